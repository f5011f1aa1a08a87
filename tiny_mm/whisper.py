"""Whisper: an audio encoder and a text decoder that reads it through cross-attention.

    embed_audio  mel (B, n_mels, 2 n_audio_ctx) -> (B, n_audio_ctx, n_audio_state)
    logits       tokens (B, L), audio features  -> (B, L, n_vocab)
    forward      both at once

The encoder, step by step:

    conv1 (kernel 3, padding 1) + GELU    (B, n_mels, 2 T) -> (B, d, 2 T)
    conv2 (kernel 3, stride 2) + GELU     -> (B, d, T)      halves the frame rate: 100 -> 50 per second
    transpose, + sinusoidal positions     -> (B, T, d)      fixed, not learned
    pre-LayerNorm blocks                  -> (B, T, d)      self-attention sees every frame
    ln_post                               -> (B, T, d)

The decoder:

    token_embedding + positional_embedding  (B, L) ids -> (B, L, d)   learned positions
    blocks: causal self-attention, cross-attention to the audio, MLP  -> (B, L, d)
    ln, then @ token_embedding.weight.T                               -> (B, L, n_vocab)

The output layer is the token embedding itself (tied weights): there is no
separate unembedding matrix and no bias.

Parameter names are openai-whisper's (``encoder.conv1``, ``blocks.{i}.attn.query``,
``cross_attn_ln``, ``mlp.0`` ...), so its ``model_state_dict`` loads with strict
keys; `tiny_mm.checkpoints.load_whisper` reads checkpoint files. Generation
(`greedy_decode`) keeps a key/value cache (`KVCache`) so each new token costs
one position's work instead of the whole prefix's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.attention import merge_heads, split_heads

__all__ = [
    "WhisperDims", "SpecialTokens", "special_tokens", "transcribe_prompt", "sinusoids",
    "AttentionCache", "KVCache", "WhisperAttention", "ResidualAttentionBlock",
    "AudioEncoder", "TextDecoder", "Whisper", "GreedyResult", "greedy_decode",
]


# ANCHOR: WhisperDims
@dataclass(frozen=True)
class WhisperDims:
    """Every size of a Whisper model, under openai-whisper's ``ModelDimensions`` names.

    n_mels: mel bins of the input spectrogram (80; 128 for large-v3).
    n_audio_ctx: encoder positions T (1500 = 30 s at 50 frames per second);
        the mel input has 2 T frames, halved by conv2's stride.
    n_audio_state, n_audio_head, n_audio_layer: encoder width d, heads, blocks.
    n_vocab: rows of the token embedding (51865 multilingual, 51864 English-only).
    n_text_ctx: decoder positions (448).
    n_text_state, n_text_head, n_text_layer: decoder width, heads, blocks.

    Defaults are the "tiny" model's.
    """

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        for state, head in (("n_audio_state", "n_audio_head"), ("n_text_state", "n_text_head")):
            if getattr(self, state) % getattr(self, head):
                raise ValueError(
                    f"{state} {getattr(self, state)} must be divisible by {head} {getattr(self, head)}"
                )
        # sinusoids() splits the width into sin and cos halves of at least two frequencies each.
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            raise ValueError(f"n_audio_state must be even and >= 4 (sin/cos halves), got {self.n_audio_state}")
        if self.n_audio_state != self.n_text_state:
            # Cross-attention projects the audio with (d, d) key/value matrices, as whisper does.
            raise ValueError(
                f"n_audio_state ({self.n_audio_state}) must equal n_text_state ({self.n_text_state}): "
                "the cross-attention's key and value projections are square"
            )

    @classmethod
    def from_mapping(cls, dims: Mapping[str, int]) -> WhisperDims:
        """From a checkpoint's ``dims`` dict (or a ModelDimensions' ``vars()``): exactly the ten fields."""
        if not isinstance(dims, Mapping):
            raise ValueError(f"dims must be a mapping of the ten sizes, got {type(dims).__name__}")
        names = {f.name for f in fields(cls)}
        missing, unexpected = sorted(names - set(dims)), sorted(set(dims) - names)
        if missing or unexpected:
            raise ValueError(f"dims do not match WhisperDims: missing {missing}, unexpected {unexpected}")
        return cls(**{name: dims[name] for name in names})
# ANCHOR_END: WhisperDims


# ---------------------------------------------------------------------------------------------
# Special tokens
# ---------------------------------------------------------------------------------------------

# ANCHOR: special_tokens
@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's special tokens for one vocabulary size (see `special_tokens`)."""

    eot: int  # <|endoftext|>
    sot: int  # <|startoftranscript|>
    first_language: int  # <|en|>: English is the first of the languages
    num_languages: int
    translate: int
    transcribe: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int  # <|0.00|>; 1501 timestamps in 0.02 s steps follow

    @property
    def en(self) -> int:
        return self.first_language


