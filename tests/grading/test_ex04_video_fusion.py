"""Grader of exercise 4: a fusion model for video, audio and captions, its size, its fusion and its loss.

Nothing here is a number a learner could paste in:

- propose_config: the proposed sizes are built into a real
  tiny_mm.video_fusion model, run on a batch of tokens and counted.
- estimate_params: compared with sum(p.numel()) of the instantiated models,
  on random sizes drawn per run for each of the four strategies, and on the
  textbook's size (d = 1024, 12 layers, 16 heads) built on the meta device.
- bottleneck_layer: real TransformerBlocks with random weights, against the
  chapter's NumPy float64 reference (chapters/ch10_video_fusion/reference.py)
  given the same weights; then probes of what each output depends on
  (perturb one input, see which outputs move) and of the text padding.
- fusion_objective: value and gradients against the reference's
  `total_objective` and `total_objective_grad` on fresh random inputs.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex04` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import numbers
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import chapters.ch10_video_fusion.reference as ref
from tests.grading.conftest import Learner, check_close, fail
from tests.numerics import float64_weights, randomize, torch_encoder_layer
from tiny_mm.layers import TransformerBlock
from tiny_mm.video_fusion import MODALITIES, STRATEGIES, VideoFusionConfig

EXERCISE = "ex04_video_fusion"
BUDGET = 200_000
NUM_CLASSES = 32  # the chapter's action classes
DRAWS = 3  # random size sets per check
TV, TA, TT = 5, 4, 6  # tokens per stream in the layer checks: deliberately all different
KEYS = ("strategy", "width", "heads", "layers", "mlp_ratio", "n_bottleneck")


# ---------------------------------------------------------------- helpers


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_sizes(rng: np.random.Generator) -> dict[str, Any]:
    """Small sizes, every one different from the others; mlp_ratio sometimes not a whole number."""
    width = int(rng.choice([8, 12, 20, 24, 36]))
    return {
        "width": width,
        "heads": int(rng.choice([h for h in (1, 2, 4) if width % h == 0])),
        "layers": int(rng.integers(1, 4)),
        "mlp_ratio": float(rng.choice([1.0, 1.3, 2.0, 2.5, 4.0])),  # int(20 * 1.3) = 26: truncated
        "num_classes": int(rng.integers(2, 41)),
        "n_bottleneck": int(rng.integers(0, 7)),
    }


def built(strategy: str, sizes: dict[str, Any], device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return STRATEGIES[strategy](VideoFusionConfig(**sizes))


def call_text(strategy: str, sizes: dict[str, Any]) -> str:
    return f"estimate_params({strategy!r}, {', '.join(f'{k}={v}' for k, v in sizes.items())})"


def check_estimate(learner: Learner, strategy: str, sizes: dict[str, Any], device: str = "cpu") -> None:
    expected = count(built(strategy, sizes, device))
    got = learner.call("estimate_params", strategy, **sizes)
    call = call_text(strategy, sizes)
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        fail(f"{call} returned {type(got).__name__} {got!r}; return an int")
    if int(got) != expected:
        fail(f"{call} returned {int(got):,}; the instantiated model has {expected:,} "
             f"(off by {int(got) - expected:+,})")


def proposed(learner: Learner) -> tuple[dict[str, Any], nn.Module]:
    """The learner's config, checked, and the model it builds."""
    config = learner.call("propose_config")
    if not isinstance(config, dict) or set(config) != set(KEYS):
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        fail(f"propose_config must return a dict with exactly the keys {list(KEYS)}, got {keys}")
    strategy = config["strategy"]
    if strategy not in STRATEGIES:
        fail(f"strategy {strategy!r} is not one of tiny_mm.video_fusion's {sorted(STRATEGIES)}")
    sizes = {k: config[k] for k in KEYS if k != "strategy"}
    if strategy == "bottleneck" and sizes["n_bottleneck"] == 0:
        fail("bottleneck fusion with n_bottleneck = 0 does not fuse: its three streams never meet "
             "before the head (give it at least one shared token)")
    try:
        torch.manual_seed(0)
        model = STRATEGIES[strategy](VideoFusionConfig(**sizes, num_classes=NUM_CLASSES))
    except (ValueError, TypeError) as exc:
        fail(f"VideoFusionConfig rejects {config}: {exc}")
    return config, model


