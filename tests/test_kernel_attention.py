"""kernels.attention (the Triton rung) against the rungs below it and against PyTorch's own.

References, all float64 and all independent of the kernel:
  * chapters/ch02_attention/reference.py: NumPy, hand-derived gradients;
  * tiny_mm.attention.scaled_dot_product_attention: the PyTorch rung
    (materialises the (Lq, Lk) matrix), differentiated by autograd;
  * torch.nn.functional.scaled_dot_product_attention, PyTorch's own, with
    is_causal=True for the causal mask so that its semantics (top-left
    aligned when Lq != Lk) are checked, not assumed.
The kernel sees float32 / float16 inputs; the references see the very same
values widened to float64, so the comparison measures the kernel's arithmetic
and nothing else.

On CPU the kernels run in Triton's interpreter (one program after another, in
numpy), so shapes are tiny and blocks are 16 or 32 wide: Lq = 37 with blocks
of 16 means three query blocks, the last one part padding. GPU-only checks
(bfloat16, larger shapes, tf32, memory) carry @pytest.mark.requires_cuda.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch02_attention.reference as ref
import kernels
import tiny_mm.attention as tma

# `kernels.attention` is the function (kernels/__init__.py exports it); the module:
ka = importlib.import_module("kernels.attention")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bounds against float64 (see DESIGN.md, "Numbers and tolerances").
# float32 dot products use tl.dot(input_precision="ieee"), exact float32, hence 1e-5.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
NAMES = ("out", "dq", "dk", "dv")


# --------------------------------------------------------------------------- helpers


def to_kernel(x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor handed to the kernel, and the float64 copy of exactly its values."""
    t = torch.tensor(x, dtype=dtype, device=DEVICE)
    return t, t.double().cpu().numpy()


def lengths_tensor(kv_lengths) -> torch.Tensor | None:
    return None if kv_lengths is None else torch.tensor(kv_lengths, dtype=torch.int64, device=DEVICE)


def assert_close(name: str, out, expected, tol: float, dtype: torch.dtype, norm: float | None = None) -> None:
    """||out - expected|| / ||expected|| < tol (or / norm when given); NaN never passes.

    On failure the message gives dtype, shape, the error, and where out and
    expected differ (an np.isclose mask, summarised by batch, head and row).
    """
    if isinstance(out, torch.Tensor):
        out = out.detach().double().cpu().numpy()
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{name}: shape {out.shape}, expected {expected.shape}"
    denom = float(np.linalg.norm(expected)) if norm is None else norm
    finite = np.isfinite(out)
    err = float(np.linalg.norm(np.where(finite, out - expected, 0.0)) / (denom if denom > 0 else 1.0))
    if finite.all() and err < tol:
        return
    atol = tol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    bad = ~np.isclose(out, expected, rtol=tol, atol=atol) | ~finite
    lines = [
        f"{name}: dtype {dtype}, shape {expected.shape}, relative error {err:.3g} (tolerance {tol:g})",
        f"  {int(bad.sum())} of {bad.size} entries differ (isclose rtol={tol:g}, atol={atol:.3g}),"
        f" {int((~finite).sum())} not finite",
    ]
    for idx in np.argwhere(bad)[:5]:
        i = tuple(int(j) for j in idx)
        lines.append(f"  at {i}: got {out[i]:.8g}, expected {expected[i]:.8g}")
    if out.ndim == 4:  # a pattern (one batch element, the last rows, ...) often points at a mask
        for b, h in sorted({(int(b), int(h)) for b, h, *_ in np.argwhere(bad)})[:8]:
            rows = np.flatnonzero(bad[b, h].any(axis=-1))
            lines.append(f"  batch {b}, head {h}: rows {rows[:20].tolist()}{' ...' if rows.size > 20 else ''}")
    pytest.fail("\n".join(lines))


