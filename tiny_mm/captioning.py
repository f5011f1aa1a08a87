"""Image captioning: a patch encoder, and a text decoder that reads it through cross-attention.

Chapter 6's model, in the order the chapter builds it:

    PatchEncoder   images (B, 3, S, S) -> image tokens (B, N, d)      N = (S / P)^2 patches
                   strided convolution (one linear map per patch), learned positions,
                   pre-LN TransformerBlocks that see every patch, ln_post
    DecoderLayer   x (B, L, d), image (B, N, d) -> (B, L, d)
                       x = x + self_attn(ln_1(x))           causal: word i reads words j <= i
                       x = x + cross_attn(ln_2(x), image)   every word reads every patch
                       x = x + mlp(ln_3(x))
    TextDecoder    ids (B, L) -> logits (B, L, V)
                   word embedding + learned positions, DecoderLayers, ln_final, head
    Captioner      the two together
    caption_loss   teacher forcing: predict ids[:, 1:] from ids[:, :-1], padding masked out
    generate       greedy or temperature sampling, with a key/value cache, recording
                   which patches each generated word attended to

The attention arithmetic is written out in `DecoderLayer` (with the projections
of chapter 2's `MultiHeadAttention`) rather than hidden in a module call, for
two reasons: generation keeps the keys and values of earlier words in a cache,
and the chapter shows the cross-attention probabilities themselves.

Captions are word ids from `tiny_mm.data.words.shapes_vocab()`: PAD = 0,
BOS = 1, EOS = 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention, merge_heads, scaled_dot_product_attention, split_heads
from tiny_mm.data.words import BOS, EOS, PAD
from tiny_mm.layers import MLP, TransformerBlock, mlp_hidden
from tiny_mm.training import load_sized_model, save_sized_model

__all__ = [
    "CaptionerConfig",
    "PatchEncoder",
    "LayerCache",
    "DecoderCache",
    "DecoderLayer",
    "TextDecoder",
    "Captioner",
    "teacher_forcing",
    "caption_loss",
    "Generation",
    "generate",
    "save_captioner",
    "load_captioner",
]


# ANCHOR: CaptionerConfig
@dataclass(frozen=True)
class CaptionerConfig:
    """Every size of a captioner. Defaults: the model `tinymm train captioner` trains.

    image_size, patch_size: the image side S and the patch side P (S a multiple of P);
        the encoder sees N = (S / P)^2 patch tokens.
    width: d, shared by the encoder and the decoder (cross-attention reads the
        image tokens with (d, d) key and value projections).
    heads: attention heads h in every attention (d divisible by h).
    encoder_layers, decoder_layers: blocks of each.
    mlp_ratio: the MLPs' hidden size is int(d * mlp_ratio).
    vocab_size: V, rows of the word embedding (45 for the shapes vocabulary).
    max_len: positions the decoder has (learned positions); a caption with
        <bos> and <eos> must fit.
    """

    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    mlp_ratio: float = 4.0
    vocab_size: int = 45
    max_len: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mlp_ratio":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"mlp_ratio must be a positive number, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must hold at least the 4 special tokens, got {self.vocab_size}")
        if self.max_len < 2:
            raise ValueError(f"max_len must leave room for <bos> and one word, got {self.max_len}")

    @property
    def grid_size(self) -> int:
        """Patches along one side: S / P."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N = (S / P)^2 image tokens."""
        return self.grid_size**2
# ANCHOR_END: CaptionerConfig


# --------------------------------------------------------------------------- the encoder


