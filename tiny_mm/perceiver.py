"""Perceiver and Perceiver IO: a small latent array reads a long input by cross-attention.

The PyTorch rung of chapter 7 (the NumPy one is ``chapters/ch07_perceiver/reference.py``).

A transformer over M inputs pays M^2 in every self-attention layer, so it
needs its inputs cut into a few hundred tokens first (patches, subwords).
The Perceiver does not: N learned latent vectors (N << M) read the inputs
by cross-attention, which costs N M, and all further work happens among the
latents, which costs N^2 per layer whatever M is. The inputs can then be raw
pixels, each with Fourier features that say where it is.

    inputs  : (B, M, C)   e.g. every pixel: RGB + d (2K + 1) position features
    latents : (N, D)      learned; the same starting array for every example
    encode  : latents read the inputs        (B, N, D)   CrossAttentionBlock, cost ~ N M
    process : L self-attention blocks        (B, N, D)   TransformerBlock, cost ~ N^2 per block
    decode  : O output queries read latents  (B, O, E)   CrossAttentionBlock, cost ~ O N  (Perceiver IO)

The pieces, in the order of the chapter:

- `fourier_features`, `pixel_inputs`: positions as the Perceiver encodes them.
- `PerceiverConfig`, `PerceiverEncoder`: the latent array, the cross-attention
  and the latent transformer, repeated R times, optionally with shared weights.
- `Perceiver`: the encoder, then the latents averaged into class logits.
- `PerceiverIO`: the encoder, then output queries that read the latents.
- `train_pixel_classifier`: a Perceiver that learns where the shape in an
  image is from its raw pixels, on a CPU, in well under a minute.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tiny_mm.layers import CrossAttentionBlock, TransformerBlock

__all__ = [
    "fourier_features",
    "pixel_inputs",
    "PerceiverConfig",
    "PerceiverEncoder",
    "Perceiver",
    "PerceiverIO",
    "ClassifierRun",
    "train_pixel_classifier",
]


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- positions


# ANCHOR: fourier_features
def fourier_features(
    shape: tuple[int, ...],
    num_bands: int,
    max_resolution: tuple[int, ...] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The Perceiver's Fourier position features of every point of a grid.

    Each axis j of the grid (n_j points) is rescaled to [-1, 1]; K frequencies
    f_k run linearly from 1 to mu_j / 2 (half the resolution: the highest
    frequency the grid can show), and each gives sin(pi f_k x_j) and
    cos(pi f_k x_j). The raw coordinates come first.

    Args:
        shape: (n_1, ..., n_d), e.g. (H, W).
        num_bands: K, frequencies per axis.
        max_resolution: mu per axis (default: shape).

    Returns:
        (n_1 * ... * n_d, d (2K + 1)): points in row-major order; per point
        [x_1 .. x_d | d K sines, axis by axis | d K cosines, same order].
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("shape must name at least one axis, got ()")
    for j, n in enumerate(shape):
        _check_size(f"shape[{j}]", n)
    _check_size("num_bands", num_bands)
    mu = shape if max_resolution is None else tuple(max_resolution)
    if len(mu) != len(shape):
        raise ValueError(f"max_resolution must have one entry per axis ({len(shape)}), got {mu}")
    for j, m in enumerate(mu):
        _check_size(f"max_resolution[{j}]", m)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")

    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=device) for n in shape]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))  # (P, d)
    freqs = torch.stack(
        [torch.linspace(1.0, m / 2.0, num_bands, dtype=torch.float64, device=device) for m in mu]
    )  # (d, K)
    # Angles in float64: pi * f * x reaches pi * mu / 2, where float32 would lose digits of sin.
    angles = (math.pi * positions[:, :, None] * freqs[None, :, :]).reshape(len(positions), -1)  # (P, d K)
    features = torch.cat([positions, angles.sin(), angles.cos()], dim=1)  # (P, d (2K + 1))
    return features.to(dtype)
# ANCHOR_END: fourier_features


# ANCHOR: pixel_inputs
def pixel_inputs(images: Tensor, num_bands: int) -> Tensor:
    """Every pixel as one input: its channels, then its 2-D Fourier position features.

    images: (B, C, H, W) -> (B, H * W, C + 2 (2K + 1)), pixels row by row. No
    patches, no convolution: the model sees a set of coloured points that
    know where they are.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {images.dtype}")
    B, C, H, W = images.shape
    pixels = images.flatten(2).transpose(1, 2)  # (B, H W, C)
    where = fourier_features((H, W), num_bands, dtype=images.dtype, device=images.device)  # (H W, F)
    return torch.cat([pixels, where.expand(B, -1, -1)], dim=-1)  # (B, H W, C + F)
