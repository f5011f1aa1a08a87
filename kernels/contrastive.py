"""CLIP's symmetric contrastive loss as a fused Triton kernel, forward and backward.

The top rung of chapter 4's ladder. Same loss as
``chapters/ch04_contrastive/reference.py`` (NumPy) and ``tiny_mm.clip_loss``
(PyTorch), with the notation of the chapter:

    I, T : (N, d)   image and text embeddings, rows L2-normalised
    s    : float    the logit scale (1 / temperature)
    S = s * I @ T.T                      (N, N) logits, S[i, j] = image i vs text j
    loss = ( mean_i (lse_row_i - S_ii) + mean_j (lse_col_j - S_jj) ) / 2

The PyTorch rung builds S, an N x N float32 matrix: 4.3 GB at N = 32,768.
This kernel never does. It visits S one (BLOCK_M x BLOCK_N) tile at a time,
keeps what it needs from each tile in registers, and forgets the tile:

* forward: for each block of rows, sweep the column blocks and keep a running
  log-sum-exp per row (the "online softmax" of flash attention). The columns
  are the rows of S.T = s * T @ I.T, so the *same* kernel run with image and
  text swapped gives the column log-sum-exps. Saved for backward: the two
  log-sum-exp vectors, 2N float32.
* backward: the gradient of the loss with respect to S is

      G = (softmax_row(S) + softmax_col(S) - 2 Id) / (2N)            (N, N)

  and both softmaxes are exp(S - lse) with the saved lse, so any tile of G can
  be rebuilt from a tile of S. Then dI = s G @ T, dT = s G.T @ I and
  d_logit_scale = sum(G * I @ T.T). One pass over row blocks builds dI; the
  same kernel with image and text swapped (G.T has the same form with the two
  lse vectors exchanged) builds dT. Each program owns its rows of the output,
  so there are no atomics and the result is deterministic.

Extra memory (beyond inputs and the returned gradients), in bytes:
forward 8N (two lse vectors) + 8 cdiv(N, BLOCK_M) (per-block loss sums);
backward the same plus, for float16/bfloat16 inputs only, one float32 (N, d)
accumulator (4 N d) that is cast to the input dtype at the end. float32
inputs accumulate straight into the returned gradient. Nothing is O(N^2).

Work: forward 2 x 2N^2 d flops (rows and columns each recompute S), backward
2 x 4N^2 d (recompute S, then G @ T). The minimum is 8N^2 d; we do 12N^2 d to
never hold more than one tile, the usual flash-style trade of flops for memory.

Inputs may be non-contiguous: the kernels take strides, so a transposed or
sliced view is read in place instead of being copied (a copy would cost the
very O(N d) memory we are trying to keep small).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["clip_loss"]

# Whether the kernels below run in Triton's interpreter (numpy on CPU) rather
# than compiled for a GPU. Decided once, when this module is imported, because
# that is when `@triton.jit` reads the variable (see kernels/__init__.py).
# Asking Triton's own settings object parses the variable exactly as @triton.jit does.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Tile sizes. 64 x 64 logits tiles, read 64 embedding dimensions at a time:
# powers of two (tl.arange needs them), at least 16 (tl.dot's minimum), big
# enough to keep a GPU's tensor cores busy, and small enough that a tile of S,
# its two softmaxes and the gradient chunk (a few 64 x 64 float32 blocks)
# stay in registers with the default 4 warps. Tests pass smaller blocks so
# that a 70-row input spans several blocks under the interpreter.
BLOCK_ROWS = 64
BLOCK_D = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ANCHOR: forward_kernel
@triton.jit
def _logits_tile(
    a_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Unscaled logits A[rows] @ B[cols].T as a (BLOCK_M, BLOCK_N) float32 tile.

    d is read BLOCK_D columns at a time, so any d works (the last chunk is
    masked) and the registers needed do not grow with d. Rows or columns past
    N load as zeros; the callers mask them out.
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_d in range(0, D, BLOCK_D):
        ks = start_d + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        k_ok = ks < D
        a = tl.load(  # (BLOCK_M, BLOCK_D), input dtype
            a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ad,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        )
        b = tl.load(  # (BLOCK_N, BLOCK_D)
            b_ptr + cols[:, None] * stride_bn + ks[None, :] * stride_bd,
            mask=col_ok[:, None] & k_ok[None, :], other=0.0,
        )
        # float16/bfloat16 multiply on tensor cores and accumulate in float32.
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _row_lse_kernel(
    a_ptr, b_ptr, lse_ptr, loss_sum_ptr, N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per block of rows of S = scale * A @ B.T; A, B: (N, D).

    Writes lse[rows] = log sum_j exp(S[rows, j])   (N,) float32
    and    loss_sum[pid] = sum over its rows of (lse_i - S_ii), one float32,
    so that the host adds cdiv(N, BLOCK_M) numbers instead of N.
    Called with (I, T) it handles the image -> text direction, with (T, I)
    the text -> image one.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < N

    # Online log-sum-exp: after each column block, m is the largest logit seen
    # so far in the row and l = sum exp(S_ij - m) over the columns seen. A new
    # block with a larger max rescales the old sum by exp(m_old - m_new), so
    # exp never sees a positive argument and cannot overflow, whatever s is.
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    diag = tl.zeros([BLOCK_M], dtype=tl.float32)  # S_ii, picked out of the tile that holds it
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        s = scale * _logits_tile(  # (BLOCK_M, BLOCK_N) float32
            a_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
            stride_an, stride_ad, stride_bn, stride_bd,
            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )
        # Taking S_ii from the same tile as the lse (rather than a separate
        # dot product) means both round the same way: lse_i - S_ii >= 0.
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        # Columns past N must not count: exp(-inf) = 0. Every block holds at
        # least one real column (start_n < N), so m becomes finite in the first
        # block and m - m_new is never -inf - (-inf) = NaN.
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # (BLOCK_M,)
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(l)  # (BLOCK_M,)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_sum_ptr + pid, tl.sum(tl.where(row_ok, lse - diag, 0.0), axis=0))
# ANCHOR_END: forward_kernel


# ANCHOR: backward_kernel
@triton.jit
def _row_grad_kernel(
    a_ptr, b_ptr, lse_a_ptr, lse_b_ptr, grad_ptr, ds_sum_ptr, N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per block of rows of A: grad[rows] += 2N * G[rows, :] @ B.

    A, B: (N, D); S = scale * A @ B.T; lse_a: (N,) the log-sum-exps of the rows
    of S, lse_b: (N,) those of its columns (both from the forward);
    grad: (N, D) float32, zero on entry, contiguous.
    With (I, T, lse_row, lse_col) this builds dI; with (T, I, lse_col, lse_row)
    it builds dT, because S.T has the same form with the two directions
    exchanged. The host multiplies by s / (2N) afterwards.
    Also writes ds_sum[pid] = sum over its rows and all j of 2N * G_ij * (A B.T)_ij,
    this block's share of d_logit_scale (times 2N).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < N
    lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    ds_rows = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        lse_b = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0)  # (BLOCK_N,)
        # Recompute the tile of S instead of having stored it: that is the
        # whole memory saving, paid for with 2 BLOCK_M BLOCK_N D flops.
        raw = _logits_tile(  # (BLOCK_M, BLOCK_N) float32, A @ B.T
            a_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
            stride_an, stride_ad, stride_bn, stride_bd,
            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )
        s = scale * raw
        # Both softmaxes from the saved lse: exp(S - lse) <= 1, no overflow.
        p_row = tl.exp(s - lse_a[:, None])  # softmax along each row of S
        p_col = tl.exp(s - lse_b[None, :])  # softmax along each column of S
        eye = rows[:, None] == cols[None, :]
        # 2N * G: entries in [-2, 2], a range float16/bfloat16 hold well
        # (G itself, ~1/N, would lose bits in the cast below at large N).
        g = p_row + p_col - tl.where(eye, 2.0, 0.0)
        # No mask needed for padding: rows and columns past N were loaded as
        # zeros, so there raw = 0 and b = 0 below, and g (finite: exp(0 - 0))
        # multiplies nothing but zeros.
        ds_rows += tl.sum(g * raw, axis=1)

        # grad[rows] += g @ B[cols], one chunk of D at a time. The running sum
        # lives in the float32 grad buffer rather than in registers (whose
        # size would have to grow with d). Only this program touches these
        # rows, so no atomics are needed and the order of the sums is fixed.
        for start_d in range(0, D, BLOCK_D):
            ks = start_d + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            k_ok = ks < D
            b = tl.load(  # (BLOCK_N, BLOCK_D)
                b_ptr + cols[:, None] * stride_bn + ks[None, :] * stride_bd,
                mask=col_ok[:, None] & k_ok[None, :], other=0.0,
            )
            out_ptrs = grad_ptr + rows[:, None] * D + ks[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(out_ptrs, mask=out_ok, other=0.0)  # (BLOCK_M, BLOCK_D) float32
            # tl.dot wants both operands in one dtype: g goes to the input's.
            acc = tl.dot(g.to(b.dtype), b, acc, input_precision=PRECISION)
            tl.store(out_ptrs, acc, mask=out_ok)
        # The next column tile reads these rows back, and the compiler may give
        # that load a different element-to-thread layout than this store: one
        # GPU thread would read what another wrote, racing unless all threads
        # of the program meet here (Triton does not track global memory for
        # barriers). A no-op in the interpreter, which runs no threads.
        tl.debug_barrier()

    tl.store(ds_sum_ptr + pid, tl.sum(ds_rows, axis=0))
# ANCHOR_END: backward_kernel


@dataclass(frozen=True)
class _Config:
    """Launch settings shared by the forward and the backward."""

    block_rows: int  # BLOCK_M = BLOCK_N: rows (and columns) of S per tile
    block_d: int  # embedding dimensions per tl.dot
    precision: str  # tl.dot input_precision for float32 inputs: "ieee" or "tf32"


def _launch_row_lse(a: torch.Tensor, b: torch.Tensor, scale: float, cfg: _Config):
    """lse over the rows of scale * a @ b.T and the sum of (lse_i - S_ii).

    a, b: (N, d) -> (lse (N,) float32, summed loss term: 0-dim float32 tensor).
    """
    n, d = a.shape
    n_blocks = triton.cdiv(n, cfg.block_rows)
    lse = torch.empty(n, dtype=torch.float32, device=a.device)
    loss_sums = torch.empty(n_blocks, dtype=torch.float32, device=a.device)
    # Launch on the inputs' GPU, not the current one (a no-op for CPU tensors).
    with torch.cuda.device_of(a):
        _row_lse_kernel[(n_blocks,)](
            a, b, lse, loss_sums, n, d,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            scale,
            BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_rows, BLOCK_D=cfg.block_d,
            PRECISION=cfg.precision,
        )
    return lse, loss_sums.sum()


def _launch_row_grad(
    a: torch.Tensor, b: torch.Tensor, lse_a: torch.Tensor, lse_b: torch.Tensor,
    scale: float, cfg: _Config,
):
    """2N * G @ b accumulated in float32, plus 2N * sum(G * a @ b.T).

    a, b: (N, d); lse_a, lse_b: (N,) -> (grad (N, d) float32, 0-dim float32 tensor).
    """
    n, d = a.shape
    n_blocks = triton.cdiv(n, cfg.block_rows)
    grad = torch.zeros(n, d, dtype=torch.float32, device=a.device)
    ds_sums = torch.empty(n_blocks, dtype=torch.float32, device=a.device)
    # Launch on the inputs' GPU, not the current one (a no-op for CPU tensors).
    with torch.cuda.device_of(a):
        _row_grad_kernel[(n_blocks,)](
            a, b, lse_a, lse_b, grad, ds_sums, n, d,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            scale,
            BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_rows, BLOCK_D=cfg.block_d,
            PRECISION=cfg.precision,
        )
    return grad, ds_sums.sum()


# ANCHOR: autograd
class _ClipLossFunction(torch.autograd.Function):
    """Autograd glue: forward saves only (I, T, lse_row, lse_col); backward rebuilds G by tiles."""

    @staticmethod
    def forward(ctx, image, text, scale_tensor, scale: float, cfg: _Config):
        # image, text: (N, d); scale_tensor: the user's logit_scale tensor or
        # None (autograd needs it as an input to route its gradient); scale:
        # the same value as a Python float, which is what the kernels take.
        n = image.shape[0]
        lse_row, loss_rows = _launch_row_lse(image, text, scale, cfg)  # image -> text
        lse_col, loss_cols = _launch_row_lse(text, image, scale, cfg)  # text -> image
        ctx.save_for_backward(image, text, lse_row, lse_col)
        ctx.scale, ctx.cfg = scale, cfg
        ctx.scale_like = scale_tensor.detach() if scale_tensor is not None else None
        return (loss_rows + loss_cols) / (2 * n)  # 0-dim float32

    @staticmethod
    @torch.autograd.function.once_differentiable  # no second derivatives: say so instead of returning wrong ones
    def backward(ctx, grad_loss):
        image, text, lse_row, lse_col = ctx.saved_tensors
        n, s, cfg = image.shape[0], ctx.scale, ctx.cfg
        need_image, need_text, need_scale = ctx.needs_input_grad[:3]
        # grad_loss is a 0-dim tensor; multiplying by it on the device avoids
        # a host sync (grad_loss.item()) in every backward.
        factor = grad_loss.to(torch.float32) * (s / (2 * n))
        d_image = d_text = d_scale = None
        ds_twice_n = None  # sum(2N G * I @ T.T): either pass computes it
        if need_image or (need_scale and not need_text):
            grad, ds_twice_n = _launch_row_grad(image, text, lse_row, lse_col, s, cfg)
            # Scale in float32, in place, then cast (a no-op for float32).
            d_image = grad.mul_(factor).to(image.dtype) if need_image else None
            del grad  # free the float32 buffer before the second pass
        if need_text:
            grad, ds_twice_n = _launch_row_grad(text, image, lse_col, lse_row, s, cfg)
            d_text = grad.mul_(factor).to(text.dtype)
            del grad
        if need_scale:
            like = ctx.scale_like
            d_scale = (ds_twice_n * grad_loss.to(torch.float32) / (2 * n)).to(like.device, like.dtype)
            d_scale = d_scale.reshape(like.shape)
        return d_image, d_text, d_scale, None, None
# ANCHOR_END: autograd


def _check_inputs(image, text, logit_scale) -> float:
    """Raise ValueError naming the problem; return the logit scale as a float.

    Runs before any allocation or launch, so a bad call fails fast and clearly.
    """
    for name, x in (("image", image), ("text", text)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if image.shape != text.shape:
        raise ValueError(
            f"image and text must have the same shape (N, d), got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    n, d = image.shape
    if n == 0:
        raise ValueError("image and text have N = 0 rows: the loss needs at least one pair")
    if d == 0:
        raise ValueError("image and text have d = 0 columns: embeddings must not be empty")
    if image.dtype != text.dtype:
        raise ValueError(f"image and text dtypes differ: {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"image and text devices differ: {image.device} and {text.device}")
    if image.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"tensors are on {image.device}, but the Triton kernel needs a CUDA device; on a "
            "machine without CUDA, `import kernels` runs it in Triton's interpreter instead "
            "(TRITON_INTERPRET=1 must be set before triton is imported)"
        )
    if INTERPRETED and image.dtype == torch.bfloat16:
        raise ValueError("bfloat16 needs a GPU: Triton's interpreter (numpy) has no bfloat16")
    # The kernels index with 32-bit integers: the farthest element must fit.
    for name, x in (("image", image), ("text", text)):
        last = (n - 1) * abs(x.stride(0)) + (d - 1) * abs(x.stride(1))
        if last >= 2**31 or n * d >= 2**31:
            raise ValueError(f"{name} of shape {tuple(x.shape)} is too large for 32-bit indexing")

    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or logit_scale.dim() > 1:
            raise ValueError(
                f"logit_scale tensor must hold one value (0-dim or shape (1,)), got shape {tuple(logit_scale.shape)}"
            )
        if not logit_scale.is_floating_point():
            raise ValueError(f"logit_scale tensor must have a floating dtype, got {logit_scale.dtype}")
        value = float(logit_scale.detach())  # one host sync, the price of checking it
    elif isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        value = float(logit_scale)
    else:
        raise ValueError(f"logit_scale must be a float or a one-element tensor, got {type(logit_scale).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"logit_scale must be finite and > 0, got {value}")
    return value


def _check_block(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (tl.arange and tl.dot need it), got {value!r}")
    return value


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    allow_tf32: bool = False,
    block_rows: int = BLOCK_ROWS,
    block_d: int | None = None,
) -> torch.Tensor:
    """Mean symmetric contrastive (CLIP) loss, fused: never builds the N x N logits.

    image, text: (N, d) on a CUDA device (or CPU under the interpreter), rows
        already L2-normalised, same dtype: float32, float16 or bfloat16.
        Any strides are accepted (no copy is made).
    logit_scale: s > 0, a Python float or a 0-dim / one-element tensor; when it
        is a tensor that requires grad, it receives d loss / d s.
    allow_tf32: float32 inputs only. The float32 logits are computed with
        input_precision="ieee" by default: exact float32, so results match a
        float32 reference on CPU and GPU alike (to ~1e-6). "tf32" uses the
        tensor cores and is several times faster on an Ampere-or-newer GPU, but
        rounds the inputs to 10 mantissa bits: logits s * cos with s = 100 can
        move by ~0.05, too much to compare against a float64 reference at
        float32 tolerance. Set it when speed matters more than the last digits.
    block_rows: rows (and columns) of S per tile; block_d: embedding dims per
        tl.dot (default min(64, next power of two of d)). Powers of two >= 16.

    Returns a 0-dim float32 tensor:
        ( mean_i(lse_j S_ij - S_ii) + mean_j(lse_i S_ij - S_jj) ) / 2,  S = s * I @ T.T.
    """
    scale = _check_inputs(image, text, logit_scale)
    d = image.shape[1]
    if block_d is None:
        block_d = min(BLOCK_D, max(16, triton.next_power_of_2(d)))
    cfg = _Config(
        block_rows=_check_block("block_rows", block_rows),
        block_d=_check_block("block_d", block_d),
        precision="tf32" if allow_tf32 else "ieee",
    )
    scale_tensor = logit_scale if isinstance(logit_scale, torch.Tensor) else None
    return _ClipLossFunction.apply(image, text, scale_tensor, scale, cfg)