def gradient_yardsticks(q64, k64, v64, d_out64, causal, lengths, scale) -> dict[str, float]:
    """For dq and dk: the norm of the terms they sum, where the sum itself cancels to ~0.

    dq_i = scale sum_j P_ij (dP_ij - delta_i) k_j, and the bracket sums to zero
    over j once weighted by P. When a query sees a single key (one query under
    causal: key 0 only) P_i0 = 1 and dq_i is exactly 0; the float64 references
    then hold rounding noise (~1e-17) and a relative error means nothing. There
    the fair yardstick is the textbook componentwise bound
    ||scale (P (|dP| + |delta|)) @ |K|||, rounding scales with the terms.
    Computed in float64 from the reference's mask and softmax, never from the
    kernel. Gradients that do not (nearly) vanish keep the plain relative error.
    """
    B, _, Lq, _ = q64.shape
    s = 1.0 / np.sqrt(q64.shape[-1]) if scale is None else scale
    mask = ref.visible_mask(B, Lq, k64.shape[2], causal, lengths)  # (B, 1, Lq, Lk)
    p = ref.softmax(np.where(mask, s * q64 @ k64.swapaxes(-1, -2), -np.inf))  # (B, H, Lq, Lk)
    out = p @ v64  # (B, H, Lq, D)
    delta = np.abs(np.sum(d_out64 * out, axis=-1, keepdims=True))  # (B, H, Lq, 1)
    terms = p * (np.abs(d_out64 @ v64.swapaxes(-1, -2)) + delta)  # (B, H, Lq, Lk)
    return {
        "dq": float(np.linalg.norm(s * terms @ np.abs(k64))),
        "dk": float(np.linalg.norm(s * terms.swapaxes(-1, -2) @ np.abs(q64))),
    }


def kernel_run(q, k, v, d_out, **kw):
    """Forward + backward through kernels.attention; float64 NumPy (out, dq, dk, dv) and lse."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = ka.attention_with_lse(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape, f"out: {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], f"lse: {lse.dtype} {tuple(lse.shape)}"
    out.backward(d_out)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, f"d{name}: {x.grad.dtype} {tuple(x.grad.shape)}"
    as64 = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    return tuple(as64(t) for t in (out, q.grad, k.grad, v.grad)), as64(lse)


def torch_rung(fn, q64, k64, v64, d_out64, causal, kv_lengths, scale):
    """(out, dq, dk, dv) of a float64 torch function, differentiated by autograd."""
    q, k, v = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q64, k64, v64))
    lengths = None if kv_lengths is None else torch.tensor(kv_lengths, dtype=torch.int64)
    out = fn(q, k, v, causal, lengths, scale)
    out.backward(torch.tensor(d_out64))
    return tuple(t.detach().numpy() for t in (out, q.grad, k.grad, v.grad))


def tiny_mm_rung(q, k, v, causal, lengths, scale):
    return tma.scaled_dot_product_attention(q, k, v, causal=causal, kv_lengths=lengths, scale=scale)


def sdpa_rung(q, k, v, causal, lengths, scale):
    """torch's SDPA; causal alone goes through is_causal=True, its own definition."""
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    mask = torch.arange(Lk)[None, None, None, :] < lengths[:, None, None, None]  # (B, 1, 1, Lk)
    if causal:
        mask = mask & torch.ones(Lq, Lk, dtype=torch.bool).tril()  # (B, 1, Lq, Lk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, Lq, D)
    # A row that sees nothing is NaN or 0 depending on SDPA's backend; 0 is the contract.
    return torch.where(mask.any(dim=-1, keepdim=True), out, 0.0)


