"""Exact counts for Whisper and GPT-2: parameters, inference memory, FLOPs.

Everything here is a formula on the model's dimensions; nothing is built. The
tests (tests/test_counting_whisper.py) check each formula against models
openai-whisper and transformers instantiate, and against what PyTorch
measures while they run.

Dimensions use openai-whisper's field names (`whisper.model.ModelDimensions`):
n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_vocab,
n_text_ctx, n_text_state, n_text_head, n_text_layer. Any object with those
attributes, or a mapping with those keys, will do.

Notation: T = n_audio_ctx = 1,500 encoder positions for a 30 s clip (3,000 mel
frames, halved by the stride-2 convolution), d the width (encoder and decoder
share it in every released model), h heads, f = 4d the MLP hidden size, A the
audio positions the decoder's cross-attention reads (A = T), V the vocabulary.

Parameters (what ``named_parameters()`` counts)
-----------------------------------------------
- stem: conv1 (n_mels -> d, kernel 3) and conv2 (d -> d, kernel 3, stride 2),
  both with biases: 3 d n_mels + d + 3 d^2 + d.
- encoder positions: **zero**. Whisper's encoder positions are fixed sinusoids
  registered as a *buffer*, not a parameter (T d = 1,536,000 numbers for
  medium, saved in the checkpoint but never trained).
- attention: query, value and out have biases, key has none: 4 d^2 + 3 d.
- encoder block: attention + MLP (8 d^2 + 5 d) + two LayerNorms (4 d) = 12 d^2 + 12 d.
- decoder block: self- and cross-attention, MLP, three LayerNorms = 16 d^2 + 17 d.
- decoder: token embedding V d, learned positions n_text_ctx d, blocks, final
  LayerNorm. The output projection is the token embedding transposed (tied):
  no parameters of its own.
"""
from __future__ import annotations

from collections.abc import Mapping

from tiny_mm.whisper import WhisperDims  # the model's own config: one definition of the ten sizes

__all__ = [
    "WhisperDims",
    "WHISPER_DIMS",
    "GPT2_SIZES",
    "whisper_params",
    "whisper_memory",
    "whisper_flops",
    "gpt2_params",
]


# ANCHOR: dims
def _release(
    n_mels: int, d: int, heads: int, layers: int, vocab: int, text_layers: int | None = None
) -> WhisperDims:
    """A released model's dims: 30 s windows (1,500 audio positions), 448 text positions."""
    text_layers = layers if text_layers is None else text_layers
    return WhisperDims(n_mels, 1500, d, heads, layers, vocab, 448, d, heads, text_layers)


# The released multilingual models (openai-whisper's checkpoints carry these dims;
# the ".en" models have n_vocab 51,864). large-v3 has 128 mel bins and one more token.
WHISPER_DIMS: dict[str, WhisperDims] = {
    "tiny": _release(80, 384, 6, 4, 51865),
    "base": _release(80, 512, 8, 6, 51865),
    "small": _release(80, 768, 12, 12, 51865),
    "medium": _release(80, 1024, 16, 24, 51865),
    "large-v2": _release(80, 1280, 20, 32, 51865),
    "large-v3": _release(128, 1280, 20, 32, 51866),
    "large-v3-turbo": _release(128, 1280, 20, 32, 51866, text_layers=4),
}
# ANCHOR_END: dims

_FIELDS = tuple(WhisperDims.__dataclass_fields__)  # n_mels ... n_text_layer


def _dims(dims: object) -> WhisperDims:
    """A WhisperDims from a dataclass/object with the fields, a mapping, or a released model's name."""
    if isinstance(dims, str):
        if dims not in WHISPER_DIMS:
            raise ValueError(f"unknown Whisper model {dims!r}; known: {', '.join(WHISPER_DIMS)}")
        return WHISPER_DIMS[dims]
    get = dims.get if isinstance(dims, Mapping) else lambda name: getattr(dims, name, None)
    values = {name: get(name) for name in _FIELDS}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"dims lacks {', '.join(missing)} (openai-whisper's ModelDimensions fields)")
    return WhisperDims(**values)


