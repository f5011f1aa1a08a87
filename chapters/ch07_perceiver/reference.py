"""Perceiver and Perceiver IO in plain NumPy (float64): positions, a forward pass, and what it costs.

The bottom rung of the ladder for chapter 7. `tiny_mm.perceiver` is tested
against these functions, and so is the FLOP formula of exercise 6.

Three parts, in the order the chapter teaches them:

1. Fourier position features, as the Perceiver defines them. Every input
   element sits at a point of a d-dimensional grid (d = 2 for an image's
   pixels). Each coordinate is rescaled to [-1, 1]; for K frequencies f_k
   spaced linearly from 1 to mu / 2 (mu = the resolution of that axis, so the
   top frequency is the Nyquist frequency of the grid) it contributes
   sin(pi f_k x) and cos(pi f_k x). With the raw coordinates in front, a
   point gets d (2K + 1) features:

       [x_1 .. x_d | sin(pi f_k x_j) for j, k | cos(pi f_k x_j) for j, k]

2. A forward pass of the blocks the models are made of (pre-LayerNorm
   cross-attention and self-attention blocks with a GELU MLP), on weights
   handed in as dicts of arrays named like the PyTorch modules' parameters.

3. Exact counts: parameters, and matmul FLOPs (2 m n k per (m, k) @ (k, n)
   product, what ``torch.utils.flop_counter.FlopCounterMode`` counts) of a
   Perceiver IO pass: encode cross-attention, latent self-attention blocks,
   decode cross-attention.

Notation: M inputs of C features, N latents of width D, O output queries of
E features, L latent blocks per repeat, R repeats, f = int(D * mlp_ratio).

No torch here on purpose: the reference must not share code with what it checks.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "grid_positions",
    "fourier_features",
    "fourier_feature_count",
    "layer_norm",
    "gelu",
    "attention",
    "cross_attention_block",
    "self_attention_block",
    "linear_flops",
    "attention_flops",
    "cross_attention_block_flops",
    "self_attention_block_flops",
    "perceiver_io_flops",
    "transformer_encoder_flops",
    "cross_attention_block_params",
    "self_attention_block_params",
    "perceiver_params",
    "perceiver_io_params",
]


def _check_sizes(**sizes: int) -> None:
    """ValueError unless every size is a positive int (bool is not an int here)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- 1. positions


