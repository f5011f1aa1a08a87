"""Image captioning in plain NumPy (float64): the loss, its gradient and one decoder layer.

The bottom rung of chapter 6's ladder. `tiny_mm.captioning` is tested against
these functions with the same weights.

Teacher forcing. A caption is a row of ids ``<bos> w1 ... wn <eos> <pad> ...``.
The decoder reads the row without its last id and must predict the row without
its first id, every position at once:

    inputs  = ids[:, :-1]     (B, L)    <bos> w1 ... wn <eos> <pad> ...
    targets = ids[:, 1:]      (B, L)    w1 ... wn <eos> <pad> ...
    logits                    (B, L, V) one distribution over the vocabulary per position

The loss is the mean cross-entropy over the positions whose target is not
padding (M of them):

    loss = (1 / M) * sum over (b, t) with targets[b, t] != pad of
           logsumexp(logits[b, t]) - logits[b, t, targets[b, t]]

and its gradient with respect to the logits, derived by hand (the derivative
of logsumexp is the softmax, that of the picked logit is a one-hot row):

    dloss/dlogits[b, t] = mask[b, t] * (softmax(logits[b, t]) - onehot(targets[b, t])) / M

A padded position gets exactly zero gradient: nothing the model says there
counts.

One decoder layer (pre-LayerNorm; x holds the L text positions, image the N
image tokens from the encoder):

    x = x + SelfAttention(LN_1(x))          causal: position i reads positions j <= i
    x = x + CrossAttention(LN_2(x), image)  queries from the text, keys and values from the image
    x = x + MLP(LN_3(x))                    Linear(d, 4d), exact GELU, Linear(4d, d)

Parameter names follow `tiny_mm.captioning.DecoderLayer`'s state dict, so a
test can hand the torch layer's weights to `decoder_layer` unchanged. Weights
are stored as torch's Linear stores them: (out_features, in_features), so a
projection is ``x @ W.T + b``.

No torch here on purpose: the reference must not share a line of code with
what it checks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "teacher_forcing",
    "log_softmax",
    "softmax",
    "masked_cross_entropy",
    "masked_cross_entropy_grad",
    "layer_norm",
    "gelu",
    "attention",
    "decoder_layer",
]


def _float(name: str, x, ndim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or inf")
    return x


# ANCHOR: teacher_forcing
def teacher_forcing(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) caption ids -> (inputs (B, T-1), targets (B, T-1)): the row shifted by one."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must have shape (B, T) with T >= 2, got {ids.shape}")
    return ids[:, :-1], ids[:, 1:]
# ANCHOR_END: teacher_forcing


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, shifted by the row maximum so exp never overflows."""
    shifted = x - x.max(axis=-1, keepdims=True)  # (..., V): largest entry 0
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax over the last axis."""
    return np.exp(log_softmax(x))


def _loss_inputs(logits, targets, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = _float("logits", logits, 3)  # (B, L, V)
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have shape (B, L) = {logits.shape[:2]}, got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer ids, got dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= logits.shape[2]:
        raise ValueError(f"target ids must lie in [0, {logits.shape[2]}), got [{targets.min()}, {targets.max()}]")
    mask = targets != pad  # (B, L): positions that count
    if not mask.any():
        raise ValueError("every target is padding: there is nothing to average over")
    return logits, targets, mask


# ANCHOR: loss
def masked_cross_entropy(logits: np.ndarray, targets: np.ndarray, pad: int = 0) -> float:
    """Mean cross-entropy over the positions whose target is not ``pad``.

    logits (B, L, V), targets (B, L) ints -> a float.
    """
    logits, targets, mask = _loss_inputs(logits, targets, pad)
    logp = log_softmax(logits)  # (B, L, V)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, L): log p(target)
    return float(-(picked * mask).sum() / mask.sum())


def masked_cross_entropy_grad(logits: np.ndarray, targets: np.ndarray, pad: int = 0) -> np.ndarray:
    """d masked_cross_entropy / d logits, by hand: mask * (softmax - onehot) / M. Shape (B, L, V)."""
    logits, targets, mask = _loss_inputs(logits, targets, pad)
    grad = softmax(logits)  # (B, L, V)
    np.put_along_axis(grad, targets[..., None], np.take_along_axis(grad, targets[..., None], -1) - 1.0, -1)
    return grad * mask[..., None] / mask.sum()  # (B, L, V): padded rows are exactly 0
# ANCHOR_END: loss


# ANCHOR: layer_pieces
def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gain + bias over the last axis (biased variance, as torch)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


_erf = np.vectorize(math.erf)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: x * Phi(x), with Phi the standard normal CDF."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def attention(
    x: np.ndarray,
    context: np.ndarray,
    params: Mapping[str, np.ndarray],
    prefix: str,
    heads: int,
    causal: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head attention from x (B, Lq, d) to context (B, Lk, d), one head at a time.

    params[prefix + "q_proj.weight"] etc.: (d, d) weights and (d,) biases of the
    q, k, v and out projections. causal: query i reads keys j <= i only.

    Returns:
        (output (B, Lq, d), probabilities (B, heads, Lq, Lk)).
    """
    p = {name: _float(prefix + name, params[prefix + name]) for name in (
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
        "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias")}
    batch, lq, d = x.shape
    lk = context.shape[1]
    if d % heads:
        raise ValueError(f"width {d} is not divisible by heads {heads}")
    dh = d // heads
    q = x @ p["q_proj.weight"].T + p["q_proj.bias"]  # (B, Lq, d)
    k = context @ p["k_proj.weight"].T + p["k_proj.bias"]  # (B, Lk, d)
    v = context @ p["v_proj.weight"].T + p["v_proj.bias"]  # (B, Lk, d)
    out = np.zeros((batch, lq, d))
    probs = np.zeros((batch, heads, lq, lk))
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)  # this head's features
        scores = q[:, :, cols] @ k[:, :, cols].transpose(0, 2, 1) / math.sqrt(dh)  # (B, Lq, Lk)
        if causal:
            later = np.arange(lk)[None, :] > np.arange(lq)[:, None]  # (Lq, Lk): key after the query
            scores = np.where(later, -np.inf, scores)
        probs[:, h] = softmax(scores)  # (B, Lq, Lk)
        out[:, :, cols] = probs[:, h] @ v[:, :, cols]  # (B, Lq, dh)
    return out @ p["out_proj.weight"].T + p["out_proj.bias"], probs
