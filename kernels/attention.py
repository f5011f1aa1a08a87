"""Scaled dot-product attention as a Triton flash-attention kernel, forward and backward.

The top rung of chapter 2's ladder. Same function as
``chapters/ch02_attention/reference.py`` (NumPy) and
``tiny_mm.attention.scaled_dot_product_attention`` (PyTorch), with the
chapter's notation, per batch element b and head h:

    q : (Lq, D)   queries        k, v : (Lk, D)   keys and values
    S = scale * q @ k.T          (Lq, Lk) logits, scale = 1/sqrt(D) by default
    P = softmax_row(S)           (Lq, Lk) with invisible keys at probability 0
    O = P @ v                    (Lq, D)
    L = logsumexp_row(S)         (Lq,)    over the visible keys only

Masks: key j is visible to query i iff j < kv_lengths[b] (when given) and,
with causal=True, j <= i: top-left aligned like
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, also when
Lq != Lk. A query row that sees no key at all (kv_lengths[b] = 0) returns zeros
and gets zero gradients; its L is -inf. Never NaN.

The PyTorch rung builds S and P, two (Lq, Lk) matrices per head: at
B * H = 32 and L = 4,096 that is 2 GiB of float32 each. This kernel never does:

* forward: one program per block of query rows sweeps the key blocks with the
  online softmax (running max m, running sum l, running unnormalised output),
  and stores only O and L. Memory beyond the output: B H Lq float32 for L.
* backward: with delta_i = rowsum(dO * O)_i computed first (a small kernel;
  it equals sum_j P_ij dP_ij), every tile of P is exp(S - L) from a
  recomputed tile of S, and

      dV = P.T @ dO     dP = dO @ V.T     dS = P * (dP - delta)
      dQ = scale dS @ K                   dK = scale dS.T @ Q

  Memory beyond the gradients: delta, B H Lq float32.

  One kernel runs over key blocks and owns rows of dK and dV; a second runs
  over query blocks and owns rows of dQ. No two programs write the same
  element, so there are no atomics and the result is bitwise reproducible.
  The price: S and dP are recomputed in both kernels, 7 matrix products
  instead of the 5 that a single pass adding into dQ with atomics needs
  (backward work 3.5x the forward's 4 B H Lq Lk D flops instead of 2.5x). We pay it for
  determinism, and because Triton's interpreter, which runs these tests on
  CPU, is best kept away from atomics.

Causal attention skips the key blocks that no row of a query block can see
(and, in the backward, the query blocks that cannot see a key block) through
the loop bounds, not through masks: about half the work disappears. Keys at or
past kv_lengths[b] are skipped the same way.

Inputs may be non-contiguous: the kernels take all four strides of q, k, v
(and of dO), so the usual (B, L, H, D).transpose(1, 2) view of a projection
is read in place, without a copy.

Note: ``kernels/__init__.py`` exports the function ``attention``, which hides
this module behind the package attribute of the same name. Use
``importlib.import_module("kernels.attention")`` to reach the module itself.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["attention", "attention_with_lse"]

# Whether the kernels below run in Triton's interpreter (numpy on CPU) rather
# than compiled for a GPU. Decided once, when this module is imported, because
# that is when `@triton.jit` reads the variable (see kernels/__init__.py).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Tile sizes when the caller gives none (see _default_blocks): 64 query rows
# x 64 keys per tile of S for float16/bfloat16, 32 x 32 for float32 with
# D > 32. Powers of two (tl.arange needs them), at least 16 (tl.dot's
# minimum). Tiles of q, k, v and dO pass through shared memory, pipelined over
# 3 stages; compiling these kernels for sm_80 and sm_90 (on a machine without
# a GPU) gives at most 73 KiB for 16-bit inputs at 64 x 64, D = 128, but 209
# KiB for float32 at 64 x 64, D = 128: more than an A100 has (163 KiB). At
# 32 x 32, float32 D = 128 needs 100 KiB. Not tuned for speed on a GPU yet.
# Tests pass 16 so that a 40-row input spans several blocks under the interpreter.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_FP32_WIDE = 32  # block_m = block_n for float32 inputs with D padded to 64 or 128

# Head dims the kernel is written for. Each program holds whole rows of q, k,
# v and of its float32 accumulators, padded to the next power of two, in
# registers: past 128 they would spill. Below 16, tl.dot's smallest tile would
# be mostly padding; the PyTorch rung is the better tool there.
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ANCHOR: masks
@triton.jit
def _visible(rows, cols, kv_len, CAUSAL: tl.constexpr):
    """Which keys each query sees: (BLOCK_M, BLOCK_N) bool (or (1, BLOCK_N)).

    rows: (BLOCK_M,) query indices; cols: (BLOCK_N,) key indices; kv_len: the
    number of keys of this batch element, already at most Lk, so the test also
    drops the padding columns past Lk.
    """
    ok = cols[None, :] < kv_len  # (1, BLOCK_N)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])  # (BLOCK_M, BLOCK_N), top-left aligned
    return ok


@triton.jit
def _key_length(kv_len_ptr, b, Lk, HAS_KV_LENGTHS: tl.constexpr):
    """Keys visible in batch element b before the causal mask: kv_lengths[b] or Lk."""
    if HAS_KV_LENGTHS:
        n = tl.minimum(tl.load(kv_len_ptr + b), Lk)  # validated on the host; min is cheap insurance
    else:
        n = Lk
    return n


@triton.jit
def _query_block_key_end(start_m, Lq, kv_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any query of rows [start_m, start_m + BLOCK_M) can see.

    Key blocks from here on are invisible to the whole query block, so the
    loops stop before them instead of masking them: with causal=True the
    query block at the top of S visits one key block, the last visits all.
    """
    end = kv_len
    if CAUSAL:
        # The last real row of the block, i = min(start_m + BLOCK_M, Lq) - 1, sees keys j <= i.
        end = tl.minimum(end, tl.minimum(start_m + BLOCK_M, Lq))
    return end