# ANCHOR: fourier
def grid_positions(shape: tuple[int, ...]) -> np.ndarray:
    """Coordinates of every point of a grid, each axis rescaled to [-1, 1].

    shape: (n_1, ..., n_d), e.g. (H, W) for an image. Returns (n_1 * ... * n_d, d),
    points in row-major order (the last axis fastest, as ``reshape`` flattens
    an image). Axis j takes the n_j values linspace(-1, 1, n_j); an axis of
    length 1 sits at -1.
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("shape must name at least one axis, got ()")
    _check_sizes(**{f"shape[{j}]": n for j, n in enumerate(shape)})
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]  # d arrays (n_j,)
    grid = np.meshgrid(*axes, indexing="ij")  # d arrays (n_1, ..., n_d)
    return np.stack(grid, axis=-1).reshape(-1, len(shape))  # (n_1 * ... * n_d, d)


def fourier_features(
    shape: tuple[int, ...], num_bands: int, max_resolution: tuple[int, ...] | None = None
) -> np.ndarray:
    """The Perceiver's Fourier position features of every point of a grid.

    shape: (n_1, ..., n_d). num_bands: K. max_resolution: mu per axis (default:
    shape itself); axis j uses the K frequencies linspace(1, mu_j / 2, K).

    Returns (n_1 * ... * n_d, d (2K + 1)): per point, the d coordinates, then
    the d K sines sin(pi f_k x_j) (axis by axis, frequencies within an axis),
    then the d K cosines in the same order.
    """
    shape = tuple(shape)
    positions = grid_positions(shape)  # (P, d)
    _check_sizes(num_bands=num_bands)
    mu = shape if max_resolution is None else tuple(max_resolution)
    if len(mu) != len(shape):
        raise ValueError(f"max_resolution must have one entry per axis ({len(shape)}), got {mu}")
    _check_sizes(**{f"max_resolution[{j}]": m for j, m in enumerate(mu)})
    freqs = np.stack([np.linspace(1.0, m / 2.0, num_bands) for m in mu])  # (d, K)
    angles = np.pi * positions[:, :, None] * freqs[None, :, :]  # (P, d, K)
    angles = angles.reshape(len(positions), -1)  # (P, d K): axis-major
    return np.concatenate([positions, np.sin(angles), np.cos(angles)], axis=1)  # (P, d (2K + 1))


def fourier_feature_count(num_axes: int, num_bands: int) -> int:
    """d (2K + 1): the coordinates, and a sine and a cosine per axis and frequency."""
    _check_sizes(num_axes=num_axes, num_bands=num_bands)
    return num_axes * (2 * num_bands + 1)
# ANCHOR_END: fourier


# --------------------------------------------------------------------------- 2. a forward pass


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch): (..., n) -> (..., n)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    return (x - mean) / np.sqrt(var + eps) * weight + bias  # (..., n)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (NumPy has no erf: math's, elementwise)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    """x @ W^T + b with W = p[name.weight] (out, in): (..., in) -> (..., out)."""
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(
    query: np.ndarray, context: np.ndarray, p: dict[str, np.ndarray], heads: int, prefix: str,
    context_lengths: np.ndarray | None = None,
) -> np.ndarray:
    """Multi-head attention with separate q/k/v/out projections under `prefix`.

    query (B, Lq, E), context (B, Lk, kdim) -> (B, Lq, E). context_lengths (B,):
    key j of example b is seen only if j < context_lengths[b].
    """
    q = _linear(query, p, f"{prefix}.q_proj")  # (B, Lq, E)
    k = _linear(context, p, f"{prefix}.k_proj")  # (B, Lk, E)
    v = _linear(context, p, f"{prefix}.v_proj")  # (B, Lk, E)
    B, Lq, E = q.shape
    Lk, Dh = k.shape[1], E // heads
    q = q.reshape(B, Lq, heads, Dh).transpose(0, 2, 1, 3)  # (B, H, Lq, Dh)
    k = k.reshape(B, Lk, heads, Dh).transpose(0, 2, 1, 3)  # (B, H, Lk, Dh)
    v = v.reshape(B, Lk, heads, Dh).transpose(0, 2, 1, 3)  # (B, H, Lk, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(Dh)  # (B, H, Lq, Lk)
    if context_lengths is not None:
        hidden = np.arange(Lk)[None, :] >= np.asarray(context_lengths)[:, None]  # (B, Lk)
        scores = np.where(hidden[:, None, None, :], -np.inf, scores)  # (B, H, Lq, Lk)
    scores = scores - scores.max(axis=-1, keepdims=True)  # (B, H, Lq, Lk): exp cannot overflow
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)  # (B, H, Lq, Lk)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, Lq, E)  # (B, Lq, E)
    return _linear(out, p, f"{prefix}.out_proj")  # (B, Lq, E)


def _mlp(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    return _linear(gelu(_linear(x, p, "mlp.c_fc")), p, "mlp.c_proj")  # (..., width)


# ANCHOR: blocks
def cross_attention_block(
    x: np.ndarray, context: np.ndarray, p: dict[str, np.ndarray], heads: int,
    context_lengths: np.ndarray | None = None,
) -> np.ndarray:
    """x + cross_attn(ln_q(x), ln_kv(context)), then + mlp(ln_2(.)). x (B, Lq, w) -> (B, Lq, w).

    The latents read the input this way (encode), and the output queries read
    the latents (decode).
    """
    kv = layer_norm(context, p["ln_kv.weight"], p["ln_kv.bias"])  # (B, Lk, c)
    q = layer_norm(x, p["ln_q.weight"], p["ln_q.bias"])  # (B, Lq, w)
    x = x + attention(q, kv, p, heads, "cross_attn", context_lengths)  # (B, Lq, w)
    return x + _mlp(layer_norm(x, p["ln_2.weight"], p["ln_2.bias"]), p)  # (B, Lq, w)


def self_attention_block(x: np.ndarray, p: dict[str, np.ndarray], heads: int) -> np.ndarray:
    """x + attn(ln_1(x)), then + mlp(ln_2(.)): the latent transformer's block. (B, N, w) -> (B, N, w)."""
    h = layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])  # (B, N, w)
    x = x + attention(h, h, p, heads, "attn")  # (B, N, w)
    return x + _mlp(layer_norm(x, p["ln_2.weight"], p["ln_2.bias"]), p)  # (B, N, w)
# ANCHOR_END: blocks


# --------------------------------------------------------------------------- 3. counting


# ANCHOR: flops
def linear_flops(rows: int, fan_in: int, fan_out: int) -> int:
    """(rows, fan_in) @ (fan_in, fan_out): 2 rows fan_in fan_out (the bias add is not counted)."""
    return 2 * rows * fan_in * fan_out


def attention_flops(lq: int, lk: int, width: int) -> int:
    """Scores Q K^T and the weighted sum P V over all heads: 2 Lq Lk w each.

    The number of heads does not matter: H heads of width w / H do the same work.
    """
    return 2 * (2 * lq * lk * width)


