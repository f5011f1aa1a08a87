"""Vector quantisation: turning encoder vectors into image tokens (VQ-VAE, van den Oord et al. 2017).

A DALL·E-style generator writes an image as a row of token ids, one per patch.
The tokenizer is a VQ-VAE: an encoder maps the image to N vectors z_e, the
quantiser below replaces each with its nearest codebook entry (the id of that
entry is the token), and a decoder rebuilds the image from the entries.

    VectorQuantizer   z_e (B, N, dim) -> Quantized(z_q (B, N, dim), codes (B, N), loss ())
                      z_q = z_e + sg[e - z_e]: the value of the code e, the gradient of z_e
                      (straight-through: the decoder's gradient reaches the encoder unchanged)
                      loss = ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2, each a mean over B * N * dim
    lookup            codes (B, N) -> entries (B, N, dim): how generated tokens become an image
    codebook_usage    fraction of codes used and perplexity: is the codebook alive?

Layout: tokens last-but-one, features last, (B, N, dim), as everywhere else in
the book. A convolutional encoder's map (B, dim, H, W) becomes tokens with
``z.flatten(2).transpose(1, 2)`` (row-major patches, N = H * W), and back with
``z_q.transpose(1, 2).reshape(B, dim, H, W)``.

Checked against chapters/ch11_text_to_image/reference.py, whose gradients are
written by hand.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Quantized", "VectorQuantizer", "codebook_usage"]


class Quantized(NamedTuple):
    """What `VectorQuantizer` returns (a tuple: ``z_q, codes, loss = vq(z_e)`` works)."""

    z_q: Tensor  # (B, N, dim): the codes' entries, with z_e's gradient
    codes: Tensor  # (B, N) long: the token ids
    loss: Tensor  # (): codebook + beta * commitment


# ANCHOR: VectorQuantizer
class VectorQuantizer(nn.Module):
    """A codebook of `num_codes` vectors of size `dim` and the nearest-code lookup.

    beta: weight of the commitment term (0.25 in the VQ-VAE paper).
    The codebook starts uniform in [-1/K, 1/K] (K = num_codes), a common choice.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        for name, value in (("num_codes", num_codes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.num_codes, self.dim, self.beta = num_codes, dim, float(beta)
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))

    def _check(self, z_e: Tensor) -> None:
        if not isinstance(z_e, Tensor) or not z_e.is_floating_point():
            raise ValueError(f"z_e must be a floating-point tensor, got {getattr(z_e, 'dtype', type(z_e))}")
        if z_e.ndim != 3 or z_e.shape[-1] != self.dim:
            raise ValueError(f"z_e must have shape (B, N, dim={self.dim}), got {tuple(z_e.shape)}")

    @torch.no_grad()
    def nearest(self, z_e: Tensor) -> Tensor:
        """Id of the nearest code (squared distance) of each vector: z_e (B, N, dim) -> (B, N) long."""
        self._check(z_e)
        flat = z_e.reshape(-1, self.dim).to(self.codebook.dtype)  # (B*N, dim)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2: a matrix product instead of a (B*N, K, dim) difference
        dist = (
            flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ self.codebook.t() + self.codebook.pow(2).sum(1)
        )  # (B*N, K)
        return dist.argmin(dim=1).view(z_e.shape[:2])  # (B, N)

    def lookup(self, codes: Tensor) -> Tensor:
        """The entries of token ids: codes (...) long -> (..., dim)."""
        if not isinstance(codes, Tensor) or codes.dtype != torch.long:
            raise ValueError(f"codes must be a long tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.codebook)  # (..., dim)

    def forward(self, z_e: Tensor) -> Quantized:
        """Quantise z_e (B, N, dim): see `Quantized` for what comes back."""
        codes = self.nearest(z_e)  # (B, N): argmin has no gradient, so none is asked of it
        e = self.lookup(codes).to(z_e.dtype)  # (B, N, dim)
        codebook_loss = F.mse_loss(e, z_e.detach())  # moves the codebook only
        commitment = F.mse_loss(z_e, e.detach())  # moves the encoder only
        z_q = z_e + (e - z_e).detach()  # (B, N, dim): forward e, backward identity to z_e
        return Quantized(z_q, codes, codebook_loss + self.beta * commitment)
# ANCHOR_END: VectorQuantizer


def codebook_usage(codes: Tensor, num_codes: int) -> tuple[float, float]:
    """(fraction of the codes used at least once, perplexity) of a batch of token ids.

    Perplexity = exp(entropy of the code histogram): num_codes when every code is
    used equally often, 1 when a single code takes every vector (a collapsed codebook).
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.long or codes.numel() == 0:
        raise ValueError("codes must be a non-empty long tensor")
    if int(codes.min()) < 0 or int(codes.max()) >= num_codes:
        raise ValueError(f"codes must lie in [0, {num_codes}), got [{int(codes.min())}, {int(codes.max())}]")
    p = torch.bincount(codes.flatten(), minlength=num_codes).double() / codes.numel()  # (K,)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()  # 0 log 0 counts as 0
    return float((p > 0).double().mean()), float(entropy.exp())
