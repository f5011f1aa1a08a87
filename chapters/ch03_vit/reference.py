"""A vision transformer's input layer in plain NumPy (float64).

Before a transformer can read an image, the image has to become a sequence of
tokens. ViT does it in three steps, each written out here:

1. Patch embedding: cut the (C, H, W) image into a grid of P x P patches,
   flatten each patch to C*P*P numbers and project it with one shared weight
   matrix to `width` features. Written two ways that give the same numbers:
   `patch_embed` (patchify, then a matrix product) and `conv2d_strided` (a
   convolution whose kernel and stride both equal P, so the windows never
   overlap and never leave a gap).
2. `add_cls_token`: put one learned vector in front of the patch tokens; the
   transformer's output at that position is the image's global embedding.
3. `add_positional_embedding`: add one learned vector per position, since
   attention by itself does not know where a token came from.

`sincos_positions_2d` is the fixed alternative to a learned table: sines
and cosines of the patch's row and column, whose dot products depend only
on the offset between two patches.

And one tool for looking inside a trained ViT afterwards:
`attention_rollout` follows attention through every block, residual
connections included, to say which input tokens an output token draws on.

Notation:

    images : (B, C, H, W)         a batch of images, channels first (as torch)
    P      : patch size; H and W must be multiples of P
    N      : (H / P) * (W / P)    number of patches, row by row
    weight : (width, C, P, P)     a convolution kernel, torch's Conv2d layout
             (width, C*P*P)       the same numbers, flattened for the matmul

The weight layout follows ``torch.nn.Conv2d(in_channels, out_channels,
kernel_size, stride)``: its weight is (out_channels, in_channels, P, P), i.e.
(width, C, P, P). No torch here: the tests compare against torch.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "check_images",
    "patchify",
    "patch_embed",
    "conv2d_strided",
    "conv_patch_embed",
    "add_cls_token",
    "add_positional_embedding",
    "embed_image",
    "sincos_positions_2d",
    "attention_rollout",
]


def check_images(images, patch_size: int) -> np.ndarray:
    """Return images as float64 (B, C, H, W); ValueError unless H and W are multiples of P."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W), got shape {images.shape}")
    _, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image height and width must be multiples of patch_size {patch_size}, "
            f"got H={height}, W={width}"
        )
    if height == 0 or width == 0:
        raise ValueError(f"images must have at least one pixel, got shape {images.shape}")
    return images


def _check_weight(weight, channels: int, patch_size: int) -> np.ndarray:
    """Return the kernel as float64 (width, C, P, P); it may come flattened as (width, C*P*P)."""
    weight = np.asarray(weight, dtype=np.float64)
    flat = channels * patch_size * patch_size
    if weight.ndim == 2 and weight.shape[1] == flat:
        return weight.reshape(weight.shape[0], channels, patch_size, patch_size)
    if weight.ndim == 4 and weight.shape[1:] == (channels, patch_size, patch_size):
        return weight
    raise ValueError(
        f"weight must be (width, C, P, P) = (width, {channels}, {patch_size}, {patch_size}) "
        f"or flattened (width, C*P*P) = (width, {flat}), got shape {weight.shape}"
    )


# ANCHOR: patchify
def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Cut images into non-overlapping P x P patches and flatten each.

    images: (B, C, H, W) -> (B, N, C*P*P), N = (H/P) * (W/P), patches row by
    row (left to right, then top to bottom). Each patch is flattened channel
    first, then row, then column: the order of a Conv2d kernel (C, P, P).
    """
    images = check_images(images, patch_size)
    B, C, H, W = images.shape
    P = patch_size
    grid = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, rows, P, cols, P)
    grid = grid.transpose(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, P, P): one patch per (row, col)
    return grid.reshape(B, (H // P) * (W // P), C * P * P)  # (B, N, C*P*P)
# ANCHOR_END: patchify


# ANCHOR: patch_embed
def patch_embed(images: np.ndarray, weight: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch embedding as patchify + one matrix product.

    images: (B, C, H, W); weight: (width, C, P, P) or (width, C*P*P).
    Returns (B, N, width): token n = weight @ (flattened patch n). No bias, as in CLIP.
    """
    images = check_images(images, patch_size)
    weight = _check_weight(weight, images.shape[1], patch_size)
    patches = patchify(images, patch_size)  # (B, N, C*P*P)
    flat = weight.reshape(weight.shape[0], -1)  # (width, C*P*P)
    return patches @ flat.T  # (B, N, width)
# ANCHOR_END: patch_embed


