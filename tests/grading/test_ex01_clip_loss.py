"""Grader of exercise 1: clip_contrastive_loss and retrieval_accuracy.

Every check compares the graded code with the chapter's NumPy float64
reference (chapters/ch04_contrastive/reference.py) on random inputs drawn per
test, or with a property that holds whatever the inputs (identical rows give
log N). Nothing here is a number a learner could paste in.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex01` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import pytest
import torch

import chapters.ch04_contrastive.reference as ref
from tests.grading.conftest import Learner, fail

EXERCISE = "ex01_clip_loss"
F32_TOL = 1e-5  # relative error against float64 for float32 inputs (DESIGN.md)


# ---------------------------------------------------------------- helpers


def embeddings(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Random raw (unnormalised) image and text embeddings, (n, d) each, float64."""
    return rng.standard_normal((n, d)), rng.standard_normal((n, d))


def t32(x: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, requires_grad=requires_grad)


def _fmt(x: np.ndarray) -> str:
    return f"{x.item():.6g}" if x.size == 1 else np.array2string(x, precision=4, threshold=6)


def check_close(what: str, got: torch.Tensor, expected: np.ndarray | float, where: str, tol: float = F32_TOL) -> None:
    """Fail unless ||got - expected|| / ||expected|| < tol (absolute when expected is ~0); NaN never passes."""
    expected = np.asarray(expected, dtype=np.float64)
    got_np = got.detach().to(torch.float64).cpu().numpy()
    if got_np.shape != expected.shape:
        fail(f"{what} has shape {tuple(got_np.shape)}, expected {tuple(expected.shape)} for {where}")
    if not np.all(np.isfinite(got_np)):
        bad = "NaN" if np.isnan(got_np).any() else "inf"
        fail(f"{what} contains {bad} for {where} (a division by zero, or exp() of a large logit?)")
    scale = float(np.linalg.norm(expected))
    err = float(np.linalg.norm(got_np - expected)) / (scale if scale > 1e-12 else 1.0)
    if err < tol:
        return
    kind = "rel err" if scale > 1e-12 else "abs err"
    if expected.size == 1:
        detail = f"expected {expected.item():.6g}, got {got_np.item():.6g}"
    else:
        worst = np.unravel_index(np.argmax(np.abs(got_np - expected)), expected.shape)
        idx = ", ".join(str(int(i)) for i in worst)
        detail = f"worst at [{idx}]: expected {expected[worst]:.6g}, got {got_np[worst]:.6g}"
    verb = "differ" if what.endswith("logits") else "differs"
    fail(f"{what} {verb} from the reference: {kind} {err:.3g} ({detail}) for {where}")


