"""A DALL·E-style generator in miniature: a decoder-only transformer that writes image tokens after a caption.

DALL·E 1 (Ramesh et al. 2021) treats an image as text in a foreign language:
a discrete autoencoder writes it as a row of codebook ids, and a GPT-style
transformer learns to continue a caption with those ids. Here the tokenizer is
`tiny_mm.vqvae.VQVAE` (64 ids per 32 x 32 image) and the caption is
word ids from `tiny_mm.data.words.shapes_vocab()`:

    sequence     [<bos> w1 ... wn <eos> <pad> ... | c_0 c_1 ... c_{N-1}]
                  T text positions (padded to T)     N image tokens
    embeddings   a word table (V, d) for the text, a code table (K, d) for the
                 image: two vocabularies, two tables, so an image id never needs an
                 offset past the words; one learned position table (T + N, d)
    blocks       tiny_mm.layers.TransformerBlock(causal=True): position i reads j <= i
    heads        image_head (d -> K) on the positions that predict a code,
                 text_head (d -> V) on those that predict the next word
    loss         cross-entropy of each code given the caption and the codes before it
                 (plus, with text_weight > 0, of each word given the words before it)
    generate     N steps: sample code i from the logits at position T - 1 + i, with
                 temperature and top-k, feed it back; a key/value cache keeps the
                 earlier positions' keys and values, so each step computes one position

Padding. DALL·E pads every caption to a fixed length, so image token i always
sits at position T + i. The <pad> words are read like any other word (the
model learns what they mean: nothing); they are only left out of the text loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.attention import merge_heads, scaled_dot_product_attention, split_heads
from tiny_mm.data.words import PAD
from tiny_mm.layers import TransformerBlock
from tiny_mm.training import load_sized_model, save_sized_model

__all__ = [
    "DalleConfig",
    "DalleLogits",
    "KVCache",
    "block_with_cache",
    "TinyDalle",
    "dalle_loss",
    "next_token_probs",
    "sample_next_token",
    "Sampled",
    "generate",
    "save_dalle",
    "load_dalle",
]


# ANCHOR: DalleConfig
@dataclass(frozen=True)
class DalleConfig:
    """Sizes of the generator.

    text_vocab: V, word ids (45: `shapes_vocab()`).
    text_len: T, caption positions: <bos>, the words, <eos>, then <pad> (16 fits every
        one-object caption: 11 tokens at most when canonical, 16 when varied).
    num_codes: K, the VQ-VAE's codebook size.
    image_tokens: N, ids per image (64: an 8 x 8 grid).
    width, layers, heads, mlp_ratio: the transformer's d, depth, heads, MLP ratio.
    """

    text_vocab: int = 45
    text_len: int = 16
    num_codes: int = 64
    image_tokens: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_len", "num_codes", "image_tokens", "width", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.text_len < 2:
            raise ValueError(f"text_len must hold <bos> and <eos>, got {self.text_len}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")

    @property
    def max_positions(self) -> int:
        """T + N - 1: the model never reads the last code (nothing comes after it)."""
        return self.text_len + self.image_tokens - 1
# ANCHOR_END: DalleConfig


class DalleLogits(NamedTuple):
    """What `TinyDalle.forward` returns."""

    text: Tensor  # (B, T - 1, V): row t predicts word t + 1
    image: Tensor  # (B, n + 1, K): row i predicts code i


# ANCHOR: cache
@dataclass
class KVCache:
    """Each layer's keys and values (B, h, L, d/h) of the L positions computed so far."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Positions already in the cache: the position of the next token."""
        return 0 if not self.keys else self.keys[0].shape[2]


def block_with_cache(block: TransformerBlock, x: Tensor, cache: KVCache, layer: int) -> Tensor:
    """`TransformerBlock.forward` for new positions x (B, L, d) after the cached ones, with the block's own weights.

    The new positions' keys and values are appended to the cache; each new
    position reads every cached one and the new ones up to itself.
    """
    attn, h = block.attn, block.heads
    y = block.ln_1(x)  # (B, L, d)
    q = split_heads(attn.q_proj(y), h)  # (B, h, L, d/h)
    k = split_heads(attn.k_proj(y), h)  # (B, h, L, d/h)
    v = split_heads(attn.v_proj(y), h)  # (B, h, L, d/h)
    if layer < len(cache.keys):
        k = torch.cat([cache.keys[layer], k], dim=2)  # (B, h, past + L, d/h)
        v = torch.cat([cache.values[layer], v], dim=2)  # (B, h, past + L, d/h)
        cache.keys[layer], cache.values[layer] = k, v
    else:
        cache.keys.append(k)
        cache.values.append(v)
    lq, lk = q.shape[2], k.shape[2]
    rows = torch.arange(lq, device=x.device)[:, None] + (lk - lq)  # (L, 1): each new position's index
    visible = torch.arange(lk, device=x.device)[None, :] <= rows  # (L, past + L): causal, shifted by the past
    out = scaled_dot_product_attention(q, k, v, attn_mask=visible[None, None])  # (B, h, L, d/h)
    x = x + attn.out_proj(merge_heads(out))  # (B, L, d)
    return x + block.mlp(block.ln_2(x))  # (B, L, d)
