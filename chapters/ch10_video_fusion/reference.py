"""Chapter 10 in plain NumPy (float64): one layer of bottleneck fusion, and the training objective.

The bottom rung of the ladder for chapter 10. `tiny_mm.video_fusion` (the
bottleneck layer) and `tiny_mm.video_objectives` (the losses) are tested
against these functions, and so is exercise 4.

Two parts, in the order the chapter teaches them:

1. The fusion layer. A pre-LayerNorm transformer block (the same block as
   ``tiny_mm.layers.TransformerBlock``, weights handed in as a dict named like
   its state_dict), and one layer of bottleneck fusion built from three of
   them: each modality m runs its own block over [z; x_m], where z are the
   n_b shared bottleneck tokens; the next z is the mean of the three updated
   copies of z. Text padding is masked as a key (kv_lengths = n_b + text_lengths).

2. The objective of the textbook's exercise 4 (source 000, part (c)), with
   every gradient derived by hand (the `*_grad` functions; the tests check
   them against finite differences):

       L = L_action + l1 L_contrast + l2 L_mask + l3 L_temporal,  (l1, l2, l3) = (0.1, 0.05, 0.05)

   L_action    mean cross-entropy of the action logits (B, C);
   L_contrast  L_VA + L_VT + L_AT, each CLIP's symmetric loss (chapter 4) between
               two modalities' pooled vectors, rows L2-normalised first;
   L_mask      mean over the batch of ||prediction - target||^2 (summed over d):
               predict a hidden modality's features from the others;
   L_temporal  binary cross-entropy: were the clip's frames in order?

No torch here on purpose: the reference must not share a line of code with what it
checks. Nor does it import chapter 4's reference (chapters are leaves): the few
lines of CLIP's loss are written again below.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "MODALITIES",
    "PAIRS",
    "BLOCK_KEYS",
    "layer_norm",
    "gelu",
    "attention",
    "transformer_block",
    "bottleneck_fusion_layer",
    "log_softmax",
    "softmax",
    "cross_entropy",
    "cross_entropy_grad",
    "l2_normalize",
    "l2_normalize_backward",
    "clip_loss",
    "clip_loss_grad",
    "pairwise_contrastive_loss",
    "pairwise_contrastive_loss_grad",
    "masked_modality_loss",
    "masked_modality_loss_grad",
    "bce_with_logits",
    "bce_with_logits_grad",
    "total_objective",
    "total_objective_grad",
    "numerical_gradient",
]

MODALITIES = ("video", "audio", "text")
PAIRS = (("video", "audio"), ("video", "text"), ("audio", "text"))

# The state_dict keys of tiny_mm.layers.TransformerBlock (separate q, k, v projections).
BLOCK_KEYS = tuple(
    f"{name}.{kind}"
    for name in ("ln_1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ln_2",
                 "mlp.c_fc", "mlp.c_proj")
    for kind in ("weight", "bias")
)


def _float(name: str, x, ndim: int | None = None) -> np.ndarray:
    """x as a float64 array; ValueError if it has the wrong number of axes or holds NaN / inf."""
    x = np.asarray(x, dtype=np.float64)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or inf")
    return x


def _check_scale(logit_scale) -> float:
    s = float(np.asarray(logit_scale, dtype=np.float64))
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"logit_scale must be a finite positive number, got {logit_scale!r}")
    return s


def _check_lengths(name: str, lengths, batch: int, low: int, high: int) -> np.ndarray | None:
    """None, or an integer (B,) array with values in [low, high]."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch},), got {lengths.dtype} {lengths.shape}")
    if lengths.min() < low or lengths.max() > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {lengths.tolist()}")
    return lengths


# --------------------------------------------------------------------------- 1. the fusion layer