def special_tokens(n_vocab: int) -> SpecialTokens:
    """Whisper's special-token ids, from the layout of its vocabulary (no tokenizer file read).

    The special tokens come right after the byte-pair vocabulary, in this order:
    <|endoftext|>, <|startoftranscript|>, one token per language (English
    first), <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
    <|nospeech|>, <|notimestamps|>, then 1501 timestamps <|0.00|> ... <|30.00|>.
    Multilingual models (n_vocab >= 51865) have 50257 byte-pair tokens, the
    English-only ones GPT-2's 50256; so n_vocab fixes the number of languages
    (99, or 100 for large-v3's 51866) and with it every id. The tests check
    these ids against openai-whisper's tokenizer.
    """
    multilingual = n_vocab >= 51865
    base = 50257 if multilingual else 50256
    num_languages = n_vocab - base - 2 - 6 - 1501  # the rest of the specials are fixed in number
    if num_languages < 1:
        raise ValueError(f"n_vocab {n_vocab} is too small for Whisper's special tokens (needs >= {base + 1510})")
    translate = base + 2 + num_languages
    return SpecialTokens(
        eot=base,
        sot=base + 1,
        first_language=base + 2,
        num_languages=num_languages,
        translate=translate,
        transcribe=translate + 1,
        no_speech=translate + 4,  # after <|startoflm|> and <|startofprev|>
        no_timestamps=translate + 5,
        timestamp_begin=translate + 6,
    )


def transcribe_prompt(n_vocab: int) -> list[int]:
    """The prompt for English transcription without timestamps.

    Multilingual models: <|startoftranscript|><|en|><|transcribe|><|notimestamps|>.
    English-only models know no language or task: <|startoftranscript|><|notimestamps|>.
    """
    ids = special_tokens(n_vocab)
    if n_vocab >= 51865:
        return [ids.sot, ids.en, ids.transcribe, ids.no_timestamps]
    return [ids.sot, ids.no_timestamps]
# ANCHOR_END: special_tokens


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