def tokens(rng: np.random.Generator, batch: int, d: int, lengths: dict[str, int],
           dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {m: torch.as_tensor(rng.standard_normal((batch, lengths[m], d)), dtype=dtype) for m in MODALITIES}


def text_lengths(rng: np.random.Generator, batch: int) -> torch.Tensor:
    """(batch,) valid text tokens: one full row, one row of a single token, the rest random."""
    lengths = torch.as_tensor(rng.integers(1, TT + 1, size=batch))
    lengths[0] = TT
    lengths[1] = 1
    return lengths


def make_blocks(rng: np.random.Generator, d: int = 12, heads: int = 3, mlp_ratio: float = 2.0,
                dtype: torch.dtype = torch.float32) -> dict[str, TransformerBlock]:
    """One TransformerBlock per modality, every parameter random (no term hides behind a 0 or 1)."""
    blocks = {}
    for m in MODALITIES:
        block = TransformerBlock(d, heads, mlp_ratio)
        randomize(block, rng)
        blocks[m] = block.to(dtype).eval()
    return blocks


def run_layer(learner: Learner, blocks: dict[str, TransformerBlock], z: torch.Tensor,
              streams: dict[str, torch.Tensor], lengths: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """Call bottleneck_layer (without autograd) and check the shapes of what comes back."""
    with torch.no_grad():
        result = learner.call("bottleneck_layer", blocks, z, dict(streams), lengths)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        fail(f"bottleneck_layer must return a pair (z_new, streams_new), got {type(result).__name__}")
    z_new, new = result
    if not isinstance(z_new, torch.Tensor) or tuple(z_new.shape) != tuple(z.shape):
        fail(f"z_new must have the shape of z, {tuple(z.shape)} (B, nb, d), got {getattr(z_new, 'shape', z_new)}")
    if not isinstance(new, dict) or set(new) != set(MODALITIES):
        fail(f"streams_new must be a dict with keys {MODALITIES}, got {type(new).__name__}")
    for m in MODALITIES:
        if not isinstance(new[m], torch.Tensor) or tuple(new[m].shape) != tuple(streams[m].shape):
            fail(f"streams_new[{m!r}] must keep the shape {tuple(streams[m].shape)} of streams[{m!r}], "
                 f"got {getattr(new[m], 'shape', new[m])}")
    return z_new, new


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def moved(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative change of b against a (float64 inputs: 0 means bit for bit, up to rounding)."""
    return float((a - b).norm() / a.norm().clamp_min(1e-300)) if a.numel() else 0.0


def layer_where(nb: int, lengths: torch.Tensor | None) -> str:
    pad = "no padding" if lengths is None else f"text_lengths={lengths.tolist()}"
    return f"B=3, nb={nb}, d=12, Tv={TV}, Ta={TA}, Tt={TT}, {pad}"


# ---------------------------------------------------------------- 1. propose_config


@pytest.mark.points(1)
def test_config_builds(learner, rng):
    """propose_config builds a tiny_mm.video_fusion model that fuses"""
    config, model = proposed(learner)
    d = config["width"]
    x = tokens(rng, 2, d, {"video": 16, "audio": 16, "text": 5}, torch.float32)
    with torch.no_grad():
        logits = model(x["video"], x["audio"], x["text"], torch.tensor([5, 3]))
    if tuple(logits.shape) != (2, NUM_CLASSES) or not torch.isfinite(logits).all():
        fail(f"the model of {config} gives logits of shape {tuple(logits.shape)}, expected (2, 32), finite")


@pytest.mark.points(1)
def test_config_within_budget(learner):
    """propose_config fits the budget of 200,000 parameters"""
    config, model = proposed(learner)
    n = count(model)
    if n > BUDGET:
        fail(f"the model of {config} has {n:,} parameters, over the budget of {BUDGET:,}")


# ---------------------------------------------------------------- 2. estimate_params


@pytest.mark.points(1)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_estimate_counts_models(learner, rng, strategy):
    """estimate_params counts the instantiated model"""
    for _ in range(DRAWS):
        check_estimate(learner, strategy, random_sizes(rng), "meta")


@pytest.mark.points(1)
def test_estimate_at_textbook_size(learner):
    """estimate_params at the textbook's size (d = 1024, 12 layers, meta device)"""
    sizes = {"width": 1024, "heads": 16, "layers": 12, "mlp_ratio": 4.0, "num_classes": 400, "n_bottleneck": 4}
    for strategy in sorted(STRATEGIES):
        check_estimate(learner, strategy, sizes, "meta")  # shapes only: 150M+ parameters, no memory


@pytest.mark.points(1)
def test_estimate_builds_nothing(learner, rng):
    """estimate_params is a formula (it builds no nn.Module)"""

    def refuse(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("estimate_params must not build an nn.Module: "
                           "write the count as a formula of the sizes")

    sizes = random_sizes(rng)
    with mock.patch.object(nn.Module, "__init__", refuse):
        got = learner.call("estimate_params", "cross", **sizes)
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        fail(f"{call_text('cross', sizes)} returned {type(got).__name__} {got!r}; return an int")


BAD: list[tuple[Any, ...]] = [
    ("middle", 32, 4, 2, 4.0, 32, 4),  # no such strategy
    ("late", 0, 4, 2, 4.0, 32, 4),
    ("early", 30, 4, 2, 4.0, 32, 4),  # heads do not divide the width
    ("cross", 32, 4, -1, 4.0, 32, 4),
    ("late", 32, 4, 2, 4.0, 0, 4),
    ("bottleneck", 32, 4, 2, 4.0, 32, -1),
    ("early", 32.0, 4, 2, 4.0, 32, 4),
    ("late", 32, 4, True, 4.0, 32, 4),
]


@pytest.mark.points(1)
def test_estimate_rejects_bad_sizes(learner):
    """estimate_params raises ValueError on sizes no model has"""
    for args in BAD:
        learner.raises(ValueError, "estimate_params", *args)


# ---------------------------------------------------------------- 3. bottleneck_layer


def reference_layer(blocks: dict[str, TransformerBlock], z: torch.Tensor, streams: dict[str, torch.Tensor],
                    lengths: torch.Tensor | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The chapter's NumPy float64 layer with the blocks' weights."""
    params = {m: float64_weights(blocks[m]) for m in MODALITIES}
    heads = blocks["video"].heads
    z_ref, new_ref = ref.bottleneck_fusion_layer(
        as_numpy(z), {m: as_numpy(streams[m]) for m in MODALITIES}, params, heads,
        None if lengths is None else lengths.numpy())
    return np.asarray(z_ref), {m: np.asarray(new_ref[m]) for m in MODALITIES}


def check_layer_against_reference(learner: Learner, rng: np.random.Generator, nb: int, padded: bool) -> None:
    blocks = make_blocks(rng)
    z = torch.as_tensor(rng.standard_normal((3, nb, 12)), dtype=torch.float32)
    streams = tokens(rng, 3, 12, {"video": TV, "audio": TA, "text": TT}, torch.float32)
    lengths = text_lengths(rng, 3) if padded else None
    z_new, new = run_layer(learner, blocks, z, streams, lengths)
    z_ref, new_ref = reference_layer(blocks, z, streams, lengths)
    where = layer_where(nb, lengths)
    check_close("z_new", z_new, z_ref, where)
    for m in MODALITIES:
        got, expected = new[m], new_ref[m]
        if m == "text" and lengths is not None:  # padding positions are meaningless: compare the valid ones
            keep = (torch.arange(TT)[None, :] < lengths[:, None]).numpy()  # (B, Tt)
            got, expected = got[torch.from_numpy(keep)], expected[keep]
        check_close(f"streams_new[{m!r}]", got, expected, where)


@pytest.mark.points(1)
def test_layer_shapes(learner, rng):
    """bottleneck_layer returns (z_new (B, nb, d), streams of unchanged shapes)"""
    blocks = make_blocks(rng)
    nb = int(rng.integers(1, 5))
    z = torch.as_tensor(rng.standard_normal((3, nb, 12)), dtype=torch.float32)
    streams = tokens(rng, 3, 12, {"video": TV, "audio": TA, "text": TT}, torch.float32)
    run_layer(learner, blocks, z, streams, text_lengths(rng, 3))


@pytest.mark.points(3)
def test_layer_matches_reference(learner, rng):
    """bottleneck_layer equals the reference (padded text)"""
    for nb in (1, int(rng.integers(2, 6))):
        check_layer_against_reference(learner, rng, nb, padded=True)


@pytest.mark.points(1)
def test_layer_matches_reference_unpadded(learner, rng):
    """bottleneck_layer equals the reference (text_lengths=None)"""
    check_layer_against_reference(learner, rng, int(rng.integers(1, 5)), padded=False)


@pytest.mark.points(2)
def test_layer_ignores_text_padding(learner, rng):
    """bottleneck_layer: changing the text's padding changes nothing"""
    blocks = make_blocks(rng, dtype=torch.float64)
    nb = int(rng.integers(1, 5))
    z = torch.as_tensor(rng.standard_normal((3, nb, 12)))
    streams = tokens(rng, 3, 12, {"video": TV, "audio": TA, "text": TT})
    lengths = text_lengths(rng, 3)
    pad = torch.arange(TT)[None, :] >= lengths[:, None]  # (B, Tt): True = a padding token
    noisy = dict(streams, text=streams["text"].clone())
    noisy["text"][pad] = torch.as_tensor(100 * rng.standard_normal((int(pad.sum()), 12)))
    z_a, a = run_layer(learner, blocks, z, streams, lengths)
    z_b, b = run_layer(learner, blocks, z, noisy, lengths)
    outputs = {"z_new": (z_a, z_b), "video": (a["video"], b["video"]), "audio": (a["audio"], b["audio"]),
               "text (valid tokens)": (a["text"][~pad], b["text"][~pad])}
    for name, (before, after) in outputs.items():
        if moved(before, after) > 1e-12:
            fail(f"{name} changed when only the text's padding tokens did (text_lengths={lengths.tolist()}): "
                 "no token may attend to padding; the text block's kv_lengths is nb + text_lengths")


@pytest.mark.points(1)
@pytest.mark.parametrize("modality", MODALITIES)
def test_layer_wiring(learner, rng, modality):
    """bottleneck_layer: a stream reads only z and itself, z_new all three"""
    blocks = make_blocks(rng, dtype=torch.float64)
    nb = int(rng.integers(1, 5))
    z = torch.as_tensor(rng.standard_normal((3, nb, 12)))
    streams = tokens(rng, 3, 12, {"video": TV, "audio": TA, "text": TT})
    z_a, a = run_layer(learner, blocks, z, streams, None)
    for other in MODALITIES:
        if other == modality:
            continue
        noise = torch.as_tensor(rng.standard_normal(tuple(streams[other].shape)))
        changed = dict(streams, **{other: streams[other] + noise})
        z_b, b = run_layer(learner, blocks, z, changed, None)
        if moved(a[modality], b[modality]) > 1e-12:
            fail(f"the {modality} tokens changed when only the {other} tokens did: in one layer the "
                 f"{modality} block may read only [z; {modality}] (the others reach it through z, next layer)")
        if moved(z_a, z_b) < 1e-6:
            fail(f"z_new did not change when the {other} tokens did: z_new is the mean of the three "
                 "modalities' copies of the bottleneck")


@pytest.mark.points(1)
def test_layer_without_bottleneck(learner, rng):
    """bottleneck_layer with nb = 0: three independent streams"""
    blocks = make_blocks(rng, dtype=torch.float64)
    z = torch.zeros(3, 0, 12, dtype=torch.float64)
    streams = tokens(rng, 3, 12, {"video": TV, "audio": TA, "text": TT})
    lengths = text_lengths(rng, 3)
    _, new = run_layer(learner, blocks, z, streams, lengths)
    pad = torch.arange(TT)[None, :] >= lengths[:, None]  # (B, Tt)
    for m in MODALITIES:
        # PyTorch's own encoder layer with the block's weights: each stream alone, as in late fusion.
        with torch.no_grad():
            layer = torch_encoder_layer(blocks[m])
            alone = layer(streams[m], src_key_padding_mask=pad if m == "text" else None)  # (B, T_m, d)
        got, expected = new[m], alone
        if m == "text":
            got, expected = got[~pad], expected[~pad]
        check_close(f"streams_new[{m!r}]", got, expected.numpy(), f"nb=0 ({m} through its own block alone)",
                    tol=1e-10)


# ---------------------------------------------------------------- 4. fusion_objective


def objective_inputs(rng: np.random.Generator, batch: int, d: int, classes: int) -> dict[str, Any]:
    """Fresh float64 inputs of the objective, as NumPy (labels and ordered as ints / bools)."""
    return {
        "logits": 2 * rng.standard_normal((batch, classes)),
        "labels": rng.integers(0, classes, size=batch),
        "streams": {m: rng.standard_normal((batch, d)) * rng.uniform(0.5, 3.0) for m in MODALITIES},
        "logit_scale": float(rng.uniform(2.0, 20.0)),
        "recon_pred": rng.standard_normal((batch, d)),
        "recon_target": rng.standard_normal((batch, d)),
        "order_logits": 2 * rng.standard_normal(batch),
        "ordered": rng.random(batch) < 0.5,
    }


def as_torch(inputs: dict[str, Any], requires_grad: bool = False) -> dict[str, Any]:
    """The inputs as float32 tensors (labels long, ordered bool); the differentiable ones require grad."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, requires_grad=requires_grad)  # noqa: E731
    return {
        "logits": f32(inputs["logits"]),
        "labels": torch.as_tensor(inputs["labels"], dtype=torch.long),
        "streams": {m: f32(x) for m, x in inputs["streams"].items()},
        "logit_scale": inputs["logit_scale"],
        "recon_pred": f32(inputs["recon_pred"]),
        "recon_target": f32(inputs["recon_target"]),
        "order_logits": f32(inputs["order_logits"]),
        "ordered": torch.as_tensor(inputs["ordered"], dtype=torch.bool),
    }


def objective(learner: Learner, tensors: dict[str, Any], weights: tuple[float, float, float] | None) -> torch.Tensor:
    """Call fusion_objective (weights None: its default) and check it returns a 0-dim tensor."""
    loss = learner.call("fusion_objective", **tensors, **({} if weights is None else {"weights": weights}))
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        fail(f"fusion_objective must return a 0-dim tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    return loss


def check_value(loss: torch.Tensor, expected: float, where: str, tol: float = 1e-5) -> None:
    """Fail unless the learner's 0-dim loss is within relative error tol of the float64 reference."""
    got = float(loss.detach())
    if not np.isfinite(got):
        fail(f"the objective is {got} for {where}")
    err = abs(got - expected) / abs(expected)
    if not err < tol:
        fail(f"the objective is {got:.6g}, the reference gives {expected:.6g} (rel err {err:.2g}) for {where}")


def random_weights(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(w) for w in rng.uniform(0.05, 1.5, size=3))


def objective_where(inputs: dict[str, Any], weights: tuple[float, ...]) -> str:
    b, c = inputs["logits"].shape
    d = inputs["streams"]["video"].shape[1]
    shown = ", ".join(f"{w:.3g}" for w in weights)
    return f"B={b}, C={c}, d={d}, logit_scale={inputs['logit_scale']:.3g}, weights=({shown})"


@pytest.mark.points(3)
def test_objective_matches_reference(learner, rng):
    """fusion_objective equals the reference"""
    for batch, d, classes in ((6, 8, 5), (int(rng.integers(2, 12)), int(rng.integers(3, 20)), NUM_CLASSES)):
        inputs, weights = objective_inputs(rng, batch, d, classes), random_weights(rng)
        loss = objective(learner, as_torch(inputs), weights)
        check_value(loss, ref.total_objective(**inputs, weights=weights), objective_where(inputs, weights))
    inputs = objective_inputs(rng, 5, 7, 9)  # the default weights: the textbook's (0.1, 0.05, 0.05)
    loss = objective(learner, as_torch(inputs), None)
    check_value(loss, ref.total_objective(**inputs), objective_where(inputs, (0.1, 0.05, 0.05)) + " (the default)")


@pytest.mark.points(2)
def test_objective_gradients(learner, rng):
    """fusion_objective's gradients equal the reference's"""
    inputs, weights = objective_inputs(rng, 7, 10, 6), random_weights(rng)
    tensors = as_torch(inputs, requires_grad=True)
    tensors["recon_target"].requires_grad_(False)
    loss = objective(learner, tensors, weights)
    if not loss.requires_grad:
        fail("the objective does not depend on its inputs through autograd: use torch operations only")
    loss.backward()
    expected = ref.total_objective_grad(**inputs, weights=weights)
    where = objective_where(inputs, weights)
    wrt = [("logits", tensors["logits"], expected["logits"]),
           *((f"streams[{m!r}]", tensors["streams"][m], expected["streams"][m]) for m in MODALITIES),
           ("recon_pred", tensors["recon_pred"], expected["recon_pred"]),
           ("order_logits", tensors["order_logits"], expected["order_logits"])]
    for name, tensor, grad in wrt:
        if tensor.grad is None:
            fail(f"no gradient reached {name} ({where})")
        check_close(f"the gradient w.r.t. {name}", tensor.grad, np.asarray(grad), where)


@pytest.mark.points(1)
def test_objective_weights(learner, rng):
    """fusion_objective: each weight scales its own term (0 drops it)"""
    inputs = objective_inputs(rng, 6, 8, 7)
    w = float(rng.uniform(0.2, 2.0))
    for weights in ((0.0, 0.0, 0.0), (w, 0.0, 0.0), (0.0, w, 0.0), (0.0, 0.0, w)):
        loss = objective(learner, as_torch(inputs), weights)
        check_value(loss, ref.total_objective(**inputs, weights=weights), objective_where(inputs, weights))


@pytest.mark.points(1)
def test_objective_normalises_streams(learner, rng):
    """fusion_objective: scaling a stream's rows changes nothing"""
    inputs, weights = objective_inputs(rng, 8, 6, 5), random_weights(rng)
    scaled = dict(inputs, streams={m: x * rng.uniform(0.05, 20.0, size=(8, 1)) for m, x in inputs["streams"].items()})
    loss = objective(learner, as_torch(scaled), weights)
    check_value(loss, ref.total_objective(**inputs, weights=weights),
                "streams' rows scaled by 0.05..20 (the contrastive loss compares directions: L2-normalise each row)")


@pytest.mark.points(1)
def test_objective_target_is_detached(learner, rng):
    """fusion_objective: no gradient flows into recon_target"""
    tensors = as_torch(objective_inputs(rng, 5, 6, 4), requires_grad=True)
    loss = objective(learner, tensors, random_weights(rng))
    if not loss.requires_grad:
        fail("the objective does not depend on its inputs through autograd: use torch operations only")
    loss.backward()
    grad = tensors["recon_target"].grad
    if grad is not None and bool(grad.abs().max() > 0):
        fail("a gradient reached recon_target: it is the target of the reconstruction, not something "
             "to move towards the prediction (use recon_target.detach())")