def check_against_references(rng, dtype, B, H, Lq, Lk, D, causal=False, kv_lengths=None, scale=None, **kw):
    """Kernel vs NumPy reference, tiny_mm's PyTorch rung and torch's SDPA: out, lse and all gradients."""
    q, q64 = to_kernel(rng.standard_normal((B, H, Lq, D)), dtype)
    k, k64 = to_kernel(rng.standard_normal((B, H, Lk, D)), dtype)
    v, v64 = to_kernel(rng.standard_normal((B, H, Lk, D)), dtype)
    d_out, d_out64 = to_kernel(rng.standard_normal((B, H, Lq, D)), dtype)
    got, lse = kernel_run(q, k, v, d_out, causal=causal, kv_lengths=lengths_tensor(kv_lengths), scale=scale, **kw)

    lengths = None if kv_lengths is None else np.asarray(kv_lengths)
    ref_out, ref_lse = ref.attention_with_lse(q64, k64, v64, causal, lengths, scale)
    numpy_ref = (ref_out, *ref.attention_grad(q64, k64, v64, d_out64, causal, lengths, scale))
    rungs = (
        ("numpy reference", numpy_ref),
        ("tiny_mm.attention", torch_rung(tiny_mm_rung, q64, k64, v64, d_out64, causal, kv_lengths, scale)),
        ("torch SDPA", torch_rung(sdpa_rung, q64, k64, v64, d_out64, causal, kv_lengths, scale)),
    )
    yardsticks = gradient_yardsticks(q64, k64, v64, d_out64, causal, lengths, scale)
    for rung, expected in rungs:
        for name, out, exp in zip(NAMES, got, expected):
            terms = yardsticks.get(name, 0.0)
            norm = terms if np.linalg.norm(exp) < 1e-6 * terms else None  # a gradient that cancels to ~0
            assert_close(f"{name} vs {rung}", out, exp, TOL[dtype], dtype, norm=norm)

    # The saved log-sum-exp: -inf exactly where a row sees no key, close elsewhere.
    empty = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty), f"lse is -inf at {np.argwhere(np.isneginf(lse))[:5].tolist()}, " \
        f"expected at {np.argwhere(empty)[:5].tolist()}"
    assert_close("lse (rows that see a key)", lse[~empty], ref_lse[~empty], TOL[dtype], dtype)
    assert not np.isnan(lse).any()


# --------------------------------------------------------------------------- values

CASES = [
    # dtype, B, H, Lq, Lk, D, causal, kv_lengths, (block_m, block_n)
    # Cross-attention, neither length a multiple of the block.
    (torch.float32, 1, 2, 37, 21, 16, False, None, (16, 16)),
    (torch.float16, 1, 2, 37, 21, 16, False, None, (16, 16)),
    # Causal with Lq < Lk (keys past Lq are seen by no one: whole blocks skipped).
    (torch.float32, 2, 2, 21, 37, 32, True, None, (16, 16)),
    # Causal with Lq > Lk: rows i >= Lk see every key.
    (torch.float16, 2, 1, 37, 21, 16, True, None, (16, 16)),
    # Key padding, including an example with no key at all (rows of zeros).
    (torch.float32, 2, 2, 33, 40, 16, False, (40, 0), (16, 16)),
    (torch.float16, 2, 2, 33, 40, 16, False, (17, 1), (16, 16)),
    # Both masks, and a fully masked example under both.
    (torch.float32, 2, 2, 40, 33, 32, True, (0, 20), (16, 16)),
    (torch.float16, 2, 1, 40, 33, 16, True, (33, 5), (16, 16)),
    # One query; under causal it sees key 0 only, so dq = 0 exactly.
    (torch.float32, 1, 2, 1, 40, 16, False, None, (16, 16)),
    (torch.float32, 2, 1, 1, 35, 16, True, (35, 9), (16, 16)),
    # One key.
    (torch.float16, 1, 2, 40, 1, 16, True, None, (16, 16)),
    (torch.float32, 2, 1, 25, 1, 32, False, (1, 0), (16, 16)),
    # Everything an exact multiple of the block: no padding.
    (torch.float32, 1, 2, 32, 32, 16, True, None, (16, 16)),
    # Head dims that are not powers of two: padded to 32, 64 and 128 inside.
    (torch.float32, 2, 2, 29, 19, 24, True, (19, 7), (16, 16)),
    (torch.float16, 1, 2, 19, 29, 40, False, (27,), (16, 16)),
    (torch.float32, 1, 1, 17, 23, 80, True, None, (16, 16)),
    # Query and key blocks of different sizes: the causal loop bounds of the
    # forward and of the two backward kernels tile S differently.
    (torch.float32, 1, 2, 40, 40, 16, True, (37,), (32, 16)),
    (torch.float16, 2, 1, 40, 35, 16, True, (35, 18), (16, 32)),
]


