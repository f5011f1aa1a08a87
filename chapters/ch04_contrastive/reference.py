"""CLIP's symmetric contrastive loss in plain NumPy (float64), forward and backward.

This is the bottom rung of the ladder: every other implementation in the
project (the PyTorch loss in ``tiny_mm.contrastive`` and the fused Triton
kernel in ``kernels.contrastive``) is tested against these functions.

Notation used throughout (the chapter text derives every line):

    I : (N, d)  image embeddings, one row per image, L2-normalised
    T : (N, d)  text embeddings, row i describes image i, L2-normalised
    s : float   the logit scale, s = 1 / temperature (CLIP starts at 1/0.07)
    S = s * I @ T.T                      (N, N) logits; S[i, j] scores image i against text j

    loss = ( mean_i (lse_j S[i, j] - S[i, i])      # image -> text: each row is a softmax over texts
           + mean_j (lse_i S[i, j] - S[j, j]) ) / 2  # text -> image: each column over images

No torch here on purpose: the reference must not share a line of code with
what it checks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "l2_normalize",
    "l2_normalize_backward",
    "similarity",
    "logsumexp",
    "softmax",
    "clip_loss",
    "clip_loss_grad",
    "clip_loss_raw",
    "clip_loss_raw_grad",
    "retrieval_accuracy",
    "numerical_gradient",
]


def _as_matrix(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows: the loss needs at least one pair")
    return x


def _check_pair(image, text) -> tuple[np.ndarray, np.ndarray]:
    image, text = _as_matrix("image", image), _as_matrix("text", text)
    if image.shape != text.shape:
        raise ValueError(
            f"image and text must have the same shape (N, d), got {image.shape} and {text.shape}"
        )
    return image, text


def _check_scale(logit_scale) -> float:
    s = float(logit_scale)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"logit_scale must be a finite positive number, got {logit_scale!r}")
    return s


# ANCHOR: normalize
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Scale each row to unit length. x: (N, d) -> (N, d)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    if np.any(norms == 0):
        raise ValueError("cannot L2-normalise a row of zeros")
    return x / norms


def l2_normalize_backward(x: np.ndarray, d_normalized: np.ndarray) -> np.ndarray:
    """Chain rule through x_hat = x / ||x||, row by row.

    d x = (d x_hat - x_hat * <x_hat, d x_hat>) / ||x||: the gradient loses its
    component along x_hat (scaling a row does not change x_hat) and is divided
    by the row's length. x, d_normalized: (N, d) -> (N, d).
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    x_hat = x / norms  # (N, d)
    radial = np.sum(x_hat * d_normalized, axis=-1, keepdims=True)  # (N, 1)
    return (d_normalized - x_hat * radial) / norms
# ANCHOR_END: normalize


# ANCHOR: similarity
def similarity(image: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    """Logits S = s * I @ T.T. image, text: (N, d) -> (N, N); S[i, j] = image i vs text j."""
    image, text = _check_pair(image, text)
    return _check_scale(logit_scale) * image @ text.T


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along `axis`, shifted by the max so exp never overflows."""
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """exp(x - lse(x)) along `axis`: rows (axis=1) or columns (axis=0) that sum to one."""
    return np.exp(x - np.expand_dims(logsumexp(x, axis), axis))
# ANCHOR_END: similarity


# ANCHOR: clip_loss
def clip_loss(image: np.ndarray, text: np.ndarray, logit_scale: float) -> float:
    """Mean symmetric cross-entropy of the N matched pairs.

    image, text: (N, d), rows already L2-normalised; logit_scale: s > 0.
    Returns a Python float.
    """
    S = similarity(image, text, logit_scale)  # (N, N)
    diag = np.diag(S)  # (N,)  the matched pairs
    image_to_text = np.mean(logsumexp(S, axis=1) - diag)  # each image picks among N texts
    text_to_image = np.mean(logsumexp(S, axis=0) - diag)  # each text picks among N images
    return float((image_to_text + text_to_image) / 2)
# ANCHOR_END: clip_loss


# ANCHOR: clip_loss_grad
def clip_loss_grad(
    image: np.ndarray, text: np.ndarray, logit_scale: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Hand-derived gradient of `clip_loss`: (d_image (N, d), d_text (N, d), d_logit_scale).

    With P_row = softmax over each row of S and P_col = softmax over each column,
    the gradient of the loss with respect to the logits is

        G = (P_row + P_col - 2 * Id) / (2N)                       (N, N)

    (softmax minus one-hot, once per direction, each direction averaged over
    N and halved). Then S = s * I @ T.T gives, by the matrix chain rule,

        dI = s * G @ T,    dT = s * G.T @ I,    ds = sum(G * (I @ T.T)).
    """
    image, text = _check_pair(image, text)
    s = _check_scale(logit_scale)
    n = image.shape[0]
    cosine = image @ text.T  # (N, N)  I @ T.T, before scaling
    S = s * cosine
    G = (softmax(S, axis=1) + softmax(S, axis=0) - 2 * np.eye(n)) / (2 * n)  # (N, N)
    d_image = s * G @ text  # (N, d)
    d_text = s * G.T @ image  # (N, d)
    d_logit_scale = float(np.sum(G * cosine))
    return d_image, d_text, d_logit_scale
# ANCHOR_END: clip_loss_grad


# ANCHOR: clip_loss_raw
def clip_loss_raw(image_raw: np.ndarray, text_raw: np.ndarray, logit_scale: float) -> float:
    """`clip_loss` on raw encoder outputs: normalise the rows first. (N, d), (N, d) -> float."""
    image_raw, text_raw = _check_pair(image_raw, text_raw)
    return clip_loss(l2_normalize(image_raw), l2_normalize(text_raw), logit_scale)


def clip_loss_raw_grad(
    image_raw: np.ndarray, text_raw: np.ndarray, logit_scale: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient of `clip_loss_raw`: the normalised-row gradient pulled back through l2_normalize."""
    image_raw, text_raw = _check_pair(image_raw, text_raw)
    d_image, d_text, d_scale = clip_loss_grad(
        l2_normalize(image_raw), l2_normalize(text_raw), logit_scale
    )
    return (
        l2_normalize_backward(image_raw, d_image),
        l2_normalize_backward(text_raw, d_text),
        d_scale,
    )
# ANCHOR_END: clip_loss_raw


# ANCHOR: retrieval_accuracy
def retrieval_accuracy(logits: np.ndarray) -> tuple[float, float]:
    """How often the matched pair scores highest: (image -> text, text -> image).

    logits: (N, N) with the matched pairs on the diagonal. Row i is correct
    when its largest entry is in column i; column j when its largest is in row j.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (N, N) matrix, got shape {logits.shape}")
    target = np.arange(logits.shape[0])
    image_to_text = float(np.mean(np.argmax(logits, axis=1) == target))
    text_to_image = float(np.mean(np.argmax(logits, axis=0) == target))
    return image_to_text, text_to_image
# ANCHOR_END: retrieval_accuracy


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function f at x (any shape), in float64.

    Each entry costs two calls of f, so keep x small. The error is O(eps^2)
    from truncation plus O(machine_eps / eps) from rounding: eps = 1e-6 puts
    both near 1e-10 for well-scaled functions.
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
