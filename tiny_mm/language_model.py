"""A tiny GPT-style language model over the shapes captions, pretrained then frozen (chapter 8).

Chapter 8 connects an image encoder to a language model that was trained on
text alone and is never changed again. This is that language model, small
enough to pretrain in seconds on a CPU:

    ids (B, L)  --token_embedding-->  (B, L, d)          word vectors
    insert prefix (B, P, d)           (B, P + L, d)      optional soft prompt (LLaVA, BLIP-2),
                                                         before word `prefix_position`
    + positional_embedding[:P + L]    (B, P + L, d)      learned positions
    layer_hook(0, x), block 0, layer_hook(1, x), block 1, ...   causal pre-LN blocks;
                                                         Flamingo's gated layers sit in the hooks
    ln_final, @ token_embedding^T     (B, P + L, V)      tied output head: logits

Two doors let an adapter in without touching a single weight:

- ``prefix``: vectors placed among the words (before word ``prefix_position``),
  in the space of the word embeddings (a "soft prompt"). LLaVA puts projected
  patch features there, BLIP-2 projected Q-Former outputs.
- ``layer_hook(i, x) -> x``: called on the residual stream before block i.
  Flamingo inserts its gated cross-attention layers there.

`pretrain_lm` trains it on shapes captions (next-word prediction, text only),
alone or after their attribute words (`text_stream`);
`freeze` switches off its gradients for good.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.data.shapes import ShapeObject, ShapesConfig, ShapesDataset
from tiny_mm.data.words import BOS, PAD, shapes_vocab
from tiny_mm.layers import TransformerBlock

__all__ = ["LMConfig", "TinyLM", "LayerHook", "next_word_loss", "STREAMS", "attribute_words", "text_stream", "pretrain_lm", "freeze", "count_parameters"]

# The hook's type: (index of the block about to run, residual stream (B, L, d)) -> (B, L, d).
LayerHook = Callable[[int, Tensor], Tensor]


# ANCHOR: LMConfig
@dataclass(frozen=True)
class LMConfig:
    """Sizes of the tiny language model.

    vocab_size: V (45: `shapes_vocab()`).
    context_length: positions in the table; a prefix plus a caption must fit
        (LLaVA's prefix here is 17 image tokens, a caption at most 11 words).
    width, layers, heads: d, depth, heads (d divisible by heads).
    mlp_ratio: the MLP's hidden size is int(d * mlp_ratio).
    """

    vocab_size: int = 45
    context_length: int = 32
    width: int = 64
    layers: int = 4
    heads: int = 2
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "width", "layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
# ANCHOR_END: LMConfig


# ANCHOR: TinyLM
class TinyLM(nn.Module):
    """Decoder-only transformer: word embeddings, learned positions, causal blocks, tied head.

    Shapes: forward(ids (B, L) int64, prefix (B, P, d) or None, layer_hook or None,
        prefix_position k) -> logits (B, P + L, V): the sequence is
        [words before k ; prefix ; words from k on], one logit row per position.
    """

    def __init__(self, config: LMConfig = LMConfig()) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.context_length, d))  # (Lmax, d)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.heads, config.mlp_ratio, causal=True) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # GPT-2's scale: tied logits start near 0

    def embed(self, ids: Tensor) -> Tensor:
        """Word vectors of ids (B, L) -> (B, L, d), without positions: the space a prefix lives in."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an int64 tensor of shape (B, L), got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.config.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return self.token_embedding(ids)  # (B, L, d)

    def forward(
        self,
        ids: Tensor,
        prefix: Tensor | None = None,
        layer_hook: LayerHook | None = None,
        prefix_position: int = 0,
    ) -> Tensor:
        x = self.embed(ids)  # (B, L, d)
        if prefix is not None:
            if prefix.dim() != 3 or prefix.shape[0] != ids.shape[0] or prefix.shape[2] != self.config.width:
                raise ValueError(
                    f"prefix must have shape (B, P, d) = ({ids.shape[0]}, P, {self.config.width}), "
                    f"got {tuple(prefix.shape)}"
                )
            if not 0 <= prefix_position <= ids.shape[1]:
                raise ValueError(f"prefix_position must lie in [0, L] = [0, {ids.shape[1]}], got {prefix_position}")
            k = prefix_position  # the prefix goes before word k: after <bos> for k = 1
            x = torch.cat([x[:, :k], prefix.to(x.dtype), x[:, k:]], dim=1)  # (B, P + L, d)
        length = x.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"prefix + ids are {length} positions, more than context_length {self.config.context_length}")
        x = x + self.positional_embedding[:length]  # (B, P + L, d)
        for i, block in enumerate(self.blocks):
            if layer_hook is not None:
                x = layer_hook(i, x)  # (B, P + L, d): an adapter's chance to read the image
            x = block(x)  # (B, P + L, d), causal
        x = self.ln_final(x)  # (B, P + L, d)
        return x @ self.token_embedding.weight.T  # (B, P + L, V): the output head is the embedding