def _case_id(c) -> str:
    dtype, B, H, Lq, Lk, D, causal, lengths, (bm, bn) = c
    mask = "+".join(filter(None, ["causal" if causal else "", f"len{list(lengths)}" if lengths else ""])) or "nomask"
    return f"{str(dtype).removeprefix('torch.')}-B{B}H{H}-Lq{Lq}-Lk{Lk}-D{D}-{mask}-blocks{bm}x{bn}"


@pytest.mark.parametrize("dtype, B, H, Lq, Lk, D, causal, kv_lengths, blocks", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_lse_and_gradients_match_references(rng, dtype, B, H, Lq, Lk, D, causal, kv_lengths, blocks):
    check_against_references(
        rng, dtype, B, H, Lq, Lk, D, causal, kv_lengths, block_m=blocks[0], block_n=blocks[1]
    )


@pytest.mark.parametrize("scale", [0.05, 2.0])
def test_explicit_scale(rng, scale):
    # 2.0 with D = 16 makes logits ~ +-30: exp would overflow float16 without the max shift.
    check_against_references(rng, torch.float32, 1, 2, 23, 30, 16, True, None, scale=scale, block_m=16, block_n=16)


@pytest.mark.parametrize(
    "dtype, Lq, Lk, D", [(torch.float32, 70, 66, 16), (torch.float16, 70, 66, 16), (torch.float32, 40, 37, 64)]
)
def test_default_block_sizes(rng, dtype, Lq, Lk, D):
    # 70 rows and 66 keys with the default 64-wide blocks: two blocks each, the
    # second short; float32 with D = 64 defaults to 32-wide blocks.
    check_against_references(rng, dtype, 1, 1, Lq, Lk, D, True, (Lk - 5,))


def test_rows_that_see_no_key_are_zero_with_zero_gradients(rng):
    # Example 1 has no visible key: its output and every gradient are exactly
    # zero, never NaN, and its lse is -inf. Example 0 is ordinary.
    q, k, v = (torch.tensor(rng.standard_normal((2, 2, L, 16)), dtype=torch.float32, device=DEVICE)
               for L in (19, 23, 23))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, lse = ka.attention_with_lse(q, k, v, kv_lengths=lengths_tensor((23, 0)), block_m=16, block_n=16)
    out.backward(torch.ones_like(out))
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has NaN or inf"
        assert torch.count_nonzero(t[1]) == 0, f"{name}[1] should be all zero, max |.| = {t[1].abs().max():.3g}"
        assert torch.count_nonzero(t[0]) > 0, f"{name}[0] is all zero"
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize(
    "causal, kv_lengths, first_unseen",
    [
        # Key padding: keys at or past kv_lengths[b], from the next block of 16 on.
        (False, (30, 16), (32, 16)),
        # Causal with Lq = 20 < Lk = 40: keys 20.. are seen by no query, 32.. is a whole block.
        (True, (40, 40), (32, 32)),
    ],
)
def test_keys_no_query_can_see_are_never_read(rng, causal, kv_lengths, first_unseen):
    # Blocks of 16 keys that no query can see are skipped by the loop bounds
    # (forward, dQ and dK/dV kernels), not loaded and masked: fill them with
    # NaN and the result must not change. (A loaded NaN value would survive
    # any mask: 0 * NaN = NaN in P @ V.)
    B, H, Lq, Lk, D = 2, 1, 20, 40, 16
    q64, k64, v64 = (rng.standard_normal((B, H, L, D)) for L in (Lq, Lk, Lk))
    d_out64 = rng.standard_normal((B, H, Lq, D))
    poisoned_k, poisoned_v = k64.copy(), v64.copy()
    for b, first in enumerate(first_unseen):
        poisoned_k[b, :, first:] = poisoned_v[b, :, first:] = np.nan
    got, _ = kernel_run(*(to_kernel(x, torch.float32)[0] for x in (q64, poisoned_k, poisoned_v, d_out64)),
                        causal=causal, kv_lengths=lengths_tensor(kv_lengths), block_m=16, block_n=16)
    q, k, v, d_out = (to_kernel(x, torch.float32)[1] for x in (q64, k64, v64, d_out64))
    lengths = np.asarray(kv_lengths)
    expected = (ref.attention(q, k, v, causal, lengths), *ref.attention_grad(q, k, v, d_out, causal, lengths))
    for name, out, exp in zip(NAMES, got, expected):
        assert_close(name, out, exp, TOL[torch.float32], torch.float32)


def test_saves_only_o_and_lse(rng):
    # Besides the inputs and kv_lengths, the graph keeps O (B, H, Lq, D) and
    # lse (B, H, Lq): nothing with Lq * Lk entries.
    q, k, v = (torch.randn(1, 2, L, 16, device=DEVICE, requires_grad=True) for L in (24, 40, 40))
    out = kernels.attention(q, k, v, kv_lengths=lengths_tensor((33,)), block_m=16, block_n=16)
    shapes = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors if t is not None)
    assert shapes == sorted([(1,), (1, 2, 24), (1, 2, 24, 16), (1, 2, 24, 16), (1, 2, 40, 16), (1, 2, 40, 16)]), shapes


