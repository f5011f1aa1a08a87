"""Scaled dot-product attention in plain NumPy (float64), forward and backward.

This is the bottom rung of chapter 2: the PyTorch layer in ``tiny_mm.attention``
and the flash-attention kernel in ``kernels.attention`` are both tested
against these functions.

Notation used throughout (the chapter text derives every line):

    B, H     : batch size, number of heads
    Lq, Lk   : number of queries and of keys (Lq != Lk for cross-attention)
    D, Dv    : head dimension of queries/keys, and of values
    Q : (B, H, Lq, D)    K : (B, H, Lk, D)    V : (B, H, Lk, Dv)
    s        : the scale, 1 / sqrt(D) unless given

    S = s * Q @ K^T          (B, H, Lq, Lk)  S[i, j] scores query i against key j;
                                            entries the mask hides are set to -inf
    P = softmax(S) by row    (B, H, Lq, Lk)  each query's weights over the keys
    O = P @ V                (B, H, Lq, Dv)  each query's weighted average of values
    lse_i = log sum_j exp(S[i, j])          (B, H, Lq)  what a flash kernel saves

Masks. ``causal``: query i sees key j iff j <= i, counted from the top-left
corner even when Lq != Lk (as ``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True``). ``kv_lengths``: an integer array (B,); key j of
example b is visible iff j < kv_lengths[b] (the rest is padding). Both may be
combined. (Top-left alignment means that when Lk > Lq the last keys are seen
by nobody; a decoder extending a cached prefix wants bottom-right alignment,
which this is not.) A query row with no visible key has nothing to average:
we define its output as zeros, its lse as -inf and its gradients as zeros,
never NaN.

No torch here on purpose: the reference must not share a line of code with
what it checks.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

__all__ = [
    "visible_mask",
    "softmax",
    "logsumexp",
    "attention",
    "attention_with_lse",
    "attention_grad",
    "split_heads",
    "merge_heads",
    "multi_head_attention",
    "numerical_gradient",
]


# --------------------------------------------------------------------------- checks
def _as_array(name: str, x, ndim: int, layout: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name} {layout} has an empty dimension: shape {x.shape}")
    return x


def _check_qkv(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _as_array("q", q, 4, "(B, H, Lq, D)")
    k = _as_array("k", k, 4, "(B, H, Lk, D)")
    v = _as_array("v", v, 4, "(B, H, Lk, Dv)")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch size B differs: q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.shape[1] == k.shape[1] == v.shape[1]:
        raise ValueError(f"number of heads H differs: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dimension D of q and k differs: q {q.shape}, k {k.shape}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"number of keys Lk of k and v differs: k {k.shape}, v {v.shape}")
    return q, k, v


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / np.sqrt(head_dim)
    s = float(scale)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    return s


def _check_lengths(kv_lengths, batch: int, n_keys: int) -> np.ndarray:
    lengths = np.asarray(kv_lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"kv_lengths must have shape (B,) = ({batch},), got {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"kv_lengths must hold integers, got dtype {lengths.dtype}")
    if np.any(lengths < 0) or np.any(lengths > n_keys):
        raise ValueError(f"kv_lengths must lie in [0, Lk] = [0, {n_keys}], got {lengths.tolist()}")
    return lengths


def _check_size(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


# --------------------------------------------------------------------------- masks
# ANCHOR: visible_mask
def visible_mask(B: int, Lq: int, Lk: int, causal: bool = False, kv_lengths=None) -> np.ndarray:
    """Which keys each query may see: bool (B, 1, Lq, Lk), True = visible.

    The head axis has size 1 because every head of an example shares its mask;
    it broadcasts against the (B, H, Lq, Lk) scores.
    """
    B, Lq, Lk = _check_size("B", B), _check_size("Lq", Lq), _check_size("Lk", Lk)
    query = np.arange(Lq)[:, None]  # (Lq, 1)
    key = np.arange(Lk)[None, :]  # (1, Lk)
    mask = np.ones((B, 1, Lq, Lk), dtype=bool)
    if causal:
        # Top-left aligned: query i sees keys 0..i whatever Lk is.
        mask &= key <= query  # (Lq, Lk) broadcast over B and heads
    if kv_lengths is not None:
        lengths = _check_lengths(kv_lengths, B, Lk)
        mask &= key < lengths[:, None, None, None]  # (B, 1, 1, Lk): padding keys hidden
    return mask
# ANCHOR_END: visible_mask


# --------------------------------------------------------------------------- softmax
# ANCHOR: softmax
def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(x))) along `axis`, shifted by the max so exp never overflows.

    A slice that is all -inf (every key masked) gives -inf. The shift is taken
    as 0 there instead of -inf, because -inf - (-inf) would be NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # all -inf slice: any finite shift will do
    total = np.sum(np.exp(x - m), axis=axis, keepdims=True)  # 0 exactly for an all -inf slice
    # log(0) = -inf, written out so numpy raises no divide-by-zero warning.
    log_total = np.log(total, out=np.full_like(total, -np.inf), where=total > 0)
    return np.squeeze(m + log_total, axis=axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum along `axis`; an all -inf slice gives zeros, not 0/0 = NaN."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(x - m)  # largest entry of each slice becomes exp(0) = 1
    total = np.sum(e, axis=axis, keepdims=True)  # >= 1 unless the slice is all -inf
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)
# ANCHOR_END: softmax


# --------------------------------------------------------------------------- attention
def _check_inputs(q, k, v, causal, kv_lengths, scale):
    """Every check, before any work: float64 q, k, v, the scale and the mask (B, 1, Lq, Lk)."""
    q, k, v = _check_qkv(q, k, v)
    s = _check_scale(scale, q.shape[-1])
    mask = visible_mask(q.shape[0], q.shape[2], k.shape[2], causal, kv_lengths)
    return q, k, v, s, mask


# ANCHOR: attention
def _scores(q: np.ndarray, k: np.ndarray, s: float, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masked scores S = s Q K^T (hidden entries -inf) and P = softmax(S), both (B, H, Lq, Lk)."""
    S = np.where(mask, s * q @ k.swapaxes(-1, -2), -np.inf)  # (B, H, Lq, Lk)
    return S, softmax(S, axis=-1)


