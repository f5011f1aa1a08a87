"""The vision transformer of CLIP: chapter 3's model, in PyTorch.

An image becomes a sequence of tokens, a stack of pre-LayerNorm transformer
blocks reads it, and the output at the class-token position, normalised and
projected, is the image's embedding:

    conv1                 (B, 3, H, W) -> (B, width, H/P, W/P)   patch embedding, no bias
    flatten, transpose    -> (B, N, width)                        N = (H/P) * (W/P) patches
    class_embedding       -> (B, N+1, width)                      one learned token in front
    positional_embedding  -> (B, N+1, width)                      one learned vector per position
    ln_pre                -> (B, N+1, width)
    transformer           -> (B, N+1, width)                      `layers` TransformerBlocks
    ln_post               -> (B, N+1, width)
    [:, 0] @ proj         -> (B, output_dim)                      the class token, projected

Parameter names are OpenAI's (``conv1``, ``class_embedding``,
``transformer.resblocks.{i}.attn.in_proj_weight``, ``proj``, ...), so the
``visual`` part of an OpenAI or open_clip state dict loads with strict keys.
The chapter's NumPy reference (``chapters/ch03_vit/reference.py``) shows why
a convolution with kernel = stride = P is the patchify-then-matmul of the paper.

To look inside a model: `VisionTransformer.attention_maps` returns every
block's attention probabilities (B, layers, heads, N+1, N+1) from one pass,
and `attention_rollout` follows them through the stack (Abnar & Zuidema,
2020). `vit_parameters` counts the parameters piece by piece.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tiny_mm.layers import TransformerBlock

__all__ = ["VisionConfig", "VisionTransformer", "QuickGELU", "attention_rollout", "vit_parameters"]


# ANCHOR: VisionConfig
@dataclass(frozen=True)
class VisionConfig:
    """Sizes of a CLIP vision transformer (defaults: ViT-B/32).

    image_size: side of the square input image, in pixels.
    patch_size: side P of a patch; image_size must be a multiple of it.
    width, layers, heads: transformer width d, depth and number of heads.
    mlp_ratio: the MLP's hidden size is int(width * mlp_ratio).
    output_dim: size of the final embedding (after ``proj``).
    quick_gelu: x * sigmoid(1.702 x) in the MLPs, as OpenAI's released models
        use; False for exact GELU, as open_clip's LAION-trained models use. The
        weights cannot tell the two apart, so the caller must say.
    """

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    output_dim: int = 512
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "output_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def grid_size(self) -> int:
        """Patches along one side: image_size // patch_size (7 for ViT-B/32 at 224)."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length the transformer sees: N patches + 1 class token (50 for ViT-B/32)."""
        return self.grid_size**2 + 1
# ANCHOR_END: VisionConfig


# ANCHOR: QuickGELU
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU used by OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)  # same shape as x
# ANCHOR_END: QuickGELU


