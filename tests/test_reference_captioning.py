"""Chapter 6's NumPy reference against independent checks: finite differences and torch in float64.

The reference (chapters/ch06_captioning/reference.py) is what `tiny_mm.captioning`
is tested against, so it is checked here on its own: the masked cross-entropy
against torch's ``F.cross_entropy(ignore_index=...)``, its hand-derived gradient
against central finite differences and against autograd, and the decoder layer
against a float64 composition of torch's own modules (``nn.MultiheadAttention``,
``nn.LayerNorm``, ``nn.GELU``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chapters.ch06_captioning.reference as ref


def random_targets(rng, batch: int, length: int, vocab: int, pad: int = 0) -> np.ndarray:
    """Targets like a padded caption batch: each row has a random number >= 1 of real ids, then pad."""
    targets = rng.integers(1, vocab, size=(batch, length))  # never pad inside a caption
    lengths = rng.integers(1, length + 1, size=batch)
    targets[np.arange(length)[None, :] >= lengths[:, None]] = pad
    return targets


def test_teacher_forcing_shifts_by_one(rng):
    ids = rng.integers(0, 45, size=(3, 9))
    inputs, targets = ref.teacher_forcing(ids)
    assert inputs.shape == targets.shape == (3, 8)
    np.testing.assert_array_equal(inputs, ids[:, :8])
    np.testing.assert_array_equal(targets, ids[:, 1:])
    with pytest.raises(ValueError, match="T >= 2"):
        ref.teacher_forcing(ids[:, :1])


@pytest.mark.parametrize("pad", [0, 5])
def test_loss_equals_torch_cross_entropy_with_ignore_index(rng, pad):
    logits = rng.standard_normal((4, 7, 11)) * 3
    targets = random_targets(rng, 4, 7, 11, pad=pad)
    targets[targets == pad] = pad
    expected = F.cross_entropy(
        torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(targets).flatten(), ignore_index=pad
    )
    assert abs(ref.masked_cross_entropy(logits, targets, pad) - float(expected)) < 1e-12


def test_loss_is_the_mean_over_real_positions_only(rng):
    """Padded positions change neither the value nor the count: the loss of a padded batch equals
    the average of the per-caption sums divided by the number of real tokens."""
    logits = rng.standard_normal((3, 6, 9))
    targets = random_targets(rng, 3, 6, 9)
    moved = logits.copy()
    moved[targets == 0] += 100 * rng.standard_normal(((targets == 0).sum(), 9))  # garbage where pad
    assert ref.masked_cross_entropy(moved, targets) == pytest.approx(ref.masked_cross_entropy(logits, targets), abs=1e-12)
    # Written out one token at a time, with Python floats only.
    total, count = 0.0, 0
    for b in range(3):
        for t in range(6):
            if targets[b, t] != 0:
                row = logits[b, t]
                total += np.log(np.sum(np.exp(row))) - row[targets[b, t]]
                count += 1
    assert ref.masked_cross_entropy(logits, targets) == pytest.approx(total / count, rel=1e-12)


def test_gradient_matches_finite_differences(rng):
    logits = rng.standard_normal((2, 5, 7)) * 2
    targets = random_targets(rng, 2, 5, 7)
    grad = ref.masked_cross_entropy_grad(logits, targets)
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += eps
        down[index] -= eps
        numeric[index] = (ref.masked_cross_entropy(up, targets) - ref.masked_cross_entropy(down, targets)) / (2 * eps)
    assert np.linalg.norm(grad - numeric) / np.linalg.norm(numeric) < 1e-7


def test_gradient_matches_autograd_and_is_zero_on_padding(rng):
    logits = rng.standard_normal((5, 8, 13))
    targets = random_targets(rng, 5, 8, 13)
    assert (targets == 0).any() and (targets != 0).any()
    x = torch.from_numpy(logits).requires_grad_()
    F.cross_entropy(x.flatten(0, 1), torch.from_numpy(targets).flatten(), ignore_index=0).backward()
    grad = ref.masked_cross_entropy_grad(logits, targets)
    assert np.linalg.norm(grad - x.grad.numpy()) / np.linalg.norm(x.grad.numpy()) < 1e-12
    assert np.all(grad[targets == 0] == 0.0)


def test_loss_refuses_bad_input(rng):
    logits = rng.standard_normal((2, 3, 5))
    with pytest.raises(ValueError, match="every target is padding"):
        ref.masked_cross_entropy(logits, np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="shape"):
        ref.masked_cross_entropy(logits, np.ones((2, 4), dtype=int))
    with pytest.raises(ValueError, match="lie in"):
        ref.masked_cross_entropy(logits, np.full((2, 3), 5))
    with pytest.raises(ValueError, match="integer"):
        ref.masked_cross_entropy(logits, np.ones((2, 3)))
    bad = logits.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ref.masked_cross_entropy(bad, np.ones((2, 3), dtype=int))


def test_layer_norm_and_gelu_equal_torch(rng):
    x = rng.standard_normal((3, 4, 10)) * 2 + 1
    gain, bias = rng.standard_normal(10), rng.standard_normal(10)
    expected = F.layer_norm(torch.from_numpy(x), (10,), torch.from_numpy(gain), torch.from_numpy(bias))
    assert np.abs(ref.layer_norm(x, gain, bias) - expected.numpy()).max() < 1e-12
    assert np.abs(ref.gelu(x) - F.gelu(torch.from_numpy(x)).numpy()).max() < 1e-12


def _torch_layer(width: int, heads: int, generator: torch.Generator) -> tuple[nn.ModuleDict, dict]:
    """torch's own modules, float64, random weights; and their weights under the reference's names."""
    mods = nn.ModuleDict({
        "ln_1": nn.LayerNorm(width), "self_attn": nn.MultiheadAttention(width, heads, batch_first=True),
        "ln_2": nn.LayerNorm(width), "cross_attn": nn.MultiheadAttention(width, heads, batch_first=True),
        "ln_3": nn.LayerNorm(width), "c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width),
    }).double()
    with torch.no_grad():
        for p in mods.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * (0.3 if p.dim() > 1 else 0.5))
    params = {}
    for name in ("ln_1", "ln_2", "ln_3"):
        params[f"{name}.weight"] = mods[name].weight.detach().numpy()
        params[f"{name}.bias"] = mods[name].bias.detach().numpy()
    for name in ("self_attn", "cross_attn"):
        w = mods[name].in_proj_weight.detach().numpy()
        b = mods[name].in_proj_bias.detach().numpy()
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            params[f"{name}.{proj}.weight"] = w[i * width : (i + 1) * width]
            params[f"{name}.{proj}.bias"] = b[i * width : (i + 1) * width]
        params[f"{name}.out_proj.weight"] = mods[name].out_proj.weight.detach().numpy()
        params[f"{name}.out_proj.bias"] = mods[name].out_proj.bias.detach().numpy()
    params["mlp.c_fc.weight"], params["mlp.c_fc.bias"] = (mods["c_fc"].weight.detach().numpy(), mods["c_fc"].bias.detach().numpy())
    params["mlp.c_proj.weight"], params["mlp.c_proj.bias"] = (mods["c_proj"].weight.detach().numpy(), mods["c_proj"].bias.detach().numpy())
    return mods, params


@pytest.mark.parametrize("width, heads, length, patches", [(16, 2, 7, 9), (12, 3, 1, 4), (8, 1, 5, 16)])
def test_decoder_layer_equals_torch_modules_in_float64(rng, width, heads, length, patches):
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    mods, params = _torch_layer(width, heads, generator)
    x = rng.standard_normal((2, length, width))
    image = rng.standard_normal((2, patches, width))
    out, probs = ref.decoder_layer(x, image, params, heads)

    t, img = torch.from_numpy(x), torch.from_numpy(image)
    hidden = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)  # True = may not see
    with torch.no_grad():
        h = mods["ln_1"](t)
        t = t + mods["self_attn"](h, h, h, attn_mask=hidden, need_weights=False)[0]
        h = mods["ln_2"](t)
        read, weights = mods["cross_attn"](h, img, img, need_weights=True, average_attn_weights=False)
        t = t + read
        t = t + mods["c_proj"](F.gelu(mods["c_fc"](mods["ln_3"](t))))
    assert np.linalg.norm(out - t.numpy()) / np.linalg.norm(t.numpy()) < 1e-12
    assert probs.shape == (2, heads, length, patches)
    assert np.abs(probs - weights.numpy()).max() < 1e-12


def test_self_attention_is_causal(rng):
    """Changing the last word changes nothing at the earlier positions."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    _, params = _torch_layer(8, 2, generator)
    x, image = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 5, 8))
    changed = x.copy()
    changed[0, -1] += rng.standard_normal(8)
    a, _ = ref.decoder_layer(x, image, params, 2)
    b, _ = ref.decoder_layer(changed, image, params, 2)
    assert np.abs(a[0, :-1] - b[0, :-1]).max() < 1e-12
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3


def test_decoder_layer_refuses_mismatched_image(rng):
    generator = torch.Generator().manual_seed(0)
    _, params = _torch_layer(8, 2, generator)
    with pytest.raises(ValueError, match="image must have shape"):
        ref.decoder_layer(rng.standard_normal((1, 3, 8)), rng.standard_normal((2, 4, 8)), params, 2)
    with pytest.raises(ValueError, match="divisible"):
        ref.decoder_layer(rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 4, 8)), params, 3)