# ANCHOR: sinusoids
def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """The encoder's fixed positions: (length, channels), sin in the first half, cos in the second.

    Frequency k of the channels // 2 is max_timescale ** (-k / (channels // 2 - 1)),
    from 1 down to 1 / max_timescale. Computed in float32 with whisper's order of
    operations, so a fresh model's buffer equals openai-whisper's bit for bit (in
    float64 the angles at position 1499 would differ by ~1e-4; checkpoints store
    the buffer anyway).
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"channels must be even and >= 4, got {channels}")
    step = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-step * torch.arange(channels // 2))  # (channels/2,) float32
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, channels/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (length, channels)
# ANCHOR_END: sinusoids


@dataclass
class AttentionCache:
    """Keys and values one attention layer has computed: each (B, L, d), None before the first call."""

    k: Tensor | None = None
    v: Tensor | None = None


class KVCache:
    """The decoder's key/value cache: per block, one AttentionCache for self- and one for cross-attention.

    Self-attention caches grow by the new positions at every call; cross-attention
    caches are filled by the first call (the audio's keys and values never change)
    and only read afterwards.
    """

    def __init__(self, n_layer: int) -> None:
        self.self_attn = [AttentionCache() for _ in range(n_layer)]
        self.cross_attn = [AttentionCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions already decoded (the next token's position)."""
        k = self.self_attn[0].k
        return 0 if k is None else k.shape[1]


# ANCHOR: WhisperAttention
class WhisperAttention(nn.Module):
    """Multi-head attention with whisper's parameter names: query, key (no bias), value, out.

    The key projection has no bias because a bias on keys adds the same amount
    to every score of a query row, which softmax cancels.

    Shapes: forward(x (B, Lq, d), xa (B, Lk, d) or None) -> (B, Lq, d).
        xa None: self-attention over x; with ``causal``, query i sees keys j <= i.
        xa given: cross-attention, queries from x, keys and values from xa.
    """

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(
        self, x: Tensor, xa: Tensor | None = None, *, causal: bool = False, cache: AttentionCache | None = None
    ) -> Tensor:
        """cache: self-attention appends this call's keys/values to it and attends to all of them;
        cross-attention fills it on the first call and reuses it afterwards (xa is then ignored)."""
        q = self.query(x)  # (B, Lq, d)
        if xa is not None and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # (B, Lk, d): the audio's keys and values, computed once
        else:
            source = x if xa is None else xa
            k, v = self.key(source), self.value(source)  # (B, Lk, d)
            if xa is None and cache is not None and cache.k is not None:
                k = torch.cat([cache.k, k], dim=1)  # (B, past + Lq, d)
                v = torch.cat([cache.v, v], dim=1)  # (B, past + Lq, d)
            if cache is not None:
                cache.k, cache.v = k, v
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, H, L, Dh) each
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        if causal:
            # The Lq new queries are the last positions: query i sits at past + i and sees keys j <= past + i.
            past = k.shape[2] - q.shape[2]
            rows = torch.arange(q.shape[2], device=q.device)[:, None] + past  # (Lq, 1)
            cols = torch.arange(k.shape[2], device=q.device)[None, :]  # (1, Lk)
            scores = scores.masked_fill(cols > rows, float("-inf"))  # (B, H, Lq, Lk)
        weights = torch.softmax(scores, dim=-1)  # (B, H, Lq, Lk)
        return self.out(merge_heads(weights @ v))  # (B, Lq, d)
# ANCHOR_END: WhisperAttention