def loss_and_logits(learner: Learner, image: torch.Tensor, text: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Call clip_contrastive_loss and check what comes back: a 0-dim loss and (N, N) logits."""
    result = learner.call("clip_contrastive_loss", image, text, **kwargs)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        fail(f"clip_contrastive_loss must return a pair (loss, logits), got {type(result).__name__}")
    loss, logits = result
    n = image.shape[0]
    for name, value in (("loss", loss), ("logits", logits)):
        if not isinstance(value, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if loss.ndim != 0:
        fail(f"loss has shape {tuple(loss.shape)}; expected a 0-dim tensor (average over the batch)")
    if tuple(logits.shape) != (n, n):
        fail(f"logits has shape {tuple(logits.shape)}; expected (N, N) = ({n}, {n}) for N={n} pairs")
    if torch.isnan(loss):
        fail(f"loss is NaN for N={n} (a division by zero, or exp() of a large logit?)")
    return loss, logits


def accuracies(learner: Learner, logits: torch.Tensor) -> tuple[float, float]:
    """Call retrieval_accuracy and check it returns two Python floats in [0, 1]."""
    result = learner.call("retrieval_accuracy", logits)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        fail(f"retrieval_accuracy must return a pair (image_to_text, text_to_image), got {type(result).__name__}")
    for name, value in zip(("image_to_text", "text_to_image"), result):
        if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
            fail(f"{name} must be a Python float (use .item()), got {type(value).__name__}")
        if not 0.0 <= float(value) <= 1.0:
            fail(f"{name} = {float(value):.4g} is not a fraction in [0, 1]")
    return float(result[0]), float(result[1])


def reference_loss(image: np.ndarray, text: np.ndarray, temperature: float) -> float:
    return ref.clip_loss_raw(image, text, 1.0 / temperature)


def reference_logits(image: np.ndarray, text: np.ndarray, temperature: float) -> np.ndarray:
    return ref.similarity(ref.l2_normalize(image), ref.l2_normalize(text), 1.0 / temperature)


# ---------------------------------------------------------------- the loss


@pytest.mark.points(1)
def test_returns_scalar_loss_and_square_logits(learner, rng):
    """returns (0-dim loss, (N, N) logits)"""
    image, text = embeddings(rng, 5, 7)
    loss_and_logits(learner, t32(image), t32(text))


@pytest.mark.points(2)
@pytest.mark.parametrize("n, d", [(3, 4), (8, 16), (13, 5)])
def test_loss_matches_reference(learner, rng, n, d):
    """loss matches the reference on random inputs"""
    image, text = embeddings(rng, n, d)
    loss, _ = loss_and_logits(learner, t32(image), t32(text))
    check_close("loss", loss, reference_loss(image, text, 0.07), f"N={n}, d={d}, temperature=0.07")


@pytest.mark.points(2)
def test_logits_match_reference(learner, rng):
    """logits are cosine similarities / temperature"""
    image, text = embeddings(rng, 6, 10)
    _, logits = loss_and_logits(learner, t32(image), t32(text))
    check_close("logits", logits, reference_logits(image, text, 0.07), "N=6, d=10, temperature=0.07")


@pytest.mark.points(1)
@pytest.mark.parametrize("temperature", [0.5, 0.013])
def test_temperature_is_used(learner, rng, temperature):
    """temperature other than 0.07"""
    image, text = embeddings(rng, 7, 9)
    loss, logits = loss_and_logits(learner, t32(image), t32(text), temperature=temperature)
    where = f"N=7, d=9, temperature={temperature}"
    check_close("logits", logits, reference_logits(image, text, temperature), where)
    check_close("loss", loss, reference_loss(image, text, temperature), where)


@pytest.mark.points(2)
def test_unnormalised_inputs(learner, rng):
    """scaling a row does not change the result"""
    image, text = embeddings(rng, 8, 12)
    # Encoders' raw outputs have arbitrary norms: the loss must see only directions.
    scaled_image = image * rng.uniform(0.05, 20.0, size=(8, 1))
    scaled_text = text * rng.uniform(0.05, 20.0, size=(8, 1))
    loss, logits = loss_and_logits(learner, t32(scaled_image), t32(scaled_text))
    where = "N=8, rows scaled by 0.05..20 (normalise each row by its own L2 norm)"
    check_close("loss", loss, reference_loss(image, text, 0.07), where)
    check_close("logits", logits, reference_logits(image, text, 0.07), where)


@pytest.mark.points(1)
def test_identical_embeddings_give_log_n(learner, rng):
    """all embeddings equal: loss = log N"""
    n = int(rng.integers(3, 12))
    row = rng.standard_normal(10)
    # Every logit is the same, so each softmax is uniform over N: loss = log N exactly.
    image = row * rng.uniform(0.5, 2.0, size=(n, 1))
    text = row * rng.uniform(0.5, 2.0, size=(n, 1))
    loss, _ = loss_and_logits(learner, t32(image), t32(text))
    check_close("loss", loss, math.log(n), f"N={n} identical rows (every logit equal: the loss is log N)")


@pytest.mark.points(1)
def test_matched_pairs_give_loss_near_zero(learner, rng):
    """text == image, orthogonal rows: loss near 0"""
    n, d = 6, 16
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))  # (d, n), orthonormal columns
    rows = q.T * rng.uniform(0.5, 2.0, size=(n, 1))  # (n, d), orthogonal rows
    temperature = 0.01
    loss, _ = loss_and_logits(learner, t32(rows), t32(rows), temperature=temperature)
    expected = reference_loss(rows, rows, temperature)  # ~ (N - 1) * exp(-100): zero in float32
    # Absolute error here: relative error to a number of size 1e-42 says nothing.
    value = float(loss.detach())
    if not abs(value - expected) < 1e-5:
        fail(f"loss = {value:.4g} for N={n} perfectly matched orthogonal pairs at temperature={temperature}; "
             f"expected about {expected:.2g} (each diagonal logit is 100, every other 0)")


@pytest.mark.points(1)
def test_batch_of_one(learner, rng):
    """batch size 1"""
    image, text = embeddings(rng, 1, 6)
    loss, logits = loss_and_logits(learner, t32(image), t32(text), temperature=0.2)
    where = "N=1, d=6, temperature=0.2"
    check_close("logits", logits, reference_logits(image, text, 0.2), where)
    value = float(loss.detach())
    if not abs(value - reference_loss(image, text, 0.2)) < 1e-6:
        fail(f"loss = {value:.4g} for a batch of one pair; expected {reference_loss(image, text, 0.2):.4g} "
             "(one choice only: the softmax is 1)")


@pytest.mark.points(1)
def test_large_logits_stay_finite(learner, rng):
    """numerically stable at temperature 0.001"""
    image, text = embeddings(rng, 6, 8)
    loss, _ = loss_and_logits(learner, t32(image), t32(text), temperature=0.001)
    # Logits reach 1000: exp() overflows float32 unless the log-sum-exp is stabilised.
    check_close("loss", loss, reference_loss(image, text, 0.001),
                "N=6, d=8, temperature=0.001 (logits up to 1000)")


@pytest.mark.points(2)
def test_gradient_matches_reference(learner, rng):
    """gradients flow back to both inputs"""
    n, d, temperature = 5, 8, 0.1
    image, text = embeddings(rng, n, d)
    image_t, text_t = t32(image, requires_grad=True), t32(text, requires_grad=True)
    loss, _ = loss_and_logits(learner, image_t, text_t, temperature=temperature)
    if not loss.requires_grad:
        fail("loss does not depend on the inputs through autograd: use torch operations only "
             "(no .detach(), .numpy(), .item() or torch.tensor(...) on the way)")
    loss.backward()
    d_image, d_text, _ = ref.clip_loss_raw_grad(image, text, 1.0 / temperature)
    where = f"N={n}, d={d}, temperature={temperature}"
    for name, tensor, expected in (("image", image_t, d_image), ("text", text_t, d_text)):
        if tensor.grad is None:
            fail(f"no gradient reached the {name} embeddings ({where})")
        check_close(f"gradient of the loss w.r.t. the {name} embeddings", tensor.grad, expected, where)


@pytest.mark.points(1)
def test_inputs_not_modified(learner, rng):
    """the caller's tensors are left unchanged"""
    image, text = embeddings(rng, 4, 6)
    image_t, text_t = t32(image), t32(text)
    loss_and_logits(learner, image_t, text_t)
    for name, tensor, original in (("image", image_t, image), ("text", text_t, text)):
        if not np.allclose(tensor.numpy(), original, rtol=1e-6, atol=0):
            fail(f"the {name} embeddings were changed in place: normalise into a new tensor "
                 "(x / x.norm(...)), not with x /= ... or .div_()")


@pytest.mark.points(1)
def test_rejects_mismatched_shapes(learner, rng):
    """ValueError on mismatched or non-2-D inputs"""
    for image_shape, text_shape in (((4, 8), (5, 8)), ((4, 8), (4, 6)), ((4, 8, 1), (4, 8, 1))):
        image = t32(rng.standard_normal(image_shape))
        text = t32(rng.standard_normal(text_shape))
        learner.raises(ValueError, "clip_contrastive_loss", image, text)


# ---------------------------------------------------------------- retrieval accuracy


@pytest.mark.points(2)
@pytest.mark.parametrize("n", [1, 9])
def test_retrieval_accuracy_matches_reference(learner, rng, n):
    """retrieval accuracy matches the reference"""
    image, text = embeddings(rng, n, 4)
    logits = reference_logits(image, text, 0.07)
    got = accuracies(learner, t32(logits))
    expected = ref.retrieval_accuracy(logits)
    if not np.allclose(got, expected, rtol=0, atol=1e-6):
        fail(f"retrieval_accuracy returned ({got[0]:.4g}, {got[1]:.4g}); the reference gives "
             f"({expected[0]:.4g}, {expected[1]:.4g}) for random (N, N) logits, N={n}")


@pytest.mark.points(2)
def test_retrieval_accuracy_on_a_constructed_case(learner, rng):
    """rows and columns counted separately"""
    n = 10
    # Row i peaks at column target[i]: the rows in `fixed` on the diagonal, the
    # others cycled among themselves (so off it). Then one off-diagonal row k is
    # moved to peak in column f0 (a fixed row's column) above row f0: rows still
    # count f0 as right, but column f0's best row is now k, so columns count it wrong.
    order = rng.permutation(n)
    n_fixed = int(rng.integers(2, 7))
    fixed, rest = order[:n_fixed], order[n_fixed:]
    target = np.empty(n, dtype=int)
    target[fixed] = fixed
    target[rest] = np.roll(rest, 1)  # a cycle over the rest: no fixed points there
    f0, k = int(fixed[0]), int(rest[0])
    target[k] = f0
    logits = rng.uniform(0.1, 1.0, size=(n, n))
    np.fill_diagonal(logits, 0.0)  # noise alone never puts a column's maximum on the diagonal
    logits[np.arange(n), target] = 10.0 + rng.uniform(0.0, 1.0, size=n)
    logits[k, f0] = logits[f0, f0] + 1.0
    rows_right = float(np.mean(target == np.arange(n)))
    expected = (rows_right, rows_right - 1.0 / n)  # columns: the same diagonal peaks but f0
    assert np.allclose(expected, ref.retrieval_accuracy(logits)), "grader bug: the construction is off"
    got = accuracies(learner, t32(logits))
    if not np.allclose(got, expected, rtol=0, atol=1e-6):
        fail(f"retrieval_accuracy returned ({got[0]:.4g}, {got[1]:.4g}); expected ({expected[0]:.4g}, "
             f"{expected[1]:.4g}) for N={n} logits where rows and columns disagree "
             "(image -> text: argmax over dim 1; text -> image: argmax over dim 0)")


@pytest.mark.points(1)
def test_retrieval_rejects_non_square(learner, rng):
    """ValueError on non-square logits"""
    learner.raises(ValueError, "retrieval_accuracy", t32(rng.standard_normal((3, 4))))