# ANCHOR: block
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch): (..., n) -> (..., n)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    return (x - mean) / np.sqrt(var + eps) * weight + bias  # (..., n)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (NumPy has no erf: math's, elementwise)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    """x @ W^T + b with W = p[name.weight] (out, in): (..., in) -> (..., out)."""
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(
    x: np.ndarray, p: dict[str, np.ndarray], heads: int, kv_lengths: np.ndarray | None = None
) -> np.ndarray:
    """Multi-head self-attention with the projections attn.{q,k,v,out}_proj.

    x (B, T, d) -> (B, T, d). kv_lengths (B,): token j of example b is seen (as
    a key) only if j < kv_lengths[b]; padding rows are still computed.
    """
    q = _linear(x, p, "attn.q_proj")  # (B, T, d)
    k = _linear(x, p, "attn.k_proj")  # (B, T, d)
    v = _linear(x, p, "attn.v_proj")  # (B, T, d)
    B, T, d = q.shape
    Dh = d // heads
    q, k, v = (a.reshape(B, T, heads, Dh).transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(Dh)  # (B, H, T, T)
    if kv_lengths is not None:
        hidden = np.arange(T)[None, :] >= kv_lengths[:, None]  # (B, T): padding keys
        scores = np.where(hidden[:, None, None, :], -np.inf, scores)  # (B, H, T, T)
    scores = scores - scores.max(axis=-1, keepdims=True)  # exp cannot overflow
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)  # (B, H, T, T): rows sum to one
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, d)  # (B, T, d): heads side by side
    return _linear(out, p, "attn.out_proj")  # (B, T, d)


def _check_block_params(params: dict, name: str = "params") -> dict[str, np.ndarray]:
    if not isinstance(params, dict):
        raise ValueError(f"{name} must be a dict of arrays named like TransformerBlock's state_dict")
    missing = [k for k in BLOCK_KEYS if k not in params]
    unexpected = [k for k in params if k not in BLOCK_KEYS]
    if missing or unexpected:
        raise ValueError(f"{name} must have TransformerBlock's state_dict keys: missing {missing}, "
                         f"unexpected {unexpected}")
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def transformer_block(
    x: np.ndarray, params: dict[str, np.ndarray], heads: int, kv_lengths: np.ndarray | None = None
) -> np.ndarray:
    """The pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.)). x (B, T, d) -> (B, T, d).

    params: keys exactly those of ``tiny_mm.layers.TransformerBlock(d, heads).state_dict()``
    (see BLOCK_KEYS). kv_lengths (B,) | None: valid tokens per example, padding at the end.
    """
    x = _float("x", x, 3)
    p = _check_block_params(params)
    B, T, d = x.shape
    if p["ln_1.weight"].shape != (d,):
        raise ValueError(f"params are for width {p['ln_1.weight'].shape}, x has width {d}")
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1 or d % heads:
        raise ValueError(f"heads must be a positive int dividing the width {d}, got {heads!r}")
    kv_lengths = _check_lengths("kv_lengths", kv_lengths, B, 1, T)
    x = x + attention(layer_norm(x, p["ln_1.weight"], p["ln_1.bias"]), p, heads, kv_lengths)  # (B, T, d)
    hidden = gelu(_linear(layer_norm(x, p["ln_2.weight"], p["ln_2.bias"]), p, "mlp.c_fc"))  # (B, T, f)
    return x + _linear(hidden, p, "mlp.c_proj")  # (B, T, d)
# ANCHOR_END: block


# ANCHOR: bottleneck_fusion_layer
def bottleneck_fusion_layer(
    z: np.ndarray,
    streams: dict[str, np.ndarray],
    params: dict[str, dict[str, np.ndarray]],
    heads: int,
    text_lengths: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One layer of bottleneck fusion (Nagrani et al. 2021), as `tiny_mm.video_fusion.BottleneckFusion` runs it.

    Args:
        z: (B, n_b, d) the shared bottleneck tokens (n_b may be 0: no exchange).
        streams: {m: (B, T_m, d)} for the modalities of MODALITIES taking part
            (normally all three).
        params: {m: block params} the weights of modality m's block in this layer.
        heads: attention heads of every block.
        text_lengths: (B,) valid text tokens (padding at the end), or None.

    Returns:
        (z_new (B, n_b, d), {m: (B, T_m, d)}). Modality m's block runs over
        [z; x_m]: its tokens see z and themselves, never another modality. The
        first n_b outputs are m's copy z_m of the bottleneck; z_new is the mean
        of the copies, which is how each modality hears the others next layer.
    """
    z = _float("z", z, 3)
    if not isinstance(streams, dict) or not streams or set(streams) - set(MODALITIES):
        raise ValueError(f"streams must be a non-empty dict with keys among {MODALITIES}, got "
                         f"{list(streams) if isinstance(streams, dict) else type(streams).__name__}")
    if not isinstance(params, dict) or set(params) != set(streams):
        raise ValueError(f"params must have one block per stream {sorted(streams)}, got "
                         f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
    B, nb, d = z.shape
    present = [m for m in MODALITIES if m in streams]  # the book's order
    copies, out = [], {}
    for m in present:
        x = _float(f"streams[{m!r}]", streams[m], 3)
        if x.shape[0] != B or x.shape[2] != d:
            raise ValueError(f"streams[{m!r}] must have shape ({B}, T, {d}), got {x.shape}")
        lengths = None
        if m == "text" and text_lengths is not None:
            lengths = nb + _check_lengths("text_lengths", text_lengths, B, 1, x.shape[1])  # z comes first
        y = transformer_block(np.concatenate([z, x], axis=1), params[m], heads, lengths)  # (B, n_b + T_m, d)
        copies.append(y[:, :nb])  # (B, n_b, d): m's update of the bottleneck
        out[m] = y[:, nb:]  # (B, T_m, d)
    return np.mean(copies, axis=0), out  # (B, n_b, d), {m: (B, T_m, d)}
# ANCHOR_END: bottleneck_fusion_layer


# --------------------------------------------------------------------------- 2. the objective


# ANCHOR: cross_entropy
def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax along `axis`, shifted by the maximum so exp never overflows."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax along `axis`."""
    return np.exp(log_softmax(x, axis))


def _check_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = _float("logits", logits, 2)  # (B, C)
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({logits.shape[0]},), got {labels.dtype} {labels.shape}")
    if logits.shape[0] == 0 or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) and B >= 1, got {labels.tolist()}")
    return logits, labels


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """L_action: mean over B of -log softmax(logits_b)[labels_b]. logits (B, C), labels (B,) ints."""
    logits, labels = _check_labels(logits, labels)
    picked = np.take_along_axis(log_softmax(logits), labels[:, None], axis=1)  # (B, 1)
    return float(-picked.mean())


