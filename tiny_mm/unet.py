"""A text-conditioned U-Net: the denoiser Stable Diffusion uses, in miniature.

Chapter 11's diffusion generator. The transformer of `tiny_mm.denoiser` treats
an image as 64 patch tokens that must learn, from data alone, which patches lie
next to which; trained for minutes on a CPU it drew the prompt's colour but
scattered it over independent patches (the chapter has the figures). A U-Net
(Ronneberger et al. 2015; Ho et al. 2020 for diffusion) builds locality in:
3 x 3 convolutions at full resolution, then at 1/2 and 1/4, the text read by
cross-attention at the coarse levels, and skip connections carrying the fine
detail back up. Rombach et al. 2022 put the same cross-attention
("SpatialTransformer") inside their U-Net; ours has three levels:

    32 x 32, c      [RGB, row, column] -> 3 x 3 conv, ResBlock   -> skip h0
    16 x 16, 2c     ResBlock, CrossAttentionBlock (256 positions read the caption) -> skip h1
     8 x 8,  2c     ResBlock, DenoiserBlock (self-attention + cross-attention)    -> skip h2
     8 x 8,  2c     middle: ResBlock, DenoiserBlock, ResBlock
     8 x 8,  2c     [middle, h2] -> ResBlock, DenoiserBlock, upsample x 2
    16 x 16, 2c     [., h1] -> ResBlock, CrossAttentionBlock, upsample x 2
    32 x 32, c      [., h0] -> ResBlock -> GroupNorm, SiLU, 3 x 3 conv to 3 channels (zero-initialised)

    the step t      sinusoids -> MLP -> an embedding (4c) that every ResBlock turns into
                    a per-channel scale and shift of its features
    the caption     `TextEncoder` (as the transformer's): its words for cross-attention, and
                    their mean projected and added to the step's embedding (Imagen and
                    SD-XL add a pooled text vector the same way)

The U-Net reads and writes the same (B, N, C) pixel-patch tokens as `TextDenoiser`
(`patchify` of the image), so the training loop, the sampler and guidance serve
both; inside, the tokens are put back into an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention
from tiny_mm.checks import check_ints
from tiny_mm.denoiser import Caption, DenoiserBlock, TextEncoder, TokenScaler, VOrEps, check_shared_sizes, \
    checked_inputs, patchify, timestep_embedding, unpatchify
from tiny_mm.layers import MLP, mlp_hidden
from tiny_mm.training import load_sized_model, save_sized_model

__all__ = ["UNetConfig", "with_coordinates", "ResBlock", "CrossAttentionBlock", "TextUNet", "save_unet", "load_unet"]


# ANCHOR: UNetConfig
@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the text-conditioned U-Net.

    text_vocab, text_len: V word ids and T caption positions (as `DenoiserConfig`).
    image_size, patch: the S x S RGB images (S divisible by 4 and by patch) and the p x p
        patches of the tokens the U-Net reads and writes: N = (S / p)^2 tokens of 3 p^2.
    channels: c, the width at full resolution (2c at 1/2 and 1/4).
    groups: GroupNorm's groups (c must be divisible by it).
    heads, mlp_ratio: the attention blocks' heads and MLP ratio.
    text_width, text_layers: the caption encoder's width e and depth. 0 by default: the
        words' own embeddings (plus their positions') are what the image reads. These
        captions need no context to be understood, and a block on top, trained for minutes,
        made the words harder to tell apart, not easier (the chapter has the figures).
    prediction: "v" or "eps", as `DenoiserConfig.prediction`.
    """

    text_vocab: int = 45
    text_len: int = 16
    image_size: int = 32
    patch: int = 4
    channels: int = 32
    groups: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    text_width: int = 64
    text_layers: int = 0
    prediction: str = "v"

    def __post_init__(self) -> None:
        check_ints(self, positive=("text_vocab", "text_len", "image_size", "patch", "channels", "groups", "heads",
                                   "text_width"),
                   non_negative=("text_layers",))
        if self.image_size % 4 or self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} must be divisible by 4 (two halvings) and by "
                             f"patch {self.patch}")
        if self.channels % self.groups:
            raise ValueError(f"channels {self.channels} must be divisible by groups {self.groups}")
        if (2 * self.channels) % self.heads:
            raise ValueError(f"2 * channels {2 * self.channels} must be divisible by heads {self.heads}")
        check_shared_sizes(self)

    @property
    def token_dim(self) -> int:
        """C = 3 p^2 numbers per token."""
        return 3 * self.patch**2

    @property
    def num_tokens(self) -> int:
        """N = (S / p)^2 tokens per image."""
        return (self.image_size // self.patch) ** 2
# ANCHOR_END: UNetConfig


# ANCHOR: ResBlock
class ResBlock(nn.Module):
    """Two 3 x 3 convolutions with a residual path, modulated by the step's embedding.

    h = conv_1(SiLU(norm_1 x)); (scale, shift) = emb_proj(SiLU(emb));
    h = conv_2(SiLU(norm_2(h) (1 + scale) + shift)); out = skip(x) + h,
    skip a 1 x 1 convolution when the channels change. conv_2 starts at zero, so
    a fresh block is its skip path (the "zero module" of Ho et al.'s code).

    Shapes: forward(x (B, c_in, H, W), emb (B, E)) -> (B, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm_1 = nn.GroupNorm(groups, c_in)
        self.conv_1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out)
        self.norm_2 = nn.GroupNorm(groups, c_out)
        self.conv_2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv_2.weight)
        nn.init.zeros_(self.conv_2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_1(F.silu(self.norm_1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = self.conv_2(F.silu(self.norm_2(h) * (1 + scale) + shift))
        return self.skip(x) + h
# ANCHOR_END: ResBlock


# ANCHOR: CrossAttentionBlock
class CrossAttentionBlock(nn.Module):
    """x = x + cross_attn(ln_1 x, caption); x = x + mlp(ln_2 x): `DenoiserBlock` without self-attention.

    For the 16 x 16 level, whose 256 positions read the caption but leave reading
    each other to the convolutions. Shapes: forward(x (B, L, d), text (B, T, e),
    text_lengths (B,)) -> (B, L, d).
    """

    def __init__(self, width: int, heads: int, text_width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, heads, kdim=text_width, vdim=text_width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))

    def forward(self, x: Tensor, text: Tensor, text_lengths: Tensor) -> Tensor:
        x = x + self.cross_attn(self.ln_1(x), text, text, kv_lengths=text_lengths)  # (B, L, d)
        return x + self.mlp(self.ln_2(x))
# ANCHOR_END: CrossAttentionBlock


def with_coordinates(images: Tensor) -> Tensor:
    """(B, 3, S, S) -> (B, 5, S, S): the row and the column of each pixel, in [-1, 1], as two more
    channels (Liu et al. 2018, "CoordConv"). A convolution is the same everywhere; "on the
    left" needs the network to know where the left is, and zero padding tells it only slowly."""
    B, _, S, _ = images.shape
    r = torch.linspace(-1.0, 1.0, S, dtype=images.dtype, device=images.device)
    rows, cols = torch.meshgrid(r, r, indexing="ij")  # (S, S) each
    return torch.cat([images, torch.stack([rows, cols])[None].expand(B, -1, -1, -1)], dim=1)


def _on_grid(block: nn.Module, x: Tensor, text: Tensor, lengths: Tensor) -> Tensor:
    """Run a token block on a feature map: (B, c, H, W) -> H W tokens (B, H W, c) -> back."""
    B, c, H, W = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, H W, c), row-major positions
    return block(tokens, text, lengths).transpose(1, 2).reshape(B, c, H, W)