# ANCHOR: PatchEncoder
class PatchEncoder(nn.Module):
    """Images -> one token per patch, as chapter 3's ViT but without a class token.

    A captioner needs no single summary vector: the decoder's cross-attention
    reads all N patch tokens and picks what each word needs.

    Shapes: forward(images (B, 3, S, S)) -> (B, N, d), patches row by row.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        d, P = config.width, config.patch_size
        # Kernel = stride = P: each output pixel is one linear map of one P x P patch.
        self.patch_embed = nn.Conv2d(3, d, kernel_size=P, stride=P)
        # Positions start at the scale of what they are added to (the patch embeddings of
        # normalised images have entries of about 0.7): at ViT's usual 0.02 the blocks barely
        # see them at first, and the position words are learned hundreds of steps later.
        self.positional_embedding = nn.Parameter(0.5 * torch.randn(config.num_patches, d))  # (N, d)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.heads, config.mlp_ratio) for _ in range(config.encoder_layers)
        )
        self.ln_post = nn.LayerNorm(d)

    def forward(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        x = self.patch_embed(images)  # (B, d, S/P, S/P)
        x = x.flatten(2).transpose(1, 2) + self.positional_embedding  # (B, N, d)
        for block in self.blocks:
            x = block(x)  # (B, N, d): every patch sees every patch
        return self.ln_post(x)  # (B, N, d)
# ANCHOR_END: PatchEncoder


# --------------------------------------------------------------------------- the decoder


# ANCHOR: cache
@dataclass
class LayerCache:
    """What one decoder layer keeps between generation steps, all split into heads.

    k, v: (B, h, L, d/h) the self-attention's keys and values of the L words so
        far; each step appends the new word's.
    image_k, image_v: (B, h, N, d/h) the cross-attention's keys and values of the
        image; computed at the first step, read at every later one.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    image_k: Tensor | None = None
    image_v: Tensor | None = None


class DecoderCache:
    """One `LayerCache` per decoder layer."""

    def __init__(self, layers: int) -> None:
        self.layers = [LayerCache() for _ in range(layers)]

    @property
    def length(self) -> int:
        """Words already in the cache: the position of the next word."""
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]
# ANCHOR_END: cache


def _causal_visible(lq: int, lk: int, device: torch.device) -> Tensor:
    """bool (1, 1, Lq, Lk): True where query i may read key j.

    The Lq queries are the last Lq of the Lk positions (the earlier Lk - Lq are in
    the cache), so query i sits at position Lk - Lq + i and reads keys j <= that.
    With no cache (Lq = Lk) this is the usual lower triangle.
    """
    past = lk - lq
    rows = torch.arange(lq, device=device)[:, None] + past  # (Lq, 1): each query's position
    cols = torch.arange(lk, device=device)[None, :]  # (1, Lk)
    return (cols <= rows)[None, None]  # (1, 1, Lq, Lk)


def _check_layer_inputs(x: Tensor, image: Tensor, width: int) -> None:
    """ValueError unless x (B, L, width) and image (B, N, width) are floating tensors of one batch."""
    for name, t in (("x", x), ("image", image)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point tensor (B, L, {width}), got {shape}")
    if image.shape[0] != x.shape[0]:
        raise ValueError(f"x and image need one batch size, got {x.shape[0]} and {image.shape[0]}")


# ANCHOR: DecoderLayer
class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention, cross-attention to the image, MLP.

    Shapes: forward(x (B, L, d), image (B, N, d), cache or None)
        -> (x (B, L, d), cross-attention probabilities (B, h, L, N)).
    With a cache, x holds only the new words; their keys and values are
    appended to the cache, and the image's keys and values come from it
    (computed on the first call).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, heads)  # its q/k/v/out projections
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, heads)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))

    def forward(self, x: Tensor, image: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]:
        _check_layer_inputs(x, image, self.width)
        h = self.heads
        # 1. Causal self-attention over the words: no word reads a later one.
        sa, y = self.self_attn, self.ln_1(x)  # (B, L, d)
        q = split_heads(sa.q_proj(y), h)  # (B, h, L, d/h)
        k = split_heads(sa.k_proj(y), h)  # (B, h, L, d/h)
        v = split_heads(sa.v_proj(y), h)  # (B, h, L, d/h)
        if cache is not None:
            if cache.k is not None:
                k = torch.cat([cache.k, k], dim=2)  # (B, h, past + L, d/h)
                v = torch.cat([cache.v, v], dim=2)  # (B, h, past + L, d/h)
            cache.k, cache.v = k, v
        visible = _causal_visible(q.shape[2], k.shape[2], x.device)  # (1, 1, L, past + L)
        words = scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (B, h, L, d/h)
        x = x + sa.out_proj(merge_heads(words))  # (B, L, d)

        # 2. Cross-attention: queries from the words, keys and values from the image.
        ca = self.cross_attn
        q = split_heads(ca.q_proj(self.ln_2(x)), h)  # (B, h, L, d/h)
        if cache is not None and cache.image_k is not None:
            k, v = cache.image_k, cache.image_v  # (B, h, N, d/h): the image does not change
        else:
            k = split_heads(ca.k_proj(image), h)  # (B, h, N, d/h)
            v = split_heads(ca.v_proj(image), h)  # (B, h, N, d/h)
            if cache is not None:
                cache.image_k, cache.image_v = k, v
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, L, N)
        x = x + ca.out_proj(merge_heads(probs @ v))  # (B, L, d)

        # 3. The MLP, position by position.
        return x + self.mlp(self.ln_3(x)), probs  # (B, L, d), (B, h, L, N)
