"""BLIP-2's Q-Former in plain NumPy (float64): the three masks, the forward pass, the losses.

The bottom rung for the Q-Former section of chapter 8: ``tiny_mm.adapters.qformer``
is tested against these functions. The sequence the Q-Former's self-attention
runs over is the Q learned queries followed by the T text tokens:

    position:  0 .. Q-1        Q .. Q+T-1
               queries         text (first token BOS, padding after each caption's end)

A mask is a (Q+T, Q+T) bool table, True where row i may attend to column j.
Each mask here is written entry by entry from the rule the BLIP-2 paper
states, with loops, so it shares no trick with the vectorised PyTorch version:

    ITC  row and column of the same kind (query-query, text-text)
    ITM  always
    ITG  column is a query, or (row is text and column is text at or before it)

The forward pass takes the PyTorch module's state_dict (as float64 arrays)
and recomputes every layer: LayerNorm, multi-head attention, the exact (erf)
GELU, all written out below. No torch here on purpose: the reference must
not share a line of code with what it checks.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = [
    "itc_mask",
    "itm_mask",
    "itg_mask",
    "hide_padding",
    "layer_norm",
    "gelu",
    "attention",
    "multi_head_attention",
    "qformer_forward",
    "itc_similarity",
    "contrastive_loss",
    "hard_negative_probs",
    "itm_logits",
    "lm_loss",
]

LN_EPS = 1e-5  # torch.nn.LayerNorm's default


def _check_sizes(num_queries, text_len) -> tuple[int, int]:
    for name, n in (("num_queries", num_queries), ("text_len", text_len)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if num_queries + text_len == 0:
        raise ValueError("the sequence is empty: num_queries + text_len must be at least 1")
    return int(num_queries), int(text_len)


# --------------------------------------------------------------------------- masks
# ANCHOR: masks
def _table(num_queries: int, text_len: int, rule) -> np.ndarray:
    """(Q+T, Q+T) bool: rule(row_is_query, col_is_query, i, j) for every entry."""
    Q, T = _check_sizes(num_queries, text_len)
    mask = np.zeros((Q + T, Q + T), dtype=bool)
    for i in range(Q + T):
        for j in range(Q + T):
            mask[i, j] = rule(i < Q, j < Q, i, j)
    return mask


def itc_mask(num_queries: int, text_len: int) -> np.ndarray:
    """Unimodal: a query sees the queries, a text token sees the text."""
    return _table(num_queries, text_len, lambda row_q, col_q, i, j: row_q == col_q)


def itm_mask(num_queries: int, text_len: int) -> np.ndarray:
    """Bidirectional: everyone sees everyone."""
    return _table(num_queries, text_len, lambda row_q, col_q, i, j: True)


def itg_mask(num_queries: int, text_len: int) -> np.ndarray:
    """Queries see the queries; text token i sees every query and text j <= i."""
    return _table(num_queries, text_len, lambda row_q, col_q, i, j: col_q or (not row_q and j <= i))


def hide_padding(mask: np.ndarray, num_queries: int, text_lengths) -> np.ndarray:
    """(L, L) -> (B, L, L): column Q + t is hidden from every row of example b when t >= text_lengths[b]."""
    lengths = np.asarray(text_lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"text_lengths must be a 1-D integer array (B,), got {lengths.dtype} {lengths.shape}"
        )
    text_len = mask.shape[-1] - num_queries
    if np.any(lengths < 1) or np.any(lengths > text_len):
        raise ValueError(f"text_lengths must lie in [1, {text_len}], got {lengths.tolist()}")
    out = np.repeat(mask[None], len(lengths), axis=0)  # (B, L, L)
    for b, n in enumerate(lengths):
        out[b, :, num_queries + n :] = False
    return out
# ANCHOR_END: masks


MASKS = {"itc": itc_mask, "itm": itm_mask, "itg": itg_mask}


# --------------------------------------------------------------------------- layers
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """Normalise the last axis to mean 0, variance 1 (biased variance), then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU: x * Phi(x), Phi the standard normal CDF, written with erf."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, p: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """softmax(q k^T / sqrt(D)) v over the visible keys; q (B, H, Lq, D), k, v (B, H, Lk, D).

    mask: bool broadcastable to (B, H, Lq, Lk), True = visible. Every row must
    see at least one key (the Q-Former's masks always leave a row something).
    """
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if mask is not None:
        if not np.all(np.broadcast_to(mask, scores.shape).any(axis=-1)):
            raise ValueError("a row of the mask sees no key at all")
        scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)  # (B, H, Lq, Lk)
    return weights @ v  # (B, H, Lq, D)


def multi_head_attention(
    query: np.ndarray, context: np.ndarray, p: Mapping[str, np.ndarray], name: str, heads: int, mask=None
) -> np.ndarray:
    """Project (q from query (B, Lq, E); k, v from context (B, Lk, kdim)), attend per head, merge, project."""
    def split(x):  # (B, L, E) -> (B, H, L, E / H)
        B, L, E = x.shape
        return x.reshape(B, L, heads, E // heads).transpose(0, 2, 1, 3)

    q = split(_linear(query, p, f"{name}.q_proj"))
    k = split(_linear(context, p, f"{name}.k_proj"))
    v = split(_linear(context, p, f"{name}.v_proj"))
    out = attention(q, k, v, mask)  # (B, H, Lq, Dh)
    B, H, L, Dh = out.shape
    return _linear(out.transpose(0, 2, 1, 3).reshape(B, L, H * Dh), p, f"{name}.out_proj")


def _mlp(x: np.ndarray, p: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return _linear(gelu(_linear(x, p, f"{name}.c_fc")), p, f"{name}.c_proj")


def _ln(x: np.ndarray, p: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return layer_norm(x, p[f"{name}.weight"], p[f"{name}.bias"])


# --------------------------------------------------------------------------- forward
# ANCHOR: forward
def qformer_forward(
    params: Mapping[str, np.ndarray],
    image_feats: np.ndarray,
    ids: np.ndarray | None,
    text_lengths: np.ndarray | None,
    objective: str,
    heads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The Q-Former's query and text outputs, from a state_dict of float64 arrays.

    Args:
        params: ``QFormer.state_dict()`` as arrays (names as in tiny_mm.adapters.qformer).
        image_feats: (B, N, image_width). ids: (B, T) ints or None (queries alone).
        text_lengths: (B,) real tokens per caption (None only when ids is None).
        objective: "itc", "itm" or "itg" (the mask; "itg" puts the decode token first).
        heads: attention heads.

    Returns:
        (queries (B, Q, d), text (B, T, d)).
    """
    if objective not in MASKS:
        raise ValueError(f"objective must be one of {sorted(MASKS)}, got {objective!r}")
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    image = layer_norm(np.asarray(image_feats, np.float64), p["ln_image.weight"], p["ln_image.bias"])
    B, Q = image.shape[0], p["query_tokens"].shape[0]
    x = np.repeat(p["query_tokens"][None], B, axis=0)  # (B, Q, d)
    mask = None
    if ids is not None:
        ids = np.asarray(ids)
        T = ids.shape[1]
        text = p["token_embedding.weight"][ids]  # (B, T, d)
        if objective == "itg":
            text[:, 0] = p["decode_token"]
        text = text + p["positional_embedding"][:T]
        x = np.concatenate([x, text], axis=1)  # (B, Q+T, d)
        mask = hide_padding(MASKS[objective](Q, T), Q, text_lengths)[:, None]  # (B, 1, L, L)

    depth = 1 + max(int(name.split(".")[1]) for name in p if name.startswith("layers."))
    for i in range(depth):
        at = f"layers.{i}"
        h = _ln(x, p, f"{at}.ln_1")
        x = x + multi_head_attention(h, h, p, f"{at}.attn", heads, mask)
        queries, text = x[:, :Q], x[:, Q:]
        if f"{at}.cross_attn.q_proj.weight" in p:
            queries = queries + multi_head_attention(_ln(queries, p, f"{at}.ln_cross"), image, p,
                                                     f"{at}.cross_attn", heads)
        queries = queries + _mlp(_ln(queries, p, f"{at}.ln_query"), p, f"{at}.mlp_query")
        if text.shape[1]:  # a Q-Former built without a text side has no ln_text, mlp_text
            text = text + _mlp(_ln(text, p, f"{at}.ln_text"), p, f"{at}.mlp_text")
        x = np.concatenate([queries, text], axis=1)
    x = _ln(x, p, "ln_post")
    return x[:, :Q], x[:, Q:]
# ANCHOR_END: forward


# --------------------------------------------------------------------------- losses
def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def itc_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """sim[i, j] = max over q of the cosine of image i's query q with text j.

    image_emb (B_i, Q, e), text_emb (B_t, e) -> (B_i, B_t); the inputs need not be normalised.
    """
    image_emb, text_emb = _l2_normalize(image_emb), _l2_normalize(text_emb)
    sim = np.empty((image_emb.shape[0], text_emb.shape[0]))
    for i in range(image_emb.shape[0]):
        for j in range(text_emb.shape[0]):
            sim[i, j] = max(float(image_emb[i, q] @ text_emb[j]) for q in range(image_emb.shape[1]))
    return sim


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def contrastive_loss(logits: np.ndarray) -> float:
    """Symmetric InfoNCE on (B, B) logits with the pairs on the diagonal: mean of the two directions."""
    diagonal = np.arange(logits.shape[0])
    image_to_text = -_log_softmax(logits, axis=1)[diagonal, diagonal].mean()
    text_to_image = -_log_softmax(logits, axis=0)[diagonal, diagonal].mean()
    return float((image_to_text + text_to_image) / 2)


def hard_negative_probs(logits: np.ndarray) -> np.ndarray:
    """p[i, j] = exp(logits[i, j]) / sum over k != i of exp(logits[i, k]), and p[i, i] = 0."""
    B = logits.shape[0]
    if logits.shape != (B, B) or B < 2:
        raise ValueError(f"need a square (B, B) matrix with B >= 2, got {logits.shape}")
    probs = np.zeros((B, B))
    for i in range(B):
        others = [j for j in range(B) if j != i]
        weights = np.exp(logits[i, others] - logits[i, others].max())
        probs[i, others] = weights / weights.sum()
    return probs


def itm_logits(query_out: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Each query's two logits, averaged over the queries: (B, Q, d) -> (B, 2)."""
    return (query_out @ weight.T + bias).mean(axis=1)


def lm_loss(logits: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> float:
    """Mean over every real next token (1 <= t < lengths[b]) of -log softmax(logits[b, t-1])[ids[b, t]]."""
    losses = []
    log_probs = _log_softmax(logits, axis=-1)  # (B, T, V)
    for b in range(ids.shape[0]):
        for t in range(1, int(lengths[b])):
            losses.append(-log_probs[b, t - 1, ids[b, t]])
    return float(np.mean(losses))
