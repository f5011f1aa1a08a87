"""Chapter 5's NumPy reference (zero-shot math, nearest neighbours), and tiny_mm.zeroshot against it.

The reference is first checked against brute-force loops and properties that
hold whatever the numbers; then tiny_mm.zeroshot's build_classifier (with a
fake encode_text), predict, accuracy and confusion_matrix are compared with it
on fresh random inputs and on edge cases (ties, one class, k at and past C).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import chapters.ch05_clip_zero_shot.reference as ref
from tiny_mm import zeroshot as zs


def rel_err(got, expected) -> float:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == expected.shape and np.isfinite(got).all()
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------- the reference itself


def test_l2_normalize_rows_are_unit_and_parallel(rng):
    x = rng.normal(size=(5, 7)) * rng.uniform(0.1, 10, size=(5, 1))
    y = ref.l2_normalize(x)
    assert np.allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-12)
    assert np.allclose(y * np.linalg.norm(x, axis=-1, keepdims=True), x, atol=1e-12)
    with pytest.raises(ValueError, match="zeros"):
        ref.l2_normalize(np.zeros((2, 3)))


def test_template_ensemble_against_a_loop(rng):
    C, T, E = 4, 3, 6
    p = rng.normal(size=(C, T, E)) * rng.uniform(0.2, 5.0, size=(C, T, 1))
    W = ref.template_ensemble(p)
    assert W.shape == (E, C)
    for c in range(C):
        votes = [p[c, t] / np.sqrt(np.dot(p[c, t], p[c, t])) for t in range(T)]
        mean = sum(votes) / T
        assert np.allclose(W[:, c], mean / np.sqrt(np.dot(mean, mean)), atol=1e-12)
    # Rescaling one prompt's embedding changes nothing: every template votes with weight 1.
    q = p.copy()
    q[1, 2] *= 100.0
    assert np.allclose(ref.template_ensemble(q), W, atol=1e-12)
    # One template: the prompt's own unit vector.
    assert np.allclose(ref.template_ensemble(p[:, :1]), ref.l2_normalize(p[:, 0]).T, atol=1e-12)
    with pytest.raises(ValueError, match="3-D"):
        ref.template_ensemble(p[0])


def test_cosine_logits_and_predict(rng):
    x = rng.normal(size=(6, 5))
    w = rng.normal(size=(5, 3))
    logits = ref.cosine_logits(x, w)
    for b in range(6):
        for c in range(3):
            cos = np.dot(x[b], w[:, c]) / (np.linalg.norm(x[b]) * np.linalg.norm(w[:, c]))
            assert logits[b, c] == pytest.approx(cos, abs=1e-12)
    assert np.all(np.abs(logits) <= 1.0 + 1e-12)
    tied = np.array([[0.1, 0.5, 0.5], [0.2, 0.2, 0.2]])
    assert ref.predict(tied).tolist() == [1, 0]  # first maximum
    with pytest.raises(ValueError, match="embedding size"):
        ref.cosine_logits(x, w[:4])


def _rank_of_label(scores: np.ndarray, label: int) -> int:
    """0-based rank by the rule 'higher first, then lower index': a brute-force count."""
    s = scores[label]
    return int(sum(1 for j, v in enumerate(scores) if v > s or (v == s and j < label)))


def test_topk_against_brute_force_with_ties(rng):
    logits = rng.integers(0, 4, size=(40, 6)).astype(float)  # small integers: many ties
    labels = rng.integers(0, 6, size=40)
    for k in range(1, 7):
        expected = [_rank_of_label(logits[i], labels[i]) < k for i in range(40)]
        assert ref.topk_correct(logits, labels, k).tolist() == expected
        assert ref.topk_accuracy(logits, labels, k) == pytest.approx(np.mean(expected))
    assert ref.topk_accuracy(logits, labels, 6) == 1.0
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            ref.topk_accuracy(logits, labels, bad)
    with pytest.raises(ValueError, match="labels"):
        ref.topk_accuracy(logits, labels + 6, 1)


def test_confusion_matrix_against_counts(rng):
    pred, labels = rng.integers(0, 4, size=50), rng.integers(0, 4, size=50)
    cm = ref.confusion_matrix(pred, labels, 4)
    for i in range(4):
        for j in range(4):
            assert cm[i, j] == int(np.sum((labels == i) & (pred == j)))
    assert cm.sum() == 50 and np.trace(cm) == int(np.sum(pred == labels))
    assert ref.confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3
    with pytest.raises(ValueError, match="0..3"):
        ref.confusion_matrix([4], [0], 4)
    with pytest.raises(ValueError, match="n_classes"):
        ref.confusion_matrix([0], [0], 0)


def test_nearest_neighbours_against_brute_force(rng):
    queries, index = rng.normal(size=(3, 8)), rng.normal(size=(9, 8))
    index[4] = 4.0 * index[7]  # same direction (a power of 2: exactly): a tie in cosine, broken toward 4
    queries[2] = index[7]
    ids, scores = ref.nearest_neighbours(queries, index, 9)
    for q in range(3):
        cos = [np.dot(queries[q], v) / np.linalg.norm(queries[q]) / np.linalg.norm(v) for v in index]
        order = sorted(range(9), key=lambda j: (-round(cos[j], 12), j))
        assert ids[q].tolist() == order
        assert np.allclose(scores[q], [cos[j] for j in order], atol=1e-12)
    assert ids[2, :2].tolist() == [4, 7] and np.allclose(scores[2, :2], 1.0)
    top2, _ = ref.nearest_neighbours(queries, index, 2)
    assert (top2 == ids[:, :2]).all()
    for bad in (0, 10):
        with pytest.raises(ValueError, match="k must be"):
            ref.nearest_neighbours(queries, index, bad)
    with pytest.raises(ValueError, match="embedding size"):
        ref.nearest_neighbours(queries[:, :4], index, 1)


# ---------------------------------------------------------------- tiny_mm.zeroshot against the reference


class FakeCLIP(nn.Module):
    """encode_text: token row [c, t] -> table[c, t]; encode_image: the first E pixels, flattened."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32), requires_grad=False)  # (C, T, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0], tokens[:, 1]]  # (P, E)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, : self.table.shape[-1]]  # (B, E)


