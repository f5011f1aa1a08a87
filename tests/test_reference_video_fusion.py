"""The NumPy reference of chapter 10 against independent computations.

- The block and the bottleneck layer against the PyTorch modules they describe
  (``tiny_mm.layers.TransformerBlock``, ``tiny_mm.video_fusion.BottleneckFusion``)
  holding the same random weights in float64, with text padding.
- Every loss value against torch's own functions (``F.cross_entropy``,
  ``F.binary_cross_entropy_with_logits``) or chapter 4's reference (CLIP's loss);
  every hand-derived gradient against central finite differences.
- ValueErrors on bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch04_contrastive.reference as ch04
import chapters.ch10_video_fusion.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.layers import TransformerBlock
from tiny_mm.video_fusion import MODALITIES, BottleneckFusion, VideoFusionConfig


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


# --------------------------------------------------------------------------- the fusion layer


def test_transformer_block_matches_the_module_with_padding(rng):
    d, heads, T = 12, 3, 7
    block = TransformerBlock(d, heads, mlp_ratio=2.0).double()
    randomize(block, rng)
    x = rng.standard_normal((3, T, d))
    lengths = np.array([T, 1, 4])  # a full row, the one-token edge case, and padding
    with torch.no_grad():
        expected = block(t(x), kv_lengths=t(lengths))
        expected_full = block(t(x))
    assert rel_err(t(ref.transformer_block(x, float64_weights(block), heads, lengths)), expected) < 1e-12
    assert rel_err(t(ref.transformer_block(x, float64_weights(block), heads)), expected_full) < 1e-12
    assert set(ref.BLOCK_KEYS) == set(block.state_dict())


@pytest.mark.parametrize("n_bottleneck", [0, 1, 3])
def test_bottleneck_layers_match_bottleneck_fusion(rng, n_bottleneck):
    """L reference layers from the module's own bottleneck tokens = BottleneckFusion.encode (float64)."""
    config = VideoFusionConfig(width=8, heads=2, layers=2, mlp_ratio=2.0, num_classes=3, n_bottleneck=n_bottleneck)
    model = BottleneckFusion(config).double()
    randomize(model, rng)
    B, tokens = 3, {"video": 5, "audio": 4, "text": 6}
    streams = {m: rng.standard_normal((B, tokens[m], 8)) for m in MODALITIES}
    lengths = np.array([6, 1, 3])
    with torch.no_grad():
        expected_streams, expected_z = model.encode(*(t(streams[m]) for m in MODALITIES), t(lengths))
    weights = float64_weights(model)
    z = np.broadcast_to(weights["bottleneck"], (B, n_bottleneck, 8))  # (B, nb, d)
    x = streams
    for layer in range(config.layers):
        params = {m: {k.split(f"encoders.{m}.{layer}.", 1)[1]: v for k, v in weights.items()
                      if k.startswith(f"encoders.{m}.{layer}.")} for m in MODALITIES}
        z, x = ref.bottleneck_fusion_layer(z, x, params, config.heads, lengths)
    assert z.shape == (B, n_bottleneck, 8)
    if n_bottleneck:
        assert rel_err(t(z), expected_z) < 1e-12
    for m in ("video", "audio"):
        assert rel_err(t(x[m]), expected_streams[m]) < 1e-12, m
    for b, n in enumerate(lengths):  # text tokens past an example's length are padding: not compared
        assert rel_err(t(x["text"][b, :n]), expected_streams["text"][b, :n]) < 1e-12


