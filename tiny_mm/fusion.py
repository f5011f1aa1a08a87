"""Three ways to let two token streams meet: early, late and cross-modal fusion.

Every model takes the same inputs and gives the same kind of output, so the
chapter can swap one for another in a toy experiment:

    image (B, N, d)          N image tokens (patches), width d
    text  (B, M, d)          M text tokens, width d
    text_lengths (B,) | None number of valid text tokens of each example
                             (padding at the end); None: all M are valid
    -> (B, num_classes) logits, or (B, d) features when num_classes is None

- `EarlyFusion`: one encoder of L `TransformerBlock`s over the N + M tokens
  concatenated (a learned "which modality" vector is added to each token
  first). Every token attends to every token from the first layer on: the
  attention matrix is (N + M)^2 per head.
- `LateFusion`: an image encoder and a text encoder, L blocks each, that never
  see each other; each output is mean-pooled and the two vectors are fused by
  a small head (Linear(2d, d) + GELU). Attention costs N^2 + M^2 per head, but
  the streams only meet as two pooled vectors.
- `CrossModalFusion`: the image encoder runs first (L blocks); the text
  stream then runs L layers, each a `TransformerBlock` (text self-attention)
  followed by a `CrossAttentionBlock` in which every text token attends to the
  image encoder's final tokens (Flamingo's arrangement, without the tanh
  gate). Attention costs N^2 + M^2 + M*N per head; the output is the text
  stream, mean-pooled.

Exact FLOP, parameter and memory counts of all three are in `tiny_mm.counting`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tiny_mm.layers import CrossAttentionBlock, TransformerBlock

__all__ = ["FusionConfig", "EarlyFusion", "LateFusion", "CrossModalFusion"]


@dataclass(frozen=True)
class FusionConfig:
    """Sizes shared by the three fusion models.

    layers: L, transformer blocks per encoder (and cross-attention blocks).
    width: d, the width of both token streams.
    heads: h, attention heads (d divisible by h).
    mlp_ratio: MLP hidden size is int(d * mlp_ratio).
    num_classes: size of the classification head; None returns features.
    """

    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes <= 0):
            raise ValueError(f"num_classes must be a positive int or None, got {self.num_classes!r}")


# --------------------------------------------------------------------------- helpers


def _check_inputs(image: Tensor, text: Tensor, text_lengths: Tensor | None, width: int) -> None:
    """ValueError unless image (B, N, d), text (B, M, d) and text_lengths (B,) in [1, M] fit together."""
    for name, x in (("image", image), ("text", text)):
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (B, L, {width}), got {type(x).__name__}"
            )
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must have shape (B, L, {width}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} needs at least one token, got shape {tuple(x.shape)}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"image and text need the same batch size, got {image.shape[0]} and {text.shape[0]}")
    if image.dtype != text.dtype or image.device != text.device:
        raise ValueError(
            f"image and text must share dtype and device, got {image.dtype}/{image.device} "
            f"and {text.dtype}/{text.device}"
        )
    if text_lengths is None:
        return
    is_tensor = isinstance(text_lengths, Tensor)
    if not is_tensor or text_lengths.dim() != 1 or text_lengths.shape[0] != text.shape[0]:
        shape = tuple(text_lengths.shape) if is_tensor else type(text_lengths).__name__
        raise ValueError(f"text_lengths must be a (B,) = ({text.shape[0]},) tensor, got {shape}")
    if text_lengths.is_floating_point() or text_lengths.is_complex() or text_lengths.dtype == torch.bool:
        raise ValueError(f"text_lengths must be an integer tensor, got dtype {text_lengths.dtype}")
    if text_lengths.device != text.device:
        raise ValueError(f"text_lengths must be on {text.device}, got {text_lengths.device}")
    if bool((text_lengths < 1).any()) or bool((text_lengths > text.shape[1]).any()):
        raise ValueError(f"text_lengths must lie in [1, M = {text.shape[1]}], got {text_lengths.tolist()}")


def _mean_tokens(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Mean over the valid tokens of each example: x (B, L, d), lengths (B,) or None -> (B, d)."""
    if lengths is None:
        return x.mean(dim=1)  # (B, d)
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, L)
    total = (x * valid[..., None].to(x.dtype)).sum(dim=1)  # (B, d): padding contributes nothing
    return total / lengths[:, None].to(x.dtype)  # (B, d)


def _head(features: int, num_classes: int | None) -> nn.Module | None:
    return None if num_classes is None else nn.Linear(features, num_classes)


# --------------------------------------------------------------------------- the models


