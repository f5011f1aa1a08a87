"""tiny_mm.perceiver against the NumPy reference of chapter 7 and against PyTorch's own counters.

- fourier_features / pixel_inputs: against the reference's float64 features.
- Perceiver, PerceiverIO: forward in float32 against the reference's float64
  blocks run on the same (randomised) weights, with and without shared
  weights and padding; parameters() against the reference's formulas.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around real modules
  against the reference's formulas, on random sizes.
- Training: a few steps overfit a tiny batch; save and load round-trips.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import chapters.ch07_perceiver.reference as ref
from tests.numerics import rel_err
from tiny_mm.layers import TransformerBlock
from tiny_mm.perceiver import (
    Perceiver, PerceiverConfig, PerceiverEncoder, PerceiverIO, fourier_features, pixel_inputs,
    train_pixel_classifier,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


def randomize(module: nn.Module, rng) -> None:
    """Fresh random values for every parameter, LayerNorm gains and biases included."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(0.3 * rng.standard_normal(tuple(p.shape))))


def weights(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The module's parameters under `prefix`, prefix removed, as float64 arrays."""
    return {k[len(prefix):]: v.detach().double().numpy()
            for k, v in module.state_dict().items() if k.startswith(prefix)}


def ref_encoder(encoder: PerceiverEncoder, inputs: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """The encoder in NumPy; shared weights as the Perceiver paper shares them, written out here."""
    c = encoder.config
    z = np.broadcast_to(weights(encoder, "")["latents"], (len(inputs), c.num_latents, c.width))  # (B, N, D)
    for r in range(c.repeats):
        cross = 0 if r == 0 else (1 if c.share_weights else r)  # the first read keeps its own weights
        latent = 0 if c.share_weights else r
        z = ref.cross_attention_block(z, inputs, weights(encoder, f"cross.{cross}."), c.cross_heads, lengths)
        for j in range(c.depth):
            z = ref.self_attention_block(z, weights(encoder, f"latent.{latent}.{j}."), c.heads)
    return z


def head(module: nn.Module, x: np.ndarray) -> np.ndarray:
    p = weights(module, "")
    return ref.layer_norm(x, p["ln_out.weight"], p["ln_out.bias"]) @ p["head.weight"].T + p["head.bias"]


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize("shape, K, mu", [((9,), 4, None), ((6, 7), 5, None), ((3, 4, 5), 3, (6, 8, 10)),
                                          ((24, 24), 6, None), ((5, 5), 1, None)])
def test_fourier_features_match_the_reference(shape, K, mu):
    expected = ref.fourier_features(shape, K, mu)
    assert rel_err(fourier_features(shape, K, mu), expected) < 1e-6  # float32
    assert rel_err(fourier_features(shape, K, mu, dtype=torch.float64), expected) < 1e-13


def test_pixel_inputs_are_channels_then_positions(rng):
    images = torch.from_numpy(rng.random((2, 3, 5, 7))).float()
    out = pixel_inputs(images, 4)
    assert out.shape == (2, 35, 3 + 2 * (2 * 4 + 1))
    for b in range(2):
        for y, x in ((0, 0), (2, 3), (4, 6)):
            assert torch.equal(out[b, y * 7 + x, :3], images[b, :, y, x])  # row-major pixels
    assert rel_err(out[1, :, 3:], ref.fourier_features((5, 7), 4)) < 1e-6


@pytest.mark.parametrize("call", [
    lambda: fourier_features((), 3), lambda: fourier_features((4, 0), 3), lambda: fourier_features((4,), 0),
    lambda: fourier_features((4, 4), 3, (4,)), lambda: fourier_features((4,), 3, dtype=torch.int64),
    lambda: pixel_inputs(torch.rand(3, 4, 4), 2), lambda: pixel_inputs(torch.ones(1, 3, 4, 4, dtype=torch.int64), 2),
])
def test_positions_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- the models


CONFIGS = [
    dict(num_latents=5, width=16, depth=1, heads=2, cross_heads=1, repeats=1, share_weights=False),
    dict(num_latents=7, width=24, depth=2, heads=3, cross_heads=2, repeats=3, share_weights=False),
    dict(num_latents=4, width=16, depth=2, heads=4, cross_heads=1, repeats=3, share_weights=True),
]


@pytest.mark.parametrize("sizes", CONFIGS, ids=["plain", "repeated", "shared"])
def test_perceiver_matches_the_reference(rng, sizes):
    C, M = 11, 23
    model = Perceiver(PerceiverConfig(input_dim=C, **sizes), num_classes=6)
    randomize(model, rng)
    inputs = rng.standard_normal((3, M, C))
    lengths = np.array([M, 9, 1])
    with torch.no_grad():
        out = model(torch.from_numpy(inputs).float(), torch.from_numpy(lengths))  # (3, 6)
        full = model(torch.from_numpy(inputs).float())  # no padding
    z = ref_encoder(model.encoder, inputs, lengths)  # (3, N, D)
    p = weights(model, "")
    pooled = ref.layer_norm(z, p["ln_out.weight"], p["ln_out.bias"]).mean(axis=1)  # (3, D)
    expected = pooled @ p["head.weight"].T + p["head.bias"]  # (3, 6)
    assert rel_err(out, expected) < 1e-5
    z_full = ref_encoder(model.encoder, inputs, None)
    pooled = ref.layer_norm(z_full, p["ln_out.weight"], p["ln_out.bias"]).mean(axis=1)
    assert rel_err(full, pooled @ p["head.weight"].T + p["head.bias"]) < 1e-5


@pytest.mark.parametrize("sizes", CONFIGS[1:], ids=["repeated", "shared"])
def test_perceiver_io_matches_the_reference(rng, sizes):
    C, M, O, E, P = 9, 17, 13, 12, 5
    model = PerceiverIO(PerceiverConfig(input_dim=C, **sizes), query_dim=E, output_dim=P)
    randomize(model, rng)
    inputs, queries = rng.standard_normal((2, M, C)), rng.standard_normal((2, O, E))
    with torch.no_grad():
        out = model(torch.from_numpy(inputs).float(), torch.from_numpy(queries).float())  # (2, O, P)
    z = ref_encoder(model.encoder, inputs, None)  # (2, N, D)
    decoded = ref.cross_attention_block(queries, z, weights(model, "decoder."), sizes["cross_heads"])  # (2, O, E)
    assert rel_err(out, head(model, decoded)) < 1e-5


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("repeats, share", [(1, False), (1, True), (2, True), (4, False), (4, True)])
def test_parameter_counts(repeats, share):
    config = PerceiverConfig(input_dim=29, num_latents=16, width=32, depth=2, heads=4, cross_heads=2,
                             repeats=repeats, share_weights=share)
    assert count(Perceiver(config, 5)) == ref.perceiver_params(29, 16, 32, 2, 5, repeats=repeats,
                                                                share_weights=share)
    assert count(PerceiverIO(config, 24, 7)) == ref.perceiver_io_params(29, 16, 32, 2, 24, 7, repeats=repeats,
                                                                         share_weights=share)


def test_shared_weights_are_one_module():
    encoder = PerceiverEncoder(PerceiverConfig(input_dim=5, width=16, heads=2, repeats=4, share_weights=True))
    crosses = [encoder.blocks(r)[0] for r in range(4)]
    latents = [encoder.blocks(r)[1] for r in range(4)]
    assert crosses[0] is not crosses[1] and crosses[1] is crosses[2] is crosses[3]
    assert latents[0] is latents[1] is latents[2] is latents[3]


def test_read_attention_is_a_distribution_over_the_real_inputs(rng):
    encoder = PerceiverEncoder(PerceiverConfig(input_dim=6, num_latents=5, width=16, cross_heads=2, heads=2))
    inputs = torch.from_numpy(rng.standard_normal((2, 10, 6))).float()
    probs = encoder.read_attention(inputs, torch.tensor([10, 4]))  # (2, 2, 5, 10)
    assert probs.shape == (2, 2, 5, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 5))
    assert torch.all(probs[1, :, :, 4:] == 0) and torch.all(probs[1, :, :, :4] > 0)


@pytest.mark.parametrize("call", [
    lambda: PerceiverConfig(input_dim=0), lambda: PerceiverConfig(input_dim=3, width=10, heads=4),
    lambda: PerceiverConfig(input_dim=3, width=16, cross_heads=3), lambda: PerceiverConfig(input_dim=3, repeats=0),
    lambda: PerceiverConfig(input_dim=3, share_weights=1), lambda: Perceiver(PerceiverConfig(input_dim=3), 0),
    lambda: PerceiverIO(PerceiverConfig(input_dim=3, cross_heads=2), 7, 2),
    lambda: Perceiver(PerceiverConfig(input_dim=3), 4)(torch.rand(2, 5, 4)),  # wrong C
    lambda: Perceiver(PerceiverConfig(input_dim=3), 4)(torch.rand(5, 3)),  # not (B, M, C)
    lambda: Perceiver(PerceiverConfig(input_dim=3), 4)(torch.ones(2, 5, 3, dtype=torch.int64)),
    lambda: Perceiver(PerceiverConfig(input_dim=3), 4)(torch.rand(2, 5, 3), torch.tensor([5, 6])),  # too long
    lambda: PerceiverIO(PerceiverConfig(input_dim=3), 8, 2)(torch.rand(2, 5, 3), torch.rand(2, 4, 9)),
    lambda: PerceiverIO(PerceiverConfig(input_dim=3), 8, 2)(torch.rand(2, 5, 3), torch.rand(3, 4, 8)),
])
def test_models_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- cost


def measured_flops(module: nn.Module, *args: torch.Tensor) -> int:
    # Not under no_grad: FlopCounterMode's module tracker trips over the views of the latent
    # parameter that no_grad makes (requires_grad without a grad_fn). The forward is counted alone.
    with FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def test_perceiver_io_flops_match_flop_counter(rng):
    for _ in range(4):
        B, M, O = int(rng.integers(1, 3)), int(rng.integers(5, 60)), int(rng.integers(1, 30))
        N, D, E = int(rng.integers(2, 12)), int(rng.choice([8, 16, 24])), int(rng.choice([8, 12]))
        C, P, L, R = int(rng.integers(3, 20)), int(rng.integers(1, 9)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        config = PerceiverConfig(input_dim=C, num_latents=N, width=D, depth=L, heads=int(rng.choice([1, 2, 4])),
                                 cross_heads=int(rng.choice([1, 2])), repeats=R, share_weights=bool(rng.integers(2)))
        model = PerceiverIO(config, E, P)
        got = measured_flops(model, torch.randn(B, M, C), torch.randn(B, O, E))
        assert got == ref.perceiver_io_flops(M, O, N, D, L, input_dim=C, query_dim=E, output_dim=P,
                                             repeats=R, batch=B)


def test_plain_encoder_flops_match_flop_counter(rng):
    M, C, D, L = int(rng.integers(10, 80)), int(rng.integers(3, 30)), 16, int(rng.integers(1, 4))
    encoder = nn.Sequential(nn.Linear(C, D), *(TransformerBlock(D, 2) for _ in range(L)))
    assert measured_flops(encoder, torch.randn(1, M, C)) == ref.transformer_encoder_flops(M, D, L, input_dim=C)


# --------------------------------------------------------------------------- training


def test_a_short_run_overfits_a_tiny_batch(rng):
    torch.manual_seed(0)
    images = torch.from_numpy(rng.random((8, 3, 8, 8))).float()
    labels = torch.arange(8) % 4
    model = Perceiver(PerceiverConfig(input_dim=3 + 2 * 9, num_latents=8, width=32, depth=1, heads=2), 4)
    inputs = pixel_inputs(images, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_train_pixel_classifier_runs_and_reports(tmp_path):
    run = train_pixel_classifier(steps=3, batch_size=8, train_size=32, test_size=16, image_size=12, num_bands=3)
    assert len(run.losses) == 3 and all(math.isfinite(x) for x in run.losses)
    assert 0.0 <= run.test_accuracy <= 1.0 and run.chance == pytest.approx(1 / 9) and len(run.class_names) == 9
    assert run.test_images.shape == (16, 3, 12, 12)
    # Saving and loading round-trips: the same logits from a fresh model.
    torch.save(run.model.state_dict(), tmp_path / "perceiver.pt")
    again = Perceiver(run.model.encoder.config, 9)
    again.load_state_dict(torch.load(tmp_path / "perceiver.pt", weights_only=True))
    inputs = pixel_inputs(run.test_images[:4], 3)
    run.model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(run.model(inputs), again(inputs))
    with pytest.raises(ValueError):
        train_pixel_classifier(steps=1, label="combo")
