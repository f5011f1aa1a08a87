"""Chapter 8's adapters in plain NumPy (float64): the references the tests check tiny_mm against.

    media_mask_reference   which image each token of an interleaved sequence may read
    layer_norm, gelu, attention, mlp           the small pieces, written out
    perceiver_resampler    Flamingo's latents reading the patch features
    gated_xattn_dense      Flamingo's tanh-gated cross-attention + MLP layer
    lm_logits              the tiny language model, with a prefix (LLaVA) and gated layers (Flamingo)
    llava_prefix           LLaVA's linear / MLP projection

Weights come in a dict ``p`` of float64 arrays named as the PyTorch modules'
``state_dict`` keys (``q_proj.weight``, ...), with a key prefix per layer, so a
test hands over ``{k: v.double().numpy() for k, v in module.state_dict().items()}``.
No torch here: the reference must not share a line of code with what it checks.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "media_mask_reference",
    "layer_norm",
    "gelu",
    "attention",
    "mlp",
    "perceiver_resampler",
    "gated_xattn_dense",
    "lm_logits",
    "llava_prefix",
]


# ANCHOR: media_mask_reference
def media_mask_reference(media_locations: np.ndarray, num_images: int, latents_per_image: int) -> np.ndarray:
    """bool (B, L, T * R): token l of row b may read the R tokens of image m iff the nearest
    <image> marker at or before l is the (m + 1)-th marker of the row.

    Written as a walk backwards from each token to the nearest marker, then a count
    of the markers up to it: another route than the cumulative sum of tiny_mm.
    """
    locations = np.asarray(media_locations, dtype=bool)
    if locations.ndim != 2:
        raise ValueError(f"media_locations must be 2-D (B, L), got shape {locations.shape}")
    B, L = locations.shape
    mask = np.zeros((B, L, num_images * latents_per_image), dtype=bool)
    for b in range(B):
        for l in range(L):
            j = l
            while j >= 0 and not locations[b, j]:
                j -= 1
            if j < 0:
                continue  # no image before this token: it reads nothing
            m = int(locations[b, : j + 1].sum()) - 1  # 0-based index of that image
            if m >= num_images:
                raise ValueError(f"row {b} has more than {num_images} markers")
            mask[b, l, m * latents_per_image : (m + 1) * latents_per_image] = True
    return mask
# ANCHOR_END: media_mask_reference


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gain + bias over the last axis (biased variance, as torch)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x), Phi the standard normal CDF (through math.erf)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, p: dict, name: str) -> np.ndarray:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(query: np.ndarray, context: np.ndarray, p: dict, name: str, heads: int,
              mask: np.ndarray | None = None, causal: bool = False) -> np.ndarray:
    """Multi-head attention of query (B, Lq, d) over context (B, Lk, dk), weights under ``name``.

    mask: bool broadcastable to (B, Lq, Lk), True = may see. A row that sees nothing gives 0.
    """
    q = _linear(query, p, f"{name}.q_proj")  # (B, Lq, d)
    k = _linear(context, p, f"{name}.k_proj")  # (B, Lk, d)
    v = _linear(context, p, f"{name}.v_proj")  # (B, Lk, d)
    B, Lq, d = q.shape
    Lk, D = k.shape[1], d // heads
    visible = np.ones((B, Lq, Lk), dtype=bool)
    if mask is not None:
        visible &= np.broadcast_to(mask, (B, Lq, Lk))
    if causal:
        visible &= np.tril(np.ones((Lq, Lk), dtype=bool))
    out = np.zeros((B, Lq, d))
    for b in range(B):
        for h in range(heads):
            cols = slice(h * D, (h + 1) * D)
            for i in range(Lq):
                seen = visible[b, i]
                if not seen.any():
                    continue
                scores = k[b, seen, cols] @ q[b, i, cols] / math.sqrt(D)  # (seen,)
                weights = np.exp(scores - scores.max())
                out[b, i, cols] = (weights / weights.sum()) @ v[b, seen, cols]
    return _linear(out, p, f"{name}.out_proj")  # (B, Lq, d)


def mlp(x: np.ndarray, p: dict, name: str) -> np.ndarray:
    """c_proj(gelu(c_fc(x)))."""
    return _linear(gelu(_linear(x, p, f"{name}.c_fc")), p, f"{name}.c_proj")


# ANCHOR: perceiver_resampler
def perceiver_resampler(features: np.ndarray, p: dict, layers: int, heads: int) -> np.ndarray:
    """features (B, N, d) -> (B, R, d): the learned latents p["latents"] (R, d) read [features ; latents]."""
    latents = np.broadcast_to(p["latents"], (features.shape[0], *p["latents"].shape)).copy()  # (B, R, d)
    for i in range(layers):
        name = f"layers.{i}"
        q = layer_norm(latents, p[f"{name}.ln_latents.weight"], p[f"{name}.ln_latents.bias"])
        media = layer_norm(features, p[f"{name}.ln_media.weight"], p[f"{name}.ln_media.bias"])
        kv = np.concatenate([media, q], axis=1)  # (B, N + R, d)
        latents = latents + attention(q, kv, p, f"{name}.attn", heads)
        latents = latents + mlp(layer_norm(latents, p[f"{name}.ln_2.weight"], p[f"{name}.ln_2.bias"]), p, f"{name}.mlp")
    return layer_norm(latents, p["ln_out.weight"], p["ln_out.bias"])
# ANCHOR_END: perceiver_resampler


# ANCHOR: gated_xattn_dense
def gated_xattn_dense(x: np.ndarray, media: np.ndarray, p: dict, heads: int, mask: np.ndarray | None = None,
                      name: str = "") -> np.ndarray:
    """x (B, L, d), media (B, M, dm) -> (B, L, d): two residual branches, each scaled by tanh(gate)."""
    pre = f"{name}." if name else ""
    read = attention(layer_norm(x, p[f"{pre}ln_1.weight"], p[f"{pre}ln_1.bias"]), media, p, f"{pre}cross_attn",
                     heads, mask)
    x = x + np.tanh(p[f"{pre}attn_gate"]) * read
    dense = mlp(layer_norm(x, p[f"{pre}ln_2.weight"], p[f"{pre}ln_2.bias"]), p, f"{pre}mlp")
    return x + np.tanh(p[f"{pre}ff_gate"]) * dense
# ANCHOR_END: gated_xattn_dense


# ANCHOR: lm_logits
def lm_logits(ids: np.ndarray, p: dict, layers: int, heads: int, prefix: np.ndarray | None = None,
              gated: dict | None = None, prefix_position: int = 0) -> np.ndarray:
    """The tiny LM: ids (B, L), with prefix (B, P, d) inserted before word prefix_position,
    -> logits (B, P + L, V), one row per position, tied head.

    gated: {block index: (weights dict of a gated layer, media (B, M, dm), mask (B, P + L, M), heads)},
    applied to the residual stream just before that block (Flamingo).
    """
    table = p["token_embedding.weight"]  # (V, d)
    x = table[ids]  # (B, L, d)
    if prefix is not None:
        k = prefix_position
        x = np.concatenate([x[:, :k], prefix, x[:, k:]], axis=1)  # (B, P + L, d)
    x = x + p["positional_embedding"][: x.shape[1]]
    for i in range(layers):
        if gated is not None and i in gated:
            weights, media, mask, gheads = gated[i]
            x = gated_xattn_dense(x, media, weights, gheads, mask)
        name = f"blocks.{i}"
        h = layer_norm(x, p[f"{name}.ln_1.weight"], p[f"{name}.ln_1.bias"])
        x = x + attention(h, h, p, f"{name}.attn", heads, causal=True)
        x = x + mlp(layer_norm(x, p[f"{name}.ln_2.weight"], p[f"{name}.ln_2.bias"]), p, f"{name}.mlp")
    x = layer_norm(x, p["ln_final.weight"], p["ln_final.bias"])
    return x @ table.T  # (B, P + L, V)
# ANCHOR_END: lm_logits


# ANCHOR: llava_prefix
def llava_prefix(features: np.ndarray, p: dict, kind: str = "linear") -> np.ndarray:
    """features (B, N, dm) -> (B, N, d): W x + b, or W2 gelu(W1 x + b1) + b2 (LLaVA-1.5)."""
    if kind == "linear":
        return _linear(features, p, "proj")
    return _linear(gelu(_linear(features, p, "proj.0")), p, "proj.2")
# ANCHOR_END: llava_prefix