# ANCHOR_END: DecoderLayer


# ANCHOR: TextDecoder
class TextDecoder(nn.Module):
    """Word ids and image tokens -> next-word logits at every position.

    Shapes: forward(ids (B, L), image (B, N, d), cache or None)
        -> (logits (B, L, V), cross-attention (B, layers, h, L, N)).
    With a cache, ids are only the new words; their positions continue after
    the cached ones.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.max_len, d))  # (max_len, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, config.heads, config.mlp_ratio) for _ in range(config.decoder_layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)

    def forward(self, ids: Tensor, image: Tensor, cache: DecoderCache | None = None) -> tuple[Tensor, Tensor]:
        offset = 0 if cache is None else cache.length
        self._check(ids, image, offset)
        x = self.token_embedding(ids) + self.positional_embedding[offset : offset + ids.shape[1]]  # (B, L, d)
        maps = []
        for i, layer in enumerate(self.layers):
            x, probs = layer(x, image, None if cache is None else cache.layers[i])  # (B, L, d), (B, h, L, N)
            maps.append(probs)
        return self.head(self.ln_final(x)), torch.stack(maps, dim=1)  # (B, L, V), (B, layers, h, L, N)

    def _check(self, ids: Tensor, image: Tensor, offset: int) -> None:
        c = self.config
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must have shape (B, L) with L >= 1, got {shape}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be int64 or int32 word ids, got dtype {ids.dtype}")
        if offset + ids.shape[1] > c.max_len:
            raise ValueError(f"{offset} cached + {ids.shape[1]} new words exceed the decoder's {c.max_len} positions")
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise ValueError(f"word ids must lie in [0, {c.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[-1] != c.width:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image tokens must have shape (B, N, {c.width}), got {shape}")
        if image.shape[0] != ids.shape[0]:
            raise ValueError(f"ids and image tokens need one batch size, got {ids.shape[0]} and {image.shape[0]}")
# ANCHOR_END: TextDecoder


# ANCHOR: Captioner
class Captioner(nn.Module):
    """The encoder-decoder. forward(images (B, 3, S, S), ids (B, L)) -> logits (B, L, V).

    Images are normalised as `tiny_mm.data.shapes.normalize` does.
    """

    def __init__(self, config: CaptionerConfig = CaptionerConfig()) -> None:
        super().__init__()
        if not isinstance(config, CaptionerConfig):
            raise ValueError(f"config must be a CaptionerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = PatchEncoder(config)
        self.decoder = TextDecoder(config)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> image tokens (B, N, d)."""
        return self.encoder(images)

    def forward(self, images: Tensor, ids: Tensor) -> Tensor:
        return self.decoder(ids, self.encoder(images))[0]  # (B, L, V)

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.config.decoder_layers)
# ANCHOR_END: Captioner


# --------------------------------------------------------------------------- the loss


# ANCHOR: loss
def teacher_forcing(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) captions <bos> w1 ... <eos> <pad>... -> (inputs ids[:, :-1], targets ids[:, 1:]).

    At training time the decoder reads the true previous words, never its own
    guesses: position t reads words 0..t and is scored on word t + 1.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must have shape (B, T) with T >= 2, got {shape}")
    return ids[:, :-1], ids[:, 1:]  # (B, T-1) each


