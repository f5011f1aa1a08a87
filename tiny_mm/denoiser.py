"""A text-conditioned diffusion denoiser: a transformer over image tokens that reads the caption.

The network of chapter 11's diffusion generator. It denoises a grid of N image
tokens of C numbers each, and two kinds of token feed it:

    pixel patches   a 32 x 32 image cut into 8 x 8 patches of 4 x 4 pixels: 64 tokens
                    of 48 numbers (`patchify`), in [-1, 1]; DiT (Peebles & Xie 2023)
                    denoises patches the same way. The chapter's run.
    latents         an autoencoder's vectors, as Stable Diffusion (Rombach et al. 2022)
                    does: here the VQ-VAE of the DALL·E-style generator, 64 vectors of 32
                    numbers before quantisation, standardised per channel; a sample is
                    snapped to the nearest codes and decoded. The chapter measures both.

    TokenScaler       tokens -> the diffusion's scale and back: (x - mean) / std, per channel
                      (pixels: mean 0.5 and std 0.5 map [0, 1] to [-1, 1])
    TextEncoder       caption ids (B, T) -> token vectors (B, T, e): word and position
                      embeddings and a few non-causal transformer blocks (SD uses
                      CLIP's text tower, 77 x 768; see the chapter)
    DenoiserBlock     self-attention over the image tokens, cross-attention to the caption,
                      an MLP (SD's "BasicTransformerBlock", each pre-LayerNorm, residual)
    TextDenoiser      (x_t (B, N, C), t (B,), caption) -> the prediction (B, N, C), v or eps;
                      the step t enters as a sinusoidal embedding added to every token

Classifier-free guidance needs the same network to work without a caption.
SD's "no caption" is the empty prompt, and so is ours: the caption <bos> <eos>,
to which `caption_dropout` swaps each training caption with probability p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention
from tiny_mm.checks import check_ints
from tiny_mm.data.words import BOS, EOS, PAD
from tiny_mm.layers import MLP, TransformerBlock, mlp_hidden
from tiny_mm.training import load_sized_model, save_sized_model

__all__ = [
    "DenoiserConfig",
    "patchify",
    "unpatchify",
    "Caption",
    "empty_captions",
    "caption_dropout",
    "timestep_embedding",
    "TokenScaler",
    "TextEncoder",
    "DenoiserBlock",
    "VOrEps",
    "TextDenoiser",
    "check_shared_sizes",
    "checked_inputs",
    "save_denoiser",
    "load_denoiser",
]


# ANCHOR: DenoiserConfig
@dataclass(frozen=True)
class DenoiserConfig:
    """Sizes of the text-conditioned denoiser.

    text_vocab, text_len: V word ids and T caption positions (as `DalleConfig`).
    token_dim, num_tokens: C numbers per image token, N tokens (pixel patches: 48 and 64;
        the VQ-VAE's latents: its code_dim and num_tokens, 32 and 64).
    width, layers, heads, mlp_ratio: the denoiser's d, depth, heads, MLP ratio.
    text_width, text_layers: the caption encoder's width e and depth (0: each word is its
        embedding plus its position's, layer-normalised).
    prediction: what the network's output means, "v" (v = sqrt(abar_t) eps - sqrt(1 - abar_t)
        x0, Salimans & Ho 2022) or "eps" (the noise, Ho et al. 2020). The chapter's model
        predicts v: trained on eps, it learned to ignore the caption (its error with and
        without it was the same to four digits), because eps is easy to guess at the noisy
        steps, which are the steps where only the caption can say what the image will be.
    """

    text_vocab: int = 45
    text_len: int = 16
    token_dim: int = 48
    num_tokens: int = 64
    width: int = 96
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    text_width: int = 64
    text_layers: int = 1
    prediction: str = "v"

    def __post_init__(self) -> None:
        check_ints(self, positive=("text_vocab", "text_len", "token_dim", "num_tokens", "width", "layers", "heads",
                                   "text_width"),
                   non_negative=("text_layers",))
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        check_shared_sizes(self)
# ANCHOR_END: DenoiserConfig


def check_shared_sizes(config) -> None:
    """The checks both denoisers' configs (`DenoiserConfig`, `tiny_mm.unet.UNetConfig`) share:
    text_width divisible by heads, room for <bos> and <eos>, a positive mlp_ratio, a known prediction."""
    c = config
    if c.text_width % c.heads:
        raise ValueError(f"text_width {c.text_width} must be divisible by heads {c.heads}")
    if c.text_len < 2:
        raise ValueError(f"text_len must hold <bos> and <eos>, got {c.text_len}")
    if isinstance(c.mlp_ratio, bool) or not isinstance(c.mlp_ratio, (int, float)) or not c.mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {c.mlp_ratio!r}")
    if c.prediction not in ("v", "eps"):
        raise ValueError(f"prediction must be 'v' or 'eps', got {c.prediction!r}")


# ANCHOR: patchify
def patchify(images: Tensor, patch: int = 4) -> Tensor:
    """Images (B, 3, S, S) -> tokens (B, (S / p)^2, 3 p^2): row-major patches, each flattened channel-first."""
    square = isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3 \
        and images.shape[2] == images.shape[3]
    if not square or images.shape[2] % patch:
        raise ValueError(f"images must have shape (B, 3, S, S) with S a multiple of {patch}, "
                         f"got {getattr(images, 'shape', type(images))}")
    B, _, S, _ = images.shape
    g = S // patch
    x = images.reshape(B, 3, g, patch, g, patch)  # (B, 3, row, i, col, j)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * patch * patch)  # (B, N, 3 p^2)


def unpatchify(tokens: Tensor, patch: int = 4) -> Tensor:
    """The inverse of `patchify`: tokens (B, N, 3 p^2) -> images (B, 3, S, S), S = p sqrt(N)."""
    B, N, C = tokens.shape
    g = math.isqrt(N)
    if g * g != N or C != 3 * patch * patch:
        raise ValueError(f"tokens must have shape (B, square N, {3 * patch * patch}), got {tuple(tokens.shape)}")
    x = tokens.reshape(B, g, g, 3, patch, patch)  # (B, row, col, 3, i, j)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * patch, g * patch)
# ANCHOR_END: patchify


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


# ANCHOR: TokenScaler
class TokenScaler(nn.Module):
    """Standardise image tokens per channel: (z - mean) / std, and back.

    fit(tokens (M, N, C)) sets mean and std (C,) from the training tokens (latents);
    set(mean, std) fixes them (pixels in [0, 1]: 0.5 and 0.5, to [-1, 1]). The two
    are buffers, saved with the denoiser.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, latents: Tensor) -> TokenScaler:
        if not isinstance(latents, Tensor) or latents.dim() != 3 or latents.shape[-1] != self.mean.numel():
            raise ValueError(f"latents must have shape (M, N, {self.mean.numel()}), "
                             f"got {getattr(latents, 'shape', type(latents))}")
        flat = latents.reshape(-1, latents.shape[-1]).double()  # (M*N, C)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-6))
        return self

    @torch.no_grad()
    def set(self, mean: float, std: float) -> TokenScaler:
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.mean.fill_(mean)
        self.std.fill_(std)
        return self

    def scale(self, z: Tensor) -> Tensor:
        return (z - self.mean) / self.std  # (B, N, C)

    def unscale(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean  # (B, N, C)
# ANCHOR_END: TokenScaler


# ANCHOR: TextEncoder
class TextEncoder(nn.Module):
    """Caption ids (B, T) and lengths (B,) -> token vectors (B, T, e); padding is never read.

    The word embeddings start at unit scale (torch's default), 50 times the positions': the
    words are the keys cross-attention chooses among, and at GPT's 0.02 a fresh block's
    output, the same for every word, drowned them (the denoiser drew the prompt's colour,
    which the pooled caption carries, but put it anywhere; the chapter has the figures).
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        e = config.text_width
        self.embedding = nn.Embedding(config.text_vocab, e)  # N(0, 1)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.text_len, e))  # (T, e)
        self.blocks = nn.ModuleList(
            TransformerBlock(e, config.heads, config.mlp_ratio) for _ in range(config.text_layers)
        )
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
    Every image token reads every other one, then the caption's real words.
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


# ANCHOR: VOrEps
class VOrEps:
    """What a denoiser's output means, for a network whose ``config.prediction`` is "v" or "eps".

    eps(schedule): the network as `tiny_mm.diffusion.sample` wants it, (z_t, t, caption) -> eps;
    target(schedule, x0, t, eps): what it learns to output for x_t = q_sample(x0, t, eps).
    """

    def eps(self, schedule):
        if self.config.prediction == "eps":
            return self
        return lambda z_t, t, caption: schedule.eps_from_v(z_t, t, self(z_t, t, caption))

    def target(self, schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return eps if self.config.prediction == "eps" else schedule.v_target(x0, t, eps)
# ANCHOR_END: VOrEps


# ANCHOR: TextDenoiser
class TextDenoiser(VOrEps, nn.Module):
    """Predicts the noise (or v) of noised image tokens, given the step and the caption.

    Shapes: forward(x_t (B, N, C), t (B,) long, caption Caption(ids (B, T), lengths (B,)))
        -> prediction (B, N, C): v or eps, as config.prediction says. None as the caption
        means the empty one. `eps(schedule)` gives the function of (z_t, t, caption) -> eps
        that `tiny_mm.diffusion.sample` calls.
    """

    def __init__(self, config: DenoiserConfig = DenoiserConfig()) -> None:
        super().__init__()
        if not isinstance(config, DenoiserConfig):
            raise ValueError(f"config must be a DenoiserConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.scaler = TokenScaler(config.token_dim)  # carried with the weights, used by the pipeline
        self.text_encoder = TextEncoder(config)
        self.input_proj = nn.Linear(config.token_dim, d)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(config.num_tokens, d))  # (N, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.blocks = nn.ModuleList(
            DenoiserBlock(d, config.heads, config.text_width, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.output_proj = nn.Linear(d, config.token_dim)
        nn.init.zeros_(self.output_proj.weight)  # starts by predicting eps = 0: a calm first step
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, z_t: Tensor, t: Tensor, caption: Caption | None) -> Tensor:
        c = self.config
        caption = checked_inputs(c, z_t, t, caption)
        text = self.text_encoder(caption)  # (B, T, e)
        time = self.time_mlp(timestep_embedding(t, c.width, dtype=z_t.dtype))  # (B, d)
        x = self.input_proj(z_t) + self.positional_embedding + time[:, None]  # (B, N, d)
        for block in self.blocks:
            x = block(x, text, caption.lengths)  # (B, N, d)
        return self.output_proj(self.ln_final(x))  # (B, N, C)
# ANCHOR_END: TextDenoiser


def checked_inputs(config, z_t: Tensor, t: Tensor, caption: Caption | None) -> Caption:
    """Check a denoiser's inputs against its config (num_tokens, token_dim, text_len, text_vocab)
    and return the caption, the empty one for None. What both denoisers do first.

    z_t (B, N, C); t (B,); caption ids int64 (B, T) in [0, V), lengths (B,) in [1, T].
    """
    c = config
    if not isinstance(z_t, Tensor) or z_t.dim() != 3 or tuple(z_t.shape[1:]) != (c.num_tokens, c.token_dim):
        raise ValueError(f"z_t must have shape (B, {c.num_tokens}, {c.token_dim}), "
                         f"got {getattr(z_t, 'shape', type(z_t))}")
    batch = z_t.shape[0]
    if not isinstance(t, Tensor) or tuple(t.shape) != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {getattr(t, 'shape', type(t))}")
    if caption is None:
        return empty_captions(batch, c.text_len, z_t.device)
    ids, lengths = caption
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or tuple(ids.shape) != (batch, c.text_len):
        raise ValueError(f"caption ids must be an int64 tensor ({batch}, {c.text_len}), "
                         f"got {getattr(ids, 'shape', type(ids))} {getattr(ids, 'dtype', '')}")
    if int(ids.min()) < 0 or int(ids.max()) >= c.text_vocab:
        raise ValueError(f"word ids must lie in [0, {c.text_vocab})")
    if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (batch,) or int(lengths.min()) < 1 \
            or int(lengths.max()) > c.text_len:
        raise ValueError(f"caption lengths must be ({batch},) in [1, {c.text_len}]")
    return caption


def save_denoiser(model: TextDenoiser, path: str | Path) -> None:
    """Write {"config": sizes, "state_dict": weights}; `load_denoiser` reads it back."""
    save_sized_model(model, path)


def load_denoiser(path: str | Path) -> TextDenoiser:
    """Rebuild a `TextDenoiser` saved by `save_denoiser` (weights_only: the file cannot run code)."""
    return load_sized_model(path, TextDenoiser, DenoiserConfig, "a TextDenoiser")