# ANCHOR_END: cache


# ANCHOR: TinyDalle
class TinyDalle(nn.Module):
    """Caption ids and image codes -> logits of the next word and of the next code.

    Shapes: forward(text (B, T) long, codes (B, n) long, 0 <= n < N)
        -> DalleLogits(text (B, T - 1, V), image (B, n + 1, K)).
    image[:, i] is the distribution of code i given the caption and codes 0 .. i-1:
    teacher forcing passes codes[:, :-1] and scores all N codes at once.
    """

    def __init__(self, config: DalleConfig = DalleConfig()) -> None:
        super().__init__()
        if not isinstance(config, DalleConfig):
            raise ValueError(f"config must be a DalleConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.text_embedding = nn.Embedding(config.text_vocab, d)
        self.image_embedding = nn.Embedding(config.num_codes, d)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.max_positions, d))  # (T + N - 1, d)
        for table in (self.text_embedding, self.image_embedding):
            nn.init.normal_(table.weight, std=0.02)  # GPT-2's scale
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.heads, config.mlp_ratio, causal=True) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, config.text_vocab, bias=False)
        self.image_head = nn.Linear(d, config.num_codes, bias=False)

    def embed(self, text: Tensor | None, codes: Tensor, offset: int = 0) -> Tensor:
        """Token vectors plus positions: [text ; codes] -> (B, L, d), starting at position `offset`.

        text (B, T) or None (generation after the caption is cached); codes (B, n), n may be 0.
        """
        parts = [] if text is None else [self.text_embedding(text)]  # (B, T, d)
        parts.append(self.image_embedding(codes))  # (B, n, d)
        x = torch.cat(parts, dim=1)  # (B, L, d)
        return x + self.positional_embedding[offset : offset + x.shape[1]]  # (B, L, d)

    def forward(self, text: Tensor, codes: Tensor) -> DalleLogits:
        self._check(text, codes)
        x = self.embed(text, codes)  # (B, T + n, d)
        for block in self.blocks:
            x = block(x)  # (B, T + n, d): causal, so position i reads positions <= i only
        x = self.ln_final(x)  # (B, T + n, d)
        T = self.config.text_len
        return DalleLogits(self.text_head(x[:, : T - 1]), self.image_head(x[:, T - 1 :]))

    def step(self, text: Tensor | None, codes: Tensor, cache: KVCache) -> Tensor:
        """The cached forward: only the new tokens (the caption first, then one code at a time).

        text (B, T) on the first call (empty cache), None after; codes (B, n) the new codes.
        Returns the image logits (B, K) of the next code, from the last new position.
        """
        offset = cache.length
        if (text is None) == (offset == 0):
            raise ValueError("pass the caption on the first step (empty cache) and only then")
        if offset + codes.shape[1] + (0 if text is None else text.shape[1]) > self.config.max_positions:
            raise ValueError(f"{offset} cached positions + the new ones exceed {self.config.max_positions}")
        if text is not None:
            self._check(text, codes)
        elif codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.num_codes):
            raise ValueError(f"codes must lie in [0, {self.config.num_codes})")
        x = self.embed(text, codes, offset)  # (B, L, d)
        for i, block in enumerate(self.blocks):
            x = block_with_cache(block, x, cache, i)  # (B, L, d)
        return self.image_head(self.ln_final(x[:, -1]))  # (B, K)

    def _check(self, text: Tensor, codes: Tensor) -> None:
        c = self.config
        if not isinstance(text, Tensor) or text.dtype != torch.long or text.dim() != 2 or text.shape[1] != c.text_len:
            got = (tuple(text.shape), text.dtype) if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"text must be an int64 tensor (B, T={c.text_len}) of word ids, got {got}")
        if not isinstance(codes, Tensor) or codes.dtype != torch.long or codes.dim() != 2:
            got = (tuple(codes.shape), codes.dtype) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must be an int64 tensor (B, n), got {got}")
        if codes.shape[0] != text.shape[0]:
            raise ValueError(f"text and codes need one batch size, got {text.shape[0]} and {codes.shape[0]}")
        if codes.shape[1] >= c.image_tokens:
            raise ValueError(
                f"codes may hold at most N - 1 = {c.image_tokens - 1} ids "
                f"(teacher forcing passes codes[:, :-1]), got {codes.shape[1]}"
            )
        if int(text.min()) < 0 or int(text.max()) >= c.text_vocab:
            raise ValueError(f"word ids must lie in [0, {c.text_vocab}), got [{int(text.min())}, {int(text.max())}]")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c.num_codes):
            raise ValueError(f"codes must lie in [0, {c.num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
# ANCHOR_END: TinyDalle


# ANCHOR: loss
def dalle_loss(model: TinyDalle, text: Tensor, codes: Tensor, text_weight: float = 0.0) -> Tensor:
    """Mean cross-entropy of the N codes (B, N) given the caption (B, T), plus text_weight x that of the words.

    DALL·E 1 weighs the text 1/8 and the image 7/8; text_weight = 0 trains the
    image only (the captions are given at generation time, never written).
    Padding words are left out of the text term.
    """
    if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[1] != model.config.image_tokens:
        got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes must have shape (B, N={model.config.image_tokens}), got {got}")
    if not (math.isfinite(text_weight) and text_weight >= 0):
        raise ValueError(f"text_weight must be a finite number >= 0, got {text_weight!r}")
    logits = model(text, codes[:, :-1])  # text (B, T-1, V), image (B, N, K)
    loss = F.cross_entropy(logits.image.flatten(0, 1), codes.flatten())
    if text_weight > 0:
        loss = loss + text_weight * F.cross_entropy(logits.text.flatten(0, 1), text[:, 1:].flatten(), ignore_index=PAD)
    return loss
# ANCHOR_END: loss


# ANCHOR: sampling
def next_token_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """The distribution a temperature / top-k sampler draws from: logits (..., V) -> probs (..., V).

    top_k keeps the logits >= the k-th largest (ties at the boundary kept) and
    drops the rest; then softmax(logits / temperature). temperature 0: all mass
    on the largest logit (the first, on a tie), i.e. greedy.
    """
    if not isinstance(logits, Tensor) or logits.dim() == 0 or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point tensor (..., V)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    vocab = logits.shape[-1]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be None or an int in [1, {vocab}], got {top_k!r}")
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), vocab).to(logits.dtype)  # (..., V)
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (..., V)
    return torch.softmax(logits / temperature, dim=-1)  # (..., V): exp(-inf) = 0


