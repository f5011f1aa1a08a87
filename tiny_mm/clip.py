"""CLIP: an image tower and a text tower that meet in one embedding space.

    encode_image   images (B, 3, H, W) -> (B, E)    chapter 3's vision transformer, or CLIP's
                                                    modified ResNet (RN50, ...), as ``visual``
    encode_text    tokens (B, 77)      -> (B, E)    a causal transformer over token ids
    forward        both -> logits (B, B') and (B', B): scaled cosine similarities

The text tower, step by step:

    token_embedding       (B, L) ids -> (B, L, width)
    positional_embedding  -> (B, L, width)          one learned vector per position
    transformer           -> (B, L, width)          causal pre-LN blocks: token i sees tokens <= i
    ln_final              -> (B, L, width)
    pool                  -> (B, width)             the output at the end-of-text token
    @ text_projection     -> (B, E)

The end-of-text token has the largest id of CLIP's vocabulary (49407), so its
position is ``tokens.argmax(-1)``; because attention is causal, its output has
read the whole caption and none of the zero padding after it.

Parameter names are OpenAI's (``visual.*``, ``token_embedding``,
``transformer.resblocks.{i}.attn.in_proj_weight``, ``ln_final``,
``text_projection``, ``logit_scale``), so a state dict saved by OpenAI's code
or by open_clip loads with strict keys. Reading checkpoints from disk (state
dicts, OpenAI's TorchScript archives, Hugging Face's CLIPModel) is
`tiny_mm.checkpoints.load_clip`; this module is the model only.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.layers import TransformerBlock
from tiny_mm.vit import QuickGELU, VisionConfig, VisionTransformer

__all__ = [
    "ResNetConfig", "ModifiedResNet", "TextConfig", "TextTransformer", "CLIPConfig", "CLIP", "encode_tokens",
]

# CLIP's models all use 64-dimensional heads; the number of heads changes no tensor's shape.
HEAD_WIDTH = 64


# ANCHOR: TextConfig
@dataclass(frozen=True)
class TextConfig:
    """Sizes of CLIP's text transformer (defaults: the text tower of ViT-B/32).

    context_length: positions in the positional table (77); captions are padded to it.
    vocab_size: rows of the token embedding (49408 for CLIP's BPE).
    width, layers, heads: transformer width d, depth and number of heads.
    mlp_ratio: the MLP's hidden size is int(width * mlp_ratio).
    quick_gelu: QuickGELU in the MLPs (OpenAI's models) or exact GELU (open_clip's LAION models).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
# ANCHOR_END: TextConfig


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: the shared embedding size E and the two towers' configs.

    vision: a VisionConfig (ViT-B/32, ...) or a ResNetConfig (RN50, ...).
    vision.output_dim must equal embed_dim (the image tower projects straight into the shared space).
    """

    embed_dim: int = 512
    vision: VisionConfig | ResNetConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.vision.output_dim != self.embed_dim:
            raise ValueError(
                f"vision.output_dim ({self.vision.output_dim}) must equal embed_dim ({self.embed_dim})"
            )


# ANCHOR: ResNetConfig
@dataclass(frozen=True)
class ResNetConfig:
    """Sizes of CLIP's modified ResNet image tower (defaults: RN50).

    layers: Bottleneck blocks in each of the four stages ((3, 4, 6, 3) for RN50).
    width: channels after the stem (64 for RN50); stage k outputs width * 2**k * 4.
    image_size: input side; a multiple of 32 (the tower downsamples 32 times).
    heads: heads of the attention pooling, width * 32 // 64 in CLIP's models.
    output_dim: size of the final embedding.
    """

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    heads: int = 32
    output_dim: int = 1024

    def __post_init__(self) -> None:
        if len(self.layers) != 4 or any(not isinstance(n, int) or n < 1 for n in self.layers):
            raise ValueError(f"layers must be four positive ints, got {self.layers!r}")
        for name in ("width", "image_size", "heads", "output_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % 32:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 32")
        if (self.width * 32) % self.heads:
            raise ValueError(f"width * 32 = {self.width * 32} must be divisible by heads {self.heads}")
# ANCHOR_END: ResNetConfig


class Bottleneck(nn.Module):
    """1x1 conv, 3x3 conv, [average pool when striding], 1x1 conv to 4x the channels; residual.

    CLIP's change to ResNet: a stride is an average pool before the last conv
    (anti-aliased), never a strided convolution. Shapes: (B, C_in, H, W) -> (B, 4 planes, H/s, W/s).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride > 1 or inplanes != out:
            # Named "-1", "0", "1" as in OpenAI's checkpoints: the pool has no weights.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        y = F.relu(self.bn2(self.conv2(y)))  # (B, planes, H, W)
        y = self.bn3(self.conv3(self.avgpool(y)))  # (B, 4 planes, H/s, W/s)
        skip = x if self.downsample is None else self.downsample(x)  # (B, 4 planes, H/s, W/s)
        return F.relu(y + skip)  # (B, 4 planes, H/s, W/s)


class AttentionPool2d(nn.Module):
    """The ResNet's global pool: one query (the mean of the feature map) attends to every position.

    forward(x (B, C, h, w)) -> (B, output_dim). Keys, queries and values have
    separate projections (q_proj, k_proj, v_proj), the output c_proj.
    """

    def __init__(self, grid: int, channels: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, channels) / channels**0.5)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, hw+1, C): the mean goes first
        x = x + self.positional_embedding.to(x.dtype)  # (B, hw+1, C)
        B, L, C = x.shape
        Dh = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k_proj(x).view(B, L, self.heads, Dh).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v_proj(x).view(B, L, self.heads, Dh).transpose(1, 2)  # (B, H, L, Dh)
        weights = torch.softmax(q @ k.transpose(-2, -1) * Dh**-0.5, dim=-1)  # (B, H, 1, L)
        pooled = (weights @ v).transpose(1, 2).reshape(B, C)  # (B, C)
        return self.c_proj(pooled)  # (B, output_dim)