# ANCHOR_END: pixel_inputs


# --------------------------------------------------------------------------- the models


# ANCHOR: PerceiverConfig
@dataclass(frozen=True)
class PerceiverConfig:
    """Sizes of a Perceiver's encoder (the latent array and what reads and refines it).

    Args:
        input_dim: C, features per input element (e.g. 3 + 2 (2K + 1) for pixels).
        num_latents: N, rows of the latent array.
        width: D, width of the latents.
        depth: L, self-attention blocks in the latent transformer.
        heads: heads of the latent self-attention (D divisible by heads).
        cross_heads: heads of the cross-attentions (the Perceiver uses 1).
        repeats: R, how many times the latents read the input and then run the
            latent transformer (the Perceiver's iterative attention).
        share_weights: as in the Perceiver paper, repeats after the first reuse
            one cross-attention, and every repeat reuses one latent transformer:
            the model becomes a recurrent network whose state is the latents.
        mlp_ratio: MLP hidden size is int(D * mlp_ratio).
    """

    input_dim: int
    num_latents: int = 32
    width: int = 64
    depth: int = 2
    heads: int = 4
    cross_heads: int = 1
    repeats: int = 1
    share_weights: bool = False
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("input_dim", "num_latents", "width", "depth", "heads", "cross_heads", "repeats"):
            _check_size(name, getattr(self, name))
        for name in ("heads", "cross_heads"):
            if self.width % getattr(self, name):
                raise ValueError(f"width {self.width} is not divisible by {name} = {getattr(self, name)}")
        if not isinstance(self.share_weights, bool):
            raise ValueError(f"share_weights must be True or False, got {self.share_weights!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
# ANCHOR_END: PerceiverConfig


def _check_inputs(inputs: Tensor, input_dim: int) -> None:
    if not isinstance(inputs, Tensor):
        raise ValueError(f"inputs must be a (B, M, {input_dim}) tensor, got {type(inputs).__name__}")
    if inputs.dim() != 3 or inputs.shape[-1] != input_dim or inputs.shape[1] == 0:
        raise ValueError(f"inputs must have shape (B, M >= 1, {input_dim}), got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got dtype {inputs.dtype}")


# ANCHOR: PerceiverEncoder
class PerceiverEncoder(nn.Module):
    """The latent array, reading the inputs R times and thinking in between.

    repeat r = 0 .. R-1:  z = cross_r(z, inputs);  z = latent_r(z)   (latent_r: L blocks)

    With share_weights, cross_r is one module for every r >= 1 (the first
    read has its own weights) and latent_r one module for every r.

    Shapes: forward(inputs (B, M, C), input_lengths (B,) or None) -> (B, N, D).
        input_lengths[b]: example b has that many real inputs, the rest padding.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        if not isinstance(config, PerceiverConfig):
            raise ValueError(f"config must be a PerceiverConfig, got {type(config).__name__}")
        self.config = c = config
        self.latents = nn.Parameter(torch.empty(c.num_latents, c.width))  # (N, D)
        nn.init.trunc_normal_(self.latents, std=0.02, a=-2.0, b=2.0)
        cross_sets = min(c.repeats, 2) if c.share_weights else c.repeats
        latent_sets = 1 if c.share_weights else c.repeats
        self.cross = nn.ModuleList(
            CrossAttentionBlock(c.width, c.cross_heads, context_width=c.input_dim, mlp_ratio=c.mlp_ratio)
            for _ in range(cross_sets)
        )
        self.latent = nn.ModuleList(
            nn.ModuleList(TransformerBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
            for _ in range(latent_sets)
        )

    def blocks(self, r: int) -> tuple[CrossAttentionBlock, nn.ModuleList]:
        """The cross-attention and latent transformer that repeat r runs (shared ones repeat)."""
        return self.cross[min(r, len(self.cross) - 1)], self.latent[min(r, len(self.latent) - 1)]

    def forward(self, inputs: Tensor, input_lengths: Tensor | None = None) -> Tensor:
        _check_inputs(inputs, self.config.input_dim)
        z = self.latents.to(inputs.dtype).expand(inputs.shape[0], -1, -1)  # (B, N, D)
        for r in range(self.config.repeats):
            cross, latent = self.blocks(r)
            z = cross(z, inputs, context_lengths=input_lengths)  # (B, N, D): ~ N M work
            for block in latent:
                z = block(z)  # (B, N, D): ~ N^2 work, whatever M is
        return z

    def read_attention(self, inputs: Tensor, input_lengths: Tensor | None = None) -> Tensor:
        """Where each latent looks in its first read: (B, cross_heads, N, M), rows sum to 1."""
        _check_inputs(inputs, self.config.input_dim)
        cross, _ = self.blocks(0)
        z = self.latents.to(inputs.dtype).expand(inputs.shape[0], -1, -1)  # (B, N, D)
        kv = cross.ln_kv(inputs)  # (B, M, C)
        return cross.cross_attn.attention_probs(cross.ln_q(z), kv, kv, kv_lengths=input_lengths)  # (B, h, N, M)
# ANCHOR_END: PerceiverEncoder


# ANCHOR: Perceiver
class Perceiver(nn.Module):
    """A Perceiver classifier: the encoder, then the latents averaged into class logits.

    Shapes: forward(inputs (B, M, C), input_lengths (B,) or None) -> logits (B, num_classes).
    """

    def __init__(self, config: PerceiverConfig, num_classes: int) -> None:
        super().__init__()
        _check_size("num_classes", num_classes)
        self.encoder = PerceiverEncoder(config)
        self.ln_out = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, num_classes)

    def forward(self, inputs: Tensor, input_lengths: Tensor | None = None) -> Tensor:
        z = self.encoder(inputs, input_lengths)  # (B, N, D)
        return self.head(self.ln_out(z).mean(dim=1))  # (B, num_classes)
# ANCHOR_END: Perceiver


# ANCHOR: PerceiverIO
class PerceiverIO(nn.Module):
    """Perceiver IO: the encoder, then one output per query, each read from the latents.

    The output queries say what is asked (a position to predict a pixel at,
    a masked word's position, or one learned vector for a class). Each reads
    the N latents by cross-attention, so the decoder costs ~ O N: linear in
    the number of outputs, as the encoder is linear in the number of inputs.

    Args:
        config: the encoder's sizes.
        query_dim: E, features of an output query (and width of the decoder).
        output_dim: P, features of each output (a Linear(E, P) head).

    Shapes: forward(inputs (B, M, C), queries (B, O, E), input_lengths (B,) or None) -> (B, O, P).
    """

    def __init__(self, config: PerceiverConfig, query_dim: int, output_dim: int) -> None:
        super().__init__()
        _check_size("query_dim", query_dim)
        _check_size("output_dim", output_dim)
        if query_dim % config.cross_heads:
            raise ValueError(f"query_dim {query_dim} is not divisible by cross_heads = {config.cross_heads}")
        self.query_dim, self.output_dim = query_dim, output_dim
        self.encoder = PerceiverEncoder(config)
        self.decoder = CrossAttentionBlock(query_dim, config.cross_heads, context_width=config.width,
                                           mlp_ratio=config.mlp_ratio)
        self.ln_out = nn.LayerNorm(query_dim)
        self.head = nn.Linear(query_dim, output_dim)

    def forward(self, inputs: Tensor, queries: Tensor, input_lengths: Tensor | None = None) -> Tensor:
        if not isinstance(queries, Tensor) or queries.dim() != 3 or queries.shape[-1] != self.query_dim:
            got = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
            raise ValueError(f"queries must have shape (B, O, {self.query_dim}), got {got}")
        _check_inputs(inputs, self.encoder.config.input_dim)
        if queries.shape[0] != inputs.shape[0]:
            raise ValueError(f"inputs and queries need the same batch size, got {inputs.shape[0]} "
                             f"and {queries.shape[0]}")
        z = self.encoder(inputs, input_lengths)  # (B, N, D)
        out = self.decoder(queries, z)  # (B, O, E): ~ O N work
        return self.head(self.ln_out(out))  # (B, O, P)
# ANCHOR_END: PerceiverIO


# --------------------------------------------------------------------------- training


@dataclass
class ClassifierRun:
    """What `train_pixel_classifier` returns."""

    model: Perceiver
    label: str  # which factor of the shapes it names: "position", "shape", "colour" or "size"
    class_names: tuple[str, ...]
    num_bands: int
    losses: list[float] = field(default_factory=list)  # training loss per step
    train_accuracy: float = 0.0  # on the first 256 training images
    test_accuracy: float = 0.0  # on held-out images
    chance: float = 0.0  # 1 / number of classes
    seconds: float = 0.0
    test_images: Tensor | None = None  # (n, 3, S, S)
    test_labels: Tensor | None = None  # (n,)


# ANCHOR: train
def train_pixel_classifier(
    *,
    label: str = "position",
    steps: int = 300,
    batch_size: int = 32,
    train_size: int = 1000,
    test_size: int = 500,
    image_size: int = 16,
    num_bands: int = 6,
    config: PerceiverConfig | None = None,
    lr: float = 3e-3,
    seed: int = 0,
) -> ClassifierRun:
    """Train a Perceiver to name one factor of a shapes image (where the shape is, by default) from raw pixels.

    Every pixel is one input (RGB + Fourier features); no patches, no
    convolution. A set of pixels has no order, so *where* the shape sits is
    known to the model only through the Fourier features. The images come
    from `tiny_mm.data.shapes` (one shape each, any colour, size, position);
    the test images are drawn with another seed. Returns the model and its
    accuracy on the held-out images.

    The loss sits near log(classes) for the first 100 to 200 steps, then
    drops within a few dozen; trained, each head reads one or two pixels.
    """
    from tiny_mm.data.shapes import ShapesConfig, ShapesDataset

    for name, value in (("steps", steps), ("batch_size", batch_size), ("train_size", train_size),
                        ("test_size", test_size), ("num_bands", num_bands)):
        _check_size(name, value)
    if label not in ("shape", "colour", "size", "position"):
        raise ValueError(f"label must be 'shape', 'colour', 'size' or 'position', got {label!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = ShapesConfig(image_size=image_size, captions="canonical")
    train_images, _, train_labels = ShapesDataset(train_size, data, seed=seed).materialize()
    test_images, _, test_labels = ShapesDataset(test_size, data, seed=seed + 10_000).materialize()
    train_y, test_y = train_labels[label], test_labels[label]  # (n,) ids into data.positions etc.
    names = tuple(getattr(data, label + "s"))
    if config is None:
        config = PerceiverConfig(input_dim=3 + 2 * (2 * num_bands + 1), num_latents=16, width=64,
                                 depth=1, heads=4, cross_heads=4)
    model = Perceiver(config, len(names))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    train_inputs = pixel_inputs(train_images, num_bands)  # (n, S S, C): positions computed once
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, train_size, (batch_size,), generator=generator)  # (b,)
        loss = nn.functional.cross_entropy(model(train_inputs[pick]), train_y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    def accuracy(images: Tensor, labels: Tensor) -> float:
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(pixel_inputs(chunk, num_bands)).argmax(-1)
                                   for chunk in images.split(128)])  # (n,)
        return float((predicted == labels).float().mean())

    return ClassifierRun(
        model=model, label=label, class_names=names, num_bands=num_bands, losses=losses,
        train_accuracy=accuracy(train_images[:256], train_y[:256]),
        test_accuracy=accuracy(test_images, test_y), chance=1.0 / len(names),
        seconds=time.perf_counter() - start, test_images=test_images, test_labels=test_y,
    )
# ANCHOR_END: train