def sample_next_token(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One draw per row from `next_token_probs`: logits (B, V) -> ids (B,) long."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, V), got {getattr(logits, 'shape', type(logits))}")
    probs = next_token_probs(logits.double(), temperature, top_k)  # (B, V): float64, as the reference
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
# ANCHOR_END: sampling


class Sampled(NamedTuple):
    """What `generate` returns."""

    codes: Tensor  # (B, N) long: the image tokens, for `VQVAE.decode_codes`
    logits: Tensor  # (B, N, K): the (untempered) logits each code was drawn from


# ANCHOR: generate
@torch.no_grad()
def generate(
    model: TinyDalle,
    text: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Sampled:
    """Write the N image tokens of each caption (B, T), one at a time.

    use_cache True: the caption runs once, then each step feeds only the newest
    code (`TinyDalle.step`); False: every step re-reads the whole prefix with
    `TinyDalle.forward` (the slow way the tests compare with).
    """
    next_token_probs(torch.zeros(1, model.config.num_codes), temperature, top_k)  # check the settings first
    if not isinstance(text, Tensor) or text.dim() != 2:
        raise ValueError(f"text must be a (B, T) tensor of word ids, got {getattr(text, 'shape', type(text))}")
    codes = text.new_zeros((text.shape[0], 0))  # (B, 0): no code written yet
    model._check(text, codes)
    cache = KVCache() if use_cache else None
    steps = []
    for i in range(model.config.image_tokens):
        if cache is None:
            logits = model(text, codes).image[:, -1]  # (B, K): the position that predicts code i
        elif i == 0:
            logits = model.step(text, codes, cache)  # (B, K): the caption, all at once
        else:
            logits = model.step(None, codes[:, -1:], cache)  # (B, K): just the newest code
        new = sample_next_token(logits, temperature, top_k, generator)  # (B,)
        codes = torch.cat([codes, new[:, None]], dim=1)  # (B, i + 1)
        steps.append(logits)
    return Sampled(codes, torch.stack(steps, dim=1))  # (B, N), (B, N, K)
# ANCHOR_END: generate


def save_dalle(model: TinyDalle, path: str | Path) -> None:
    """Write {"config": sizes, "state_dict": weights}; `load_dalle` reads it back."""
    save_sized_model(model, path)


def load_dalle(path: str | Path) -> TinyDalle:
    """Rebuild a `TinyDalle` saved by `save_dalle` (weights_only: the file cannot run code)."""
    return load_sized_model(path, TinyDalle, DalleConfig, "a TinyDalle")