def cross_entropy_grad(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """d cross_entropy / d logits = (softmax(logits) - onehot(labels)) / B. Shape (B, C)."""
    logits, labels = _check_labels(logits, labels)
    grad = softmax(logits)  # (B, C)
    grad[np.arange(len(labels)), labels] -= 1.0
    return grad / len(labels)
# ANCHOR_END: cross_entropy


# ANCHOR: contrastive
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length. x (N, d) -> (N, d)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    if np.any(norms == 0):
        raise ValueError("cannot L2-normalise a row of zeros")
    return x / norms


def l2_normalize_backward(x: np.ndarray, d_normalized: np.ndarray) -> np.ndarray:
    """Chain rule through x_hat = x / ||x||, row by row: dx = (g - x_hat <x_hat, g>) / ||x||.

    Scaling a row does not move x_hat, so the gradient has no radial component.
    """
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    x_hat = x / norms  # (N, d)
    return (d_normalized - x_hat * np.sum(x_hat * d_normalized, axis=-1, keepdims=True)) / norms


def _check_rows(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _float("a", a, 2), _float("b", b, 2)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"a and b must share a shape (N, d) with N >= 1, got {a.shape} and {b.shape}")
    return a, b


def clip_loss(a: np.ndarray, b: np.ndarray, logit_scale: float) -> float:
    """CLIP's symmetric loss of N pairs (row i of a matches row i of b), rows L2-normalised.

    S = s a b^T (N, N); loss = (mean_i (lse_j S_ij - S_ii) + mean_j (lse_i S_ij - S_jj)) / 2.
    """
    a, b = _check_rows(a, b)
    S = _check_scale(logit_scale) * a @ b.T  # (N, N)
    a_to_b = -np.diag(log_softmax(S, axis=1)).mean()  # a_i picks its match among the N rows of b
    b_to_a = -np.diag(log_softmax(S, axis=0)).mean()  # b_j picks its match among the N rows of a
    return float((a_to_b + b_to_a) / 2)


def clip_loss_grad(a: np.ndarray, b: np.ndarray, logit_scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(d a, d b, d s) of `clip_loss`: with G = (softmax_rows(S) + softmax_cols(S) - 2 Id) / (2N),
    da = s G b, db = s G^T a, ds = sum(G * a b^T)."""
    a, b = _check_rows(a, b)
    s = _check_scale(logit_scale)
    n = a.shape[0]
    cosine = a @ b.T  # (N, N)
    S = s * cosine
    G = (softmax(S, axis=1) + softmax(S, axis=0) - 2 * np.eye(n)) / (2 * n)  # (N, N)
    return s * G @ b, s * G.T @ a, float(np.sum(G * cosine))


def _check_streams(streams) -> dict[str, np.ndarray]:
    """{m: (B, d)} float arrays with keys among MODALITIES, one B and one d, >= one pair present."""
    if not isinstance(streams, dict) or set(streams) - set(MODALITIES):
        raise ValueError(f"streams must be a dict with keys among {MODALITIES}, got "
                         f"{list(streams) if isinstance(streams, dict) else type(streams).__name__}")
    out = {m: _float(f"streams[{m!r}]", x, 2) for m, x in streams.items()}
    shapes = {m: x.shape for m, x in out.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"every stream must have the same shape (B, d), got {shapes}")
    if not any(a in out and b in out for a, b in PAIRS):
        raise ValueError(f"the contrastive loss needs at least two modalities, got {sorted(out)}")
    if next(iter(out.values())).shape[0] == 0:
        raise ValueError("streams have no rows: the loss needs at least one example")
    return out


def pairwise_contrastive_loss(streams: dict[str, np.ndarray], logit_scale: float) -> float:
    """L_contrast = L_VA + L_VT + L_AT: `clip_loss` of every pair of modalities present.

    streams: {m: (B, d)} pooled vectors, NOT normalised (normalised here). Pairs
    whose two modalities are not both in streams are skipped.
    """
    streams = _check_streams(streams)
    unit = {m: l2_normalize(x) for m, x in streams.items()}  # (B, d) each
    return float(sum(clip_loss(unit[a], unit[b], logit_scale) for a, b in PAIRS if a in unit and b in unit))


def pairwise_contrastive_loss_grad(
    streams: dict[str, np.ndarray], logit_scale: float
) -> tuple[dict[str, np.ndarray], float]:
    """({m: d streams[m] (B, d)}, d logit_scale) of `pairwise_contrastive_loss`.

    Each modality takes part in two pairs: its gradient with respect to its
    normalised rows is the sum of what the two pairs send, then one pull-back
    through the normalisation.
    """
    streams = _check_streams(streams)
    unit = {m: l2_normalize(x) for m, x in streams.items()}
    d_unit = {m: np.zeros_like(x) for m, x in unit.items()}
    d_scale = 0.0
    for a, b in PAIRS:
        if a in unit and b in unit:
            da, db, ds = clip_loss_grad(unit[a], unit[b], logit_scale)
            d_unit[a] += da
            d_unit[b] += db
            d_scale += ds
    return {m: l2_normalize_backward(streams[m], d_unit[m]) for m in streams}, d_scale
# ANCHOR_END: contrastive


# ANCHOR: masked_and_temporal
def _check_pair(predicted, target) -> tuple[np.ndarray, np.ndarray]:
    predicted, target = _float("predicted", predicted, 2), _float("target", target, 2)
    if predicted.shape != target.shape or predicted.shape[0] == 0:
        raise ValueError(f"predicted and target must share a shape (B, d) with B >= 1, got "
                         f"{predicted.shape} and {target.shape}")
    return predicted, target


def masked_modality_loss(predicted: np.ndarray, target: np.ndarray) -> float:
    """L_mask for one hidden modality: mean over B of ||p_b - t_b||^2 (summed over d). (B, d), (B, d)."""
    predicted, target = _check_pair(predicted, target)
    return float(np.mean(np.sum((predicted - target) ** 2, axis=1)))


def masked_modality_loss_grad(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """d masked_modality_loss / d predicted = 2 (p - t) / B (the target is a constant). (B, d)."""
    predicted, target = _check_pair(predicted, target)
    return 2.0 * (predicted - target) / predicted.shape[0]


def _check_binary(logits, targets) -> tuple[np.ndarray, np.ndarray]:
    logits = _float("logits", logits, 1)  # (B,)
    targets = np.asarray(targets)
    if targets.shape != logits.shape or logits.shape[0] == 0:
        raise ValueError(f"targets must have shape {logits.shape} (B >= 1), got {targets.shape}")
    targets = targets.astype(np.float64)
    if not np.all((targets == 0) | (targets == 1)):
        raise ValueError("targets must be 0 / 1 (or bool)")
    return logits, targets


def bce_with_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """L_temporal: mean over B of -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))].

    logits (B,): the order head's score; targets (B,) bool / 0-1: 1 = frames in
    order. Written as max(x, 0) - x y + log(1 + exp(-|x|)), which never overflows.
    """
    x, y = _check_binary(logits, targets)
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


def bce_with_logits_grad(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """d bce_with_logits / d logits = (sigmoid(x) - y) / B. (B,)."""
    x, y = _check_binary(logits, targets)
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow
    return (sigmoid - y) / len(x)
# ANCHOR_END: masked_and_temporal


# ANCHOR: total_objective
def _check_weights(weights) -> tuple[float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 3 or not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights must be three finite numbers >= 0 (contrastive, masked, temporal), got {weights}")
    return weights


def _masked_terms(recon_pred, recon_target) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """One (B, d) pair, or {m: (B, d)} dicts (one per hidden modality: L_mask sums them)."""
    if isinstance(recon_pred, dict) or isinstance(recon_target, dict):
        if not isinstance(recon_pred, dict) or not isinstance(recon_target, dict) or \
                set(recon_pred) != set(recon_target):
            raise ValueError("recon_pred and recon_target must be two arrays or two dicts with the same keys")
        return [(m, recon_pred[m], recon_target[m]) for m in recon_pred]
    return [(None, recon_pred, recon_target)]


def total_objective(
    logits: np.ndarray,
    labels: np.ndarray,
    streams: dict[str, np.ndarray] | None,
    logit_scale: float,
    recon_pred: np.ndarray | dict[str, np.ndarray] | None,
    recon_target: np.ndarray | dict[str, np.ndarray] | None,
    order_logits: np.ndarray | None,
    ordered: np.ndarray | None,
    weights: tuple[float, float, float] = (0.1, 0.05, 0.05),
) -> float:
    """L = L_action + l1 L_contrast + l2 L_mask + l3 L_temporal (the textbook's weights by default).

    Args:
        logits (B, C), labels (B,) ints: the action head and its classes.
        streams: {m: (B, d)} pooled vectors (unnormalised) for L_contrast, or None to leave it out.
        logit_scale: s of every contrastive pair.
        recon_pred, recon_target: (B, d) each (or {m: (B, d)} dicts, summed), or None.
        order_logits (B,), ordered (B,) bool: the temporal-order head and its truth, or None.
        weights: (l1, l2, l3).
    """
    l1, l2, l3 = _check_weights(weights)
    total = cross_entropy(logits, labels)
    if streams is not None:
        total += l1 * pairwise_contrastive_loss(streams, logit_scale)
    if recon_pred is not None:
        total += l2 * sum(masked_modality_loss(p, t) for _, p, t in _masked_terms(recon_pred, recon_target))
    if order_logits is not None:
        total += l3 * bce_with_logits(order_logits, ordered)
    return float(total)


def total_objective_grad(
    logits: np.ndarray,
    labels: np.ndarray,
    streams: dict[str, np.ndarray] | None,
    logit_scale: float,
    recon_pred: np.ndarray | dict[str, np.ndarray] | None,
    recon_target: np.ndarray | dict[str, np.ndarray] | None,
    order_logits: np.ndarray | None,
    ordered: np.ndarray | None,
    weights: tuple[float, float, float] = (0.1, 0.05, 0.05),
) -> dict:
    """Gradients of `total_objective` (same arguments): each term's own gradient times its weight.

    Returns {"logits": (B, C), "streams": {m: (B, d)}, "logit_scale": float,
    "recon_pred": (B, d) or {m: (B, d)}, "order_logits": (B,)}; a term left out
    (None) has no entry. The terms share no inputs, so nothing is summed across them.
    """
    l1, l2, l3 = _check_weights(weights)
    grads: dict = {"logits": cross_entropy_grad(logits, labels)}
    if streams is not None:
        d_streams, d_scale = pairwise_contrastive_loss_grad(streams, logit_scale)
        grads["streams"] = {m: l1 * g for m, g in d_streams.items()}
        grads["logit_scale"] = l1 * d_scale
    if recon_pred is not None:
        terms = {m: l2 * masked_modality_loss_grad(p, t) for m, p, t in _masked_terms(recon_pred, recon_target)}
        grads["recon_pred"] = terms[None] if None in terms else terms
    if order_logits is not None:
        grads["order_logits"] = l3 * bce_with_logits_grad(order_logits, ordered)
    return grads
# ANCHOR_END: total_objective


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function f at x (any shape), in float64.

    Each entry costs two calls of f: keep x small. The error is O(eps^2) from
    truncation plus O(machine_eps / eps) from rounding, both near 1e-10 at eps = 1e-6.
    """
    x = np.array(x, dtype=np.float64)  # a copy we may perturb
    grad = np.empty_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        saved = flat[k]
        flat[k] = saved + eps
        f_plus = f(x)
        flat[k] = saved - eps
        f_minus = f(x)
        flat[k] = saved
        out[k] = (f_plus - f_minus) / (2 * eps)
    return grad