# ANCHOR_END: layer_pieces


# ANCHOR: decoder_layer
def decoder_layer(
    x: np.ndarray, image: np.ndarray, params: Mapping[str, np.ndarray], heads: int
) -> tuple[np.ndarray, np.ndarray]:
    """One captioning decoder layer: causal self-attention, cross-attention to the image, MLP.

    x: (B, L, d) text positions; image: (B, N, d) image tokens; params: the layer's
    state dict as float64 arrays (ln_1, self_attn, ln_2, cross_attn, ln_3, mlp.c_fc, mlp.c_proj).

    Returns:
        (x after the layer (B, L, d), cross-attention probabilities (B, heads, L, N)).
    """
    x = _float("x", x, 3)
    image = _float("image", image, 3)
    if image.shape[0] != x.shape[0] or image.shape[2] != x.shape[2]:
        raise ValueError(f"image must have shape (B, N, d) = ({x.shape[0]}, N, {x.shape[2]}), got {image.shape}")
    p = {name: _float(name, value) for name, value in params.items()}

    h = layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    x = x + attention(h, h, p, "self_attn.", heads, causal=True)[0]  # (B, L, d)
    h = layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    read, probs = attention(h, image, p, "cross_attn.", heads, causal=False)  # (B, L, d), (B, H, L, N)
    x = x + read
    h = layer_norm(x, p["ln_3.weight"], p["ln_3.bias"])
    hidden = gelu(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"])  # (B, L, 4d)
    return x + hidden @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"], probs
# ANCHOR_END: decoder_layer