def cross_attention_block_flops(lq: int, lk: int, width: int, context_width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-LN cross-attention block: Lq queries of width w read Lk context tokens of width c."""
    hidden = int(width * mlp_ratio)
    projections = 2 * linear_flops(lq, width, width) + 2 * linear_flops(lk, context_width, width)  # q, out; k, v
    mlp = linear_flops(lq, width, hidden) + linear_flops(lq, hidden, width)
    return projections + attention_flops(lq, lk, width) + mlp


def self_attention_block_flops(length: int, width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-LN self-attention block on `length` tokens: quadratic in the length."""
    return cross_attention_block_flops(length, length, width, width, mlp_ratio)


def perceiver_io_flops(
    input_len: int, output_len: int, num_latents: int, width: int, depth: int, *,
    input_dim: int, query_dim: int, output_dim: int, repeats: int = 1, mlp_ratio: float = 4.0,
    batch: int = 1,
) -> int:
    """Matmul FLOPs of one forward pass of `tiny_mm.perceiver.PerceiverIO`.

    encode: R cross-attentions, N latents (width D) reading M inputs (C features)
    process: R L self-attention blocks on the N latents
    decode: O queries (E features) reading the N latents, then a Linear(E, P) head

    Linear in M and in O; the latent part does not depend on either.
    """
    _check_sizes(input_len=input_len, output_len=output_len, num_latents=num_latents, width=width,
                 depth=depth, input_dim=input_dim, query_dim=query_dim, output_dim=output_dim,
                 repeats=repeats, batch=batch)
    encode = repeats * cross_attention_block_flops(num_latents, input_len, width, input_dim, mlp_ratio)
    process = repeats * depth * self_attention_block_flops(num_latents, width, mlp_ratio)
    decode = cross_attention_block_flops(output_len, num_latents, query_dim, width, mlp_ratio)
    head = linear_flops(output_len, query_dim, output_dim)
    return batch * (encode + process + decode + head)


def transformer_encoder_flops(
    input_len: int, width: int, depth: int, *, input_dim: int, mlp_ratio: float = 4.0, batch: int = 1
) -> int:
    """A plain encoder on the same inputs: Linear(C, D) on every input, then L self-attention blocks.

    Quadratic in M: every input attends to every other, in every block.
    """
    _check_sizes(input_len=input_len, width=width, depth=depth, input_dim=input_dim, batch=batch)
    embed = linear_flops(input_len, input_dim, width)
    return batch * (embed + depth * self_attention_block_flops(input_len, width, mlp_ratio))
# ANCHOR_END: flops


# ANCHOR: params
def cross_attention_block_params(width: int, context_width: int, mlp_ratio: float = 4.0) -> int:
    """ln_q, ln_kv, q/k/v/out projections (with biases; k and v from c features), ln_2, MLP."""
    w, c, f = width, context_width, int(width * mlp_ratio)
    norms = 2 * w + 2 * c + 2 * w
    projections = (w * w + w) + 2 * (c * w + w) + (w * w + w)
    return norms + projections + (w * f + f) + (f * w + w)


def self_attention_block_params(width: int, mlp_ratio: float = 4.0) -> int:
    """ln_1, q/k/v/out projections (with biases), ln_2, MLP."""
    w, f = width, int(width * mlp_ratio)
    return 2 * w + (4 * w * w + 4 * w) + 2 * w + (w * f + f) + (f * w + w)


def _encoder_params(input_dim: int, num_latents: int, width: int, depth: int, repeats: int,
                    share_weights: bool, mlp_ratio: float) -> int:
    """The latent array, the cross-attentions and the latent blocks.

    Shared as in the Perceiver paper: the first cross-attention has its own
    weights, every later one reuses a second set, and every repeat reuses
    one latent transformer. Unshared: each repeat has its own.
    """
    cross_sets = min(repeats, 2) if share_weights else repeats
    latent_sets = 1 if share_weights else repeats
    return (num_latents * width
            + cross_sets * cross_attention_block_params(width, input_dim, mlp_ratio)
            + latent_sets * depth * self_attention_block_params(width, mlp_ratio))


def perceiver_params(
    input_dim: int, num_latents: int, width: int, depth: int, num_classes: int, *,
    repeats: int = 1, share_weights: bool = False, mlp_ratio: float = 4.0,
) -> int:
    """Parameters of `tiny_mm.perceiver.Perceiver`: the encoder, a final LayerNorm, Linear(D, classes)."""
    _check_sizes(input_dim=input_dim, num_latents=num_latents, width=width, depth=depth,
                 num_classes=num_classes, repeats=repeats)
    encoder = _encoder_params(input_dim, num_latents, width, depth, repeats, share_weights, mlp_ratio)
    return encoder + 2 * width + (width * num_classes + num_classes)


def perceiver_io_params(
    input_dim: int, num_latents: int, width: int, depth: int, query_dim: int, output_dim: int, *,
    repeats: int = 1, share_weights: bool = False, mlp_ratio: float = 4.0,
) -> int:
    """Parameters of `tiny_mm.perceiver.PerceiverIO`: the encoder, the decoder block, LayerNorm, Linear(E, P)."""
    _check_sizes(input_dim=input_dim, num_latents=num_latents, width=width, depth=depth,
                 query_dim=query_dim, output_dim=output_dim, repeats=repeats)
    encoder = _encoder_params(input_dim, num_latents, width, depth, repeats, share_weights, mlp_ratio)
    decoder = cross_attention_block_params(query_dim, width, mlp_ratio)
    return encoder + decoder + 2 * query_dim + (query_dim * output_dim + output_dim)
# ANCHOR_END: params
