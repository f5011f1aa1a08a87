"""kernels.clip_loss (the Triton rung) against the two rungs below it.

References, both float64 and both independent of the kernel:
  * chapters/ch04_contrastive/reference.py: NumPy, hand-derived gradients;
  * tiny_mm.clip_loss: the PyTorch rung, differentiated by autograd.
The kernel sees float32 / float16 inputs; the references see the very same
values widened to float64, so the comparison measures the kernel's arithmetic
and nothing else.

On CPU the kernels run in Triton's interpreter (one program after another, in
numpy), so shapes are tiny and blocks are 16 or 32 wide: N = 37 with blocks of
16 means three row blocks, the last one part padding. GPU-only checks
(bfloat16, memory at large N) carry @pytest.mark.requires_cuda.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch04_contrastive.reference as ref
import kernels
import kernels.contrastive as kc
import tiny_mm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error bounds against float64 (see DESIGN.md, "Numbers and tolerances").
# float32 logits use tl.dot(input_precision="ieee"), exact float32, hence 1e-5.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------- helpers


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) float64, rows of unit length, drawn fresh for each test."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def to_kernel(x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The tensor handed to the kernel, and the float64 copy of exactly its values."""
    t = torch.tensor(x, dtype=dtype, device=DEVICE)
    return t, t.double().cpu().numpy()


def rel_err(out, expected, norm: float | None = None) -> float:
    """||out - expected|| / norm, norm defaulting to ||expected||."""
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(expected) if norm is None else norm
    # An all-zero reference (N = 1: loss and gradients vanish) -> absolute error.
    return float(np.linalg.norm(out - expected) / (denom if denom > 0 else 1.0))


def assert_close(name: str, out, expected, tol: float, dtype: torch.dtype, norm: float | None = None) -> None:
    """||out - expected|| / ||expected|| < tol (or / norm when given); NaN never passes.

    On failure the message gives dtype, shape, the error, and where out and
    expected differ (an np.isclose mask, summarised).
    """
    if isinstance(out, torch.Tensor):
        out = out.detach().double().cpu().numpy()
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{name}: shape {out.shape}, expected {expected.shape}"
    err = rel_err(out, expected, norm)
    if np.all(np.isfinite(out)) and err < tol:
        return
    atol = tol * max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    bad = ~np.isclose(out, expected, rtol=tol, atol=atol) | ~np.isfinite(out)
    where = np.argwhere(bad)[:5] if out.ndim else []
    lines = [
        f"{name}: dtype {dtype}, shape {expected.shape}, relative error {err:.3g} (tolerance {tol:g})",
        f"  {int(bad.sum())} of {bad.size} entries differ (isclose rtol={tol:g}, atol={atol:.3g}),"
        f" {int((~np.isfinite(out)).sum())} not finite",
    ]
    if out.ndim == 0:
        lines.append(f"  got {out.item():.8g}, expected {expected.item():.8g}")
    for idx in where:
        i = tuple(int(k) for k in idx)
        lines.append(f"  at {i}: got {out[i]:.8g}, expected {expected[i]:.8g}")
    if out.ndim == 2:  # a pattern (last rows, one column, ...) often points at a mask
        for axis, label in ((1, "rows"), (0, "columns")):
            idx = np.flatnonzero(bad.any(axis=axis))
            lines.append(f"  {label} with a mismatch: {idx[:20].tolist()}{' ...' if idx.size > 20 else ''}")
    pytest.fail("\n".join(lines))


