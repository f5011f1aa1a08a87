"""The PyTorch contrastive loss (tiny_mm.contrastive) against the float64 NumPy reference.

Every expected value comes from chapters/ch04_contrastive/reference.py (hand-written
NumPy forward and gradients), never from the code under test. Gradients here are
torch autograd's, so these tests check the loss *and* that autograd sees the
same function the chapter derives by hand.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import chapters.ch04_contrastive.reference as ref
from tiny_mm.contrastive import ClipLoss, clip_loss

# Relative-error budgets of the project (DESIGN.md): float64 is "exact", float32 < 1e-5.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_close(out, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """||out - expected|| <= rtol * ||expected|| + atol, NaN never passes; message says how far."""
    out = np.asarray(out.detach().double() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite values {out}"
    err, scale = np.linalg.norm(out - expected), np.linalg.norm(expected)
    assert err <= rtol * scale + atol, (
        f"{what}: ||out - ref|| = {err:.3e}, ||ref|| = {scale:.3e} "
        f"(relative {err / max(scale, 1e-300):.3e}, allowed {rtol:.0e} relative + {atol:.0e})"
    )


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return ref.l2_normalize(rng.standard_normal((n, d)))


def nearly_identical_rows(rng: np.random.Generator, n: int, d: int, spread: float = 1e-3) -> np.ndarray:
    """n unit rows that all point almost the same way: every logit is close to the scale."""
    base = rng.standard_normal((1, d))
    return ref.l2_normalize(base + spread * rng.standard_normal((n, d)))


def torch_loss_and_grads(image: np.ndarray, text: np.ndarray, s: float, dtype: torch.dtype):
    """Run tiny_mm's clip_loss in `dtype`; return (loss, d_image, d_text, d_scale) and the
    float64 copies of the exact inputs it saw (rounded to `dtype`), for the reference."""
    I = torch.tensor(image, dtype=dtype, requires_grad=True)
    T = torch.tensor(text, dtype=dtype, requires_grad=True)
    S = torch.tensor(s, dtype=dtype, requires_grad=True)
    loss = clip_loss(I, T, S)
    assert loss.dim() == 0 and loss.dtype == dtype
    loss.backward()
    seen = (I.detach().double().numpy(), T.detach().double().numpy(), float(S.detach().double()))
    return (loss, I.grad, T.grad, S.grad), seen


def check_against_reference(image, text, s, dtype, atol: float = 0.0) -> None:
    (loss, d_image, d_text, d_s), (image64, text64, s64) = torch_loss_and_grads(image, text, s, dtype)
    r_image, r_text, r_s = ref.clip_loss_grad(image64, text64, s64)
    rtol = RTOL[dtype]
    assert_close(loss, ref.clip_loss(image64, text64, s64), rtol, atol, "loss")
    assert_close(d_image, r_image, rtol, atol, "d_image")
    assert_close(d_text, r_text, rtol, atol, "d_text")
    assert_close(d_s, r_s, rtol, atol, "d_logit_scale")


# --------------------------------------------------------------------------- clip_loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, d", [(8, 16), (13, 5), (2, 3)])
def test_clip_loss_matches_reference(rng, dtype, n, d):
    check_against_reference(unit_rows(rng, n, d), unit_rows(rng, n, d), 1 / 0.07, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("s", [1.0, 100.0])
def test_clip_loss_logit_scale_range(rng, dtype, s):
    check_against_reference(unit_rows(rng, 9, 7), unit_rows(rng, 9, 7), s, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_loss_confident_pairs(rng, dtype):
    # Text rows are the image rows plus a little noise and s = 100: the diagonal wins by
    # tens of logits, the loss and its gradients are ~1e-20, far below float32's resolution.
    # What must hold: no NaN/inf and the result is zero to within the precision of a loss
    # of order one (absolute floor = rtol).
    image = unit_rows(rng, 10, 6)
    text = ref.l2_normalize(image + 1e-2 * rng.standard_normal(image.shape))
    check_against_reference(image, text, 100.0, dtype, atol=RTOL[dtype])


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_clip_loss_all_rows_nearly_identical(rng, dtype, rtol):
    # Every logit is within ~s * spread^2 of s = 100: exp(100) would overflow float32
    # without the max shift inside cross-entropy. The problem is ill-conditioned: the
    # gradient s * G @ T cancels to ~spread of its terms' size, so rounding in G
    # (eps ~ 6e-8 in float32) shows up magnified by ~1 / spread = 100 (float64: ~1e-16 * 100).
    spread = 1e-2
    image = nearly_identical_rows(rng, 7, 5, spread)
    text = nearly_identical_rows(rng, 7, 5, spread)
    outputs, (image64, text64, s64) = torch_loss_and_grads(image, text, 100.0, dtype)
    loss, d_image, d_text, d_s = outputs
    r_image, r_text, r_s = ref.clip_loss_grad(image64, text64, s64)
    assert_close(loss, ref.clip_loss(image64, text64, s64), RTOL[dtype], what="loss")
    assert_close(d_image, r_image, rtol, what="d_image")
    assert_close(d_text, r_text, rtol, what="d_text")
    assert_close(d_s, r_s, rtol, what="d_logit_scale")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_loss_single_pair(rng, dtype):
    # N = 1: one candidate each way, the loss and every gradient are exactly zero.
    check_against_reference(unit_rows(rng, 1, 4), unit_rows(rng, 1, 4), 1 / 0.07, dtype, atol=1e-7)


def test_clip_loss_accepts_python_float_scale(rng):
    image, text = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    loss = clip_loss(torch.tensor(image), torch.tensor(text), 3.5)
    assert_close(loss, ref.clip_loss(image, text, 3.5), 1e-12, what="loss")


@pytest.mark.parametrize(
    "image_shape, text_shape, scale, match",
    [
        ((4,), (4,), 1.0, "2-D"),
        ((2, 3, 4), (2, 3, 4), 1.0, "2-D"),
        ((4, 3), (5, 3), 1.0, "same shape"),
        ((4, 3), (4, 2), 1.0, "same shape"),
        ((0, 3), (0, 3), 1.0, "at least one row"),
        ((4, 3), (4, 3), 0.0, "positive"),
        ((4, 3), (4, 3), -2.0, "positive"),
        ((4, 3), (4, 3), math.inf, "finite"),
        ((4, 3), (4, 3), math.nan, "finite"),
        ((4, 3), (4, 3), torch.tensor([1.0, 2.0]), "0-dim"),
        ((4, 3), (4, 3), torch.tensor(-1.0), "positive"),
    ],
)
def test_clip_loss_rejects_bad_input(image_shape, text_shape, scale, match):
    with pytest.raises(ValueError, match=match):
        clip_loss(torch.ones(image_shape), torch.ones(text_shape), scale)


def test_clip_loss_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        clip_loss(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="floating"):
        clip_loss(torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64), 1.0)


# --------------------------------------------------------------------------- ClipLoss


def test_cliploss_initial_temperature():
    module = ClipLoss()
    assert isinstance(module.log_logit_scale, torch.nn.Parameter)
    assert module.log_logit_scale.requires_grad
    assert any(p is module.log_logit_scale for p in module.parameters())
    assert abs(float(module.log_logit_scale.detach()) - math.log(1 / 0.07)) < 1e-6
    assert abs(float(module.logit_scale) - 1 / 0.07) < 1e-4


def test_cliploss_fixed_temperature_is_not_trained(rng):
    module = ClipLoss(init_logit_scale=20.0, learnable=False).double()
    assert list(module.parameters()) == []
    assert "log_logit_scale" in dict(module.named_buffers())
    image, text = unit_rows(rng, 5, 4), unit_rows(rng, 5, 4)
    loss = module(torch.tensor(image), torch.tensor(text))
    s = float(module.logit_scale)  # 20 up to the float32 rounding of log(20) at construction
    assert abs(s - 20.0) < 1e-5
    assert_close(loss, ref.clip_loss(image, text, s), 1e-12, what="loss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cliploss_learnable_gradient(rng, dtype):
    # d loss / d log s = (d loss / d s) * s: the chain rule through s = exp(parameter).
    s = float(rng.uniform(2.0, 50.0))
    module = ClipLoss(init_logit_scale=s).to(dtype)
    image, text = unit_rows(rng, 7, 5), unit_rows(rng, 7, 5)
    I = torch.tensor(image, dtype=dtype, requires_grad=True)
    T = torch.tensor(text, dtype=dtype, requires_grad=True)
    loss = module(I, T)
    loss.backward()
    image64, text64 = I.detach().double().numpy(), T.detach().double().numpy()
    s64 = math.exp(float(module.log_logit_scale.detach().double()))
    r_image, r_text, r_s = ref.clip_loss_grad(image64, text64, s64)
    rtol = RTOL[dtype]
    assert_close(loss, ref.clip_loss(image64, text64, s64), rtol, what="loss")
    assert_close(I.grad, r_image, rtol, what="d_image")
    assert_close(T.grad, r_text, rtol, what="d_text")
    assert_close(module.log_logit_scale.grad, r_s * s64, rtol, what="d_log_logit_scale")


def test_cliploss_caps_scale_at_100(rng):
    module = ClipLoss().double()
    with torch.no_grad():
        module.log_logit_scale.fill_(math.log(300.0))  # as if an optimiser step overshot the cap
    assert abs(float(module.logit_scale) - 100.0) < 1e-9  # the value the next forward will use
    image, text = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    loss = module(torch.tensor(image), torch.tensor(text))
    loss.backward()
    assert_close(loss, ref.clip_loss(image, text, 100.0), 1e-12, what="loss at the cap")
    # CLIP clamps the parameter itself, so it now sits at log(100) ...
    assert abs(float(module.log_logit_scale.detach()) - math.log(100.0)) < 1e-12
    # ... and still gets the gradient at s = 100 (not zero), so training can pull it back down.
    _, _, r_s = ref.clip_loss_grad(image, text, 100.0)
    assert_close(module.log_logit_scale.grad, r_s * 100.0, 1e-12, what="d_log_logit_scale at the cap")
    assert float(module.log_logit_scale.grad) != 0.0


def test_cliploss_below_cap_is_untouched():
    module = ClipLoss(init_logit_scale=99.0).double()
    module(torch.eye(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
    assert abs(float(module.log_logit_scale.detach()) - math.log(99.0)) < 1e-6  # float32 parameter


def test_cliploss_two_forwards_one_backward(rng):
    # The in-place clamp happens in every forward; it must not invalidate an earlier graph
    # (gradient accumulation runs several forwards before one backward).
    module = ClipLoss().double()
    batches = [(unit_rows(rng, 4, 3), unit_rows(rng, 4, 3)) for _ in range(2)]
    total = sum(module(torch.tensor(i), torch.tensor(t)) for i, t in batches)
    total.backward()
    s = float(module.logit_scale)
    expected = sum(ref.clip_loss_grad(i, t, s)[2] for i, t in batches) * s
    assert_close(module.log_logit_scale.grad, expected, 1e-10, what="accumulated d_log_logit_scale")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cliploss_normalize_matches_raw_reference(rng, dtype):
    s = float(rng.uniform(5.0, 30.0))
    module = ClipLoss(init_logit_scale=s, learnable=False, normalize=True).to(dtype)
    image_raw = 3.0 * rng.standard_normal((8, 6))  # rows of very different lengths
    text_raw = rng.standard_normal((8, 6)) * rng.uniform(0.1, 10.0, size=(8, 1))
    I = torch.tensor(image_raw, dtype=dtype, requires_grad=True)
    T = torch.tensor(text_raw, dtype=dtype, requires_grad=True)
    loss = module(I, T)
    loss.backward()
    image64, text64 = I.detach().double().numpy(), T.detach().double().numpy()
    s64 = float(module.logit_scale.double())
    r_image, r_text, _ = ref.clip_loss_raw_grad(image64, text64, s64)
    rtol = RTOL[dtype]
    assert_close(loss, ref.clip_loss_raw(image64, text64, s64), rtol, what="loss")
    assert_close(I.grad, r_image, rtol, what="d_image_raw")
    assert_close(T.grad, r_text, rtol, what="d_text_raw")


def test_cliploss_without_normalize_does_not_normalize(rng):
    # Guard against normalising by default: raw rows give the raw (unnormalised) loss.
    image, text = 2.0 * unit_rows(rng, 5, 3), unit_rows(rng, 5, 3)
    module = ClipLoss(init_logit_scale=4.0, learnable=False).double()
    loss = module(torch.tensor(image), torch.tensor(text))
    assert_close(loss, ref.clip_loss(image, text, float(module.logit_scale)), 1e-12, what="loss")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_logit_scale": 0.0}, "positive"),
        ({"init_logit_scale": math.nan}, "finite"),
        ({"init_logit_scale": 150.0}, "max_logit_scale"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_cliploss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClipLoss(**kwargs)


def test_cliploss_rejects_bad_features():
    module = ClipLoss()
    with pytest.raises(ValueError, match="same shape"):
        module(torch.ones(4, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        module(torch.ones(4), torch.ones(4))


# --------------------------------------------------------------------------- triton backend


def _kernels_clip_loss():
    import kernels

    return kernels.clip_loss


@pytest.mark.parametrize("normalize", [False, True])
def test_cliploss_triton_backend_matches_torch_backend(rng, monkeypatch, normalize):
    kernel = _kernels_clip_loss()
    kernel_calls = []

    def spy(*args, **kwargs):  # proves the triton backend really runs the kernel
        kernel_calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr("kernels.clip_loss", spy)
    n, d = 5, 12  # tiny: the kernel runs under the Triton interpreter on CPU
    s = float(rng.uniform(5.0, 40.0))
    image = unit_rows(rng, n, d) if not normalize else rng.standard_normal((n, d))
    text = unit_rows(rng, n, d) if not normalize else rng.standard_normal((n, d))
    results = {}
    for backend in ("torch", "triton"):
        module = ClipLoss(init_logit_scale=s, normalize=normalize, backend=backend)  # float32
        I = torch.tensor(image, dtype=torch.float32, requires_grad=True)
        T = torch.tensor(text, dtype=torch.float32, requires_grad=True)
        loss = module(I, T)
        loss.backward()
        results[backend] = (loss, I.grad, T.grad, module.log_logit_scale.grad)
    assert kernel_calls == [(n, d)], "ClipLoss(backend='triton') did not call kernels.clip_loss once"
    image64 = torch.tensor(image, dtype=torch.float32).double().numpy()
    text64 = torch.tensor(text, dtype=torch.float32).double().numpy()
    s64 = math.exp(float(torch.tensor(math.log(s), dtype=torch.float32).double()))
    if normalize:
        r_loss = ref.clip_loss_raw(image64, text64, s64)
        r_image, r_text, r_s = ref.clip_loss_raw_grad(image64, text64, s64)
    else:
        r_loss = ref.clip_loss(image64, text64, s64)
        r_image, r_text, r_s = ref.clip_loss_grad(image64, text64, s64)
    names = ("loss", "d_image", "d_text", "d_log_logit_scale")
    for name, got, torch_value, expected in zip(
        names, results["triton"], results["torch"], (r_loss, r_image, r_text, r_s * s64)
    ):
        assert_close(got, expected, 1e-3, what=f"triton {name} vs float64 reference")
        torch_value = torch_value.detach().double().numpy()
        assert_close(got, torch_value, 1e-3, what=f"triton {name} vs torch backend")


# --------------------------------------------------------------------------- a real implementation


@pytest.mark.slow  # importing open_clip takes ~5 s on a 2-core CPU
def test_clip_loss_matches_open_clip(rng):
    # open_clip's single-process ClipLoss takes the scale itself (already exp'd) and
    # normalised features, like ours: the same numbers must come out, loss and gradients.
    import open_clip.loss as open_clip_loss
    image, text, s = unit_rows(rng, 11, 8), unit_rows(rng, 11, 8), float(rng.uniform(5.0, 60.0))
    grads = []
    for loss_fn in (clip_loss, open_clip_loss.ClipLoss()):
        I = torch.tensor(image, requires_grad=True)
        T = torch.tensor(text, requires_grad=True)
        S = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(I, T, S)
        loss.backward()
        grads.append((loss.detach(), I.grad, T.grad, S.grad))
    ours, theirs = grads
    for name, a, b in zip(("loss", "d_image", "d_text", "d_logit_scale"), ours, theirs):
        assert_close(a, b.numpy(), 1e-12, what=f"{name} vs open_clip")