# ANCHOR: ResidualAttentionBlock
class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, [cross-attention to the audio], MLP, each residual.

        x = x + attn(attn_ln(x))
        x = x + cross_attn(cross_attn_ln(x), xa)      decoder blocks only
        x = x + mlp(mlp_ln(x))                        mlp: Linear(d, 4d), GELU, Linear(4d, d)

    Shapes: forward(x (B, L, d), xa (B, T, d) or None) -> (B, L, d).
    """

    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.attn = WhisperAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = WhisperAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        # nn.Sequential so the keys are whisper's mlp.0 / mlp.2 (mlp.1 is the GELU, no weights).
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(
        self,
        x: Tensor,
        xa: Tensor | None = None,
        *,
        causal: bool = False,
        self_cache: AttentionCache | None = None,
        cross_cache: AttentionCache | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_ln(x), causal=causal, cache=self_cache)  # (B, L, d)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), xa, cache=cross_cache)  # (B, L, d)
        return x + self.mlp(self.mlp_ln(x))  # (B, L, d)
# ANCHOR_END: ResidualAttentionBlock


# ANCHOR: AudioEncoder
class AudioEncoder(nn.Module):
    """Log-mel spectrogram -> audio features.

    Shapes: forward(mel (B, n_mels, 2 n_audio_ctx)) -> (B, n_audio_ctx, n_audio_state).
    The input length is fixed: the positional table has exactly n_audio_ctx rows
    (whisper pads or trims every clip to 30 s).
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_audio_state
        self.n_mels, self.n_ctx = dims.n_mels, dims.n_audio_ctx
        self.conv1 = nn.Conv1d(dims.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)  # 2T frames -> T
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, d))  # (T, d), saved
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(d, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        self.ln_post = nn.LayerNorm(d)

    def forward(self, mel: Tensor) -> Tensor:
        expected = (self.n_mels, 2 * self.n_ctx)
        if not isinstance(mel, Tensor) or mel.dim() != 3 or tuple(mel.shape[1:]) != expected:
            shape = tuple(mel.shape) if isinstance(mel, Tensor) else type(mel).__name__
            raise ValueError(f"mel must have shape (B, {expected[0]}, {expected[1]}), got {shape}")
        if not mel.is_floating_point():
            raise ValueError(f"mel must be a floating-point tensor, got dtype {mel.dtype}")
        x = F.gelu(self.conv1(mel))  # (B, d, 2T)
        x = F.gelu(self.conv2(x))  # (B, d, T)
        x = x.transpose(1, 2) + self.positional_embedding  # (B, T, d)
        for block in self.blocks:
            x = block(x)  # (B, T, d)
        return self.ln_post(x)  # (B, T, d)
# ANCHOR_END: AudioEncoder


# ANCHOR: TextDecoder
class TextDecoder(nn.Module):
    """Token ids and audio features -> next-token logits at every position.

    Shapes: forward(tokens (B, L) int, xa (B, T, d), cache) -> (B, L, n_vocab).
    With a `KVCache`, tokens are the L *new* positions after cache.length old
    ones: they get positions cache.length ... cache.length + L - 1 and attend
    to the cached keys and values too.
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        d = dims.n_text_state
        self.n_vocab, self.n_ctx, self.n_state = dims.n_vocab, dims.n_text_ctx, d
        self.token_embedding = nn.Embedding(dims.n_vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, d))  # learned, (n_text_ctx, d)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(d, dims.n_text_head, cross_attention=True) for _ in range(dims.n_text_layer)
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, tokens: Tensor, xa: Tensor, cache: KVCache | None = None) -> Tensor:
        offset = 0 if cache is None else cache.length
        self._check(tokens, xa, offset)
        positions = self.positional_embedding[offset : offset + tokens.shape[1]]  # (L, d): after the cached ones
        x = self.token_embedding(tokens) + positions  # (B, L, d)
        for i, block in enumerate(self.blocks):
            self_cache = None if cache is None else cache.self_attn[i]
            cross_cache = None if cache is None else cache.cross_attn[i]
            x = block(x, xa, causal=True, self_cache=self_cache, cross_cache=cross_cache)  # (B, L, d)
        x = self.ln(x)  # (B, L, d)
        return x @ self.token_embedding.weight.T  # (B, L, n_vocab): tied output layer

    def _check(self, tokens: Tensor, xa: Tensor, offset: int) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] == 0:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must have shape (B, L) with L >= 1, got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64 or int32 ids, got dtype {tokens.dtype}")
        if offset + tokens.shape[1] > self.n_ctx:
            raise ValueError(
                f"{offset} cached + {tokens.shape[1]} new tokens exceed the decoder's {self.n_ctx} positions"
            )
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_vocab:
            low, high = int(tokens.min()), int(tokens.max())
            raise ValueError(f"token ids must lie in [0, {self.n_vocab}), got values in [{low}, {high}]")
        if not isinstance(xa, Tensor) or xa.dim() != 3 or xa.shape[-1] != self.n_state:
            shape = tuple(xa.shape) if isinstance(xa, Tensor) else type(xa).__name__
            raise ValueError(f"audio features must have shape (B, T, {self.n_state}), got {shape}")
        if xa.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"tokens and audio features need one batch size, got {tokens.shape[0]} and {xa.shape[0]}"
            )
# ANCHOR_END: TextDecoder


# ANCHOR: Whisper
class Whisper(nn.Module):
    """The encoder-decoder. Shapes: forward(mel (B, n_mels, 2 T), tokens (B, L)) -> (B, L, n_vocab)."""

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        if not isinstance(dims, WhisperDims):
            raise ValueError(
                f"dims must be a WhisperDims (see WhisperDims.from_mapping), got {type(dims).__name__}"
            )
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """(B, n_mels, 2 T) -> (B, T, d)."""
        return self.encoder(mel)

    def logits(self, tokens: Tensor, audio_features: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, L) ids, (B, T, d) -> (B, L, n_vocab)."""
        return self.decoder(tokens, audio_features, cache)

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        return self.decoder(tokens, self.encoder(mel))  # (B, L, n_vocab)

    def new_cache(self) -> KVCache:
        return KVCache(self.dims.n_text_layer)
# ANCHOR_END: Whisper


# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------

@dataclass
class GreedyResult:
    """tokens: (B, P + S) the prompt then S generated ids; after a sequence's first eot, eot repeats.
    logits: (B, S, n_vocab) the logits each generated token was picked from."""

    tokens: Tensor
    logits: Tensor


# ANCHOR: greedy_decode
@torch.no_grad()
def greedy_decode(
    model: Whisper,
    audio_features: Tensor,
    prompt: list[int] | Tensor,
    *,
    max_new_tokens: int = 100,
    eot: int | None = None,
    use_cache: bool = True,
) -> GreedyResult:
    """Pick the most likely next token until every sequence has produced eot, or max_new_tokens.

    audio_features: (B, T, d) from `Whisper.embed_audio`, computed once.
    prompt: P ids shared by the batch (e.g. `transcribe_prompt`) or a (B, P) tensor.
    eot: the end token (default: <|endoftext|> of the model's vocabulary).
    use_cache: True feeds the decoder only the newest token each step and keeps
        keys/values in a `KVCache`; False recomputes the whole prefix every step
        (the slow reference the tests compare with). Both give the same tokens.
    Generation also stops when the decoder's n_text_ctx positions are full.
    """
    batch = audio_features.shape[0]
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=audio_features.device)
    if tokens.dim() == 1:
        tokens = tokens[None, :].expand(batch, -1)  # (B, P)
    if tokens.dim() != 2 or tokens.shape[0] != batch or tokens.shape[1] == 0:
        raise ValueError(f"prompt must be P >= 1 ids or a ({batch}, P) tensor, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] >= model.dims.n_text_ctx:
        raise ValueError(
            f"a prompt of {tokens.shape[1]} ids leaves none of the {model.dims.n_text_ctx} positions free"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eot = special_tokens(model.dims.n_vocab).eot if eot is None else eot
    steps = min(max_new_tokens, model.dims.n_text_ctx - tokens.shape[1])
    cache = model.new_cache() if use_cache else None

    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)  # (B,)
    step_logits = []
    new = tokens  # what the decoder has not seen yet: the prompt, then one token per step
    for _ in range(steps):
        logits = model.logits(new if use_cache else tokens, audio_features, cache)[:, -1]  # (B, n_vocab)
        step_logits.append(logits)
        next_token = torch.where(done, eot, logits.argmax(dim=-1))  # (B,): finished sequences pad with eot
        done = done | (next_token == eot)
        new = next_token[:, None]  # (B, 1)
        tokens = torch.cat([tokens, new], dim=1)  # (B, P + step + 1)
        if bool(done.all()):
            break
    return GreedyResult(tokens=tokens, logits=torch.stack(step_logits, dim=1))  # (B, P + S), (B, S, V)
# ANCHOR_END: greedy_decode