# ANCHOR_END: TinyLM


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once), or only those with requires_grad."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ANCHOR: next_word_loss
def next_word_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ids[:, t + 1] from position t; padding is left out.

    logits: (B, L, V), the positions of the words only (a prefix sliced off).
    ids: (B, L) int64, ``<bos> w1 ... <eos> <pad> ...``.
    """
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"logits (B, L, V) and ids (B, L) must agree, got {tuple(logits.shape)} and {tuple(ids.shape)}")
    targets = ids[:, 1:]  # (B, L - 1): the next word at every position
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD
    )
# ANCHOR_END: next_word_loss


def freeze(model: nn.Module) -> nn.Module:
    """Switch off every gradient of model and put it in eval mode; returns model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ANCHOR: text_stream
STREAMS = ("captions", "context")


def attribute_words(obj: ShapeObject) -> list[list[str]]:
    """The attributes of one shape as words, one group per attribute: [["small"], ["red"], ["circle"], ["top", "left"]]."""
    return [[obj.size], [obj.colour], [obj.shape], obj.position.split()]


def text_stream(captions: int, kind: str = "captions", *, context_fraction: float = 0.8, seed: int = 0) -> Tensor:
    """One long stream of token ids (T,) for pretraining: `captions` canonical captions, each <bos> ... <eos>.

    kind "captions": ``<bos> a small red circle on the left <eos> <bos> ...``. Size, colour,
        shape and position are drawn independently, so nothing earlier in the stream
        ever helps predict a caption's attribute words.
    kind "context": a fraction `context_fraction` of the captions is preceded, after its
        <bos>, by its four attributes in a random order, ``<bos> circle left red small a
        small red circle on the left <eos>``, the rest are plain. Here the context
        predicts the caption, as earlier text does in real text, so the model learns to
        read it. The context sits after <bos>, where `PrefixLM` puts an image.
    """
    if isinstance(captions, bool) or not isinstance(captions, int) or captions < 1:
        raise ValueError(f"captions must be a positive int, got {captions!r}")
    if kind not in STREAMS:
        raise ValueError(f"kind must be one of {STREAMS}, got {kind!r}")
    if not 0.0 <= context_fraction <= 1.0:
        raise ValueError(f"context_fraction must lie in [0, 1], got {context_fraction!r}")
    vocab = shapes_vocab()
    data = ShapesDataset(captions, ShapesConfig(captions="canonical"), seed=seed + 1000)
    rng = random.Random(seed)
    tokens: list[int] = []
    for k in range(captions):
        example = data.sample(k)
        ids = vocab.encode_one(example.caption)  # [BOS, words..., EOS]
        if kind == "context" and rng.random() < context_fraction:
            groups = attribute_words(example.objects[0])
            rng.shuffle(groups)  # the order carries nothing: the model must read the words themselves
            ids = [BOS, *(vocab.stoi[w] for g in groups for w in g), *ids[1:]]
        tokens.extend(ids)
    return torch.tensor(tokens)  # (T,)
# ANCHOR_END: text_stream


# ANCHOR: pretrain_lm
def pretrain_lm(
    config: LMConfig = LMConfig(),
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    captions: int = 2000,
    seed: int = 0,
    stream: str = "captions",
    context_fraction: float = 0.8,
) -> tuple[TinyLM, list[float]]:
    """Train a `TinyLM` on a stream of canonical shapes captions (text only), then freeze it.

    The captions come from `ShapesDataset` (canonical wording, one object) with
    its own seed; no image is ever rendered. `stream` picks the text (see
    `text_stream`): "captions" alone, or "context", where a fraction
    `context_fraction` of the captions follow their attribute words. As a real language model is, it is trained on
    one long stream cut into windows of context_length tokens at random
    offsets, so every position of the table learns to carry text: a caption
    that starts after a 17-vector prefix is then as familiar as one that starts
    at position 0. AdamW with a cosine decay.

    Returns (frozen model in eval mode, loss of every step).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("captions", captions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    vocab = shapes_vocab()
    if config.vocab_size != len(vocab):
        raise ValueError(f"config.vocab_size {config.vocab_size} != the shapes vocabulary's {len(vocab)}")
    tokens = text_stream(captions, stream, context_fraction=context_fraction, seed=seed)  # (T,)
    window = config.context_length
    if len(tokens) <= window:
        raise ValueError(f"{captions} captions make {len(tokens)} tokens, fewer than a window of {window}")
    torch.manual_seed(seed)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(window)  # (C,)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(len(tokens) - window, (batch_size,), generator=generator)  # (b,)
        batch = tokens[starts[:, None] + offsets]  # (b, C): windows of the stream
        loss = next_word_loss(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return freeze(model), losses
# ANCHOR_END: pretrain_lm


if __name__ == "__main__":  # a quick look: python -m tiny_mm.language_model
    start = time.perf_counter()
    lm, curve = pretrain_lm()
    print(f"pretrained {count_parameters(lm):,} parameters in {time.perf_counter() - start:.1f} s; "
          f"loss {curve[0]:.3f} -> {curve[-1]:.3f}")
