"""Exercise 5 (chapter 3): a learned CLS token as the image's global embedding.

A patch encoder turns an image into N patch tokens, and a transformer mixes
them. But a contrastive loss wants one vector per image. ViT and CLIP get it by
putting one extra, learned token in front of the patches: the "class" (CLS)
token. It is the same vector for every image, so on its own it says nothing;
through attention it gathers what the patches hold, and its output is the
image's embedding.

What to do:
  1. Fill in the parts of `PatchEncoderWithCLS` marked below: replace each
     `raise NotImplementedError(...)` with your code. The docstrings are the
     specification (shapes, names, which errors to raise). The patch
     embedding, the transformer blocks and the final LayerNorm are given.
  2. Grade your work:

         tinymm grade ex05

     Each check is worth points; the scorecard prints, for every failing
     check, one line saying what went wrong. The checks compare your token
     sequence with the chapter's NumPy reference
     (chapters/ch03_vit/reference.py, `embed_image`), and train your encoder
     for a few steps on a toy task only the CLS token can solve.

The reference solution lives in solutions/ex05_cls_token.py
(`tinymm grade ex05 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tiny_mm.layers import TransformerBlock


class PatchEncoderWithCLS(nn.Module):
    """A small vision transformer whose output is the CLS token's.

    Args:
        image_size: side of the square input images, in pixels.
        patch_size: side P of a patch; image_size must be a multiple of it.
        width: token width d.
        layers: number of transformer blocks.
        heads: attention heads per block (width must be divisible by heads).
        in_channels: C, the image's channels.

    Attributes (keep these names; the grader reads them):
        conv1: the patch embedding, Conv2d(C, width, kernel_size=P, stride=P, bias=False).
        class_embedding: nn.Parameter of shape (width,), the CLS token. (yours)
        positional_embedding: nn.Parameter of shape (N + 1, width), one row per
            position, row 0 for the CLS token, N = (image_size / P) ** 2. (yours)
        transformer: nn.ModuleList of `layers` TransformerBlocks.
        ln_post: LayerNorm(width), applied to the transformer's output.

    Shapes:
        embed(images (B, C, H, W)) -> (B, N + 1, width), the transformer's input.
        forward(images (B, C, H, W)) -> (B, width), the CLS token's output.
    """

    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("patch_size", patch_size), ("width", width),
                            ("layers", layers), ("heads", heads), ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_patches = (image_size // patch_size) ** 2  # N
        # torch's order is Conv2d(in_channels, out_channels, ...). Kernel = stride = P: every
        # output pixel sees exactly one patch, so this is one shared linear map per patch.
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=False)
        # BEGIN SOLUTION
        # hint: create self.class_embedding (width,) and self.positional_embedding (N + 1, width)
        # hint: as nn.Parameter, initialised with small random values (e.g. width ** -0.5 * randn).
        scale = width**-0.5  # CLIP's scale: random tokens about as large as the patch tokens
        self.class_embedding = nn.Parameter(scale * torch.randn(width))  # (width,)
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))  # (N+1, width)
        # END SOLUTION
        self.transformer = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)

    def embed(self, images: Tensor) -> Tensor:
        """The transformer's input: images (B, C, H, W) -> tokens (B, N + 1, width).

        Steps:
            1. Check the images: a 4-D floating-point tensor of shape
               (B, in_channels, image_size, image_size); otherwise raise
               ValueError naming the shape you got.
            2. Patch tokens: conv1, then flatten the (H/P, W/P) grid row by
               row into (B, N, width).
            3. Prepend the CLS token to every sequence: (B, N + 1, width).
               Use expand (or broadcasting) over the batch, not a Python loop.
            4. Add the positional embedding, row 0 to the CLS token.
        """
        # BEGIN SOLUTION
        # hint: check the shape (ValueError); x = conv1(images).flatten(2).transpose(1, 2);
        # hint: cls = class_embedding.expand(B, 1, width); torch.cat([cls, x], dim=1) + positional_embedding
        size, channels = self.image_size, self.in_channels
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise ValueError(f"images must be a floating-point torch.Tensor, got {type(images).__name__}"
                             + (f" of dtype {images.dtype}" if isinstance(images, Tensor) else ""))
        if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"images must have shape (B, {channels}, {size}, {size}), got {tuple(images.shape)}"
            )
        x = self.conv1(images)  # (B, width, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, width), patches row by row
        # One vector shared by every image: a view, so its gradient sums over the batch.
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, N+1, width), the CLS token first
        return x + self.positional_embedding  # (B, N+1, width)
        # END SOLUTION

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B, width): the CLS token's output after ln_post."""
        x = self.embed(images)  # (B, N+1, width)
        for block in self.transformer:
            x = block(x)  # (B, N+1, width)
        x = self.ln_post(x)  # (B, N+1, width)
        # BEGIN SOLUTION
        # hint: the CLS token is position 0 of every sequence.
        return x[:, 0]  # (B, width)
        # END SOLUTION