def kernel_loss_and_grads(image: torch.Tensor, text: torch.Tensor, scale: float, **kw):
    """Run forward + backward with a tensor logit_scale; return float64 NumPy results."""
    image = image.detach().clone().requires_grad_(True)
    text = text.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float32, device=image.device, requires_grad=True)
    loss = kernels.clip_loss(image, text, s, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0, f"loss: {loss.dtype} {tuple(loss.shape)}"
    loss.backward()
    assert image.grad.dtype == image.dtype and text.grad.dtype == text.dtype
    assert image.grad.shape == image.shape and text.grad.shape == text.shape
    as64 = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    return float(loss.detach()), as64(image.grad), as64(text.grad), float(s.grad)


def torch_rung(image64: np.ndarray, text64: np.ndarray, scale: float):
    """tiny_mm.clip_loss in float64 with autograd: (loss, d_image, d_text, d_scale)."""
    i = torch.tensor(image64, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(text64, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = tiny_mm.clip_loss(i, t, s)
    loss.backward()
    return float(loss.detach()), i.grad.numpy(), t.grad.numpy(), float(s.grad)


def term_magnitudes(image64: np.ndarray, text64: np.ndarray, scale: float) -> tuple[float, ...]:
    """Norms of the sums the loss and its gradients are made of, taken term by term.

    d_image = s G @ T adds up N terms s G_ij T_j whose sum can be far smaller
    than the terms (G's rows sum to zero; when all T_j are nearly equal they
    cancel almost exactly). Rounding errors scale with the terms, not with the
    sum, so for such inputs the fair yardstick is ||s |G| @ |T|||, the textbook
    componentwise bound for a matrix product; likewise for d_text and d_scale.
    Computed in float64 from the reference's formulas, never from the kernel.
    """
    n = image64.shape[0]
    cosine = image64 @ text64.T  # (N, N)
    logits = scale * cosine
    g = np.abs(ref.softmax(logits, axis=1) + ref.softmax(logits, axis=0) - 2 * np.eye(n)) / (2 * n)
    loss = ref.clip_loss(image64, text64, scale)
    return (
        abs(loss),
        float(np.linalg.norm(scale * g @ np.abs(text64))),
        float(np.linalg.norm(scale * g.T @ np.abs(image64))),
        float(np.sum(g * np.abs(cosine))),
    )


def check_against_both_rungs(image64, text64, dtype, scale, componentwise=False, tol=None, **kw):
    """Kernel vs NumPy reference and vs tiny_mm (float64), loss and the three gradients.

    componentwise=True measures errors against term_magnitudes() instead of
    the norm of the result: for ill-conditioned inputs (nearly identical rows).
    """
    image, image_seen = to_kernel(image64, dtype)
    text, text_seen = to_kernel(text64, dtype)
    got = kernel_loss_and_grads(image, text, scale, **kw)
    numpy_ref = (ref.clip_loss(image_seen, text_seen, scale), *ref.clip_loss_grad(image_seen, text_seen, scale))
    scales = term_magnitudes(image_seen, text_seen, scale) if componentwise else (None,) * 4
    for rung, expected in (("numpy reference", numpy_ref), ("tiny_mm.clip_loss", torch_rung(image_seen, text_seen, scale))):
        for name, out, exp, norm in zip(("loss", "d_image", "d_text", "d_logit_scale"), got, expected, scales):
            assert_close(f"{name} vs {rung}", out, exp, tol or TOL[dtype], dtype, norm=norm)


# --------------------------------------------------------------------------- values


CASES = [
    # N not a multiple of the block, d not a power of two: masks on both axes.
    (torch.float32, 37, 24, 14.3, 16),
    (torch.float16, 45, 40, 14.3, 16),
    # d = 80 > block_d = 64: two d-chunks, the second one masked.
    (torch.float32, 70, 80, 100.0, 32),
    (torch.float16, 70, 80, 100.0, 32),
    # Everything an exact multiple: no padding at all.
    (torch.float32, 32, 16, 1.0, 16),
    (torch.float16, 32, 16, 1.0, 16),
    # One pair: the loss and every gradient are exactly zero.
    (torch.float32, 1, 5, 14.3, 16),
    (torch.float16, 1, 5, 14.3, 16),
    # Fewer rows than one block.
    (torch.float32, 3, 7, 100.0, 16),
]


@pytest.mark.parametrize(
    "dtype, n, d, scale, block",
    CASES,
    ids=[f"{str(c[0]).removeprefix('torch.')}-N{c[1]}-d{c[2]}-s{c[3]:g}-block{c[4]}" for c in CASES],
)
def test_loss_and_gradients_match_references(rng, dtype, n, d, scale, block):
    check_against_both_rungs(unit_rows(rng, n, d), unit_rows(rng, n, d), dtype, scale, block_rows=block)


def test_default_block_sizes(rng):
    # 70 rows with the default 64-row blocks: two row blocks, the second 6 rows deep.
    check_against_both_rungs(unit_rows(rng, 70, 33), unit_rows(rng, 70, 33), torch.float32, 14.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nearly_identical_rows_do_not_overflow(rng, dtype):
    # All rows within ~1e-3 of one direction and s = 100: every logit is ~100,
    # and exp(100) = 2.7e43 is beyond float32 (3.4e38), let alone float16.
    base = rng.standard_normal(24)
    image = base + 1e-3 * rng.standard_normal((40, 24))
    text = base + 1e-3 * rng.standard_normal((40, 24))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # The loss is well conditioned, but the gradients are tiny differences of
    # large terms (see term_magnitudes): even the float32 PyTorch rung is off by
    # ~3e-4 relative here, so errors are measured against the terms' size.
    check_against_both_rungs(image, text, dtype, 100.0, componentwise=True, block_rows=16)


def test_identical_rows_give_log_n(rng):
    # Every logit equal: each softmax is uniform, the loss is log N, exactly.
    row = unit_rows(rng, 1, 20)
    image = torch.tensor(np.repeat(row, 35, axis=0), dtype=torch.float32, device=DEVICE)
    loss = kernels.clip_loss(image, image.clone(), 100.0, block_rows=16)
    assert_close("loss", loss, np.log(35), TOL[torch.float32], torch.float32)


def test_float_and_tensor_scale_agree(rng):
    image, _ = to_kernel(unit_rows(rng, 20, 12), torch.float32)
    text, _ = to_kernel(unit_rows(rng, 20, 12), torch.float32)
    results = []
    value = float(np.float32(14.3))  # the same number in every form below
    for scale in (value, torch.tensor(value), torch.tensor([value], dtype=torch.float64, requires_grad=True)):
        i, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        loss = kernels.clip_loss(i, t, scale, block_rows=16)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad))
        if isinstance(scale, torch.Tensor) and scale.requires_grad:
            # The gradient has the parameter's shape and dtype.
            assert scale.grad.shape == (1,) and scale.grad.dtype == torch.float64
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), "a float and a tensor logit_scale must give the same numbers"


def test_upstream_gradient_and_partial_requires_grad(rng):
    image64, text64 = unit_rows(rng, 21, 10), unit_rows(rng, 21, 10)
    image, image_seen = to_kernel(image64, torch.float32)
    text, text_seen = to_kernel(text64, torch.float32)
    d_image, d_text, d_scale = ref.clip_loss_grad(image_seen, text_seen, 5.0)

    # Only the scale needs a gradient: d_logit_scale comes from whichever pass runs.
    s = torch.tensor(5.0, requires_grad=True)
    (3.0 * kernels.clip_loss(image, text, s, block_rows=16)).backward()
    assert_close("3 * d_logit_scale", s.grad, 3.0 * d_scale, 1e-5, torch.float32)

    # Only text needs one, and the loss is scaled downstream.
    t = text.clone().requires_grad_(True)
    (-0.5 * kernels.clip_loss(image, t, 5.0, block_rows=16)).backward()
    assert_close("-0.5 * d_text", t.grad, -0.5 * d_text, 1e-5, torch.float32)

    i = image.clone().requires_grad_(True)
    (2.0 * kernels.clip_loss(i, text, 5.0, block_rows=16)).backward()
    assert_close("2 * d_image", i.grad, 2.0 * d_image, 1e-5, torch.float32)


def test_non_contiguous_inputs_read_in_place(rng):
    n, d = 19, 11
    image64, text64 = unit_rows(rng, n, d), unit_rows(rng, n, d)
    wide = torch.zeros(n, 2 * d, dtype=torch.float32, device=DEVICE)
    wide[:, 1::2] = torch.tensor(image64, dtype=torch.float32)
    image = wide[:, 1::2]  # strides (2d, 2)
    text = torch.tensor(text64.T.copy(), dtype=torch.float32, device=DEVICE).T  # strides (1, n)
    assert not image.is_contiguous() and not text.is_contiguous()
    i, t = image.detach().requires_grad_(True), text.detach().requires_grad_(True)
    loss = kernels.clip_loss(i, t, 14.3, block_rows=16)
    loss.backward()
    image_seen, text_seen = image.double().cpu().numpy(), text.double().cpu().numpy()
    d_image, d_text, _ = ref.clip_loss_grad(image_seen, text_seen, 14.3)
    assert_close("loss", loss, ref.clip_loss(image_seen, text_seen, 14.3), 1e-5, torch.float32)
    assert_close("d_image", i.grad, d_image, 1e-5, torch.float32)
    assert_close("d_text", t.grad, d_text, 1e-5, torch.float32)


def test_deterministic(rng):
    image, _ = to_kernel(unit_rows(rng, 33, 20), torch.float32)
    text, _ = to_kernel(unit_rows(rng, 33, 20), torch.float32)
    first = kernel_loss_and_grads(image, text, 14.3, block_rows=16)
    second = kernel_loss_and_grads(image, text, 14.3, block_rows=16)
    for a, b in zip(first, second):
        assert np.array_equal(a, b), "two runs on the same input must agree bit for bit"


def _largest_allocation(loss_fn, image: torch.Tensor, text: torch.Tensor) -> int:
    """Bytes of the largest allocation any torch op makes during forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn(image, text, 14.3).backward()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocations; the GPU has test_memory_stays_linear_in_n")
def test_never_allocates_the_n_by_n_matrix(rng):
    n, d = 256, 16  # N x N float32 = 256 KiB, (N, d) float32 = 16 KiB
    image, _ = to_kernel(unit_rows(rng, n, d), torch.float32)
    text, _ = to_kernel(unit_rows(rng, n, d), torch.float32)
    # The measurement can see an N x N matrix: the PyTorch rung builds one.
    naive = _largest_allocation(tiny_mm.clip_loss, image, text)
    assert naive >= n * n * 4, f"profiler saw only {naive} bytes for the PyTorch rung"
    fused = _largest_allocation(kernels.clip_loss, image, text)
    assert fused <= 4 * n * d * 4, f"largest allocation {fused} bytes; N x N float32 is {n * n * 4}"


# --------------------------------------------------------------------------- bad input


def _good(n=4, d=3, dtype=torch.float32):
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    return x.to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (_good()[0], _good(), 1.0), r"image must be 2-D"),
        (lambda: (_good(), _good().unsqueeze(0), 1.0), r"text must be 2-D"),
        (lambda: (_good(4, 3), _good(5, 3), 1.0), r"same shape"),
        (lambda: (_good(4, 3), _good(4, 2), 1.0), r"same shape"),
        (lambda: (_good(0, 3), _good(0, 3), 1.0), r"N = 0"),
        (lambda: (_good(4, 0), _good(4, 0), 1.0), r"d = 0"),
        (lambda: (_good(dtype=torch.float64), _good(dtype=torch.float64), 1.0), r"dtype .*float64"),
        (lambda: (_good().to(torch.int32), _good(), 1.0), r"dtype .*int32"),
        (lambda: (_good(), _good(dtype=torch.float16), 1.0), r"dtypes differ"),
        (lambda: (_good(), torch.empty(4, 3, device="meta"), 1.0), r"devices differ"),
        (lambda: (_good().cpu().numpy(), _good(), 1.0), r"image must be a torch.Tensor"),
        (lambda: (_good(), _good(), float("nan")), r"logit_scale must be finite and > 0"),
        (lambda: (_good(), _good(), float("inf")), r"logit_scale must be finite and > 0"),
        (lambda: (_good(), _good(), 0.0), r"logit_scale must be finite and > 0"),
        (lambda: (_good(), _good(), torch.tensor(-2.0, requires_grad=True)), r"logit_scale must be finite and > 0"),
        (lambda: (_good(), _good(), torch.tensor([1.0, 2.0])), r"logit_scale tensor must hold one value"),
        (lambda: (_good(), _good(), torch.ones(1, 1)), r"logit_scale tensor must hold one value"),
        (lambda: (_good(), _good(), torch.tensor(3)), r"floating dtype"),
        (lambda: (_good(), _good(), "14.3"), r"logit_scale must be a float"),
        (lambda: (_good(), _good(), True), r"logit_scale must be a float"),
    ],
)
def test_bad_input_raises_before_launch(monkeypatch, make, match):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was validated")

    monkeypatch.setattr(kc, "_launch_row_lse", no_launch)
    image, text, scale = make()
    with pytest.raises(ValueError, match=match):
        kernels.clip_loss(image, text, scale)


@pytest.mark.parametrize("kw, match", [({"block_rows": 24}, "block_rows"), ({"block_d": 8}, "block_d")])
def test_bad_block_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        kernels.clip_loss(_good(), _good(), 1.0, **kw)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    # As if TRITON_INTERPRET had been off when the kernels were decorated.
    monkeypatch.setattr(kc, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels.clip_loss(_good().cpu(), _good().cpu(), 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_import_turns_on_the_interpreter_without_cuda():
    # A fresh interpreter with TRITON_INTERPRET unset, as a new user has it.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import os, kernels.contrastive as kc; print(os.environ.get('TRITON_INTERPRET'), kc.INTERPRETED)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"], out.stdout


@pytest.mark.skipif(not kc.INTERPRETED, reason="only the interpreter lacks bfloat16")
def test_bfloat16_refused_by_interpreter():
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.clip_loss(_good(dtype=torch.bfloat16), _good(dtype=torch.bfloat16), 1.0)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.requires_cuda
@pytest.mark.parametrize("n, d", [(37, 24), (300, 200), (1000, 512)])
def test_bfloat16_on_gpu(rng, n, d):
    check_against_both_rungs(unit_rows(rng, n, d), unit_rows(rng, n, d), torch.bfloat16, 14.3)


@pytest.mark.requires_cuda
def test_tf32_on_gpu(rng):
    # TF32 keeps 10 mantissa bits of each dot input. Emulating that truncation
    # in NumPy on these shapes gives relative errors up to ~1.4e-3 (d_logit_scale),
    # so the bound is 5e-3 rather than DESIGN.md's 1e-3.
    check_against_both_rungs(
        unit_rows(rng, 500, 96), unit_rows(rng, 500, 96), torch.float32, 14.3, tol=5e-3, allow_tf32=True
    )


@pytest.mark.requires_cuda
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_stays_linear_in_n(n, dtype):
    d = 512
    gen = torch.Generator(device="cuda").manual_seed(n)
    image = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).to(dtype)
    image.requires_grad_(True)
    text.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = kernels.clip_loss(image, text, 14.3)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    elt = image.element_size()
    # The returned gradients (2 N d elements), the float32 accumulator of the
    # low-precision path (4 N d bytes), 2N lse floats, and 1 MiB of slack for
    # the per-block sums and the allocator's rounding.
    bound = 2 * n * d * elt + (4 * n * d if dtype != torch.float32 else 0) + 8 * n + 2**20
    assert extra <= bound, f"{dtype} N={n}: {extra / 2**20:.1f} MiB extra, bound {bound / 2**20:.1f} MiB"
    assert extra < n * n * 4 / 8, "the N x N matrix (or a large part of it) was materialised"
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