def test_bottleneck_layer_keeps_modalities_apart(rng):
    """In one layer the video outputs depend on z and video only; z_new on all three streams."""
    d, heads, B, nb = 8, 2, 2, 2
    params = {}
    for m in MODALITIES:
        block = TransformerBlock(d, heads, 2.0).double()
        randomize(block, rng)
        params[m] = float64_weights(block)
    z = rng.standard_normal((B, nb, d))
    streams = {m: rng.standard_normal((B, n, d)) for m, n in zip(MODALITIES, (3, 4, 5))}
    lengths = np.array([5, 2])
    z1, out1 = ref.bottleneck_fusion_layer(z, streams, params, heads, lengths)
    changed = dict(streams, audio=rng.standard_normal((B, 4, d)))
    z2, out2 = ref.bottleneck_fusion_layer(z, changed, params, heads, lengths)
    assert np.array_equal(out1["video"], out2["video"]) and np.array_equal(out1["text"], out2["text"])
    assert not np.allclose(z1, z2)
    padded = dict(streams, text=streams["text"].copy())
    padded["text"][1, 2:] = 100.0  # example 1 has two valid text tokens: the rest is padding
    z3, out3 = ref.bottleneck_fusion_layer(z, padded, params, heads, lengths)
    assert np.allclose(z1, z3, rtol=0, atol=1e-12) and np.allclose(out1["video"], out3["video"])
    assert np.allclose(out1["text"][1, :2], out3["text"][1, :2], rtol=0, atol=1e-12)


def test_block_and_layer_reject_bad_input(rng):
    block = float64_weights(TransformerBlock(8, 2).double())
    x = rng.standard_normal((2, 3, 8))
    for bad in ({k: v for k, v in block.items() if k != "attn.q_proj.bias"}, {**block, "extra": np.ones(1)}):
        with pytest.raises(ValueError, match="state_dict keys"):
            ref.transformer_block(x, bad, 2)
    with pytest.raises(ValueError, match="heads"):
        ref.transformer_block(x, block, 3)
    with pytest.raises(ValueError, match="kv_lengths"):
        ref.transformer_block(x, block, 2, np.array([4, 1]))
    with pytest.raises(ValueError, match="3-D"):
        ref.transformer_block(x[0], block, 2)
    z = rng.standard_normal((2, 1, 8))
    with pytest.raises(ValueError, match="params"):
        ref.bottleneck_fusion_layer(z, {"video": x, "audio": x}, {"video": block}, 2)
    with pytest.raises(ValueError, match="shape"):
        ref.bottleneck_fusion_layer(z, {"video": x[:1]}, {"video": block}, 2)
    with pytest.raises(ValueError, match="keys among"):
        ref.bottleneck_fusion_layer(z, {"depth": x}, {"depth": block}, 2)


# --------------------------------------------------------------------------- the objective: values


def test_loss_values_match_torch_and_chapter_4(rng):
    B, C, d = 6, 5, 4
    logits, labels = rng.standard_normal((B, C)) * 2, rng.integers(0, C, size=B)
    assert abs(ref.cross_entropy(logits, labels) - F.cross_entropy(t(logits), t(labels)).item()) < 1e-13

    order, ordered = rng.standard_normal(B) * 3, rng.random(B) < 0.5
    expected = F.binary_cross_entropy_with_logits(t(order), t(ordered).double()).item()
    assert abs(ref.bce_with_logits(order, ordered) - expected) < 1e-13
    extreme = np.array([800.0, -800.0, 30.0, -30.0])  # exp(800) overflows: the stable form must not
    truth = np.array([0, 1, 1, 0])
    expected = F.binary_cross_entropy_with_logits(t(extreme), t(truth).double()).item()
    assert abs(ref.bce_with_logits(extreme, truth) - expected) < 1e-10
    assert np.all(np.isfinite(ref.bce_with_logits_grad(extreme, truth)))

    pred, target = rng.standard_normal((B, d)), rng.standard_normal((B, d))
    expected = sum(float(np.dot(p - q, p - q)) for p, q in zip(pred, target)) / B  # row by row
    assert abs(ref.masked_modality_loss(pred, target) - expected) < 1e-12

    streams = {m: rng.standard_normal((B, d)) * rng.uniform(0.5, 3) for m in MODALITIES}  # unnormalised
    scale = rng.uniform(1, 20)
    expected = sum(ch04.clip_loss_raw(streams[a], streams[b], scale) for a, b in ref.PAIRS)
    assert abs(ref.pairwise_contrastive_loss(streams, scale) - expected) < 1e-12
    two = {"video": streams["video"], "text": streams["text"]}  # pairs with audio are skipped
    assert abs(ref.pairwise_contrastive_loss(two, scale) - ch04.clip_loss_raw(two["video"], two["text"], scale)) < 1e-12