def test_non_contiguous_inputs_and_zero_stride_gradient(rng):
    # q from the usual (B, L, H, D) -> (B, H, L, D) transpose of a projection,
    # k every other row of a longer tensor, v transposed in memory; the
    # backward of out.sum() hands the kernel an expanded dO with strides 0.
    B, H, Lq, Lk, D = 2, 2, 21, 18, 16
    q = torch.tensor(rng.standard_normal((B, Lq, H, D)), dtype=torch.float32, device=DEVICE).transpose(1, 2)
    k = torch.tensor(rng.standard_normal((B, H, 2 * Lk, D)), dtype=torch.float32, device=DEVICE)[:, :, ::2]
    v = torch.tensor(rng.standard_normal((B, H, D, Lk)), dtype=torch.float32, device=DEVICE).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = kernels.attention(q, k, v, causal=True, kv_lengths=lengths_tensor((18, 11)), block_m=16, block_n=16)
    out.sum().backward()
    seen = [x.detach().double().cpu().numpy() for x in (q, k, v)]
    lengths = np.array([18, 11])
    expected = (ref.attention(*seen, True, lengths), *ref.attention_grad(*seen, np.ones((B, H, Lq, D)), True, lengths))
    for name, got, exp in zip(NAMES, (out, q.grad, k.grad, v.grad), expected):
        assert_close(name, got, exp, TOL[torch.float32], torch.float32)


def test_partial_requires_grad(rng):
    q64, k64, v64 = (rng.standard_normal((1, 2, L, 16)) for L in (22, 17, 17))
    d_out64 = rng.standard_normal((1, 2, 22, 16))
    (q, q_seen), (k, k_seen), (v, v_seen), (d_out, d_seen) = (
        to_kernel(x, torch.float32) for x in (q64, k64, v64, d_out64)
    )
    expected = dict(zip(("q", "k", "v"), ref.attention_grad(q_seen, k_seen, v_seen, d_seen, True)))
    for wanted in ("q", "k", "v"):
        inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        inputs[wanted].requires_grad_(True)
        kernels.attention(inputs["q"], inputs["k"], inputs["v"], causal=True, block_m=16, block_n=16).backward(d_out)
        assert_close(f"d{wanted} alone", inputs[wanted].grad, expected[wanted], TOL[torch.float32], torch.float32)


def test_deterministic(rng):
    q, k, v, d_out = (to_kernel(rng.standard_normal((1, 2, L, 16)), torch.float32)[0] for L in (33, 35, 35, 33))
    first, _ = kernel_run(q, k, v, d_out, causal=True, block_m=16, block_n=16)
    second, _ = kernel_run(q, k, v, d_out, causal=True, block_m=16, block_n=16)
    for name, a, b in zip(NAMES, first, second):
        assert np.array_equal(a, b), f"{name}: two runs on the same input must agree bit for bit"