def attention_with_lse(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool = False,
    kv_lengths=None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(s Q K^T) V and the row log-sum-exp of the scores.

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv), kv_lengths: int (B,).
    Returns out (B, H, Lq, Dv) and lse (B, H, Lq); rows with no visible key
    give out = 0 and lse = -inf.
    """
    q, k, v, s, mask = _check_inputs(q, k, v, causal, kv_lengths, scale)
    S, P = _scores(q, k, s, mask)  # (B, H, Lq, Lk) each
    out = P @ v  # (B, H, Lq, Dv)  a zero row of P gives a zero row of out
    return out, logsumexp(S, axis=-1)  # (B, H, Lq)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool = False,
    kv_lengths=None,
    scale: float | None = None,
) -> np.ndarray:
    """softmax(s Q K^T) V: q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv)."""
    return attention_with_lse(q, k, v, causal, kv_lengths, scale)[0]
# ANCHOR_END: attention


# ANCHOR: attention_grad
def attention_grad(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    d_out: np.ndarray,
    causal: bool = False,
    kv_lengths=None,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand-derived gradients (dq, dk, dv) of <d_out, attention(q, k, v)>.

    d_out: (B, H, Lq, Dv), the gradient arriving at the output. Backwards
    through O = P V, then the row softmax, then S = s Q K^T:

        dV = P^T dO                    (B, H, Lk, Dv)
        dP = dO V^T                    (B, H, Lq, Lk)
        dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
        dQ = s dS K,   dK = s dS^T Q

    Masked entries have P = 0, hence dS = 0: no gradient flows through them,
    and a row with no visible key contributes nothing anywhere.
    """
    q, k, v, s, mask = _check_inputs(q, k, v, causal, kv_lengths, scale)
    d_out = np.asarray(d_out, dtype=np.float64)
    out_shape = q.shape[:3] + v.shape[3:]  # (B, H, Lq, Dv)
    if d_out.shape != out_shape:
        raise ValueError(
            f"d_out must have the output's shape (B, H, Lq, Dv) = {out_shape}, got {d_out.shape}"
        )
    _, P = _scores(q, k, s, mask)  # (B, H, Lq, Lk); recomputed, as a flash kernel does
    out = P @ v  # (B, H, Lq, Dv)
    dv = P.swapaxes(-1, -2) @ d_out  # (B, H, Lk, Dv)
    dP = d_out @ v.swapaxes(-1, -2)  # (B, H, Lq, Lk)
    # Softmax backward: sum_j P_ij dP_ij equals rowsum(dO * O), which is cheaper
    # (Dv numbers per row instead of Lk) and is what a flash kernel uses.
    delta = np.sum(d_out * out, axis=-1, keepdims=True)  # (B, H, Lq, 1)
    dS = P * (dP - delta)  # (B, H, Lq, Lk)
    dq = s * dS @ k  # (B, H, Lq, D)
    dk = s * dS.swapaxes(-1, -2) @ q  # (B, H, Lk, D)
    return dq, dk, dv
# ANCHOR_END: attention_grad


