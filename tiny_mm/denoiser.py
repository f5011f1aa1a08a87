"""Latent diffusion in miniature: a denoiser that reads the caption through cross-attention.

Stable Diffusion (Rombach et al. 2022) does not denoise pixels. An autoencoder
squeezes each image into a small grid of latent vectors, the diffusion model
learns to denoise *those*, and the decoder turns the final latents back into
pixels. Here the autoencoder is the VQ-VAE of the DALL·E-style generator
(`tiny_mm.vqvae`): its encoder writes a 32 x 32 image as 8 x 8 = 64 vectors of
32 numbers, its decoder reads them back. The diffusion runs on the encoder's
vectors *before* quantisation, and a sample is snapped to the nearest codebook
entries before decoding: the paper's "VQ-regularised" variant, in which the
quantiser is part of the decoder.

    LatentScaler      per-channel mean and std of the training latents: the
                      diffusion sees latents of unit variance (SD's 0.18215 is one
                      such scale, for all channels at once)
    TextEncoder       caption ids (B, T) -> token vectors (B, T, e): word and position
                      embeddings and a few non-causal transformer blocks (SD uses
                      CLIP's text tower, 77 x 768; see the chapter)
    DenoiserBlock     self-attention over the latents, cross-attention to the caption,
                      an MLP (SD's "BasicTransformerBlock", each pre-LayerNorm, residual)
    LatentDenoiser    (z_t (B, N, C), t (B,), caption) -> predicted noise eps (B, N, C);
                      the step t enters as a sinusoidal embedding added to every token

Classifier-free guidance needs the same network to work without a caption.
SD's "no caption" is the empty prompt, and so is ours: the caption <bos> <eos>,
to which `caption_dropout` swaps each training caption with probability p.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention
from tiny_mm.data.words import BOS, EOS, PAD
from tiny_mm.layers import MLP, TransformerBlock, mlp_hidden

__all__ = [
    "DenoiserConfig",
    "Caption",
    "empty_captions",
    "caption_dropout",
    "timestep_embedding",
    "LatentScaler",
    "TextEncoder",
    "DenoiserBlock",
    "LatentDenoiser",
    "save_denoiser",
    "load_denoiser",
]


# ANCHOR: DenoiserConfig
@dataclass(frozen=True)
class DenoiserConfig:
    """Sizes of the text-conditioned latent denoiser.

    text_vocab, text_len: V word ids and T caption positions (as `DalleConfig`).
    latent_dim, latent_tokens: C numbers per latent vector, N vectors (the VQ-VAE's
        code_dim and num_tokens: 32 and 64).
    width, layers, heads, mlp_ratio: the denoiser's d, depth, heads, MLP ratio.
    text_width, text_layers: the caption encoder's width e and depth.
    """

    text_vocab: int = 45
    text_len: int = 16
    latent_dim: int = 32
    latent_tokens: int = 64
    width: int = 96
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    text_width: int = 64
    text_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("text_vocab", "text_len", "latent_dim", "latent_tokens", "width", "layers", "heads",
                     "text_width", "text_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads or self.text_width % self.heads:
            raise ValueError(f"width {self.width} and text_width {self.text_width} must be divisible by "
                             f"heads {self.heads}")
        if self.text_len < 2:
            raise ValueError(f"text_len must hold <bos> and <eos>, got {self.text_len}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
# ANCHOR_END: DenoiserConfig


class Caption(NamedTuple):
    """A batch of captions as the denoiser reads them: ids (B, T) long padded with <pad>, lengths (B,)."""

    ids: Tensor
    lengths: Tensor


# ANCHOR: empty_captions
def empty_captions(batch: int, text_len: int, device: torch.device | str | None = None) -> Caption:
    """The empty prompt, B times: <bos> <eos> <pad> ... : what "no caption" means for guidance."""
    ids = torch.full((batch, text_len), PAD, dtype=torch.long, device=device)  # (B, T)
    ids[:, 0], ids[:, 1] = BOS, EOS
    return Caption(ids, torch.full((batch,), 2, dtype=torch.long, device=device))


def caption_dropout(caption: Caption, p: float, generator: torch.Generator | None = None) -> Caption:
    """Swap each caption for the empty one with probability p (training for classifier-free guidance)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    ids, lengths = caption
    drop = torch.rand(ids.shape[0], generator=generator) < p  # (B,)
    empty = empty_captions(ids.shape[0], ids.shape[1], ids.device)
    return Caption(torch.where(drop[:, None], empty.ids, ids), torch.where(drop, empty.lengths, lengths))
# ANCHOR_END: empty_captions


# ANCHOR: timestep_embedding
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoids of the step: t (B,) -> (B, dim), [cos(t w_0) .. cos(t w_{h-1}), sin(t w_0) .. sin(t w_{h-1})].

    w_i = max_period^(-i / h), h = dim // 2 (the transformer's position code,
    with the step as the position). dim must be even. The angles reach 1000
    radians, where float32 keeps only about four digits of the angle: they are
    computed in float64 and the result cast to ``dtype``.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"t must be a (B,) tensor of steps, got {getattr(t, 'shape', type(t))}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)  # (h,)
    angles = t.double()[:, None] * freqs[None]  # (B, h)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(dtype)  # (B, dim)
# ANCHOR_END: timestep_embedding


