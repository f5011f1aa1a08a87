"""Scaled dot-product and multi-head attention: the PyTorch rung of chapter 2.

Notation (the same as ``chapters/ch02_attention/reference.py``):

    q : (B, H, Lq, D)   queries, one row per query position of each head
    k : (B, H, Lk, D)   keys
    v : (B, H, Lk, Dv)  values, one per key
    S = scale * q @ k^T           (B, H, Lq, Lk) scores, scale = 1 / sqrt(D) by default
    P = softmax over the visible keys of each row of S
    out = P @ v                   (B, H, Lq, Dv)

Which keys a query may see (the mask) has two independent parts:

- ``causal``: query i sees key j only if j <= i. Aligned at the top-left
  corner, as ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``
  does, also when Lq != Lk.
- ``kv_lengths``: an integer tensor (B,); example b has kv_lengths[b] real keys
  and the rest is padding, so key j is visible only if j < kv_lengths[b].

- ``attn_mask``: any other pattern, a bool tensor broadcastable to
  (B, H, Lq, Lk), True where the query may see the key. Later chapters need it:
  Flamingo's media mask, the Q-Former's three masks. It is combined with the
  two above (a key must pass all of them), and the Triton kernel does not take
  it (``backend="auto"`` then runs the plain rung).

A query row that sees no key at all (kv_lengths[b] == 0) has no distribution
to average over: it returns zeros, and its gradients are zero, never NaN.

Three pieces live here:

- `scaled_dot_product_attention`: the plain rung. It builds the whole (Lq, Lk)
  score matrix, so it reads like the formula and autograd gives the gradients.
- `MultiHeadAttention`: the module the models use, for self-attention and for
  cross-attention between two modalities. It projects, splits the heads, runs
  one of three attention backends (this file's plain rung, PyTorch's fused
  ``scaled_dot_product_attention``, or the Triton kernel ``kernels.attention``)
  and merges the heads again.
- `visible_mask`, `split_heads`, `merge_heads`: the small helpers they share.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "scaled_dot_product_attention",
    "visible_mask",
    "split_heads",
    "merge_heads",
    "MultiHeadAttention",
]

BACKENDS = ("auto", "torch", "sdpa", "triton")


# --------------------------------------------------------------------------- checks


def _check_kv_lengths(kv_lengths: Tensor | None, batch: int, lk: int, device: torch.device) -> None:
    """ValueError unless kv_lengths is None or an integer tensor (B,) with 0 <= values <= Lk."""
    if kv_lengths is None:
        return
    if not isinstance(kv_lengths, Tensor):
        raise ValueError(
            f"kv_lengths must be an integer torch.Tensor of shape (B,), got {type(kv_lengths).__name__}"
        )
    if kv_lengths.is_floating_point() or kv_lengths.is_complex() or kv_lengths.dtype == torch.bool:
        raise ValueError(f"kv_lengths must be an integer tensor, got dtype {kv_lengths.dtype}")
    if tuple(kv_lengths.shape) != (batch,):
        raise ValueError(
            f"kv_lengths must have shape (B,) = ({batch},), got {tuple(kv_lengths.shape)}"
        )
    if kv_lengths.device != device:
        raise ValueError(f"kv_lengths must be on {device} like the inputs, got {kv_lengths.device}")
    # One small read of two numbers (a device sync on a GPU): a length past the end
    # is almost always a bug upstream, and the mask would hide it silently.
    low, high = int(kv_lengths.min()), int(kv_lengths.max())
    if low < 0 or high > lk:
        raise ValueError(f"kv_lengths must lie in [0, Lk] = [0, {lk}], got values in [{low}, {high}]")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """ValueError unless q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) fit together."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(x.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if not q.shape[:2] == k.shape[:2] == v.shape[:2]:
        raise ValueError(
            f"q, k and v must agree on (B, H), got shapes {tuple(q.shape)}, {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim D, got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must have the same number of keys Lk, got shapes {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: 1 / sqrt(D) unless given; ValueError unless finite and positive."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return float(scale)


def _check_causal(causal: bool) -> None:
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")


def _check_attn_mask(attn_mask: Tensor | None, shape: tuple[int, int, int, int], device: torch.device) -> None:
    """ValueError unless attn_mask is None or a bool tensor broadcastable to shape (B, H, Lq, Lk)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise ValueError(f"attn_mask must be a bool torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise ValueError(
            f"attn_mask must be a bool tensor (True = the query may see the key), got dtype {attn_mask.dtype}"
        )
    if attn_mask.device != device:
        raise ValueError(f"attn_mask must be on {device} like the inputs, got {attn_mask.device}")
    try:
        torch.broadcast_shapes(tuple(attn_mask.shape), shape)
        fits = attn_mask.dim() <= 4
    except RuntimeError:
        fits = False
    if not fits or torch.broadcast_shapes(tuple(attn_mask.shape), shape) != shape:
        raise ValueError(
            f"attn_mask must broadcast to (B, H, Lq, Lk) = {shape}, got shape {tuple(attn_mask.shape)}"
        )


# --------------------------------------------------------------------------- masks


# ANCHOR: mask
def visible_mask(
    batch: int,
    lq: int,
    lk: int,
    *,
    causal: bool = False,
    kv_lengths: Tensor | None = None,
    attn_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which keys each query may see.

    Args:
        batch, lq, lk: B, Lq, Lk.
        causal: query i sees key j only if j <= i (top-left aligned).
        kv_lengths: int tensor (B,); key j of example b is visible only if j < kv_lengths[b].
        attn_mask: bool, broadcastable to (B, H, Lq, Lk); True where the query may see the key.
        device: where to build the mask (default: the device of kv_lengths or
            attn_mask, else the CPU).

    Returns:
        bool (B, 1, Lq, Lk), True where query i of example b may see key j; with
        an attn_mask that varies over heads, (B, H, Lq, Lk).
    """
    for name, size in (("batch", batch), ("lq", lq), ("lk", lk)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if kv_lengths is not None:
        device = kv_lengths.device
        _check_kv_lengths(kv_lengths, batch, lk, device)
    if attn_mask is not None:
        device = attn_mask.device if device is None else torch.device(device)
        heads = attn_mask.shape[-3] if attn_mask.dim() >= 3 else 1
        _check_attn_mask(attn_mask, (batch, heads, lq, lk), device)
    rows = torch.arange(lq, device=device)[:, None]  # (Lq, 1): query positions i
    cols = torch.arange(lk, device=device)[None, :]  # (1, Lk): key positions j
    visible = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)  # (B, 1, Lq, Lk)
    if causal:
        visible = visible & (cols <= rows)  # (B, 1, Lq, Lk): j <= i
    if kv_lengths is not None:
        lengths = kv_lengths.to(torch.long)[:, None, None, None]  # (B, 1, 1, 1)
        visible = visible & (cols < lengths)  # (B, 1, Lq, Lk): j < kv_lengths[b]
    if attn_mask is not None:
        visible = visible & attn_mask  # (B, 1 or H, Lq, Lk)
    return visible


def _safe_mask(
    batch: int,
    lq: int,
    lk: int,
    causal: bool,
    kv_lengths: Tensor | None,
    device: torch.device,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """The mask a softmax can use without NaN, and which rows see any key at all.

    A softmax over a row whose every entry is -inf is 0/0 = NaN, in the forward
    and (as NaN * 0) in the backward. So rows that see nothing are handed to the
    softmax fully visible (a harmless finite distribution) and their output is
    zeroed afterwards with `torch.where`, which also sends them zero gradient.

    Returns:
        (mask, any_visible): bool (B, 1, Lq, Lk) and bool (B, 1, Lq, 1) (H for
        1 where attn_mask varies over heads), or (None, None) when nothing is masked.
    """
    if not causal and kv_lengths is None and attn_mask is None:
        return None, None
    visible = visible_mask(
        batch, lq, lk, causal=causal, kv_lengths=kv_lengths, attn_mask=attn_mask, device=device
    )
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, 1, Lq, 1)
    return visible | ~any_visible, any_visible  # (B, 1, Lq, Lk), (B, 1, Lq, 1)
# ANCHOR_END: mask


# --------------------------------------------------------------------------- the plain rung


# ANCHOR: sdpa
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """softmax(scale * q k^T, over the visible keys) v, with the (Lq, Lk) matrix in memory.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, Dv) values.
        causal: query i sees key j only if j <= i (top-left aligned, as
            ``F.scaled_dot_product_attention(is_causal=True)``).
        kv_lengths: int tensor (B,) on q's device; key j of example b is visible
            only if j < kv_lengths[b].
        scale: multiplies the scores; default 1 / sqrt(D).
        attn_mask: bool, broadcastable to (B, H, Lq, Lk); True where the query may
            see the key. Combined with causal and kv_lengths.

    Returns:
        (B, H, Lq, Dv), in q's dtype. A query row that sees no key gives zeros.
    """
    _check_qkv(q, k, v)
    _check_causal(causal)
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    _check_kv_lengths(kv_lengths, batch, lk, q.device)
    _check_attn_mask(attn_mask, (batch, heads, lq, lk), q.device)
    scale = _resolve_scale(scale, head_dim)

    scores = scale * (q @ k.transpose(-2, -1))  # (B, H, Lq, Lk)
    mask, any_visible = _safe_mask(batch, lq, lk, causal, kv_lengths, q.device, attn_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, Lq, Lk): exp(-inf) = 0
    # Softmax in float32 at least: half precision loses the small probabilities.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    probs = probs.to(v.dtype)  # (B, H, Lq, Lk)
    if any_visible is not None:
        probs = torch.where(any_visible, probs, 0.0)  # (B, H, Lq, Lk): rows that see nothing -> 0
    return probs @ v  # (B, H, Lq, Dv)
# ANCHOR_END: sdpa


# ANCHOR: torch_sdpa
def _torch_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    kv_lengths: Tensor | None,
    scale: float,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """The same attention through ``F.scaled_dot_product_attention`` (fused kernels, no NaN).

    Shapes as `scaled_dot_product_attention`; the inputs are assumed checked.
    """
    if kv_lengths is None and attn_mask is None:
        # is_causal lets PyTorch pick its flash kernel; with causal alone every row
        # sees at least key 0, so there is no empty row to fix.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # (B, H, Lq, Dv)
    batch, _, lq, _ = q.shape
    mask, any_visible = _safe_mask(batch, lq, k.shape[2], causal, kv_lengths, q.device, attn_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, Lq, Dv)
    # Depending on the version and kernel, SDPA returns NaN or zeros for a row that sees
    # nothing; the safe mask made it finite, and this makes it zero like the other rungs.
    return torch.where(any_visible, out, 0.0)  # (B, H, Lq, Dv)
# ANCHOR_END: torch_sdpa


# --------------------------------------------------------------------------- heads


# ANCHOR: heads
def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, H * Dh) -> (B, H, L, Dh): each head gets its own slice of the features."""
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, L, H * Dh), got shape {tuple(x.shape)}")
    if num_heads < 1 or x.shape[-1] % num_heads != 0:
        raise ValueError(
            f"the feature size {x.shape[-1]} must be a positive multiple of num_heads = {num_heads}"
        )
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # (B, H, L, Dh)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, Dh) -> (B, L, H * Dh): the heads side by side again, the inverse of `split_heads`."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, L, Dh), got shape {tuple(x.shape)}")
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, L, H * Dh)
# ANCHOR_END: heads


# --------------------------------------------------------------------------- the module


def _kernel_can_run(q: Tensor, v: Tensor) -> bool:
    """Whether ``kernels.attention`` takes these heads: float32/16 or bfloat16, 16 <= D == Dv <= 128.

    Below D = 16 the kernel's smallest tile would be mostly padding, and it holds
    whole rows of D in registers, so it stops at 128; "auto" runs the plain rung there.
    """
    head_dim = q.shape[-1]
    return (
        q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and head_dim == v.shape[-1]
        and 16 <= head_dim <= 128
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention, batch-first, for self- and cross-attention.

    The queries come from ``query`` (B, Lq, E); keys and values from ``key``
    (B, Lk, kdim) and ``value`` (B, Lk, vdim), another modality in
    cross-attention, or ``query`` itself in self-attention. Each is projected
    to E = num_heads * head_dim features, split into heads, attended, merged
    and projected back to E.

    Args:
        embed_dim: E, the width of the queries and of the output.
        num_heads: H; E must be a multiple of H, head_dim = E // H.
        kdim, vdim: widths of key and value (default E).
        bias: add biases to the four projections.
        packed_in_proj: keep the q, k and v projection weights in one (3E, E)
            parameter ``in_proj_weight`` (and ``in_proj_bias`` (3E,)), under the
            names ``torch.nn.MultiheadAttention`` uses, so its state_dict (and
            CLIP's checkpoints) load unchanged. Needs kdim == vdim == E.
            Otherwise the projections are ``q_proj``, ``k_proj``, ``v_proj``,
            ``out_proj`` (nn.Linear each).
        backend: "auto" (the Triton kernel on CUDA tensors it supports, the plain
            rung otherwise), "torch" (`scaled_dot_product_attention`), "sdpa"
            (``torch.nn.functional.scaled_dot_product_attention``) or "triton"
            (``kernels.attention``; on a CPU it runs under Triton's interpreter).

    Shapes: forward(query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim)) -> (B, Lq, E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        packed_in_proj: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        sizes = {"embed_dim": embed_dim, "num_heads": num_heads, "kdim": kdim, "vdim": vdim}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        if packed_in_proj and not kdim == vdim == embed_dim:
            raise ValueError(
                f"packed_in_proj=True stacks the q, k and v weights into one (3E, E) matrix, so it "
                f"needs kdim == vdim == embed_dim = {embed_dim}, got kdim={kdim}, vdim={vdim}; "
                "use packed_in_proj=False for other key/value widths"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            # Import the kernels now, not at the first forward: on a CPU they need
            # Triton's interpreter, which must be switched on before anything else
            # imports Triton (creating an optimiser does, through torch._dynamo).
            import kernels  # noqa: F401
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.bias, self.packed_in_proj, self.backend = bias, packed_in_proj, backend

        # ANCHOR: projections
        if packed_in_proj:
            # Rows [0, E) project queries, [E, 2E) keys, [2E, 3E) values, as in nn.MultiheadAttention.
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
            # register_parameter keeps the name even when it is None, as nn.MultiheadAttention does.
            in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim)) if bias else None
            self.register_parameter("in_proj_bias", in_proj_bias)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
            self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # ANCHOR_END: projections
        if packed_in_proj:
            # The packed weight is a bare Parameter: initialise it as nn.MultiheadAttention
            # does (Xavier-uniform weight, zero biases). The separate Linears keep their own init.
            nn.init.xavier_uniform_(self.in_proj_weight)
            if bias:
                nn.init.zeros_(self.in_proj_bias)
                nn.init.zeros_(self.out_proj.bias)

    # ANCHOR: project_qkv
    def _project_qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, Lq, E), (B, Lk, kdim), (B, Lk, vdim) -> three (B, L, E) projections."""
        if not self.packed_in_proj:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)  # three (E, E) views, no copy
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        # Three products, not one with the (3E, E) matrix: in cross-attention the keys and
        # values come from another sequence, so only the query rows multiply `query`.
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    # ANCHOR_END: project_qkv

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        kv_lengths: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Run the chosen backend on (B, H, L, Dh) heads; returns (B, H, Lq, Dh)."""
        options = {"causal": causal, "kv_lengths": kv_lengths, "scale": 1.0 / math.sqrt(self.head_dim)}
        backend = self.backend
        if backend == "auto":
            fused = q.is_cuda and _kernel_can_run(q, v) and attn_mask is None
            backend = "triton" if fused else "torch"
        if backend == "torch":
            return scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)  # (B, H, Lq, Dh)
        if backend == "sdpa":
            return _torch_sdpa(q, k, v, attn_mask=attn_mask, **options)  # (B, H, Lq, Dh)
        if attn_mask is not None:
            raise ValueError(
                "the Triton kernel takes causal and kv_lengths masks only, not an attn_mask; "
                'use backend="torch" or "sdpa" (or "auto", which picks the plain rung) for this module'
            )
        import kernels  # "triton": imported by __init__; "auto": on CUDA, where import order is free

        # The kernel takes any strides: split_heads' transposed views are read in place.
        return kernels.attention(q, k, v, **options)  # (B, H, Lq, Dh)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """ValueError unless query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim)."""
        widths = {"query": self.embed_dim, "key": self.kdim, "value": self.vdim}
        for (name, width), x in zip(widths.items(), (query, key, value)):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 3:
                raise ValueError(f"{name} must be 3-D (B, L, features), got shape {tuple(x.shape)}")
            if x.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features, got shape {tuple(x.shape)}")
            if x.shape[1] == 0:
                raise ValueError(f"{name} must hold at least one position, got shape {tuple(x.shape)}")
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(
                f"query, key and value must have the same batch size, got shapes {tuple(query.shape)}, "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have the same length Lk, got shapes {tuple(key.shape)} "
                f"and {tuple(value.shape)}"
            )
        if not query.dtype == key.dtype == value.dtype:
            raise ValueError(
                f"query, key and value must share a dtype, got {query.dtype}, {key.dtype} "
                f"and {value.dtype}"
            )
        if not query.device == key.device == value.device:
            raise ValueError(
                f"query, key and value must be on one device, got {query.device}, {key.device} "
                f"and {value.device}"
            )

    # ANCHOR: MultiHeadAttention_forward
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        causal: bool = False,
        kv_lengths: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from query to key/value.

        Args:
            query: (B, Lq, E).
            key: (B, Lk, kdim); None for self-attention (key = value = query).
            value: (B, Lk, vdim); None means value = key.
            causal: query i sees key j only if j <= i.
            kv_lengths: int tensor (B,); key j of example b is visible only if j < kv_lengths[b].
            attn_mask: bool, broadcastable to (B, H, Lq, Lk); True where the query
                may see the key (e.g. Flamingo's media mask). Not for the Triton backend.

        Returns:
            (B, Lq, E). A query that sees no key (kv_lengths[b] == 0) attends to
            nothing: its attention output is zero, so it returns out_proj's bias.
        """
        if key is None and value is not None:
            raise ValueError("value was given without key: pass key too, or neither for self-attention")
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        _check_causal(causal)
        _check_kv_lengths(kv_lengths, query.shape[0], key.shape[1], query.device)
        shape = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
        _check_attn_mask(attn_mask, shape, query.device)

        q, k, v = self._project_qkv(query, key, value)  # (B, Lq, E), (B, Lk, E), (B, Lk, E)
        q = split_heads(q, self.num_heads)  # (B, H, Lq, Dh)
        k = split_heads(k, self.num_heads)  # (B, H, Lk, Dh)
        v = split_heads(v, self.num_heads)  # (B, H, Lk, Dh)
        heads = self._attend(q, k, v, causal, kv_lengths, attn_mask)  # (B, H, Lq, Dh)
        return self.out_proj(merge_heads(heads))  # (B, Lq, E)
    # ANCHOR_END: MultiHeadAttention_forward

    # ANCHOR: attention_probs
    def attention_probs(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        causal: bool = False,
        kv_lengths: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """The attention probabilities forward uses: softmax(q k^T / sqrt(Dh)) per head.

        Takes forward's arguments and masks (value only fills in and is checked
        as in forward; the probabilities do not depend on it). Always computed
        the plain way, whatever the backend: the fused backends never hold them.

        Returns:
            (B, H, Lq, Lk), in query's dtype. Each row sums to 1 over the keys
            the query may see and is 0 elsewhere; a query that sees no key gets
            a row of zeros.
        """
        if key is None and value is not None:
            raise ValueError("value was given without key: pass key too, or neither for self-attention")
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        _check_causal(causal)
        _check_kv_lengths(kv_lengths, query.shape[0], key.shape[1], query.device)
        shape = (query.shape[0], self.num_heads, query.shape[1], key.shape[1])
        _check_attn_mask(attn_mask, shape, query.device)

        q, k, _ = self._project_qkv(query, key, value)  # (B, Lq, E), (B, Lk, E); the values are not needed
        q = split_heads(q, self.num_heads)  # (B, H, Lq, Dh)
        k = split_heads(k, self.num_heads)  # (B, H, Lk, Dh)
        scores = (1.0 / math.sqrt(self.head_dim)) * (q @ k.transpose(-2, -1))  # (B, H, Lq, Lk), as _attend scales
        batch, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        mask, any_visible = _safe_mask(batch, lq, lk, causal, kv_lengths, query.device, attn_mask)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, Lq, Lk)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
        if any_visible is not None:
            probs = torch.where(any_visible, probs, 0.0)  # (B, H, Lq, Lk): rows that see nothing -> 0
        return probs.to(query.dtype)  # (B, H, Lq, Lk)
    # ANCHOR_END: attention_probs

    def extra_repr(self) -> str:
        widths = f"kdim={self.kdim}, vdim={self.vdim}, "
        if self.kdim == self.vdim == self.embed_dim:
            widths = ""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, {widths}"
            f"bias={self.bias}, packed_in_proj={self.packed_in_proj}, backend={self.backend!r}"
        )