# --------------------------------------------------------------------------- heads
# ANCHOR: heads
def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, L, H * Dh) -> (B, H, L, Dh): channel h * Dh + d becomes head h, channel d."""
    x = _as_array("x", x, 3, "(B, L, H * Dh)")
    H = _check_size("n_heads", n_heads)
    B, L, E = x.shape
    if E % H:
        raise ValueError(f"the last dimension {E} of x is not divisible by n_heads = {H}")
    return x.reshape(B, L, H, E // H).transpose(0, 2, 1, 3)  # (B, H, L, Dh)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, L, Dh) -> (B, L, H * Dh): the inverse of `split_heads`, heads side by side."""
    x = _as_array("x", x, 4, "(B, H, L, Dh)")
    B, H, L, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * Dh)
# ANCHOR_END: heads


# --------------------------------------------------------------------------- multi-head
_PARAM_SHAPES = {
    "q_weight": ("E", "E"),
    "q_bias": ("E",),
    "k_weight": ("E", "Ekv"),
    "k_bias": ("E",),
    "v_weight": ("E", "Ekv"),
    "v_bias": ("E",),
    "out_weight": ("E", "E"),
    "out_bias": ("E",),
}


def _check_params(params: Mapping[str, np.ndarray], E: int, Ekv: int) -> dict[str, np.ndarray | None]:
    missing = sorted(set(_PARAM_SHAPES) - set(params))
    if missing:
        raise ValueError(f"params is missing {missing}")
    sizes = {"E": E, "Ekv": Ekv}
    checked = {}
    for name, dims in _PARAM_SHAPES.items():
        value = params[name]
        if value is None and name.endswith("_bias"):  # a Linear built with bias=False
            checked[name] = None
            continue
        value = np.asarray(value, dtype=np.float64)
        expected = tuple(sizes[d] for d in dims)
        if value.shape != expected:
            raise ValueError(
                f"params[{name!r}] must have shape {expected} ({', '.join(dims)}), got {value.shape}"
            )
        checked[name] = value
    return checked


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """y = x W^T + b, as torch.nn.Linear: x (..., in), W (out, in), b (out,) -> (..., out)."""
    y = x @ weight.T
    return y if bias is None else y + bias


# ANCHOR: multi_head_attention
def multi_head_attention(
    x_q: np.ndarray,
    x_kv: np.ndarray,
    params: Mapping[str, np.ndarray],
    n_heads: int,
    causal: bool = False,
    kv_lengths=None,
) -> np.ndarray:
    """Multi-head attention of the queries x_q over x_kv: (B, Lq, E) -> (B, Lq, E).

    x_q: (B, Lq, E); x_kv: (B, Lk, Ekv) (pass x_q again for self-attention).
    params: q_weight (E, E), k_weight (E, Ekv), v_weight (E, Ekv), out_weight
    (E, E) and the biases q_bias, k_bias, v_bias, out_bias (E,) (None = no bias).
    Each head works in its own Dh = E / n_heads channels with scale 1 / sqrt(Dh).
    """
    x_q = _as_array("x_q", x_q, 3, "(B, Lq, E)")
    x_kv = _as_array("x_kv", x_kv, 3, "(B, Lk, Ekv)")
    if x_q.shape[0] != x_kv.shape[0]:
        raise ValueError(f"batch size B differs: x_q {x_q.shape}, x_kv {x_kv.shape}")
    p = _check_params(params, x_q.shape[-1], x_kv.shape[-1])
    q = split_heads(_linear(x_q, p["q_weight"], p["q_bias"]), n_heads)  # (B, H, Lq, Dh)
    k = split_heads(_linear(x_kv, p["k_weight"], p["k_bias"]), n_heads)  # (B, H, Lk, Dh)
    v = split_heads(_linear(x_kv, p["v_weight"], p["v_bias"]), n_heads)  # (B, H, Lk, Dh)
    heads = attention(q, k, v, causal=causal, kv_lengths=kv_lengths)  # (B, H, Lq, Dh)
    return _linear(merge_heads(heads), p["out_weight"], p["out_bias"])  # (B, Lq, E)
# ANCHOR_END: multi_head_attention


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function f at x (any shape), in float64.

    Each entry costs two calls of f, so keep x small. Truncation error is
    O(eps^2) and rounding error O(machine_eps / eps): eps = 1e-6 keeps both
    near 1e-10 for well-scaled functions.
    """
    x = np.array(x, dtype=np.float64)  # our own copy, perturbed one entry at a time
    grad = np.empty_like(x)
    flat, flat_grad = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        f_plus = f(x)
        flat[i] = saved - eps
        f_minus = f(x)
        flat[i] = saved
        flat_grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad
