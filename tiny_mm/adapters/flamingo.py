"""Flamingo's adapter: a Perceiver Resampler and tanh-gated cross-attention in a frozen LM.

Flamingo (Alayrac et al., 2022) keeps a pretrained image encoder and a
pretrained language model frozen and trains two new pieces between them:

    patch features (B, T, N, d_img)   T images per sequence, N features each
      --PerceiverResampler-->          (B, T, R, d_img)   R learned latents per image
      flattened                        (B, T * R, d_img)  the "media" tokens
    before block i of the frozen LM (every `every` blocks):
      x = x + tanh(alpha_attn) * cross_attn(ln(x), media, media_mask)
      x = x + tanh(alpha_ff)   * mlp(ln(x))
      (`GatedCrossAttentionDense`, both alphas start at 0)

The gates make the new layers start as the identity: at initialisation the
model computes exactly what the frozen LM computes, and training opens them.

The media mask (`media_mask`) decides which image a text token may read: the
one whose marker most recently precedes it (the marker itself included).
Tokens before any image read nothing; their cross-attention output is 0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention
from tiny_mm.language_model import TinyLM
from tiny_mm.layers import MLP, mlp_hidden

__all__ = ["media_index", "media_mask", "PerceiverResampler", "GatedCrossAttentionDense", "FlamingoLM"]


# ANCHOR: media_mask
def media_index(media_locations: Tensor) -> Tensor:
    """For each token, which image it belongs to: 1 + the index of the latest marker at or before it.

    media_locations: bool (B, L), True where an <image> marker sits.
    Returns int64 (B, L): 0 for tokens before any image, m for tokens after the m-th marker
    (counting from 1) and before the next one.
    """
    if not isinstance(media_locations, Tensor) or media_locations.dtype != torch.bool or media_locations.dim() != 2:
        got = (media_locations.dtype, tuple(media_locations.shape)) if isinstance(media_locations, Tensor) else type(media_locations).__name__
        raise ValueError(f"media_locations must be a bool tensor of shape (B, L), got {got}")
    return media_locations.long().cumsum(dim=1)  # (B, L): markers seen so far, this one included


def media_mask(media_locations: Tensor, num_images: int, latents_per_image: int) -> Tensor:
    """Which media tokens each text token may attend to.

    media_locations: bool (B, L), True at the <image> markers; image m of a sequence
        (0-based) is the one introduced by its (m + 1)-th marker.
    num_images: T, images per sequence (the media tensor's second axis).
    latents_per_image: R, tokens per image after the resampler.

    Returns bool (B, 1, L, T * R): [b, 0, l, m * R + r] is True iff token l's latest
    image is image m. Rows of tokens before any image are all False.
    """
    index = media_index(media_locations)  # (B, L)
    if int(index.max()) > num_images:
        raise ValueError(f"a sequence has {int(index.max())} <image> markers but only {num_images} images were given")
    image_of_column = torch.arange(num_images, device=index.device).repeat_interleave(latents_per_image) + 1  # (T * R,)
    return (index[:, :, None] == image_of_column)[:, None]  # (B, 1, L, T * R)
# ANCHOR_END: media_mask


# ANCHOR: PerceiverResampler
class PerceiverResampler(nn.Module):
    """A fixed number of learned latents read a variable number of patch features.

    Each layer: the latents query the concatenation [patch features ; latents]
    (Flamingo's choice: the latents also attend to themselves), then an MLP;
    both residual. A final LayerNorm.

    Args:
        width: d_img, the width of the patch features (and of the latents).
        num_latents: R, output tokens per image (64 in Flamingo).
        layers, heads, mlp_ratio: depth (6 in Flamingo), heads, MLP size.

    Shapes: forward(features (B, N, d_img)) -> (B, R, d_img); N may be any length.
    """

    def __init__(self, width: int, num_latents: int = 8, layers: int = 2, heads: int = 2, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.width = width
        self.latents = nn.Parameter(0.02 * torch.randn(num_latents, width))  # (R, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "ln_media": nn.LayerNorm(width),
                "ln_latents": nn.LayerNorm(width),
                "attn": MultiHeadAttention(width, heads),
                "ln_2": nn.LayerNorm(width),
                "mlp": MLP(width, mlp_hidden(width, mlp_ratio)),
            })
            for _ in range(layers)
        )
        self.ln_out = nn.LayerNorm(width)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[-1] != self.width:
            raise ValueError(f"features must have shape (B, N, {self.width}), got {tuple(features.shape)}")
        latents = self.latents.expand(features.shape[0], -1, -1)  # (B, R, d)
        for layer in self.layers:
            q = layer["ln_latents"](latents)  # (B, R, d)
            kv = torch.cat([layer["ln_media"](features), q], dim=1)  # (B, N + R, d)
            latents = latents + layer["attn"](q, kv, kv)  # (B, R, d)
            latents = latents + layer["mlp"](layer["ln_2"](latents))  # (B, R, d)
        return self.ln_out(latents)  # (B, R, d)
# ANCHOR_END: PerceiverResampler


# ANCHOR: GatedCrossAttentionDense
class GatedCrossAttentionDense(nn.Module):
    """Flamingo's gated xattn-dense layer, inserted before a frozen LM block.

        x = x + tanh(attn_gate) * cross_attn(ln_1(x), media, media, attn_mask)
        x = x + tanh(ff_gate)   * mlp(ln_2(x))

    Both gates are scalars initialised at 0, so a new layer starts as the exact
    identity (x + 0 * y == x bit for bit, for finite y).

    Args:
        width: d, the LM's width (queries and output).
        context_width: width of the media tokens.
        heads, mlp_ratio: of the cross-attention and the MLP.

    Shapes: forward(x (B, L, d), media (B, M, context_width), attn_mask bool
        broadcastable to (B, heads, L, M) or None) -> (B, L, d).
    """

    def __init__(self, width: int, context_width: int, heads: int = 2, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, heads, kdim=context_width, vdim=context_width)
        self.attn_gate = nn.Parameter(torch.zeros(()))  # alpha: tanh(0) = 0, the layer starts closed
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, media: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        read = self.cross_attn(self.ln_1(x), media, media, attn_mask=attn_mask)  # (B, L, d); 0 where nothing is visible
        x = x + torch.tanh(self.attn_gate) * read  # (B, L, d)
        return x + torch.tanh(self.ff_gate) * self.mlp(self.ln_2(x))  # (B, L, d)

    def gates(self) -> tuple[float, float]:
        """(tanh(attn_gate), tanh(ff_gate)): how far each branch is open."""
        return float(torch.tanh(self.attn_gate.detach())), float(torch.tanh(self.ff_gate.detach()))
# ANCHOR_END: GatedCrossAttentionDense


# ANCHOR: FlamingoLM
class FlamingoLM(nn.Module):
    """A frozen `TinyLM` with a resampler and gated layers before every `every`-th block.

    Args:
        lm: the language model; it is frozen here (requires_grad False, eval mode).
        media_width: d_img of the image features.
        num_latents, resampler_layers: the resampler's size.
        every: a gated layer before blocks 0, every, 2 * every, ...
        heads: heads of the new attention layers.

    Shapes: forward(ids (B, L), features (B, T, N, d_img), media_locations bool (B, L))
        -> logits (B, L, V). Image m of a row is introduced by its (m + 1)-th marker.
    """

    def __init__(
        self, lm: TinyLM, media_width: int, *, num_latents: int = 8, resampler_layers: int = 2,
        every: int = 1, heads: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.every = every
        self.resampler = PerceiverResampler(media_width, num_latents, resampler_layers, heads)
        width = lm.config.width
        self.gated = nn.ModuleDict({
            str(i): GatedCrossAttentionDense(width, media_width, heads) for i in range(0, lm.config.layers, every)
        })

    def train(self, mode: bool = True) -> "FlamingoLM":
        super().train(mode)
        self.lm.eval()  # the frozen model never changes behaviour (no dropout here, but be explicit)
        return self

    def forward(self, ids: Tensor, features: Tensor, media_locations: Tensor) -> Tensor:
        if features.dim() != 4:
            raise ValueError(f"features must have shape (B, T, N, d_img), got {tuple(features.shape)}")
        if media_locations.shape != ids.shape:
            raise ValueError(f"media_locations must have the shape of ids {tuple(ids.shape)}, got {tuple(media_locations.shape)}")
        B, T, N, d_img = features.shape
        latents = self.resampler(features.reshape(B * T, N, d_img))  # (B * T, R, d_img): each image alone
        R = latents.shape[1]
        media = latents.reshape(B, T * R, d_img)  # (B, T * R, d_img)
        mask = media_mask(media_locations, T, R)  # (B, 1, L, T * R)

        def hook(i: int, x: Tensor) -> Tensor:
            layer = self.gated[str(i)] if str(i) in self.gated else None
            return x if layer is None else layer(x, media, mask)  # (B, L, d)

        return self.lm(ids, layer_hook=hook)  # (B, L, V)

    def gates(self) -> dict[int, tuple[float, float]]:
        """{block index: (tanh(attn_gate), tanh(ff_gate))} of every gated layer."""
        return {int(i): layer.gates() for i, layer in self.gated.items()}
# ANCHOR_END: FlamingoLM