def _largest_allocation(fn, q, k, v) -> int:
    """Bytes of the largest allocation any torch op makes during forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(q, k, v).sum().backward()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocations; the GPU has test_memory_stays_linear_in_length")
def test_never_allocates_the_lq_by_lk_matrix():
    L, D = 256, 16  # Lq x Lk float32 = 256 KiB, (L, D) float32 = 16 KiB
    q, k, v = (torch.randn(1, 1, L, D) for _ in range(3))
    # The measurement can see an L x L matrix: the PyTorch rung builds one.
    naive = _largest_allocation(tma.scaled_dot_product_attention, q, k, v)
    assert naive >= L * L * 4, f"profiler saw only {naive} bytes for the PyTorch rung"
    fused = _largest_allocation(kernels.attention, q, k, v)
    # The backward's largest event holds dq, dk, dv and delta: about 3 (L, D) tensors.
    assert fused <= 4 * L * D * 4, f"largest allocation {fused} bytes; Lq x Lk float32 is {L * L * 4}"


# --------------------------------------------------------------------------- bad input


def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _qkv(**over):
    args = dict(q=_t(2, 2, 5, 16), k=_t(2, 2, 7, 16), v=_t(2, 2, 7, 16))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, kw, match",
    [
        (_qkv(q=_t(2, 5, 16)), {}, r"q must be 4-D"),
        (_qkv(k=_t(2, 2, 7, 16, 1)), {}, r"k must be 4-D"),
        (_qkv(q=_t(2, 2, 5, 16).numpy()), {}, r"q must be a torch.Tensor"),
        (_qkv(v=_t(2, 2, 6, 16)), {}, r"k and v must have the same shape"),
        (_qkv(v=_t(2, 2, 7, 32)), {}, r"k and v must have the same shape"),
        (_qkv(k=_t(1, 2, 7, 16), v=_t(1, 2, 7, 16)), {}, r"batch and heads"),
        (_qkv(k=_t(2, 4, 7, 16), v=_t(2, 4, 7, 16)), {}, r"batch and heads"),
        (_qkv(k=_t(2, 2, 7, 32), v=_t(2, 2, 7, 32)), {}, r"head dims differ"),
        (_qkv(q=_t(2, 2, 5, 8), k=_t(2, 2, 7, 8), v=_t(2, 2, 7, 8)), {}, r"head dim D = 8 is outside \[16, 128\]"),
        (_qkv(q=_t(2, 2, 5, 160), k=_t(2, 2, 7, 160), v=_t(2, 2, 7, 160)), {}, r"head dim D = 160"),
        (_qkv(q=_t(2, 2, 0, 16)), {}, r"q is empty"),
        (_qkv(k=_t(2, 2, 0, 16), v=_t(2, 2, 0, 16)), {}, r"k is empty"),
        (_qkv(q=_t(2, 2, 5, 16, dtype=torch.float64)), {}, r"q dtype .*float64"),
        (_qkv(v=_t(2, 2, 7, 16).to(torch.int32)), {}, r"v dtype .*int32"),
        (_qkv(k=_t(2, 2, 7, 16, dtype=torch.float16)), {}, r"dtypes differ"),
        (_qkv(v=torch.empty(2, 2, 7, 16, device="meta")), {}, r"devices differ"),
        (_qkv(q=_t(1, 1, 1, 16).expand(65_536, 1, 1, 16), k=_t(1, 1, 1, 16).expand(65_536, 1, 1, 16),
              v=_t(1, 1, 1, 16).expand(65_536, 1, 1, 16)), {}, r"B \* H = 65536 \* 1 = 65536"),
        # 2**27 rows of 16: 2**31 elements, past int32 offsets (expanded views, no memory).
        (_qkv(q=_t(1, 1, 1, 16).expand(1, 1, 2**27, 16), k=_t(1, 1, 1, 16).expand(1, 1, 2**27, 16),
              v=_t(1, 1, 1, 16).expand(1, 1, 2**27, 16)), {}, r"q of shape \(1, 1, 134217728, 16\) is too large"),
        (_qkv(), {"causal": 1}, r"causal must be True or False"),
        (_qkv(), {"scale": float("nan")}, r"scale must be finite and > 0"),
        (_qkv(), {"scale": float("inf")}, r"scale must be finite and > 0"),
        (_qkv(), {"scale": 0.0}, r"scale must be finite and > 0"),
        (_qkv(), {"scale": -1.0}, r"scale must be finite and > 0"),
        (_qkv(), {"scale": torch.tensor(0.5)}, r"scale must be a float"),
        (_qkv(), {"scale": True}, r"scale must be a float"),
        (_qkv(), {"kv_lengths": [7, 7]}, r"kv_lengths must be a torch.Tensor"),
        (_qkv(), {"kv_lengths": torch.tensor([7.0, 7.0], device=DEVICE)}, r"kv_lengths must have an integer dtype"),
        (_qkv(), {"kv_lengths": torch.tensor([True, True], device=DEVICE)}, r"kv_lengths must have an integer dtype"),
        (_qkv(), {"kv_lengths": torch.tensor([7], device=DEVICE)}, r"kv_lengths must have shape \(B,\) = \(2,\)"),
        (_qkv(), {"kv_lengths": torch.tensor([[7, 7]], device=DEVICE)}, r"kv_lengths must have shape"),
        (_qkv(), {"kv_lengths": torch.tensor([7, 7], device="meta")}, r"kv_lengths is on meta"),
        (_qkv(), {"kv_lengths": torch.tensor([8, 7], device=DEVICE)}, r"kv_lengths must lie in \[0, Lk\] = \[0, 7\]"),
        (_qkv(), {"kv_lengths": torch.tensor([3, -1], device=DEVICE)}, r"kv_lengths must lie in"),
        (_qkv(), {"block_m": 24}, r"block_m must be a power of two"),
        (_qkv(), {"block_n": 8}, r"block_n must be a power of two"),
    ],
)
def test_bad_input_raises_before_launch(monkeypatch, args, kw, match):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before the input was validated")

    monkeypatch.setattr(ka, "_launch_forward", no_launch)
    with pytest.raises(ValueError, match=match):
        kernels.attention(args["q"], args["k"], args["v"], **kw)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    # As if TRITON_INTERPRET had been off when the kernels were decorated.
    monkeypatch.setattr(ka, "INTERPRETED", False)
    args = _qkv(q=_t(2, 2, 5, 16, device="cpu"), k=_t(2, 2, 7, 16, device="cpu"), v=_t(2, 2, 7, 16, device="cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels.attention(**args)


@pytest.mark.skipif(not ka.INTERPRETED, reason="only the interpreter lacks bfloat16")
def test_bfloat16_refused_by_interpreter():
    args = {name: x.to(torch.bfloat16) for name, x in _qkv().items()}
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.attention(**args)


def test_no_second_derivatives():
    q, k, v = (torch.randn(1, 1, L, 16, device=DEVICE, requires_grad=True) for L in (5, 7, 7))
    # A d_out that requires grad, as in a double backward (e.g. a gradient penalty).
    d_out = torch.randn(1, 1, 5, 16, device=DEVICE, requires_grad=True)
    (dq,) = torch.autograd.grad(kernels.attention(q, k, v), q, grad_outputs=d_out, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


# --------------------------------------------------------------------------- GPU code, compiled on CPU

# Run in a fresh interpreter with TRITON_INTERPRET=0: @triton.jit then builds
# GPU kernels, and triton.compile lowers them all the way to a cubin for a
# given architecture without needing the GPU itself. This catches what the
# interpreter lets through (types of loop bounds, constexpr branches, dot
# shapes) and measures the shared memory each kernel asks for at launch.
_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ka = importlib.import_module("kernels.attention")
assert not ka.INTERPRETED
results = []
for arch, dtype, elt, d, causal, has_len, precision, ones in json.loads(sys.argv[1]):
    block_m, block_n = ka._default_blocks(d, elt)
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=ka._block_d(d), CAUSAL=causal,
                  HAS_KV_LENGTHS=has_len, PRECISION=precision)
    # A launch specialises integer arguments equal to 1 into constants: emulate it.
    consts.update({name: 1 for name in ones})
    pointer = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "kv_len_ptr": "*i32" if has_len else "*fp32"}
    for fn in (ka._attention_fwd_kernel, ka._attention_bwd_delta_kernel,
               ka._attention_bwd_dkdv_kernel, ka._attention_bwd_dq_kernel):
        c = {k: v for k, v in consts.items() if k in fn.arg_names}
        sig = {n: "constexpr" if n in c else pointer.get(n, "*" + dtype) if n.endswith("_ptr")
               else "fp32" if n == "scale" else "i32" for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", arch, 32))
        results.append((arch, dtype, d, fn.__name__, kernel.metadata.shared))
print(json.dumps(results))
"""