def test_total_objective_weighs_each_term(rng):
    B, C, d = 5, 4, 3
    args = objective_inputs(rng, B, C, d)
    (logits, labels, streams, scale, pred, target, order, ordered) = args
    ce = F.cross_entropy(t(logits), t(labels)).item()
    contrast = sum(ch04.clip_loss_raw(streams[a], streams[b], scale) for a, b in ref.PAIRS)
    mask = float(np.mean(np.sum((pred - target) ** 2, axis=1)))
    temporal = F.binary_cross_entropy_with_logits(t(order), t(ordered).double()).item()
    expected = ce + 0.1 * contrast + 0.05 * mask + 0.05 * temporal  # the textbook's lambdas by default
    assert abs(ref.total_objective(*args) - expected) < 1e-12
    w = rng.uniform(0, 1, size=3)
    expected = ce + w[0] * contrast + w[1] * mask + w[2] * temporal
    assert abs(ref.total_objective(*args, weights=tuple(w)) - expected) < 1e-12
    assert abs(ref.total_objective(*args, weights=(0, 0, 0)) - ce) < 1e-13
    only_action = ref.total_objective(logits, labels, None, scale, None, None, None, None)
    assert abs(only_action - ce) < 1e-13


def test_objective_rejects_bad_input(rng):
    B, C, d = 4, 3, 2
    logits, labels, streams, scale, pred, target, order, ordered = objective_inputs(rng, B, C, d)
    with pytest.raises(ValueError, match="labels"):
        ref.cross_entropy(logits, labels.astype(float))
    with pytest.raises(ValueError, match="labels"):
        ref.cross_entropy(logits, np.full(B, C))
    with pytest.raises(ValueError, match="two modalities"):
        ref.pairwise_contrastive_loss({"video": streams["video"]}, scale)
    with pytest.raises(ValueError, match="same shape"):
        ref.pairwise_contrastive_loss({"video": streams["video"], "audio": streams["audio"][:2]}, scale)
    with pytest.raises(ValueError, match="logit_scale"):
        ref.pairwise_contrastive_loss(streams, -1.0)
    with pytest.raises(ValueError, match="share a shape"):
        ref.masked_modality_loss(pred, target[:, :1])
    with pytest.raises(ValueError, match="0 / 1"):
        ref.bce_with_logits(order, np.full(B, 0.5))
    with pytest.raises(ValueError, match="NaN"):
        ref.cross_entropy(np.full((B, C), np.nan), labels)
    with pytest.raises(ValueError, match="weights"):
        ref.total_objective(logits, labels, streams, scale, pred, target, order, ordered, weights=(0.1, -1, 0))


# --------------------------------------------------------------------------- the objective: gradients


def objective_inputs(rng, B: int, C: int, d: int) -> tuple:
    """Fresh (logits, labels, streams, logit_scale, recon_pred, recon_target, order_logits, ordered)."""
    ordered = rng.random(B) < 0.5
    ordered[0], ordered[-1] = True, False  # both classes present
    return (
        rng.standard_normal((B, C)) * 2,
        rng.integers(0, C, size=B),
        {m: rng.standard_normal((B, d)) * rng.uniform(0.5, 2) for m in MODALITIES},
        float(rng.uniform(1, 10)),
        rng.standard_normal((B, d)),
        rng.standard_normal((B, d)),
        rng.standard_normal(B) * 2,
        ordered,
    )


def check_grad(f, x, analytic, limit: float = 1e-7) -> None:
    numeric = ref.numerical_gradient(f, x)
    assert rel_err(t(np.asarray(analytic)), numeric) < limit