# ANCHOR: conv2d_strided
def conv2d_strided(images: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """A 2-D convolution (torch's cross-correlation), no padding, no bias.

    images: (B, C, H, W); weight: (out_channels, C, K, K) with K = kernel size.
    Returns (B, out_channels, (H - K) // stride + 1, (W - K) // stride + 1).
    Written as a loop over output positions: output pixel (i, j) is the dot
    product of the kernel with the K x K window whose top-left corner is
    (i * stride, j * stride). With stride == K the windows are exactly the
    patches of `patchify`.
    """
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    images = np.asarray(images, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    if images.ndim != 4 or weight.ndim != 4:
        raise ValueError(
            f"images must be (B, C, H, W) and weight (out, C, K, K), got shapes {images.shape} "
            f"and {weight.shape}"
        )
    B, C, H, W = images.shape
    out_channels, in_channels, K, K2 = weight.shape
    if in_channels != C:
        raise ValueError(
            f"weight expects {in_channels} input channels but images have {C}: torch's layout is "
            f"(out_channels, in_channels, K, K), as in Conv2d(in_channels, out_channels, K)"
        )
    if K != K2 or K > H or K > W:
        raise ValueError(f"kernel must be square and fit in the image, got {weight.shape} for {images.shape}")
    rows, cols = (H - K) // stride + 1, (W - K) // stride + 1
    out = np.empty((B, out_channels, rows, cols))  # (B, out, rows, cols)
    for i in range(rows):
        for j in range(cols):
            top, left = i * stride, j * stride
            window = images[:, :, top : top + K, left : left + K]  # (B, C, K, K)
            out[:, :, i, j] = np.einsum("bckl,ockl->bo", window, weight)  # (B, out)
    return out
# ANCHOR_END: conv2d_strided


# ANCHOR: conv_tokens
def conv_patch_embed(images: np.ndarray, weight: np.ndarray, patch_size: int) -> np.ndarray:
    """Patch embedding as a strided convolution, then the grid read out as tokens.

    images: (B, C, H, W); weight: (width, C, P, P). Returns (B, N, width), the
    same numbers as `patch_embed`.
    """
    images = check_images(images, patch_size)
    weight = _check_weight(weight, images.shape[1], patch_size)
    grid = conv2d_strided(images, weight, stride=patch_size)  # (B, width, H/P, W/P)
    B, width = grid.shape[:2]
    return grid.reshape(B, width, -1).transpose(0, 2, 1)  # (B, N, width), row by row
# ANCHOR_END: conv_tokens


# ANCHOR: cls_token
def add_cls_token(tokens: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Prepend the same learned vector to every sequence.

    tokens (B, N, width), cls (width,) -> (B, N+1, width); cls comes first.
    """
    tokens = np.asarray(tokens, dtype=np.float64)
    cls = np.asarray(cls, dtype=np.float64)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, width), got shape {tokens.shape}")
    if cls.shape != (tokens.shape[2],):
        raise ValueError(f"cls must have shape (width,) = ({tokens.shape[2]},), got {cls.shape}")
    first = np.broadcast_to(cls, (tokens.shape[0], 1, tokens.shape[2]))  # (B, 1, width)
    return np.concatenate([first, tokens], axis=1)  # (B, N+1, width)
# ANCHOR_END: cls_token


# ANCHOR: positional
def add_positional_embedding(tokens: np.ndarray, positional: np.ndarray) -> np.ndarray:
    """Add one learned vector per position. tokens (B, L, width), positional (L, width) -> (B, L, width)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    positional = np.asarray(positional, dtype=np.float64)
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, L, width), got shape {tokens.shape}")
    if positional.shape != tokens.shape[1:]:
        raise ValueError(
            f"positional must have shape (L, width) = {tokens.shape[1:]}, got {positional.shape}"
        )
    return tokens + positional  # (B, L, width), the same table for every image
# ANCHOR_END: positional


# ANCHOR: embed_image
def embed_image(
    images: np.ndarray, weight: np.ndarray, cls: np.ndarray, positional: np.ndarray, patch_size: int
) -> np.ndarray:
    """The whole input layer: (B, C, H, W) -> (B, N+1, width) tokens for the transformer."""
    tokens = patch_embed(images, weight, patch_size)  # (B, N, width)
    tokens = add_cls_token(tokens, cls)  # (B, N+1, width)
    return add_positional_embedding(tokens, positional)  # (B, N+1, width)
# ANCHOR_END: embed_image


# ANCHOR: sincos
def sincos_positions_2d(grid_size: int, width: int, base: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine positional embeddings for a grid_size x grid_size patch grid.

    Returns (grid_size**2, width), patches row by row as `patchify` orders them.
    The first width/2 features encode the row r, the rest the column c, each as
    [sin(t w_0), ..., sin(t w_{K-1}), cos(t w_0), ..., cos(t w_{K-1})] with
    t = r or c, K = width / 4 and w_k = base ** (-k / K). Since
    sin(a) sin(b) + cos(a) cos(b) = cos(a - b), the dot product of two rows is
    sum_k cos(w_k dr) + sum_k cos(w_k dc): it depends only on the offset (dr, dc).
    """
    for name, value in (("grid_size", grid_size), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 (sin and cos for rows and columns), got {width}")
    K = width // 4
    freqs = base ** (-np.arange(K) / K)  # (K,), from 1 down to nearly 1/base
    rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)  # (N,) each, row by row

    def encode(t: np.ndarray) -> np.ndarray:
        angles = t[:, None] * freqs[None, :]  # (N, K)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (N, 2K)

    return np.concatenate([encode(rows), encode(cols)], axis=1)  # (N, width)
# ANCHOR_END: sincos


# ANCHOR: rollout
def attention_rollout(maps: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020), in float64.

    maps: (B, layers, heads, L, L), row i of each map is token i's attention
    distribution. Per block: A = mean over heads, then (A + I) with rows
    renormalised, since the residual connection carries each token past its
    attention. Rollout = A_last ... A_2 A_1, returned as (B, L, L).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 5 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must have shape (B, layers, heads, L, L), got {maps.shape}")
    B, layers, _, L, _ = maps.shape
    out = np.empty((B, L, L))
    for b in range(B):
        rollout = np.eye(L)  # (L, L): before any block, every token is only itself
        for layer in range(layers):
            flow = maps[b, layer].mean(axis=0) + np.eye(L)  # (L, L)
            flow = flow / flow.sum(axis=1, keepdims=True)  # (L, L), rows sum to 1
            rollout = flow @ rollout  # (L, L)
        out[b] = rollout
    return out
# ANCHOR_END: rollout