def caption_loss(logits: Tensor, targets: Tensor, pad: int = PAD) -> Tensor:
    """Mean cross-entropy over the target positions that are not padding.

    logits (B, L, V), targets (B, L) -> a scalar. Padding must not count: a
    batch pads short captions to the longest, and without the mask the model
    would be rewarded for predicting <pad> after <eos>, and short captions would
    weigh less than long ones.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B, L, V), got {shape}")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(logits.shape[:2]):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must have shape (B, L) = {tuple(logits.shape[:2])}, got {shape}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 word ids, got dtype {targets.dtype}")
    if not bool((targets != pad).any()):
        raise ValueError("every target is padding: there is nothing to average over")
    # ignore_index drops the padded positions from the sum and from the count.
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=pad)
# ANCHOR_END: loss


# --------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """What `generate` returns, for S generation steps.

    tokens: (B, 1 + S) <bos>, then the generated ids; after a caption's <eos>, <pad>.
    logits: (B, S, V) the (untempered) logits each word was chosen from.
    cross_attention: (B, S, layers, h, N) for generated word s, how much the
        position that produced it attended to each of the N patches, per layer
        and head (rows sum to 1).
    """

    tokens: Tensor
    logits: Tensor
    cross_attention: Tensor


# ANCHOR: generate
@torch.no_grad()
def generate(
    model: Captioner,
    images: Tensor,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """Write a caption for each image, one word at a time, until every caption has <eos>.

    images: (B, 3, S, S), normalised. temperature: 0 picks the most likely word
    (greedy); T > 0 samples from softmax(logits / T) (generator: its random
    numbers, for repeatable samples). use_cache: True feeds the decoder only the
    newest word each step, keeping keys and values in a `DecoderCache`; False
    re-reads the whole prefix every step (the slow way the tests compare with).
    max_new_tokens: at most this many words (default: until the positions run out).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    limit = model.config.max_len - 1  # <bos> takes the first position
    steps = limit if max_new_tokens is None else max_new_tokens
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(f"max_new_tokens must be an int in [1, {limit}], got {max_new_tokens!r}")

    image = model.encode(images)  # (B, N, d): the encoder runs once
    batch = image.shape[0]
    tokens = torch.full((batch, 1), BOS, dtype=torch.long, device=image.device)  # (B, 1)
    cache = model.new_cache() if use_cache else None
    done = torch.zeros(batch, dtype=torch.bool, device=image.device)  # (B,)
    all_logits, all_maps = [], []
    for _ in range(steps):
        new = tokens[:, -1:] if use_cache else tokens  # (B, 1) or (B, t)
        logits, maps = model.decoder(new, image, cache)  # (B, ., V), (B, layers, h, ., N)
        logits, maps = logits[:, -1], maps[:, :, :, -1]  # (B, V), (B, layers, h, N): the newest position
        if temperature == 0:
            word = logits.argmax(dim=-1)  # (B,)
        else:
            probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
            word = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
        word = torch.where(done, PAD, word)  # (B,): finished captions are padded
        done = done | (word == EOS)
        tokens = torch.cat([tokens, word[:, None]], dim=1)  # (B, t + 1)
        all_logits.append(logits)
        all_maps.append(maps)
        if bool(done.all()):
            break
    return Generation(tokens, torch.stack(all_logits, dim=1), torch.stack(all_maps, dim=1))
# ANCHOR_END: generate


# --------------------------------------------------------------------------- saving


def save_captioner(model: Captioner, path: str | Path) -> None:
    """Write {"config": sizes, "state_dict": weights}; `load_captioner` reads it back."""
    save_sized_model(model, path)


def load_captioner(path: str | Path) -> Captioner:
    """Rebuild a `Captioner` saved by `save_captioner` (weights_only: the file cannot run code)."""
    return load_sized_model(path, Captioner, CaptionerConfig, "a captioner")
