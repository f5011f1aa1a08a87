"""tiny_mm.video_objectives: chapter 10's losses against the NumPy float64 reference, and its sampling.

- Every loss: value and autograd gradients against chapters/ch10_video_fusion/reference.py
  (hand-derived gradients, themselves checked by finite differences in
  tests/test_reference_video_fusion.py), in float64 (tight) and float32 (< 1e-5),
  on fresh random inputs; total_objective end to end, with non-default weights.
- shuffle_frames: how many clips it shuffles, that a shuffled clip holds its own
  frames in a new order (never the identity), that ordered clips are untouched,
  and that a seeded generator repeats it.
- modality_dropout: no example loses everything, each modality goes missing
  with the probability the rule implies (p - p^3 / 3), p = 0 drops nothing.
- ValueErrors on bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch10_video_fusion.reference as ref
from tests.numerics import rel_err
from tiny_mm.video_objectives import (
    PAIRS,
    ObjectiveWeights,
    action_loss,
    masked_modality_loss,
    modality_dropout,
    pairwise_contrastive_loss,
    shuffle_frames,
    temporal_order_loss,
    total_objective,
)

MODALITIES = ("video", "audio", "text")
LIMITS = {torch.float64: 1e-12, torch.float32: 1e-5}


def leaf(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=True)


def scalar_err(out: torch.Tensor, expected: float) -> float:
    return rel_err(out.reshape(1), np.array([expected]))


def inputs(rng, B: int = 6, C: int = 5, d: int = 4) -> dict:
    """Fresh float64 inputs of the whole objective (streams unnormalised, at different scales)."""
    ordered = rng.random(B) < 0.5
    ordered[0], ordered[-1] = True, False
    return dict(
        logits=rng.standard_normal((B, C)) * 2,
        labels=rng.integers(0, C, size=B),
        streams={m: rng.standard_normal((B, d)) * rng.uniform(0.5, 3) for m in MODALITIES},
        logit_scale=float(rng.uniform(1, 15)),
        recon_pred=rng.standard_normal((B, d)),
        recon_target=rng.standard_normal((B, d)),
        order_logits=rng.standard_normal(B) * 2,
        ordered=ordered,
    )


# --------------------------------------------------------------------------- each loss vs the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_action_loss_matches_reference(rng, dtype):
    x = inputs(rng)
    logits = leaf(x["logits"], dtype)
    loss = action_loss(logits, torch.from_numpy(x["labels"]))
    loss.backward()
    assert scalar_err(loss, ref.cross_entropy(x["logits"], x["labels"])) < LIMITS[dtype]
    assert rel_err(logits.grad, ref.cross_entropy_grad(x["logits"], x["labels"])) < LIMITS[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("present", [MODALITIES, ("video", "text"), ("audio", "text")])
def test_pairwise_contrastive_loss_matches_reference(rng, dtype, present):
    x = inputs(rng, B=7, d=5)
    streams = {m: x["streams"][m] for m in present}
    tensors = {m: leaf(v, dtype) for m, v in streams.items()}
    scale = torch.tensor(x["logit_scale"], dtype=dtype, requires_grad=True)  # a learnable scale
    total, parts = pairwise_contrastive_loss(tensors, scale)
    total.backward()
    expected_parts = [f"{a}-{b}" for a, b in PAIRS if a in present and b in present]
    assert list(parts) == expected_parts
    assert scalar_err(total, ref.pairwise_contrastive_loss(streams, x["logit_scale"])) < LIMITS[dtype]
    for name, value in parts.items():  # each part alone is the reference's loss of that pair
        a, b = name.split("-")
        pair = {a: streams[a], b: streams[b]}
        assert scalar_err(value, ref.pairwise_contrastive_loss(pair, x["logit_scale"])) < LIMITS[dtype]
    grads, d_scale = ref.pairwise_contrastive_loss_grad(streams, x["logit_scale"])
    for m in present:
        assert rel_err(tensors[m].grad, grads[m]) < LIMITS[dtype], m
    assert scalar_err(scale.grad, d_scale) < LIMITS[dtype]


def test_pairwise_contrastive_loss_takes_a_float_scale(rng):
    x = inputs(rng)
    total, _ = pairwise_contrastive_loss({m: torch.from_numpy(v) for m, v in x["streams"].items()}, 7.5)
    assert scalar_err(total, ref.pairwise_contrastive_loss(x["streams"], 7.5)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_modality_loss_matches_reference_and_leaves_the_target_alone(rng, dtype):
    x = inputs(rng)
    pred, target = leaf(x["recon_pred"], dtype), leaf(x["recon_target"], dtype)
    loss = masked_modality_loss(pred, target)
    loss.backward()
    assert scalar_err(loss, ref.masked_modality_loss(x["recon_pred"], x["recon_target"])) < LIMITS[dtype]
    assert rel_err(pred.grad, ref.masked_modality_loss_grad(x["recon_pred"], x["recon_target"])) < LIMITS[dtype]
    assert target.grad is None  # detached: the target is a label


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("head_shape", ["(B,)", "(B, 1)"])
def test_temporal_order_loss_matches_reference(rng, dtype, head_shape):
    x = inputs(rng)
    logits = leaf(x["order_logits"], dtype)
    given = logits if head_shape == "(B,)" else logits[:, None]
    loss = temporal_order_loss(given, torch.from_numpy(x["ordered"]))
    loss.backward()
    assert scalar_err(loss, ref.bce_with_logits(x["order_logits"], x["ordered"])) < LIMITS[dtype]
    assert rel_err(logits.grad, ref.bce_with_logits_grad(x["order_logits"], x["ordered"])) < LIMITS[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_total_objective_matches_reference_end_to_end(rng, dtype):
    x = inputs(rng)
    w = tuple(float(v) for v in rng.uniform(0.2, 1.0, size=3))  # not the defaults: each weight must be used
    t = {k: leaf(v, dtype) for k, v in x.items() if k in ("logits", "recon_pred", "recon_target", "order_logits")}
    streams = {m: leaf(v, dtype) for m, v in x["streams"].items()}
    scale = torch.tensor(x["logit_scale"], dtype=dtype, requires_grad=True)
    terms = {
        "action": action_loss(t["logits"], torch.from_numpy(x["labels"])),
        "contrastive": pairwise_contrastive_loss(streams, scale)[0],
        "masked": masked_modality_loss(t["recon_pred"], t["recon_target"]),
        "temporal": temporal_order_loss(t["order_logits"], torch.from_numpy(x["ordered"])),
    }
    loss = total_objective(terms, ObjectiveWeights(*w))
    loss.backward()
    assert scalar_err(loss, ref.total_objective(**x, weights=w)) < LIMITS[dtype]
    grads = ref.total_objective_grad(**x, weights=w)
    limit = LIMITS[dtype]
    assert rel_err(t["logits"].grad, grads["logits"]) < limit
    assert rel_err(t["recon_pred"].grad, grads["recon_pred"]) < limit
    assert rel_err(t["order_logits"].grad, grads["order_logits"]) < limit
    assert scalar_err(scale.grad, grads["logit_scale"]) < limit
    for m in MODALITIES:
        assert rel_err(streams[m].grad, grads["streams"][m]) < limit, m


def test_total_objective_weights(rng):
    values = {k: torch.tensor(float(v)) for k, v in zip(("action", "contrastive", "masked", "temporal"),
                                                         rng.uniform(0.5, 3, size=4))}
    a, c, m, t = (float(v) for v in values.values())
    assert ObjectiveWeights() == ObjectiveWeights(0.1, 0.05, 0.05)  # the textbook's lambdas
    assert abs(float(total_objective(values)) - (a + 0.1 * c + 0.05 * m + 0.05 * t)) < 1e-6
    w = ObjectiveWeights(0.7, 0.0, 2.0)
    assert abs(float(total_objective(values, w)) - (a + 0.7 * c + 2.0 * t)) < 1e-6
    assert abs(float(total_objective({"action": values["action"], "masked": values["masked"]}, w)) - a) < 1e-6
    assert abs(float(total_objective({"action": values["action"]})) - a) < 1e-6


# --------------------------------------------------------------------------- shuffle_frames


def frame_sources(shuffled: torch.Tensor, original: torch.Tensor) -> list[list[int]]:
    """For each clip, which original frame each output frame is (frames are all different)."""
    B, T = original.shape[:2]
    flat_out, flat_in = shuffled.reshape(B, T, -1), original.reshape(B, T, -1)
    sources = []
    for b in range(B):
        same = (flat_out[b][:, None, :] == flat_in[b][None, :, :]).all(-1)  # (T, T): output t is input s
        assert bool((same.sum(1) == 1).all()), f"clip {b}: an output frame is not one of its own frames"
        sources.append(same.int().argmax(1).tolist())
    return sources


@pytest.mark.parametrize("B, T, fraction", [(10, 8, 0.5), (7, 2, 0.5), (9, 4, 0.3), (5, 3, 1.0), (6, 5, 0.0)])
def test_shuffle_frames_shuffles_the_right_clips(rng, B, T, fraction):
    frames = torch.as_tensor(rng.standard_normal((B, T, 3, 2, 2)), dtype=torch.float32)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    out, ordered = shuffle_frames(frames, generator, fraction)
    assert out.shape == frames.shape and ordered.shape == (B,) and ordered.dtype == torch.bool
    assert int((~ordered).sum()) == round(fraction * B)
    for b, source in enumerate(frame_sources(out, frames)):
        assert sorted(source) == list(range(T))  # a permutation of the clip's own frames
        if ordered[b]:
            assert torch.equal(out[b], frames[b])
        else:
            assert source != list(range(T))  # never the identity


def test_shuffle_frames_is_reproducible_and_varies(rng):
    frames = torch.as_tensor(rng.standard_normal((16, 6, 3)))
    seed = int(rng.integers(2**31))
    first = shuffle_frames(frames, torch.Generator().manual_seed(seed))
    again = shuffle_frames(frames, torch.Generator().manual_seed(seed))
    other = shuffle_frames(frames, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert frames.shape == (16, 6, 3) and not torch.equal(first[0], frames)  # a new tensor; input intact


def test_shuffle_frames_rejects_bad_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        shuffle_frames(torch.zeros(4, 1, 3), g, 0.5)
    assert bool(shuffle_frames(torch.zeros(4, 1, 3), g, 0.0)[1].all())  # nothing to shuffle: fine
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="fraction"):
            shuffle_frames(torch.zeros(4, 3, 2), g, bad)
    with pytest.raises(ValueError, match="frames"):
        shuffle_frames(torch.zeros(4), g)
    with pytest.raises(ValueError, match="generator"):
        shuffle_frames(torch.zeros(4, 3), 0)


# --------------------------------------------------------------------------- modality_dropout


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_modality_dropout_frequency_and_rescue(p):
    B = 20_000
    present = modality_dropout(B, p, torch.Generator().manual_seed(1234))
    assert present.shape == (B, 3) and present.dtype == torch.bool
    assert bool(present.any(dim=1).all())  # nobody loses all three
    # Dropped with probability p; a row that lost all three (probability p^3) gets back one of
    # the three uniformly, so each modality ends up missing with probability p - p^3 / 3.
    q = p - p**3 / 3
    sigma = (q * (1 - q) / B) ** 0.5
    missing = (~present).double().mean(dim=0)  # (3,): per modality
    assert torch.all((missing - q).abs() < 6 * sigma), (missing, q)


def test_modality_dropout_p_zero_seed_and_device(rng):
    assert bool(modality_dropout(500, 0.0, torch.Generator().manual_seed(3)).all())
    seed = int(rng.integers(2**31))
    a = modality_dropout(64, 0.5, torch.Generator().manual_seed(seed))
    b = modality_dropout(64, 0.5, torch.Generator().manual_seed(seed))
    c = modality_dropout(64, 0.5, torch.Generator().manual_seed(seed + 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert modality_dropout(3, 0.5, None, device="cpu").device.type == "cpu"
    for bad in (-0.1, 1.0, "0.5", True):
        with pytest.raises(ValueError, match="p must"):
            modality_dropout(4, bad, None)
    for bad in (0, -2, 3.0, True):
        with pytest.raises(ValueError, match="batch"):
            modality_dropout(bad, 0.1, None)


# --------------------------------------------------------------------------- bad input


def test_losses_reject_bad_input(rng):
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="labels"):
        action_loss(logits, labels.float())
    with pytest.raises(ValueError, match="labels"):
        action_loss(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels"):
        action_loss(logits, labels[:3])
    with pytest.raises(ValueError, match="logits"):
        action_loss(logits[0], labels)
    s = {m: torch.randn(4, 5) for m in MODALITIES}
    with pytest.raises(ValueError, match="two modalities"):
        pairwise_contrastive_loss({"video": s["video"]}, 10.0)
    with pytest.raises(ValueError, match="same shape"):
        pairwise_contrastive_loss({**s, "audio": torch.randn(3, 5)}, 10.0)
    with pytest.raises(ValueError, match="keys among"):
        pairwise_contrastive_loss({**s, "depth": torch.randn(4, 5)}, 10.0)
    for bad in (-1.0, float("nan"), torch.ones(2)):
        with pytest.raises(ValueError, match="logit_scale"):
            pairwise_contrastive_loss(s, bad)
    with pytest.raises(ValueError, match="same shape"):
        masked_modality_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="ordered"):
        temporal_order_loss(torch.randn(4), torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="logits"):
        temporal_order_loss(torch.randn(4, 2), torch.ones(4, dtype=torch.bool))
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="action"):
        total_objective({"contrastive": one})
    with pytest.raises(ValueError, match="action"):
        total_objective({"action": one, "reconstruction": one})
    with pytest.raises(ValueError, match="0-dim"):
        total_objective({"action": torch.ones(2)})
    with pytest.raises(ValueError, match="weights"):
        total_objective({"action": one}, (0.1, 0.05, 0.05))
    with pytest.raises(ValueError, match="masked"):
        ObjectiveWeights(masked=-0.1)


# --------------------------------------------------------------------------- the tour stop


def test_tour_stop_holds_and_fails_loudly(monkeypatch, capsys):
    # The stop of `tinymm tour` for chapter 10: every check holds; a contrastive loss taken in one
    # direction only (the textbook's formula read literally, not CLIP's) must turn it False, saying FAIL.
    import torch.nn.functional as F

    from tiny_mm import video_objectives
    from tiny_mm.tour import video_fusion as stop

    assert stop.run(quick=True) is True
    assert "FAIL" not in capsys.readouterr().out

    def one_direction(a, b, scale):
        return F.cross_entropy(scale * a @ b.T, torch.arange(a.shape[0]))

    monkeypatch.setattr(video_objectives, "clip_loss", one_direction)
    assert stop.run(quick=True) is False
    assert "FAIL" in capsys.readouterr().out