# ANCHOR: TextUNet
class TextUNet(VOrEps, nn.Module):
    """Predicts v (or eps) of noised pixel-patch tokens, given the step and the caption.

    Shapes: forward(z_t (B, N, C), t (B,) long, caption Caption(ids (B, T), lengths (B,)) or
        None for the empty one) -> (B, N, C), N and C as `UNetConfig.num_tokens`, `.token_dim`.
        `eps(schedule)` and `target(...)` as `TextDenoiser`'s.
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        c, g, e, heads, r = config.channels, config.groups, config.text_width, config.heads, config.mlp_ratio
        emb = 4 * c
        self.scaler = TokenScaler(config.token_dim)
        self.text_encoder = TextEncoder(config)
        self.time_mlp = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_pool_proj = nn.Linear(e, emb)
        self.conv_in = nn.Conv2d(3 + 2, c, 3, padding=1)  # RGB and the two coordinate planes
        # down: 32 -> 16 -> 8
        self.down_0 = ResBlock(c, c, emb, g)
        self.downsample_1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down_1 = ResBlock(c, 2 * c, emb, g)
        self.down_1_attn = CrossAttentionBlock(2 * c, heads, e, r)
        self.downsample_2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.down_2 = ResBlock(2 * c, 2 * c, emb, g)
        self.down_2_attn = DenoiserBlock(2 * c, heads, e, r)
        # middle, at 8 x 8
        self.mid_1 = ResBlock(2 * c, 2 * c, emb, g)
        self.mid_attn = DenoiserBlock(2 * c, heads, e, r)
        self.mid_2 = ResBlock(2 * c, 2 * c, emb, g)
        # up: 8 -> 16 -> 32, each level reading its skip
        self.up_2 = ResBlock(4 * c, 2 * c, emb, g)
        self.up_2_attn = DenoiserBlock(2 * c, heads, e, r)
        self.up_1 = ResBlock(4 * c, 2 * c, emb, g)
        self.up_1_attn = CrossAttentionBlock(2 * c, heads, e, r)
        self.up_0 = ResBlock(3 * c, c, emb, g)
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # starts by predicting 0: a calm first step
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z_t: Tensor, t: Tensor, caption: Caption | None) -> Tensor:
        c = self.config
        caption = checked_inputs(c, z_t, t, caption)
        lengths = caption.lengths
        text = self.text_encoder(caption)  # (B, T, e)
        real = (torch.arange(c.text_len, device=z_t.device)[None] < lengths[:, None]).to(text.dtype)  # (B, T)
        pooled = (text * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, e): mean of the real words
        emb = self.time_mlp(timestep_embedding(t, c.channels, dtype=z_t.dtype)) + self.text_pool_proj(pooled)

        x = with_coordinates(unpatchify(z_t, c.patch))  # (B, 5, S, S)
        h0 = self.down_0(self.conv_in(x), emb)  # (B, c, S, S)
        h1 = _on_grid(self.down_1_attn, self.down_1(self.downsample_1(h0), emb), text, lengths)  # (B, 2c, S/2, S/2)
        h2 = _on_grid(self.down_2_attn, self.down_2(self.downsample_2(h1), emb), text, lengths)  # (B, 2c, S/4, S/4)
        m = self.mid_2(_on_grid(self.mid_attn, self.mid_1(h2, emb), text, lengths), emb)
        u = _on_grid(self.up_2_attn, self.up_2(torch.cat([m, h2], 1), emb), text, lengths)
        u = F.interpolate(u, scale_factor=2, mode="nearest")  # (B, 2c, S/2, S/2)
        u = _on_grid(self.up_1_attn, self.up_1(torch.cat([u, h1], 1), emb), text, lengths)
        u = F.interpolate(u, scale_factor=2, mode="nearest")  # (B, 2c, S, S)
        u = self.up_0(torch.cat([u, h0], 1), emb)  # (B, c, S, S)
        out = self.conv_out(F.silu(self.norm_out(u)))  # (B, 3, S, S)
        return patchify(out, c.patch)  # (B, N, C)
# ANCHOR_END: TextUNet


def save_unet(model: TextUNet, path: str | Path) -> None:
    """Write {"config": sizes, "state_dict": weights}; `load_unet` reads it back."""
    save_sized_model(model, path)


def load_unet(path: str | Path) -> TextUNet:
    """Rebuild a `TextUNet` saved by `save_unet` (weights_only: the file cannot run code)."""
    return load_sized_model(path, TextUNet, UNetConfig, "a TextUNet")