def test_single_loss_gradients_match_finite_differences(rng):
    B, C, d = 5, 4, 3
    logits, labels, streams, scale, pred, target, order, ordered = objective_inputs(rng, B, C, d)
    check_grad(lambda x: ref.cross_entropy(x, labels), logits, ref.cross_entropy_grad(logits, labels))
    check_grad(lambda x: ref.masked_modality_loss(x, target), pred, ref.masked_modality_loss_grad(pred, target))
    check_grad(lambda x: ref.bce_with_logits(x, ordered), order, ref.bce_with_logits_grad(order, ordered))
    a, b = ref.l2_normalize(streams["video"]), ref.l2_normalize(streams["text"])
    da, db, ds = ref.clip_loss_grad(a, b, scale)
    check_grad(lambda x: ref.clip_loss(x, b, scale), a, da)
    check_grad(lambda x: ref.clip_loss(a, x, scale), b, db)
    check_grad(lambda s: ref.clip_loss(a, b, float(s)), np.array(scale), ds)


@pytest.mark.parametrize("present", [MODALITIES, ("video", "audio"), ("audio", "text")])
def test_pairwise_contrastive_gradient_matches_finite_differences(rng, present):
    B, d = 4, 3
    streams = {m: rng.standard_normal((B, d)) * rng.uniform(0.5, 3) for m in present}
    scale = float(rng.uniform(1, 10))
    grads, d_scale = ref.pairwise_contrastive_loss_grad(streams, scale)
    assert set(grads) == set(present)
    for m in present:
        f = lambda x, m=m: ref.pairwise_contrastive_loss({**streams, m: x}, scale)  # noqa: E731
        check_grad(f, streams[m], grads[m])
    check_grad(lambda s: ref.pairwise_contrastive_loss(streams, float(s)), np.array(scale), d_scale)


@pytest.mark.parametrize("recon", ["array", "dict"])
def test_total_objective_gradient_matches_finite_differences(rng, recon):
    B, C, d = 4, 3, 3
    logits, labels, streams, scale, pred, target, order, ordered = objective_inputs(rng, B, C, d)
    if recon == "dict":  # L_mask summed over two hidden modalities
        pred = {"video": pred, "audio": rng.standard_normal((B, d))}
        target = {"video": target, "audio": rng.standard_normal((B, d))}
    weights = tuple(rng.uniform(0.2, 1, size=3))  # not the defaults: a weight applied twice would show
    args = dict(logits=logits, labels=labels, streams=streams, logit_scale=scale, recon_pred=pred,
                recon_target=target, order_logits=order, ordered=ordered, weights=weights)
    grads = ref.total_objective_grad(**args)
    assert set(grads) == {"logits", "streams", "logit_scale", "recon_pred", "order_logits"}

    def f(name, key=None):
        def value(x):
            if key is None:
                return ref.total_objective(**{**args, name: float(x) if name == "logit_scale" else x})
            return ref.total_objective(**{**args, name: {**args[name], key: x}})
        return value

    check_grad(f("logits"), logits, grads["logits"])
    check_grad(f("order_logits"), order, grads["order_logits"])
    check_grad(f("logit_scale"), np.array(scale), grads["logit_scale"])
    for m in MODALITIES:
        check_grad(f("streams", m), streams[m], grads["streams"][m])
    if recon == "dict":
        for m in pred:
            check_grad(f("recon_pred", m), pred[m], grads["recon_pred"][m])
    else:
        check_grad(f("recon_pred"), pred, grads["recon_pred"])


def test_total_objective_gradient_leaves_out_absent_terms(rng):
    logits, labels, _, scale, *_ = objective_inputs(rng, 4, 3, 2)
    grads = ref.total_objective_grad(logits, labels, None, scale, None, None, None, None)
    assert set(grads) == {"logits"}
    assert rel_err(t(grads["logits"]), ref.numerical_gradient(lambda x: ref.cross_entropy(x, labels), logits)) < 1e-7