@pytest.mark.slow  # ~10 s: eleven kernels compiled to cubins
def test_kernels_compile_for_gpus_with_default_blocks():
    import json
    import os
    import subprocess
    import sys

    configs = [
        # arch, dtype, bytes, D, causal, kv_lengths, precision, arguments equal to 1
        (90, "bf16", 2, 80, True, True, "ieee", []),  # H100, D padded to 128
        (80, "fp32", 4, 128, False, False, "tf32", []),  # A100, the most shared memory
        (90, "fp16", 2, 16, True, False, "ieee", ["H", "Lq", "Lk"]),  # one head, one query, one key
    ]
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(configs)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.splitlines()[-1])
    assert len(results) == 4 * len(configs)
    # An A100 gives a program at most 163 KiB of shared memory (an H100 227 KiB).
    too_big = [r for r in results if r[4] > 163 * 1024]
    assert not too_big, f"kernels asking for more shared memory than an A100 has: {too_big}"


# --------------------------------------------------------------------------- GPU only


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, causal, kv_lengths",
    [
        (2, 3, 196, 128, 64, False, (128, 77)),  # image patches x words, cross-attention
        (1, 4, 448, 1500, 64, False, None),  # decoder x audio frames
        (2, 2, 1000, 1000, 128, True, (1000, 513)),
        (1, 2, 300, 300, 80, True, None),  # D padded to 128
    ],
)
def test_low_precision_on_gpu(rng, dtype, B, H, Lq, Lk, D, causal, kv_lengths):
    check_against_references(rng, dtype, B, H, Lq, Lk, D, causal, kv_lengths)