def _check_count(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- parameters


def _attention_params(d: int) -> int:
    """query (d^2 + d), key (d^2, no bias), value (d^2 + d), out (d^2 + d)."""
    return 4 * d * d + 3 * d


def _mlp_params(d: int) -> int:
    """Linear(d, 4d) and Linear(4d, d), with biases."""
    return 8 * d * d + 5 * d


def _norm_params(d: int) -> int:
    return 2 * d


# ANCHOR: whisper_params
def whisper_params(dims: object) -> dict[str, int]:
    """Parameters of openai-whisper's `Whisper(dims)`, piece by piece, by formula.

    Returns {"total", "encoder", "decoder", "conv1", "conv2", "stem",
    "encoder_positions" (0: a buffer), "encoder_block" (one), "encoder_ln_post",
    "token_embedding", "decoder_positions", "decoder_block" (one), "decoder_ln"}.
    total = encoder + decoder; the output head is tied to token_embedding.
    """
    dm = _dims(dims)
    d, e = dm.n_audio_state, dm.n_text_state
    parts = {
        "conv1": dm.n_mels * d * 3 + d,  # Conv1d(n_mels, d, kernel_size=3)
        "conv2": d * d * 3 + d,  # Conv1d(d, d, kernel_size=3, stride=2)
        "encoder_positions": 0,  # sinusoids, register_buffer: not a parameter
        "encoder_block": 2 * _norm_params(d) + _attention_params(d) + _mlp_params(d),  # 12 d^2 + 12 d
        "encoder_ln_post": _norm_params(d),
        "token_embedding": dm.n_vocab * e,
        "decoder_positions": dm.n_text_ctx * e,  # learned: nn.Parameter
        "decoder_block": 3 * _norm_params(e) + 2 * _attention_params(e) + _mlp_params(e),  # 16 e^2 + 17 e
        "decoder_ln": _norm_params(e),
    }
    parts["stem"] = parts["conv1"] + parts["conv2"]
    encoder = parts["stem"] + dm.n_audio_layer * parts["encoder_block"] + parts["encoder_ln_post"]
    decoder = (
        parts["token_embedding"]
        + parts["decoder_positions"]
        + dm.n_text_layer * parts["decoder_block"]
        + parts["decoder_ln"]
    )
    return {"total": encoder + decoder, "encoder": encoder, "decoder": decoder, **parts}
# ANCHOR_END: whisper_params


# --------------------------------------------------------------------------- memory


# ANCHOR: whisper_memory
def whisper_memory(
    dims: object,
    *,
    dtype_bytes: int,
    text_tokens: int = 448,
    batch: int = 1,
    materialise_scores: bool = True,
) -> dict[str, int]:
    """Bytes held while Whisper transcribes one 30 s window (inference, no gradients).

    Returns (all in bytes):
      weights: every parameter at `dtype_bytes` (4 fp32, 2 fp16, 1 int8; an int8
        scheme's scales and zero points are not counted).
      mel_input: the (B, n_mels, 2T) log-mel input.
      stem_peak: conv1's output and its GELU, both (B, d, 2T): 4 B T d values
        (conv2's phase holds as much: GELU(conv1) (B, d, 2T), conv2's output and its GELU).
      encoder_attention_phase: the most one encoder block holds around its
        attention. Scores materialised (openai-whisper's plain path): block
        input, LayerNorm output, Q, K, V, the (B, h, T, T) scores and softmax
        probabilities, P @ V and its merged-heads copy, 7 B T d + 2 B h T^2
        values. (Just before, the scaled copies of Q and K live next to the
        scores alone: 7 B T d + B h T^2, less.) Fused attention
        (materialise_scores=False): no scores; the peak is at the output
        projection: input, LayerNorm output, Q, K, V, attention output, its
        projection, 7 B T d (the kernel's (B, h, T) statistics are transient).
      encoder_mlp_phase: block input, residual sum, LayerNorm output, and the
        (B, T, 4d) MLP hidden before and after GELU: 3 B T d + 2 B T f = 11 B T d.
      encoder_layer_peak: the larger of the two phases (one block at a time:
        at inference nothing is kept from earlier layers).
      encoder_peak: max(stem_peak, encoder_layer_peak); the mel input is not in it.
      audio_features: the encoder output (B, T, d), read by every decoder layer.
      kv_self: the decoder's self-attention cache, K and V of (B, text_tokens, d)
        per layer: 2 L B text_tokens d.
      kv_cross: the cross-attention K and V of the audio, (B, T, d) per layer,
        computed once per window: 2 L B T d.
      decoding: audio_features + kv_self + kv_cross (the per-token transients,
        a (B, 1, d) row per layer and (B, V) logits, are left out).
      total: weights + max(encoder_peak, decoding).

    The activation figures are exact for openai-whisper in float32 (measured by
    the tests): its `disable_sdpa()` path materialises the scores, its default
    SDPA path does not. In float16 openai-whisper upcasts LayerNorm inputs and
    the scores to float32, which adds float32 copies not counted here.
    """
    dm = _dims(dims)
    _check_count(dtype_bytes=dtype_bytes, text_tokens=text_tokens, batch=batch)
    if text_tokens > dm.n_text_ctx:
        raise ValueError(f"text_tokens {text_tokens} exceeds the decoder's context n_text_ctx {dm.n_text_ctx}")
    b, T, d, h = dtype_bytes, dm.n_audio_ctx, dm.n_audio_state, dm.n_audio_head
    e, layers = dm.n_text_state, dm.n_text_layer
    rows = batch * T  # encoder positions over the batch
    scores = 2 * batch * h * T * T if materialise_scores else 0  # scores and probabilities
    memory = {
        "weights": whisper_params(dm)["total"] * b,
        "mel_input": batch * dm.n_mels * 2 * T * b,
        "stem_peak": 4 * rows * d * b,  # conv output + GELU at 2T frames
        "encoder_attention_phase": (7 * rows * d + scores) * b,
        "encoder_mlp_phase": (3 * rows * d + 2 * rows * 4 * d) * b,
        "audio_features": rows * d * b,
        "kv_self": 2 * layers * batch * text_tokens * e * b,
        "kv_cross": 2 * layers * rows * e * b,
    }
    memory["encoder_layer_peak"] = max(memory["encoder_attention_phase"], memory["encoder_mlp_phase"])
    memory["encoder_peak"] = max(memory["stem_peak"], memory["encoder_layer_peak"])
    memory["decoding"] = memory["audio_features"] + memory["kv_self"] + memory["kv_cross"]
    memory["total"] = memory["weights"] + max(memory["encoder_peak"], memory["decoding"])
    return memory
# ANCHOR_END: whisper_memory


# --------------------------------------------------------------------------- FLOPs


# ANCHOR: whisper_flops
def whisper_flops(dims: object, *, text_tokens: int = 448, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one 30 s window, counted as FlopCounterMode counts them (2 m n k per product,
    2 x output x c_in x kernel per convolution; softmax, norms, GELU and adds not counted).

    Returns:
      stem: conv1 over 2T frames, 2 B (2T) d (3 n_mels), plus conv2 over T outputs, 2 B T d (3 d).
      encoder_layer: B (24 T d^2 + 4 T^2 d): Q, K, V, out (8 T d^2), scores and
        weighted sum (4 T^2 d), MLP (16 T d^2).
      encoder: stem + L_enc encoder_layer.
      cross_kv: the cross-attention K and V of the audio, once per window: L_dec 4 B A d^2.
      decoder_token: the last of `text_tokens` tokens decoded one at a time with the
        cache (it attends to n = text_tokens keys): L_dec B (28 d^2 + 4 d (n + A))
        plus the tied output head 2 B d V.
      decoder: cross_kv + every token from 1 to text_tokens, one at a time.
      total: encoder + decoder.
    """
    dm = _dims(dims)
    _check_count(text_tokens=text_tokens, batch=batch)
    if text_tokens > dm.n_text_ctx:
        raise ValueError(f"text_tokens {text_tokens} exceeds the decoder's context n_text_ctx {dm.n_text_ctx}")
    T, d, e, A = dm.n_audio_ctx, dm.n_audio_state, dm.n_text_state, dm.n_audio_ctx
    stem = 2 * batch * (2 * T) * d * (3 * dm.n_mels) + 2 * batch * T * d * (3 * d)
    encoder_layer = batch * (24 * T * d * d + 4 * T * T * d)

    def token(n_keys: int) -> int:
        """One decoded token attending to n_keys cached positions (itself included)."""
        per_layer = 28 * e * e + 4 * e * (n_keys + A)
        return batch * (dm.n_text_layer * per_layer + 2 * e * dm.n_vocab)

    flops = {
        "stem": stem,
        "encoder_layer": encoder_layer,
        "encoder": stem + dm.n_audio_layer * encoder_layer,
        "cross_kv": dm.n_text_layer * 4 * batch * A * e * e,
        "decoder_token": token(text_tokens),
    }
    flops["decoder"] = flops["cross_kv"] + sum(token(n) for n in range(1, text_tokens + 1))
    flops["total"] = flops["encoder"] + flops["decoder"]
    return flops
# ANCHOR_END: whisper_flops


# --------------------------------------------------------------------------- GPT-2


# ANCHOR: gpt2_params
GPT2_SIZES: dict[str, tuple[int, int]] = {  # name -> (layers, width); heads are width / 64
    "small": (12, 768),
    "medium": (24, 1024),
    "large": (36, 1280),
    "xl": (48, 1600),
}


def gpt2_params(n_layers: int, d_model: int, n_vocab: int = 50257, n_ctx: int = 1024) -> dict[str, int]:
    """Parameters of GPT-2 (transformers' GPT2Model), by formula.

    Returns {"total", "token_embedding" (wte, V d), "positions" (wpe, n_ctx d),
    "block" (one: ln_1, c_attn d -> 3d, c_proj, ln_2, MLP d -> 4d -> d, all
    with biases: 12 d^2 + 13 d), "blocks", "ln_f"}. The LM head is tied to wte,
    so GPT2LMHeadModel has the same total (counted once, as parameters() does).
    """
    _check_count(n_layers=n_layers, d_model=d_model, n_vocab=n_vocab, n_ctx=n_ctx)
    d = d_model
    parts = {
        "token_embedding": n_vocab * d,
        "positions": n_ctx * d,
        "block": 2 * _norm_params(d) + (3 * d * d + 3 * d) + (d * d + d) + _mlp_params(d),
        "ln_f": _norm_params(d),
    }
    parts["blocks"] = n_layers * parts["block"]
    total = parts["token_embedding"] + parts["positions"] + parts["blocks"] + parts["ln_f"]
    return {"total": total, **parts}
# ANCHOR_END: gpt2_params
