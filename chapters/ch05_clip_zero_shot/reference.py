"""Zero-shot classification and embedding search in plain NumPy (float64).

The bottom rung of chapter 5's ladder: `tiny_mm.zeroshot`, the exercises
ex02_zero_shot and ex07_photo_search, and their graders are all checked
against these functions.

A CLIP model gives every image and every piece of text a vector in one shared
space. Zero-shot classification never trains a classifier: it writes one from
the class names.

    P : (C, T, E)   the text embedding of template t filled with class c
                    ("a photo of a {}." with "dog"), C classes, T templates
    W : (E, C)      the classifier: column c is the unit vector of class c,
                    W[:, c] = normalise( mean_t normalise(P[c, t]) )
    X : (B, E)      image embeddings
    logits = normalise(X) @ W          (B, C) cosine similarities
    prediction = argmax over the C columns

Photo search is the same computation read the other way: the "classes" are
the images of a folder, and a query (a text or another image) ranks them all.

Ties are broken toward the lower index everywhere (the order a stable sort
gives, and the index `np.argmax` returns), so every answer here is unique.
No torch here on purpose: the reference must not share a line of code with
what it checks.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "l2_normalize",
    "template_ensemble",
    "cosine_logits",
    "predict",
    "ranking",
    "topk_correct",
    "topk_accuracy",
    "confusion_matrix",
    "nearest_neighbours",
]


def _as_array(name: str, x, ndim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or inf")
    return x


def _check_k(k, n: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in 1..{n} (the number of {what}), got {k!r}")
    return int(k)


# ANCHOR: normalize
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Scale each vector (the last axis) to unit length. x: (..., E) -> (..., E)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (..., 1)
    if np.any(norms == 0):
        raise ValueError("cannot L2-normalise a vector of zeros")
    return x / norms
# ANCHOR_END: normalize


# ANCHOR: ensemble
def template_ensemble(prompt_embeddings: np.ndarray) -> np.ndarray:
    """The zero-shot classifier W (E, C) from prompt embeddings (C, T, E).

    Each prompt embedding is normalised first, so every template gets an equal
    vote however long the text tower made its vector; the mean of the T unit
    vectors is shorter than 1, so it is normalised again. With T = 1 a column
    is just the one prompt's unit vector.
    """
    p = _as_array("prompt_embeddings", prompt_embeddings, 3)  # (C, T, E)
    if 0 in p.shape:
        raise ValueError(f"prompt_embeddings must have C, T, E >= 1, got shape {p.shape}")
    votes = l2_normalize(p)  # (C, T, E): one unit vector per prompt
    classes = l2_normalize(votes.mean(axis=1))  # (C, E): one unit vector per class
    return classes.T  # (E, C)
# ANCHOR_END: ensemble


# ANCHOR: logits
def cosine_logits(image_embeddings: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Cosine similarity of every image with every class: (B, E), (E, C) -> (B, C).

    Both sides are normalised, so the entries lie in [-1, 1]. CLIP multiplies
    by its logit scale before a softmax; the argmax does not change, so
    classification leaves it out.
    """
    x = _as_array("image_embeddings", image_embeddings, 2)  # (B, E)
    w = _as_array("classifier", classifier, 2)  # (E, C)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"image embedding size {x.shape[1]} != classifier rows {w.shape[0]}")
    return l2_normalize(x) @ l2_normalize(w.T).T  # (B, C)


def predict(logits: np.ndarray) -> np.ndarray:
    """The predicted class of each row: (B, C) -> (B,) int, the first maximum on ties."""
    return np.argmax(_as_array("logits", logits, 2), axis=1)
# ANCHOR_END: logits


# ANCHOR: topk
def ranking(scores: np.ndarray) -> np.ndarray:
    """Column indices of each row from the highest score down, ties by lower index. (B, C) -> (B, C)."""
    scores = _as_array("scores", scores, 2)
    return np.argsort(-scores, axis=1, kind="stable")  # (B, C)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(B,) bool: is row i's label among its k best classes? logits (B, C), labels (B,) ints."""
    logits = _as_array("logits", logits, 2)  # (B, C)
    n_classes = logits.shape[1]
    k = _check_k(k, n_classes, "classes")
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be (B,) = ({logits.shape[0]},) ints, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    top = ranking(logits)[:, :k]  # (B, k), best first
    return np.any(top == labels[:, None], axis=1)  # (B,)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k best classes; k must be in 1..C."""
    hits = topk_correct(logits, labels, k)  # (B,)
    if hits.size == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(hits.mean())
# ANCHOR_END: topk


# ANCHOR: confusion
def confusion_matrix(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n) int64 counts: entry [i, j] is how many samples of true class i were predicted j.

    Row sums are the class sizes; the diagonal holds the correct predictions.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.ndim != 1 or pred.shape != labels.shape:
        raise ValueError(f"pred and labels must be equal-length 1-D arrays, got {pred.shape} and {labels.shape}")
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)  # (n, n)
    for true, guess in zip(labels, pred):
        if not (0 <= true < n_classes and 0 <= guess < n_classes):
            raise ValueError(f"class indices must lie in 0..{n_classes - 1}, got label {true}, prediction {guess}")
        counts[true, guess] += 1
    return counts
# ANCHOR_END: confusion


# ANCHOR: neighbours
def nearest_neighbours(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k items of `index` most similar to each query, by cosine similarity.

    queries: (Q, E); index: (N, E), one row per stored item (an image of the folder).
    Returns (ids (Q, k) int, scores (Q, k) float), best first, ties by lower index.
    """
    q = _as_array("queries", queries, 2)  # (Q, E)
    x = _as_array("index", index, 2)  # (N, E)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query embedding size {q.shape[1]} != index embedding size {x.shape[1]}")
    k = _check_k(k, x.shape[0], "items in the index")
    scores = l2_normalize(q) @ l2_normalize(x).T  # (Q, N)
    ids = ranking(scores)[:, :k]  # (Q, k)
    return ids, np.take_along_axis(scores, ids, axis=1)  # (Q, k), (Q, k)
# ANCHOR_END: neighbours