@pytest.mark.requires_cuda
def test_float32_default_blocks_on_gpu(rng):
    check_against_references(rng, torch.float32, 2, 2, 333, 517, 64, True, (517, 200))


@pytest.mark.requires_cuda
def test_tf32_on_gpu(rng):
    # TF32 keeps 10 mantissa bits of each dot input: relative errors ~1e-3.
    q, k, v, d_out = (torch.randn(2, 4, 512, 64, device="cuda") for _ in range(4))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = kernels.attention(q, k, v, causal=True, allow_tf32=True)
    out.backward(d_out)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exp = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    exp.backward(d_out.double())
    for name, got, want in zip(NAMES, (out, q.grad, k.grad, v.grad), (exp, q64.grad, k64.grad, v64.grad)):
        assert_close(name, got, want.detach().cpu().numpy(), 5e-3, torch.float32)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("L", [4096, 16384])
def test_memory_stays_linear_in_length(L):
    B, H, D = 1, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16, generator=gen).requires_grad_(True)
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = kernels.attention(q, k, v, causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # out, dq, dk, dv (4 B H L D halves), lse and delta (2 B H L floats), 1 MiB slack.
    bound = 4 * B * H * L * D * 2 + 2 * B * H * L * 4 + 2**20
    assert extra <= bound, f"L={L}: {extra / 2**20:.1f} MiB extra, bound {bound / 2**20:.1f} MiB"
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