# ANCHOR: ModifiedResNet
class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower (RN50, RN101, ...). forward(images (B, 3, H, W)) -> (B, output_dim).

    Differences from torchvision's ResNet: a stem of three 3x3 convolutions and
    an average pool instead of one 7x7 convolution and a max pool; strides as
    average pools inside the blocks; attention pooling instead of a global mean.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = w
        for stage, blocks in enumerate(config.layers):
            planes = w * 2**stage
            stride = 1 if stage == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.attnpool = AttentionPool2d(config.image_size // 32, w * 32, config.heads, config.output_dim)

    def forward(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        x = images.to(self.conv1.weight.dtype)  # (B, 3, H, W)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w/2, H/2, W/2)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, w/2, H/2, W/2)
        x = F.relu(self.bn3(self.conv3(x)))  # (B, w, H/2, W/2)
        x = self.avgpool(x)  # (B, w, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 w, H/32, W/32)
        return self.attnpool(x)  # (B, output_dim)
# ANCHOR_END: ModifiedResNet


class _CausalBlocks(nn.Module):
    """The text blocks under ``resblocks``, so keys read ``transformer.resblocks.{i}...``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads, config.mlp_ratio, causal=True, packed_in_proj=True)
            for _ in range(config.layers)
        )
        if config.quick_gelu:
            for block in self.resblocks:  # no parameters: the state dict's keys are unchanged
                block.mlp.gelu = QuickGELU()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)  # (B, L, width)
        return x


# ANCHOR: TextTransformer
class TextTransformer(nn.Module):
    """CLIP's text tower. forward(tokens (B, context_length) int) -> (B, embed_dim).

    Its parameters sit at the top level of OpenAI's CLIP (there is no ``text.``
    prefix), so `CLIP` holds them directly; this module is the same tower on its own.
    """

    def __init__(self, config: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, d))  # (L, width)
        self.transformer = _CausalBlocks(config)
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(d**-0.5 * torch.randn(d, embed_dim))  # (width, E)

    def forward(self, tokens: Tensor) -> Tensor:
        return encode_tokens(self, tokens)  # (B, E)
# ANCHOR_END: TextTransformer


def _check_tokens(tokens: Tensor, config: TextConfig) -> None:
    L = config.context_length
    if not isinstance(tokens, Tensor):
        raise ValueError(f"tokens must be a torch.Tensor of shape (B, {L}), got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[1] != L:
        raise ValueError(f"tokens must have shape (B, {L}), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an int64 or int32 tensor of token ids, got dtype {tokens.dtype}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        low, high = int(tokens.min()), int(tokens.max())
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got {low}..{high}")


# ANCHOR: encode_tokens
def encode_tokens(tower: nn.Module, tokens: Tensor) -> Tensor:
    """The text tower's computation, for any module holding its five parts.

    tokens (B, L) -> (B, E). Shared by `TextTransformer` and `CLIP`, whose
    parameters have the same names but no common parent module.
    """
    _check_tokens(tokens, tower.text_config if isinstance(tower, CLIP) else tower.config)
    x = tower.token_embedding(tokens)  # (B, L, width)
    x = x + tower.positional_embedding.to(x.dtype)  # (B, L, width)
    x = tower.ln_final(tower.transformer(x))  # (B, L, width): causal, so padding never reaches the EOT
    eot = tokens.argmax(dim=-1)  # (B,): end-of-text has the largest id, 49407
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, width)
    return pooled @ tower.text_projection  # (B, E)
# ANCHOR_END: encode_tokens


# ANCHOR: CLIP
class CLIP(nn.Module):
    """OpenAI's CLIP with its parameter names. See the module docstring for the shapes."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.text_config = config.text
        if isinstance(config.vision, ResNetConfig):
            self.visual: nn.Module = ModifiedResNet(config.vision)
        else:
            self.visual = VisionTransformer(config.vision)
        # The text tower's parts, at the top level as in OpenAI's state dicts.
        text = TextTransformer(config.text, config.embed_dim)
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding  # (L, width)
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection  # (width, E)
        # The softmax temperature, learned in log space; CLIP starts it at 1/0.07.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # ()

    def encode_image(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> (B, E), not normalised."""
        return self.visual(images)  # (B, E)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """tokens (B, context_length) -> (B, E), not normalised."""
        return encode_tokens(self, tokens)  # (B, E)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), tokens (B', L) -> (logits_per_image (B, B'), logits_per_text (B', B)).

        logits[i, j] = exp(logit_scale) * cos(image i, text j).
        """
        image = F.normalize(self.encode_image(images), dim=-1)  # (B, E), unit rows
        text = F.normalize(self.encode_text(tokens), dim=-1)  # (B', E), unit rows
        logits_per_image = self.logit_scale.exp() * image @ text.t()  # (B, B')
        return logits_per_image, logits_per_image.t()  # (B, B'), (B', B)
# ANCHOR_END: CLIP