# ANCHOR: EarlyFusion
class EarlyFusion(nn.Module):
    """One encoder over the concatenated streams [image tokens, text tokens].

    Shapes: forward(image (B, N, d), text (B, M, d), text_lengths (B,) | None)
        -> (B, num_classes), or (B, d) features.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.modality = nn.Parameter(torch.randn(2, d) * 0.02)  # (2, d): row 0 image, row 1 text
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.head = _head(d, config.num_classes)

    def forward(self, image: Tensor, text: Tensor, text_lengths: Tensor | None = None) -> Tensor:
        _check_inputs(image, text, text_lengths, self.config.width)
        n_image = image.shape[1]
        # Without the modality vectors the encoder could not tell a patch from a word.
        x = torch.cat([image + self.modality[0], text + self.modality[1]], dim=1)  # (B, N + M, d)
        # Image tokens come first, so "key j is valid iff j < N + text_length" masks text padding.
        lengths = None if text_lengths is None else n_image + text_lengths  # (B,)
        for block in self.blocks:
            x = block(x, kv_lengths=lengths)  # (B, N + M, d)
        features = _mean_tokens(self.ln_final(x), lengths)  # (B, d)
        return features if self.head is None else self.head(features)  # (B, classes)
# ANCHOR_END: EarlyFusion


# ANCHOR: LateFusion
class LateFusion(nn.Module):
    """Two separate encoders; their mean-pooled outputs meet in a small head.

    Shapes: forward(image (B, N, d), text (B, M, d), text_lengths (B,) | None)
        -> (B, num_classes), or (B, d) features.
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d, h, r = config.width, config.heads, config.mlp_ratio
        self.image_blocks = nn.ModuleList(TransformerBlock(d, h, r) for _ in range(config.layers))
        self.text_blocks = nn.ModuleList(TransformerBlock(d, h, r) for _ in range(config.layers))
        self.ln_image = nn.LayerNorm(d)
        self.ln_text = nn.LayerNorm(d)
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU())
        self.head = _head(d, config.num_classes)

    def forward(self, image: Tensor, text: Tensor, text_lengths: Tensor | None = None) -> Tensor:
        _check_inputs(image, text, text_lengths, self.config.width)
        for block in self.image_blocks:
            image = block(image)  # (B, N, d)
        for block in self.text_blocks:
            text = block(text, kv_lengths=text_lengths)  # (B, M, d)
        pooled_image = _mean_tokens(self.ln_image(image), None)  # (B, d)
        pooled_text = _mean_tokens(self.ln_text(text), text_lengths)  # (B, d)
        # The only place where the modalities meet: two vectors, after all the layers.
        features = self.fuse(torch.cat([pooled_image, pooled_text], dim=-1))  # (B, d)
        return features if self.head is None else self.head(features)  # (B, classes)
# ANCHOR_END: LateFusion


# ANCHOR: CrossModalFusion
class CrossModalFusion(nn.Module):
    """Separate encoders; in each of the L text layers, text tokens also attend to the image.

    Layer l of the text stream: text = text_blocks[l](text) (self-attention
    over the M text tokens), then text = cross_blocks[l](text, image) (every
    text token reads from the image encoder's final N tokens). The image
    stream never reads the text.

    Shapes: forward(image (B, N, d), text (B, M, d), text_lengths (B,) | None)
        -> (B, num_classes), or (B, d) features (the pooled text stream).
    """

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        d, h, r = config.width, config.heads, config.mlp_ratio
        self.image_blocks = nn.ModuleList(TransformerBlock(d, h, r) for _ in range(config.layers))
        self.text_blocks = nn.ModuleList(TransformerBlock(d, h, r) for _ in range(config.layers))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(d, h, d, r) for _ in range(config.layers))
        self.ln_text = nn.LayerNorm(d)
        self.head = _head(d, config.num_classes)

    def forward(self, image: Tensor, text: Tensor, text_lengths: Tensor | None = None) -> Tensor:
        _check_inputs(image, text, text_lengths, self.config.width)
        for block in self.image_blocks:
            image = block(image)  # (B, N, d)
        for self_block, cross_block in zip(self.text_blocks, self.cross_blocks):
            text = self_block(text, kv_lengths=text_lengths)  # (B, M, d)
            text = cross_block(text, image)  # (B, M, d): all N image tokens are valid keys
        features = _mean_tokens(self.ln_text(text), text_lengths)  # (B, d)
        return features if self.head is None else self.head(features)  # (B, classes)
# ANCHOR_END: CrossModalFusion
