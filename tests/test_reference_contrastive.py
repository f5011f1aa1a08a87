"""The NumPy reference of chapter 4 against independent checks.

The reference is what every other rung is tested against, so it gets checked
three ways that share no code with it: a loop written straight from the
definition, central finite differences, and float64 autograd in PyTorch.
"""
import math

import numpy as np
import pytest

import chapters.ch04_contrastive.reference as ref


def unit_rows(rng, n, d):
    return ref.l2_normalize(rng.standard_normal((n, d)))


def rel_err(out, expected):
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert np.all(np.isfinite(out)), f"non-finite values in {out}"
    return np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-300)


def loss_by_definition(image, text, s):
    """-log p(text i | image i) and -log p(image j | text j), one pair at a time."""
    n = len(image)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    logits = [[s * dot(image[i], text[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)) / n
    t2i = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


@pytest.mark.parametrize("n, d, s", [(1, 3, 1.0), (5, 7, 14.285714), (8, 16, 1 / 0.07), (6, 4, 3.0)])
def test_loss_matches_the_definition(rng, n, d, s):
    image, text = unit_rows(rng, n, d), unit_rows(rng, n, d)
    assert rel_err(ref.clip_loss(image, text, s), loss_by_definition(image, text, s)) < 1e-12


def test_uniform_logits_give_log_n(rng):
    n = 11
    row = unit_rows(rng, 1, 9)
    same = np.repeat(row, n, axis=0)  # every logit equal -> every softmax uniform
    assert abs(ref.clip_loss(same, same, 1 / 0.07) - math.log(n)) < 1e-12


def test_large_logits_stay_finite(rng):
    base = unit_rows(rng, 1, 32)
    image = ref.l2_normalize(base + 1e-4 * rng.standard_normal((16, 32)))
    text = ref.l2_normalize(base + 1e-4 * rng.standard_normal((16, 32)))
    loss = ref.clip_loss(image, text, 100.0)
    grads = ref.clip_loss_grad(image, text, 100.0)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    # Far apart, well-matched pairs at s = 100 score near zero loss, exactly computed.
    eye = np.eye(16, 32)
    assert 0 <= ref.clip_loss(eye, eye, 100.0) < 1e-40  # exp(-100) terms, far below 1e-40


@pytest.mark.parametrize("n, d, s", [(1, 4, 2.0), (4, 5, 1 / 0.07), (7, 3, 100.0), (5, 6, 1.0)])
def test_hand_gradient_matches_finite_differences(rng, n, d, s):
    image, text = unit_rows(rng, n, d), unit_rows(rng, n, d)
    d_image, d_text, d_s = ref.clip_loss_grad(image, text, s)
    num_image = ref.numerical_gradient(lambda x: ref.clip_loss(x, text, s), image)
    num_text = ref.numerical_gradient(lambda x: ref.clip_loss(image, x, s), text)
    num_s = ref.numerical_gradient(lambda x: ref.clip_loss(image, text, float(x[0])), np.array([s]))[0]
    if n == 1:  # a single pair: the loss is identically zero, and so is every gradient
        for g in (d_image, d_text, num_image, num_text):
            assert np.max(np.abs(g)) < 1e-9
        assert abs(d_s) < 1e-12 and abs(num_s) < 1e-9
        return
    assert rel_err(d_image, num_image) < 1e-6
    assert rel_err(d_text, num_text) < 1e-6
    assert abs(d_s - num_s) <= 1e-6 * max(1.0, abs(num_s))


@pytest.mark.parametrize("n, d, s", [(3, 4, 1 / 0.07), (6, 5, 7.0)])
def test_raw_gradient_matches_finite_differences(rng, n, d, s):
    # Rows of very different lengths: the normalisation's chain rule must undo them.
    image = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, size=(n, 1))
    text = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, size=(n, 1))
    d_image, d_text, d_s = ref.clip_loss_raw_grad(image, text, s)
    assert rel_err(d_image, ref.numerical_gradient(lambda x: ref.clip_loss_raw(x, text, s), image)) < 1e-6
    assert rel_err(d_text, ref.numerical_gradient(lambda x: ref.clip_loss_raw(image, x, s), text)) < 1e-6
    # Scaling a row leaves the loss unchanged, so its gradient is orthogonal to the row.
    assert np.max(np.abs(np.sum(d_image * image, axis=1))) < 1e-12


def test_against_torch_float64_autograd(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    n, d, s = 9, 13, 1 / 0.07
    image_raw, text_raw = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    i = torch.tensor(image_raw, requires_grad=True)
    t = torch.tensor(text_raw, requires_grad=True)
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    logits = scale * F.normalize(i, dim=1) @ F.normalize(t, dim=1).T
    labels = torch.arange(n)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    assert rel_err(ref.clip_loss_raw(image_raw, text_raw, s), loss.item()) < 1e-13
    d_image, d_text, d_s = ref.clip_loss_raw_grad(image_raw, text_raw, s)
    assert rel_err(d_image, i.grad.numpy()) < 1e-12
    assert rel_err(d_text, t.grad.numpy()) < 1e-12
    assert rel_err(d_s, scale.grad.item()) < 1e-12


def test_retrieval_accuracy_on_a_known_permutation(rng):
    n = 10
    perm = rng.permutation(n)
    logits = rng.uniform(0, 1, size=(n, n))
    logits[np.arange(n), perm] += 10  # row i's best text is perm[i]; column perm[i]'s best image is i
    expected_i2t = np.mean(perm == np.arange(n))
    # Column j's best row is the i with perm[i] == j, correct when that i == j: same fixed points.
    assert ref.retrieval_accuracy(logits) == (expected_i2t, expected_i2t)
    assert ref.retrieval_accuracy(logits[:, perm]) == (1.0, 1.0)  # new column i = old column perm[i]


@pytest.mark.parametrize(
    "image, text, s, message",
    [
        (np.ones(4), np.ones(4), 1.0, "2-D"),
        (np.ones((3, 4)), np.ones((2, 4)), 1.0, "same shape"),
        (np.ones((0, 4)), np.ones((0, 4)), 1.0, "no rows"),
        (np.ones((2, 4)), np.ones((2, 4)), 0.0, "positive"),
        (np.ones((2, 4)), np.ones((2, 4)), float("nan"), "finite"),
    ],
)
def test_bad_input_is_named(image, text, s, message):
    with pytest.raises(ValueError, match=message):
        ref.clip_loss(image, text, s)


def test_zero_row_cannot_be_normalised():
    with pytest.raises(ValueError, match="zeros"):
        ref.l2_normalize(np.zeros((2, 3)))
