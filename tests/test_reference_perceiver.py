"""The NumPy reference of chapter 7 against the definitions it implements, and the sources' numbers.

- Fourier features: every entry recomputed one scalar at a time with the
  `math` module from the Perceiver's definition (coordinates in [-1, 1],
  frequencies linspace(1, mu / 2, K), sin and cos of pi f x, coordinates first).
- The blocks: LayerNorm and GELU against torch's own functions in float64,
  attention against ``torch.nn.functional.scaled_dot_product_attention``.
- The FLOP formulas: their shape (linear in inputs and outputs, quadratic for
  a plain encoder) by finite differences; the exact counts are checked
  against the real modules with FlopCounterMode in tests/test_perceiver.py.
- The sources' numbers, recomputed by plain arithmetic.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch07_perceiver.reference as ref
from tests.numerics import rel_err


def scalar_fourier(point: tuple[int, ...], shape: tuple[int, ...], K: int, mu: tuple[int, ...]) -> list[float]:
    """The features of one grid point, straight from the definition, one number at a time."""
    coords = [-1.0 + 2.0 * i / (n - 1) if n > 1 else -1.0 for i, n in zip(point, shape)]
    freqs = [[1.0 + (m / 2.0 - 1.0) * k / (K - 1) if K > 1 else 1.0 for k in range(K)] for m in mu]
    sines = [math.sin(math.pi * f * x) for x, fs in zip(coords, freqs) for f in fs]
    cosines = [math.cos(math.pi * f * x) for x, fs in zip(coords, freqs) for f in fs]
    return coords + sines + cosines


@pytest.mark.parametrize("shape, K, mu", [((7,), 3, None), ((5, 6), 4, None), ((3, 4, 5), 2, (8, 9, 10)),
                                          ((6, 6), 1, (12, 12)), ((1, 4), 3, None)])
def test_fourier_features_follow_the_definition(shape, K, mu):
    out = ref.fourier_features(shape, K, mu)
    d = len(shape)
    assert out.shape == (math.prod(shape), d * (2 * K + 1)) == (math.prod(shape), ref.fourier_feature_count(d, K))
    expected = [scalar_fourier(point, shape, K, mu or shape) for point in np.ndindex(*shape)]  # row-major
    assert rel_err(torch.from_numpy(out), np.array(expected)) < 1e-13


def test_fourier_frequencies_run_from_one_to_half_the_resolution():
    """On a 1-D grid, the first sine has frequency 1 and the last mu / 2: read them off the values."""
    mu, K = 16, 5
    out = ref.fourier_features((mu,), K)
    x = out[:, 0]
    assert x[0] == -1.0 and x[-1] == 1.0 and np.all(np.diff(x) > 0)
    for k, f in ((0, 1.0), (K - 1, mu / 2)):
        assert np.allclose(out[:, 1 + k], np.sin(np.pi * f * x), atol=1e-14)
        assert np.allclose(out[:, 1 + K + k], np.cos(np.pi * f * x), atol=1e-14)


@pytest.mark.parametrize("bad", [dict(shape=(), num_bands=2), dict(shape=(4, 0), num_bands=2),
                                 dict(shape=(4,), num_bands=0), dict(shape=(4, 4), num_bands=2, max_resolution=(4,)),
                                 dict(shape=(4,), num_bands=2.0)])
def test_fourier_features_reject_bad_sizes(bad):
    with pytest.raises(ValueError):
        ref.fourier_features(**bad)


def test_layer_norm_gelu_and_attention_match_torch(rng):
    x = rng.standard_normal((2, 5, 8))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    t = torch.from_numpy
    assert rel_err(torch.from_numpy(ref.layer_norm(x, w, b)), F.layer_norm(t(x), (8,), t(w), t(b))) < 1e-13
    assert rel_err(torch.from_numpy(ref.gelu(x)), F.gelu(t(x))) < 1e-13

    E, C, heads = 8, 6, 2
    p = {f"a.{n}_proj.weight": rng.standard_normal((E, C if n in "kv" else E)) for n in ("q", "k", "v", "out")}
    p |= {f"a.{n}_proj.bias": rng.standard_normal(E) for n in ("q", "k", "v", "out")}
    query, context = rng.standard_normal((2, 3, E)), rng.standard_normal((2, 7, C))
    lengths = np.array([7, 4])
    out = ref.attention(query, context, p, heads, "a", lengths)  # (2, 3, E)
    q, k, v = (t(a) @ t(p[f"a.{n}_proj.weight"]).T + t(p[f"a.{n}_proj.bias"])
               for a, n in ((query, "q"), (context, "k"), (context, "v")))
    split = lambda z: z.view(2, -1, heads, E // heads).transpose(1, 2)  # noqa: E731
    mask = (torch.arange(7)[None, :] < t(lengths)[:, None])[:, None, None, :]  # (2, 1, 1, 7)
    heads_out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    expected = heads_out.transpose(1, 2).reshape(2, 3, E) @ t(p["a.out_proj.weight"]).T + t(p["a.out_proj.bias"])
    assert rel_err(torch.from_numpy(out), expected) < 1e-12


def draw_sizes(rng) -> dict[str, int]:
    return dict(input_len=int(rng.integers(10, 500)), output_len=int(rng.integers(1, 300)),
                num_latents=int(rng.integers(2, 64)), width=int(rng.choice([16, 32, 48])),
                depth=int(rng.integers(1, 5)), input_dim=int(rng.integers(3, 40)),
                query_dim=int(rng.choice([8, 16, 24])), output_dim=int(rng.integers(1, 20)))


def test_perceiver_io_flops_are_linear_in_inputs_and_outputs(rng):
    for _ in range(5):
        s = draw_sizes(rng)
        f = lambda **change: ref.perceiver_io_flops(**(s | change))  # noqa: E731
        M, O = s["input_len"], s["output_len"]
        # Second differences vanish: a straight line in M (and in O), with a positive slope.
        assert f(input_len=M + 2) - 2 * f(input_len=M + 1) + f() == 0 < f(input_len=M + 1) - f()
        assert f(output_len=O + 2) - 2 * f(output_len=O + 1) + f() == 0 < f(output_len=O + 1) - f()
        # Doubling both at most doubles the cost: the latent part does not grow.
        assert f() < f(input_len=2 * M, output_len=2 * O) < 2 * f()
        # The latent blocks cost the same whatever M and O are.
        deeper = f(depth=s["depth"] + 1) - f()
        assert deeper == ref.self_attention_block_flops(s["num_latents"], s["width"])
        assert deeper == ref.perceiver_io_flops(**(s | dict(input_len=3, output_len=1, depth=s["depth"] + 1))) \
            - ref.perceiver_io_flops(**(s | dict(input_len=3, output_len=1)))


def test_plain_encoder_flops_are_quadratic(rng):
    s = dict(width=32, depth=3, input_dim=29)
    f = lambda M: ref.transformer_encoder_flops(M, **s)  # noqa: E731
    M = int(rng.integers(50, 400))
    # Second difference = 2 * (the M^2 coefficient) = 2 * depth * 4 * width (two products of 2 M^2 w).
    assert f(M + 2) - 2 * f(M + 1) + f(M) == 2 * 3 * (4 * 32)


def test_the_sources_numbers():
    """Source 004's arithmetic, recomputed (see the chapter for what checks out)."""
    assert 3 + ref.fourier_feature_count(2, 6) == 29  # RGB + 2 (2 * 6 + 1): correct
    assert 3 + ref.fourier_feature_count(2, 64) == 261  # the released ImageNet models use K = 64
    pixels = 224 * 224
    assert pixels == 50_176
    assert round(pixels**2 / 1e9, 1) == 2.5  # "about 2.5 billion attention scores": correct
    assert round(pixels * 512 / 1e6, 1) == 25.7  # "about 25.7 million": correct
    assert round(pixels / 512) == 98  # "roughly 100 times less": correct (98x, for the scores alone)
    assert 224 * 224 * 25 * 10 == 12_544_000  # "about 12.5 million pixel tokens": correct
    assert 224 * 224 * 32 // (2 * 8 * 8) == 12_544  # video tokens: correct
    assert 48_000 * 32 // 25 // 128 == 480  # 1.28 s of 48 kHz audio in 128-sample pieces: correct


def test_parameter_formulas_count_shared_blocks_once():
    args = dict(input_dim=29, num_latents=16, width=32, depth=2, num_classes=5)
    one = ref.perceiver_params(**args)
    unshared = ref.perceiver_params(**args, repeats=4)
    shared = ref.perceiver_params(**args, repeats=4, share_weights=True)
    block = ref.self_attention_block_params(32)
    cross = ref.cross_attention_block_params(32, 29)
    assert unshared - one == 3 * (cross + 2 * block)
    assert shared - one == cross  # only the second cross-attention is new
    assert ref.perceiver_params(**args, repeats=1, share_weights=True) == one