class _Blocks(nn.Module):
    """Holds the blocks under ``resblocks`` so keys read ``transformer.resblocks.{i}...``."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, config.mlp_ratio, packed_in_proj=True)
            for _ in range(config.layers)
        )
        if config.quick_gelu:
            # The activation has no parameters, so swapping it leaves the state dict's keys alone.
            for block in self.resblocks:
                block.mlp.gelu = QuickGELU()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)  # (B, L, width)
        return x


# ANCHOR: VisionTransformer
class VisionTransformer(nn.Module):
    """CLIP's image tower. forward(images (B, 3, H, W)) -> (B, output_dim).

    H = W = config.image_size: the positional table has one row per patch of
    that grid, so other sizes are refused (no interpolation here).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        d, P = config.width, config.patch_size
        scale = d**-0.5  # CLIP's initial scale for the free-standing tensors below
        # torch's order: Conv2d(in_channels, out_channels, kernel_size, stride). Kernel = stride = P,
        # so each output pixel sees exactly one patch: a shared linear map of every patch.
        self.conv1 = nn.Conv2d(3, d, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))  # (width,)
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_tokens, d))  # (N+1, width)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = _Blocks(config)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(scale * torch.randn(d, config.output_dim))  # (width, output_dim)

    def _check_images(self, images: Tensor) -> None:
        size = self.config.image_size
        if not isinstance(images, Tensor):
            raise ValueError(
                f"images must be a torch.Tensor (B, 3, {size}, {size}), got {type(images).__name__}"
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")

    def embed(self, images: Tensor) -> Tensor:
        """The input layer: images (B, 3, H, W) -> tokens (B, N+1, width), before ln_pre."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width), patches row by row
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, N+1, width)
        return x + self.positional_embedding.to(x.dtype)  # (B, N+1, width)

    def forward(self, images: Tensor, return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """images (B, 3, H, W) -> embedding (B, output_dim).

        With return_tokens=True, returns (embedding, tokens): tokens (B, N+1, width)
        are every position's output after ln_post, class token first.
        """
        self._check_images(images)
        x = self.ln_pre(self.embed(images))  # (B, N+1, width)
        x = self.ln_post(self.transformer(x))  # (B, N+1, width)
        embedding = x[:, 0] @ self.proj  # (B, output_dim): the class token speaks for the image
        return (embedding, x) if return_tokens else embedding
# ANCHOR_END: VisionTransformer

    # ANCHOR: attention_maps
    def attention_maps(self, images: Tensor) -> Tensor:
        """Every block's attention probabilities, from one pass over the images.

        images (B, 3, H, W) -> (B, layers, heads, N+1, N+1). Entry [b, l, h, i, j]
        is how much token i attends to token j in head h of block l, computed on
        what that block's attention reads (its ln_1 output). Token 0 is the class
        token, so [:, l, h, 0, 1:] is where the class token looks among the N
        patches (row by row, as `embed` orders them). Rows sum to 1.
        Wrap the call in torch.no_grad() unless you need gradients.
        """
        self._check_images(images)
        x = self.ln_pre(self.embed(images))  # (B, N+1, width)
        maps = []
        for block in self.transformer.resblocks:
            maps.append(block.attn.attention_probs(block.ln_1(x)))  # (B, heads, N+1, N+1)
            x = block(x)  # (B, N+1, width): the next block reads this block's output
        return torch.stack(maps, dim=1)  # (B, layers, heads, N+1, N+1)
    # ANCHOR_END: attention_maps


# ANCHOR: attention_rollout
def attention_rollout(maps: Tensor) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each input token reaches each output.

    One block's attention map says where a token reads from in that block only.
    Rollout follows the flow through the whole stack: average the heads, add
    the identity for the residual connection (a token also keeps itself),
    renormalise the rows, and multiply the blocks' matrices, the last block on
    the left.

    maps: (B, layers, heads, L, L) from `VisionTransformer.attention_maps`.
    Returns (B, L, L): row i is the share of output token i owed to each input
    token; rows sum to 1. Row 0, columns 1: is the class token's map over the patches.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 5 or maps.shape[-1] != maps.shape[-2]:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor of shape (B, layers, heads, L, L), got {shape}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating-point tensor, got dtype {maps.dtype}")
    length = maps.shape[-1]
    eye = torch.eye(length, dtype=maps.dtype, device=maps.device)  # (L, L)
    flow = maps.mean(dim=2) + eye  # (B, layers, L, L): heads averaged, residual added
    flow = flow / flow.sum(dim=-1, keepdim=True)  # (B, layers, L, L), rows sum to 1 again
    rollout = flow[:, 0]  # (B, L, L)
    for layer in range(1, maps.shape[1]):
        rollout = flow[:, layer] @ rollout  # (B, L, L): block `layer` reads what the earlier ones made
    return rollout
# ANCHOR_END: attention_rollout


# ANCHOR: vit_parameters
def vit_parameters(config: VisionConfig) -> dict[str, int]:
    """Parameters of `VisionTransformer(config)`, piece by piece, and their "total".

    With width W, patch size P, N patches, output size E and MLP hidden size h:
    conv1 3 P^2 W (no bias), class token W, positions (N+1) W, ln_pre and ln_post
    2W each, proj W E; each block 4W^2 + 4W (attention: q, k, v and output
    projections with biases), 2Wh + h + W (MLP), 4W (two LayerNorms), which is
    12 W^2 + 13 W when h = 4W.
    """
    W, P, E = config.width, config.patch_size, config.output_dim
    hidden = int(W * config.mlp_ratio)  # as TransformerBlock sizes its MLP
    block = (4 * W * W + 4 * W) + (2 * W * hidden + hidden + W) + 4 * W
    counts = {
        "conv1": 3 * P * P * W,
        "class_embedding": W,
        "positional_embedding": config.num_tokens * W,
        "ln_pre": 2 * W,
        "blocks": config.layers * block,
        "ln_post": 2 * W,
        "proj": W * E,
    }
    counts["total"] = sum(counts.values())
    return counts
# ANCHOR_END: vit_parameters
