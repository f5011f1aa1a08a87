# Generated from solutions/ex03_whisper_params.py by `python -m tiny_mm.stubs`: fill in every NotImplementedError.
"""Exercise 3 (chapter 9): how big is Whisper, and how much memory does it need to listen?

Whisper medium has a 24-layer encoder and a 24-layer decoder, both of width
d = 1024. Before you load a checkpoint, you can work out from these numbers
alone what it holds and what it will cost to run. Write the counts as
functions of the dimensions, then answer:

  1. How many parameters does the 24-layer, d = 1024 encoder have (80 mel
     bins, 1,500 audio positions)? Careful: its positions are fixed sinusoids,
     a buffer, not a parameter.
  2. How many does the 24-layer decoder have (51,865 tokens, 448 positions)?
     Its output layer is the token embedding, transposed: tied, no new weights.
  3. How many bytes does the key/value cache take while the decoder writes
     448 tokens about one 30 s clip, in float16?
  4. GPT-2 XL (48 layers, d = 1600) has about 1.5 billion parameters. How
     does Whisper medium compare, and where do the parameters of each sit
     (embeddings against blocks)?

What to do:
  1. Fill in the four functions below: replace each `raise NotImplementedError(...)`
     with your code. The docstrings are the specification. Count what
     ``sum(p.numel() for p in model.parameters())`` counts.
  2. Grade your work:

         tinymm grade ex03

     The checks build small random Whisper encoders and decoders
     (tiny_mm.whisper) and GPT-2 models (transformers), count their
     parameters, fill a real key/value cache, and compare with your formulas.
     Medium's own sizes are built on the meta device (no memory used).

The reference solution lives in solutions/ex03_whisper_params.py
(`tinymm grade ex03 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations


def _check_positive(**sizes: int) -> None:
    """Raise ValueError unless every size is a positive int (bool is not an int here)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def encoder_params(n_layers: int, d_model: int, n_mels: int = 80, n_audio_ctx: int = 1500) -> int:
    """Parameters of Whisper's audio encoder (tiny_mm.whisper.AudioEncoder).

    The encoder: conv1 (n_mels -> d, kernel 3, bias), conv2 (d -> d, kernel 3,
    stride 2, bias), sinusoidal positions (n_audio_ctx, d), n_layers blocks,
    a final LayerNorm ln_post. A block: LayerNorm, self-attention (query,
    key, value, out: d x d each; query, value and out have a bias, key has
    none), LayerNorm, MLP d -> 4d -> d with biases.

    Count what ``named_parameters()`` counts: the sinusoidal positions are a
    buffer, so n_audio_ctx does not change the answer (it is an argument
    only so that you notice). Raise ValueError if any argument is not a
    positive int.
    """
    raise NotImplementedError(
        "ex03 (encoder_params): validate with _check_positive; add up the stem, the blocks and "
        "ln_post (the positions are a buffer: 0 parameters)"
    )


def decoder_params(n_layers: int, d_model: int, n_vocab: int = 51865, n_text_ctx: int = 448) -> int:
    """Parameters of Whisper's text decoder (tiny_mm.whisper.TextDecoder).

    The decoder: token embedding (n_vocab, d), learned positions
    (n_text_ctx, d), n_layers blocks, a final LayerNorm. A block: LayerNorm +
    causal self-attention, LayerNorm + cross-attention to the audio,
    LayerNorm + MLP d -> 4d -> d. Both attentions are built like the
    encoder's (key without bias). The output layer is the token embedding
    transposed (tied): count it once, as ``parameters()`` does.
    Raise ValueError if any argument is not a positive int.
    """
    raise NotImplementedError(
        "ex03 (decoder_params): embeddings + n_layers blocks (two attentions, three LayerNorms) + "
        "final LayerNorm"
    )


def gpt2_params(n_layers: int, d_model: int, n_vocab: int = 50257, n_ctx: int = 1024) -> int:
    """Parameters of GPT-2 with its LM head (transformers.GPT2LMHeadModel), MLP width 4 d.

    Token embedding wte (n_vocab, d), learned positions wpe (n_ctx, d),
    n_layers blocks (ln_1, c_attn d -> 3d, c_proj d -> d, ln_2, MLP
    d -> 4d -> d, every projection with a bias), final LayerNorm ln_f.
    The LM head is tied to wte: counted once, as ``parameters()`` does (it
    is the same tensor). Raise ValueError if any argument is not a positive int.
    """
    raise NotImplementedError(
        "ex03 (gpt2_params): wte + wpe + n_layers blocks + ln_f; the tied head adds nothing"
    )


def kv_cache_bytes(
    n_layers: int, d_model: int, n_tokens: int = 448, n_audio_ctx: int = 1500, dtype_bytes: int = 2
) -> int:
    """Bytes of the decoder's key/value cache after n_tokens tokens about one clip.

    Assumptions: batch 1; every element takes dtype_bytes bytes (2 for
    float16 / bfloat16, 4 for float32). In each of the n_layers decoder
    layers the cache holds
      - self-attention: K and V of every token so far, each (1, n_tokens, d);
      - cross-attention: K and V of the audio, each (1, n_audio_ctx, d),
        computed once per clip (n_audio_ctx = 1,500 for 30 s).
    Nothing else (weights, audio features, logits) is counted.
    Raise ValueError if any argument is not a positive int.
    """
    raise NotImplementedError(
        "ex03 (kv_cache_bytes): per layer, K and V for the tokens and K and V for the audio, each "
        "of width d"
    )