def fake_tokenize(texts: list[str]) -> torch.Tensor:
    """'t{t} class{c}' -> [c, t]."""
    rows = [[int(s.split()[1][5:]), int(s.split()[0][1:])] for s in texts]
    return torch.tensor(rows, dtype=torch.long)  # (P, 2)


@pytest.mark.parametrize("C, T, E", [(7, 5, 16), (1, 1, 4), (3, 18, 32)])
def test_build_classifier_matches_reference(rng, C, T, E):
    table = rng.normal(size=(C, T, E)) * rng.uniform(0.3, 6.0, size=(C, T, 1))  # unequal prompt norms
    classes, templates = [f"class{c}" for c in range(C)], [f"t{t} {{}}" for t in range(T)]
    W = zs.build_classifier(FakeCLIP(table), classes, templates, fake_tokenize)
    assert rel_err(W.numpy(), ref.template_ensemble(table)) < 1e-5


def test_predict_matches_reference_cosine_logits(rng):
    E, C = 16, 5
    images = rng.normal(size=(6, 3, 4, 4))
    W = rng.normal(size=(E, C))
    W /= np.linalg.norm(W, axis=0)  # a classifier has unit columns
    logits = zs.predict(FakeCLIP(np.zeros((1, 1, E))), torch.tensor(images, dtype=torch.float32),
                        torch.tensor(W, dtype=torch.float32))
    assert rel_err(logits.numpy(), ref.cosine_logits(images.reshape(6, -1)[:, :E], W)) < 1e-5


@pytest.mark.parametrize("C", [2, 10, 30])
def test_accuracy_matches_reference(rng, C):
    logits = rng.normal(size=(200, C))  # continuous: no ties
    labels = rng.integers(0, C, size=200)
    ks = sorted({1, min(2, C), min(5, C), C})
    got = zs.accuracy(torch.tensor(logits), torch.tensor(labels), topk=ks)
    for k in ks:
        assert got[f"top{k}"] == pytest.approx(ref.topk_accuracy(logits, labels, k), abs=1e-12)


def test_accuracy_with_ties_lies_between_the_tie_rules(rng):
    """torch.topk breaks ties in no documented order: any rule must land between 'label first' and 'label last'."""
    C = 6
    logits = rng.integers(0, 3, size=(300, C)).astype(float)
    labels = rng.integers(0, C, size=300)
    got = zs.accuracy(torch.tensor(logits), torch.tensor(labels), topk=(1, 3))
    for k in (1, 3):
        label = logits[np.arange(300), labels][:, None]  # (B, 1)
        above, level = (logits > label).sum(1), (logits >= label).sum(1)  # level counts the label itself
        best, worst = np.mean(above < k), np.mean(level <= k)
        assert worst <= got[f"top{k}"] <= best
        assert worst <= ref.topk_accuracy(logits, labels, k) <= best
        assert worst < best  # the ties matter for this draw, so the bounds do constrain


def test_top1_accuracy_agrees_with_argmax_on_ties():
    logits = torch.zeros(8, 10)  # every class tied: argmax says class 0
    labels = torch.zeros(8, dtype=torch.long)
    assert zs.accuracy(logits, labels, topk=(1,))["top1"] == ref.topk_accuracy(logits.numpy(), labels.numpy(), 1)


def test_accuracy_k_past_c_is_capped_and_bad_k_raises(rng):
    logits, labels = rng.normal(size=(20, 3)), rng.integers(0, 3, size=20)
    got = zs.accuracy(torch.tensor(logits), torch.tensor(labels), topk=(1, 5))
    assert got["top5"] == 1.0 == ref.topk_accuracy(logits, labels, 3)  # documented: k capped at C
    with pytest.raises(ValueError, match="k must be"):
        ref.topk_accuracy(logits, labels, 5)  # the reference is strict
    with pytest.raises(ValueError, match="1..3"):
        zs.accuracy(torch.tensor(logits), torch.tensor(labels), topk=(0,))


def test_confusion_matrix_matches_reference(rng):
    for n, size in ((4, 120), (1, 5), (7, 0)):
        pred, labels = rng.integers(0, n, size=size), rng.integers(0, n, size=size)
        got = zs.confusion_matrix(torch.tensor(pred), torch.tensor(labels), n)
        assert got.dtype == torch.int64
        assert (got.numpy() == ref.confusion_matrix(pred, labels, n)).all()
    with pytest.raises(ValueError):
        zs.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="0..1"):
        zs.confusion_matrix(torch.tensor([-1]), torch.tensor([0]), 2)