# ANCHOR: LatentScaler
class LatentScaler(nn.Module):
    """Standardise latents per channel: (z - mean) / std, and back.

    fit(latents (M, N, C)) sets mean and std (C,) from the training latents;
    the two are buffers, saved with the denoiser.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, latents: Tensor) -> LatentScaler:
        if not isinstance(latents, Tensor) or latents.dim() != 3 or latents.shape[-1] != self.mean.numel():
            raise ValueError(f"latents must have shape (M, N, {self.mean.numel()}), "
                             f"got {getattr(latents, 'shape', type(latents))}")
        flat = latents.reshape(-1, latents.shape[-1]).double()  # (M*N, C)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-6))
        return self

    def scale(self, z: Tensor) -> Tensor:
        return (z - self.mean) / self.std  # (B, N, C)

    def unscale(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean  # (B, N, C)
# ANCHOR_END: LatentScaler


# ANCHOR: TextEncoder
class TextEncoder(nn.Module):
    """Caption ids (B, T) and lengths (B,) -> token vectors (B, T, e); padding is never read."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        e = config.text_width
        self.embedding = nn.Embedding(config.text_vocab, e)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.text_len, e))  # (T, e)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(e, config.heads, config.mlp_ratio) for _ in range(config.text_layers))
        self.ln_final = nn.LayerNorm(e)

    def forward(self, caption: Caption) -> Tensor:
        x = self.embedding(caption.ids) + self.positional_embedding  # (B, T, e)
        for block in self.blocks:
            x = block(x, kv_lengths=caption.lengths)  # (B, T, e): each word reads the real words only
        return self.ln_final(x)  # (B, T, e)
# ANCHOR_END: TextEncoder


# ANCHOR: DenoiserBlock
class DenoiserBlock(nn.Module):
    """x = x + self_attn(ln_1 x); x = x + cross_attn(ln_2 x, caption); x = x + mlp(ln_3 x).

    Shapes: forward(x (B, N, d), text (B, T, e), text_lengths (B,)) -> (B, N, d).
    Every latent token reads every other one, then the caption's real words.
    """

    def __init__(self, width: int, heads: int, text_width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, heads, kdim=text_width, vdim=text_width)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))

    def forward(self, x: Tensor, text: Tensor, text_lengths: Tensor) -> Tensor:
        x = x + self.self_attn(self.ln_1(x))  # (B, N, d)
        x = x + self.cross_attn(self.ln_2(x), text, text, kv_lengths=text_lengths)  # (B, N, d)
        return x + self.mlp(self.ln_3(x))  # (B, N, d)
# ANCHOR_END: DenoiserBlock


# ANCHOR: LatentDenoiser
class LatentDenoiser(nn.Module):
    """Predicts the noise in a noised latent image, given the step and the caption.

    Shapes: forward(z_t (B, N, C), t (B,) long, caption Caption(ids (B, T), lengths (B,)))
        -> eps (B, N, C). `denoiser(z_t, t, caption)` is the signature
        `tiny_mm.diffusion.sample` calls; None as the caption means the empty one.
    """

    def __init__(self, config: DenoiserConfig = DenoiserConfig()) -> None:
        super().__init__()
        if not isinstance(config, DenoiserConfig):
            raise ValueError(f"config must be a DenoiserConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.scaler = LatentScaler(config.latent_dim)  # carried with the weights, used by the pipeline
        self.text_encoder = TextEncoder(config)
        self.input_proj = nn.Linear(config.latent_dim, d)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.latent_tokens, d))  # (N, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.blocks = nn.ModuleList(
            DenoiserBlock(d, config.heads, config.text_width, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.output_proj = nn.Linear(d, config.latent_dim)
        nn.init.zeros_(self.output_proj.weight)  # starts by predicting eps = 0: a calm first step
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, z_t: Tensor, t: Tensor, caption: Caption | None) -> Tensor:
        c = self.config
        if not isinstance(z_t, Tensor) or z_t.dim() != 3 or tuple(z_t.shape[1:]) != (c.latent_tokens, c.latent_dim):
            raise ValueError(f"z_t must have shape (B, {c.latent_tokens}, {c.latent_dim}), "
                             f"got {getattr(z_t, 'shape', type(z_t))}")
        batch = z_t.shape[0]
        if not isinstance(t, Tensor) or tuple(t.shape) != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {getattr(t, 'shape', type(t))}")
        if caption is None:
            caption = empty_captions(batch, c.text_len, z_t.device)
        self._check_caption(caption, batch)
        text = self.text_encoder(caption)  # (B, T, e)
        time = self.time_mlp(timestep_embedding(t, c.width, dtype=z_t.dtype))  # (B, d)
        x = self.input_proj(z_t) + self.positional_embedding + time[:, None]  # (B, N, d)
        for block in self.blocks:
            x = block(x, text, caption.lengths)  # (B, N, d)
        return self.output_proj(self.ln_final(x))  # (B, N, C)

    def _check_caption(self, caption: Caption, batch: int) -> None:
        c = self.config
        ids, lengths = caption
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or tuple(ids.shape) != (batch, c.text_len):
            raise ValueError(f"caption ids must be an int64 tensor ({batch}, {c.text_len}), "
                             f"got {getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}")
        if int(ids.min()) < 0 or int(ids.max()) >= c.text_vocab:
            raise ValueError(f"word ids must lie in [0, {c.text_vocab})")
        if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (batch,) or int(lengths.min()) < 1 \
                or int(lengths.max()) > c.text_len:
            raise ValueError(f"caption lengths must be ({batch},) in [1, {c.text_len}]")
# ANCHOR_END: LatentDenoiser


def save_denoiser(model: LatentDenoiser, path: str | Path) -> None:
    """Write {"config": sizes, "state_dict": weights (the latent scaler's included)}."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state}, str(path))


def load_denoiser(path: str | Path) -> LatentDenoiser:
    """Rebuild a `LatentDenoiser` saved by `save_denoiser` (weights_only: the file cannot run code)."""
    saved = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or set(saved) != {"config", "state_dict"}:
        raise ValueError(f"{path} is not a LatentDenoiser checkpoint (expected keys 'config' and 'state_dict')")
    model = LatentDenoiser(DenoiserConfig(**saved["config"]))
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()