# ANCHOR_END: masks


# ANCHOR: forward_kernel
@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kv_len_ptr,
    H, Lq, Lk, D, scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (block of query rows, batch element b, head h).

    q: (B, H, Lq, D), k, v: (B, H, Lk, D), any strides, all one dtype.
    Writes o: (B, H, Lq, D) contiguous, input dtype, and
           lse: (B, H, Lq) contiguous float32, log sum_j exp(S_ij) over visible j
           (-inf for a row that sees no key).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < Lq
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,) D padded to a power of two
    dim_ok = dims < D
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    # Padding rows and dims load as zeros: they add nothing to any dot product.
    q = tl.load(  # (BLOCK_M, BLOCK_D), input dtype; stays in registers for the whole sweep
        q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    kv_len = _key_length(kv_len_ptr, b, Lk, HAS_KV_LENGTHS)
    key_end = _query_block_key_end(start_m, Lq, kv_len, BLOCK_M, CAUSAL)

    # Online softmax. After each key block, for every row:
    #   m   = the largest visible logit so far,
    #   l   = sum over the visible keys so far of exp(S_ij - m),
    #   acc = sum over the same keys of exp(S_ij - m) * v_j   (unnormalised O).
    # A block with a larger max rescales l and acc by exp(m_old - m_new) <= 1,
    # so exp never sees a positive argument and cannot overflow.
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < Lk
        k = tl.load(  # (BLOCK_N, BLOCK_D)
            k_base + cols[:, None] * stride_kl + dims[None, :] * stride_kd,
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        s = scale * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
        s = tl.where(_visible(rows, cols, kv_len, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # (BLOCK_M,)
        # A row with nothing visible yet has m_new = -inf, and s - m_new would
        # be -inf - (-inf) = NaN. Subtracting 0 instead gives exp(-inf) = 0.
        # With this file's masks it cannot happen (the first block visited
        # holds key 0, which every row sees, and a row that sees no key visits
        # no block), but the guard costs one select and keeps the kernel
        # NaN-free under any other mask someone adds (e.g. bottom-right causal).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
        alpha = tl.exp(m - m_safe)  # (BLOCK_M,) rescales the old sums; exp(-inf) = 0 at the start
        p = tl.exp(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N) float32, 0 where invisible
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(  # (BLOCK_N, BLOCK_D)
            v_base + cols[:, None] * stride_vl + dims[None, :] * stride_vd,
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        # tl.dot wants both operands in one dtype: p (in [0, 1]) goes to v's,
        # the product still accumulates in float32.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    # A row that saw no key has l = 0 and acc = 0: output 0, lse -inf.
    seen = l > 0.0  # (BLOCK_M,)
    l_safe = tl.where(seen, l, 1.0)
    out = acc / l_safe[:, None]  # (BLOCK_M, BLOCK_D) float32
    lse = tl.where(seen, m + tl.log(l_safe), float("-inf"))  # (BLOCK_M,) float32

    o_rows = pid_bh * Lq + rows  # o and lse are contiguous: row index into (B*H*Lq,)
    tl.store(o_ptr + o_rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + o_rows, lse, mask=row_ok)
# ANCHOR_END: forward_kernel


# ANCHOR: backward_kernels
@triton.jit
def _attention_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    H, Lq, D,
    stride_dob, stride_doh, stride_dol, stride_dod,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d], float32 (B, H, Lq).

    This is rowsum(P * dP): the term dS = P * (dP - delta) subtracts, computed
    once here from (Lq, D) tensors instead of from (Lq, Lk) tiles.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    ok = (rows[:, None] < Lq) & (dims[None, :] < D)
    o = tl.load(o_ptr + (pid_bh * Lq + rows[:, None]) * D + dims[None, :], mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(  # (BLOCK_M, BLOCK_D)
        do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol + dims[None, :] * stride_dod,
        mask=ok, other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(delta_ptr + pid_bh * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kv_len_ptr,
    H, Lq, Lk, D, scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (block of keys, b, h): dK and dV for those keys.

    Sweeps the query blocks that can see the keys, rebuilding each (BLOCK_M,
    BLOCK_N) tile of P from S and the saved lse. dk, dv: (B, H, Lk, D)
    contiguous, input dtype; every element is written by exactly one program.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < Lk
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dim_ok = dims < D
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kl + dims[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols[:, None] * stride_vl + dims[None, :] * stride_vd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    kv_len = _key_length(kv_len_ptr, b, Lk, HAS_KV_LENGTHS)
    # Under the causal mask, query i sees keys j <= i, so rows before start_n
    # see no key of this block: the sweep starts at row start_n (its query
    # blocks need not line up with the forward's). A key block entirely past
    # kv_len is seen by nobody: an empty loop, zero gradients.
    first_m = 0
    if CAUSAL:
        first_m = start_n
    last_m = tl.where(start_n < kv_len, Lq, first_m)
    for start_m in range(first_m, last_m, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < Lq
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
                    mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        do = tl.load(do_base + rows[:, None] * stride_dol + dims[None, :] * stride_dod,
                     mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(lse_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(delta_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)

        s = scale * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
        # P = exp(S - lse) <= 1. Invisible entries, padding rows and rows that
        # see no key at all (lse = -inf, so exp gives +inf there) are all
        # outside `visible`, and the where() keeps that inf from escaping.
        visible = _visible(rows, cols, kv_len, CAUSAL) & row_ok[:, None]
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N) float32
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N) float32, gradient of S
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)

    # S = scale * q k^T, so dK carries the scale once, applied here in float32.
    out_rows = pid_bh * Lk + cols  # dk, dv contiguous: row index into (B*H*Lk,)
    tl.store(dk_ptr + out_rows[:, None] * D + dims[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_rows[:, None] * D + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kv_len_ptr,
    H, Lq, Lk, D, scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (block of query rows, b, h): dQ for those rows.

    The same key sweep as the forward (same loop bounds), rebuilding P and
    dS tile by tile. dq: (B, H, Lq, D) contiguous, input dtype.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < Lq
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dim_ok = dims < D
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
                mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows[:, None] * stride_dol + dims[None, :] * stride_dod,
                 mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(lse_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(delta_ptr + pid_bh * Lq + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kv_len = _key_length(kv_len_ptr, b, Lk, HAS_KV_LENGTHS)
    key_end = _query_block_key_end(start_m, Lq, kv_len, BLOCK_M, CAUSAL)
    for start_n in range(0, key_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kv_mask = (cols[:, None] < Lk) & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + dims[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + cols[:, None] * stride_vl + dims[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        s = scale * tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
        visible = _visible(rows, cols, kv_len, CAUSAL) & row_ok[:, None]  # see the dK/dV kernel
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N) float32
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N) float32
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)

    out = pid_bh * Lq + rows  # dq contiguous
    tl.store(dq_ptr + out[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)
# ANCHOR_END: backward_kernels


@dataclass(frozen=True)
class _Config:
    """Launch settings shared by the forward and the backward."""

    causal: bool
    scale: float
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    precision: str  # tl.dot input_precision for float32 inputs: "ieee" or "tf32"


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # (b, h, l, d)


def _block_d(d: int) -> int:
    """D padded to a power of two (tl.arange needs one); >= 16 since D >= 16."""
    return triton.next_power_of_2(d)


def _default_blocks(d: int, element_size: int) -> tuple[int, int]:
    """(block_m, block_n) for head dim d and inputs of element_size bytes (see BLOCK_M)."""
    if element_size >= 4 and _block_d(d) >= 64:
        return BLOCK_FP32_WIDE, BLOCK_FP32_WIDE
    return BLOCK_M, BLOCK_N


def _launch_forward(q, k, v, kv_lengths, cfg: _Config):
    """q: (B, H, Lq, D), k, v: (B, H, Lk, D), kv_lengths: (B,) int32 or None.

    Returns (out (B, H, Lq, D) contiguous, input dtype; lse (B, H, Lq) float32).
    """
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty(bsz, heads, lq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, heads, lq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(lq, cfg.block_m), bsz * heads)
    # Launch on the inputs' GPU, not the current one (a no-op for CPU tensors).
    with torch.cuda.device_of(q):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse, kv_lengths if kv_lengths is not None else lse,  # a dummy, never read
            heads, lq, lk, d, cfg.scale,
            *_strides(q), *_strides(k), *_strides(v),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d),
            CAUSAL=cfg.causal, HAS_KV_LENGTHS=kv_lengths is not None, PRECISION=cfg.precision,
        )
    return out, lse


def _launch_backward(q, k, v, out, lse, kv_lengths, d_out, cfg: _Config, need_dq: bool, need_dkdv: bool):
    """Gradients (dq, dk, dv), each contiguous in the input dtype, or None where not needed.

    d_out: (B, H, Lq, D), any strides (autograd may hand us an expanded view).
    """
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    lengths = kv_lengths if kv_lengths is not None else lse  # a dummy, never read
    common = dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(d),
        CAUSAL=cfg.causal, HAS_KV_LENGTHS=kv_lengths is not None, PRECISION=cfg.precision,
    )
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(d_out))
    delta = torch.empty(bsz, heads, lq, dtype=torch.float32, device=q.device)  # (B, H, Lq)
    dq = dk = dv = None
    with torch.cuda.device_of(q):
        _attention_bwd_delta_kernel[(triton.cdiv(lq, cfg.block_m), bsz * heads)](
            out, d_out, delta, heads, lq, d, *_strides(d_out),
            BLOCK_M=cfg.block_m, BLOCK_D=_block_d(d),
        )
        if need_dkdv:
            dk = torch.empty_like(k, memory_format=torch.contiguous_format)  # (B, H, Lk, D)
            dv = torch.empty_like(v, memory_format=torch.contiguous_format)  # (B, H, Lk, D)
            _attention_bwd_dkdv_kernel[(triton.cdiv(lk, cfg.block_n), bsz * heads)](
                q, k, v, d_out, lse, delta, dk, dv, lengths,
                heads, lq, lk, d, cfg.scale, *strides, **common,
            )
        if need_dq:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, Lq, D)
            _attention_bwd_dq_kernel[(triton.cdiv(lq, cfg.block_m), bsz * heads)](
                q, k, v, d_out, lse, delta, dq, lengths,
                heads, lq, lk, d, cfg.scale, *strides, **common,
            )
    return dq, dk, dv


# ANCHOR: autograd
class _AttentionFunction(torch.autograd.Function):
    """Autograd glue: forward saves q, k, v, O and lse, never an (Lq, Lk) matrix."""

    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, cfg: _Config):
        # q: (B, H, Lq, D), k, v: (B, H, Lk, D); kv_lengths: (B,) int32 or None.
        out, lse = _launch_forward(q, k, v, kv_lengths, cfg)  # (B, H, Lq, D), (B, H, Lq)
        ctx.save_for_backward(q, k, v, out, lse, kv_lengths)
        ctx.cfg = cfg
        # lse is returned for inspection (attention_with_lse) but has no gradient.
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # no second derivatives: say so instead of returning wrong ones
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse, kv_lengths = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _launch_backward(
            q, k, v, out, lse, kv_lengths, d_out, ctx.cfg, need_dq=need_q, need_dkdv=need_k or need_v,
        )
        return dq, (dk if need_k else None), (dv if need_v else None), None, None
# ANCHOR_END: autograd


def _check_inputs(q, k, v, causal, kv_lengths, scale) -> tuple[float, torch.Tensor | None]:
    """Raise ValueError naming the problem; return (scale, kv_lengths as int32 or None).

    Runs before any allocation or launch, so a bad call fails fast and clearly.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float32, float16 or bfloat16, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty, shape {tuple(x.shape)}: every dimension must be >= 1")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, H, Lk, D), got {tuple(k.shape)} and {tuple(v.shape)}"
            " (this kernel needs the value dim to equal the head dim)"
        )
    bsz, heads, lq, d = q.shape
    if k.shape[:2] != (bsz, heads):
        raise ValueError(
            f"q and k must agree on batch and heads (B, H), got {tuple(q.shape[:2])} and {tuple(k.shape[:2])}"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: D = {d} and {k.shape[3]}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim D = {d} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], the range this kernel supports; "
            "use tiny_mm.attention.scaled_dot_product_attention instead"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v dtypes differ: {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v devices differ: {q.device}, {k.device} and {v.device}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"tensors are on {q.device}, but the Triton kernel needs a CUDA device; on a "
            "machine without CUDA, `import kernels` runs it in Triton's interpreter instead "
            "(TRITON_INTERPRET=1 must be set before triton is imported)"
        )
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise ValueError("bfloat16 needs a GPU: Triton's interpreter (numpy) has no bfloat16")
    # The kernels index with 32-bit integers: the farthest element must fit.
    for name, x in (("q", q), ("k", k), ("v", v)):
        last = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()))
        if last >= 2**31 or x.numel() >= 2**31:
            raise ValueError(f"{name} of shape {tuple(x.shape)} is too large for 32-bit indexing")

    # The grid is (query or key blocks, B * H); CUDA caps a grid's second axis at 65,535.
    if bsz * heads > 65_535:
        raise ValueError(
            f"B * H = {bsz} * {heads} = {bsz * heads} is more than the 65,535 programs a CUDA grid axis allows"
        )

    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")

    if scale is None:
        value = 1.0 / math.sqrt(d)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
        # Positive like the NumPy and PyTorch rungs: a negative scale would
        # turn attention into "attend to the least similar key".
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"scale must be finite and > 0, got {value}")
    else:
        raise ValueError(f"scale must be a float or None, got {type(scale).__name__}")

    if kv_lengths is None:
        return value, None
    if not isinstance(kv_lengths, torch.Tensor):
        raise ValueError(f"kv_lengths must be a torch.Tensor of shape (B,), got {type(kv_lengths).__name__}")
    if kv_lengths.dtype == torch.bool or kv_lengths.is_floating_point() or kv_lengths.is_complex():
        raise ValueError(f"kv_lengths must have an integer dtype, got {kv_lengths.dtype}")
    if kv_lengths.shape != (bsz,):
        raise ValueError(f"kv_lengths must have shape (B,) = ({bsz},), got {tuple(kv_lengths.shape)}")
    if kv_lengths.device != q.device:
        raise ValueError(f"kv_lengths is on {kv_lengths.device}, but q, k and v are on {q.device}")
    # One host sync (two reductions), the price of checking the values.
    lo, hi = int(kv_lengths.min()), int(kv_lengths.max())
    lk = k.shape[2]
    if lo < 0 or hi > lk:
        raise ValueError(f"kv_lengths must lie in [0, Lk] = [0, {lk}], got values from {lo} to {hi}")
    return value, kv_lengths.to(torch.int32).contiguous()


def _check_block(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.arange and tl.dot need it), got {value!r}")
    return value


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    kv_lengths: torch.Tensor | None = None,
    scale: float | None = None,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` that also returns the per-row log-sum-exp the backward uses.

    Returns (out (B, H, Lq, D), differentiable as in `attention`;
             lse (B, H, Lq) float32, log sum_j exp(S_ij) over the visible keys,
             -inf for a row that sees none; not differentiable).
    """
    scale_value, lengths = _check_inputs(q, k, v, causal, kv_lengths, scale)
    default_m, default_n = _default_blocks(q.shape[-1], q.element_size())
    cfg = _Config(
        causal=causal,
        scale=scale_value,
        block_m=_check_block("block_m", block_m, default_m),
        block_n=_check_block("block_n", block_n, default_n),
        precision="tf32" if allow_tf32 else "ieee",
    )
    return _AttentionFunction.apply(q, k, v, lengths, cfg)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    kv_lengths: torch.Tensor | None = None,
    scale: float | None = None,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, fused: never builds the (Lq, Lk) matrices.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); Lq and Lk may differ. Same dtype,
        float32, float16 or bfloat16 (bfloat16 on a GPU only), on a CUDA device
        (or CPU under the interpreter); 16 <= D <= 128, any D in that range
        (padded to a power of two inside). Any strides (no copy is made).
    causal: query i sees key j only if j <= i, top-left aligned as in
        torch's scaled_dot_product_attention(is_causal=True).
    kv_lengths: (B,) integer tensor on q's device, values in [0, Lk]: key j of
        batch element b is visible only if j < kv_lengths[b] (key padding).
        Checking the values costs one host sync.
    scale: multiplies q @ k.T, finite and > 0; default 1 / sqrt(D).
    allow_tf32: float32 inputs only. By default the float32 dot products use
        input_precision="ieee", exact float32, so results match a float32
        reference on CPU and GPU alike. "tf32" is several times faster on an
        Ampere-or-newer GPU but rounds the inputs to 10 mantissa bits
        (relative errors ~1e-3).
    block_m, block_n: query rows and keys per tile, powers of two >= 16;
        default 64 x 64, or 32 x 32 for float32 with D > 32 (shared memory).

    Returns out: (B, H, Lq, D), contiguous, in the input dtype. A query row
    that sees no key gets zeros (and zero gradients). Logits, the softmax
    statistics and all accumulators are float32 whatever the input dtype.
    Differentiable in q, k and v (once).
    """
    out, _ = attention_with_lse(
        q, k, v, causal=causal, kv_lengths=kv_lengths, scale=scale,
        allow_tf32=allow_tf32, block_m=block_m, block_n=block_n,
    )
    return out
