"""The NumPy reference of chapter 3 against torch's own convolution and against itself.

Patch embedding is computed three independent ways, patchify + matmul, the
convolution loop of the reference, and ``torch.nn.functional.conv2d`` in
float64, and they must agree; the CLS token and positional embedding are
checked element by element.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch03_vit.reference as ref


def rel_err(out, expected):
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), "non-finite values"
    return np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-300)


def torch_patch_embed(images, weight, patch_size):
    """torch.nn.functional.conv2d with stride = kernel = P, grid read out row by row: (B, N, width)."""
    grid = F.conv2d(torch.from_numpy(images), torch.from_numpy(weight), stride=patch_size)  # (B, width, h, w)
    return grid.flatten(2).transpose(1, 2).numpy()


CASES = [(1, 3, 8, 8, 4, 5), (2, 3, 12, 8, 4, 7), (3, 1, 6, 9, 3, 2), (2, 2, 5, 5, 5, 4), (1, 3, 4, 4, 1, 3)]


@pytest.mark.parametrize("B, C, H, W, P, width", CASES)
def test_patchify_matmul_equals_conv_loop_equals_torch(rng, B, C, H, W, P, width):
    images = rng.standard_normal((B, C, H, W))
    weight = rng.standard_normal((width, C, P, P))
    expected = torch_patch_embed(images, weight, P)  # (B, N, width)
    assert rel_err(ref.patch_embed(images, weight, P), expected) < 1e-12
    assert rel_err(ref.conv_patch_embed(images, weight, P), expected) < 1e-12
    # The flattened (width, C*P*P) weight of the matmul form gives the same tokens.
    assert rel_err(ref.patch_embed(images, weight.reshape(width, -1), P), expected) < 1e-12


@pytest.mark.parametrize("stride, K", [(1, 3), (2, 3), (3, 2), (2, 2)])
def test_conv_loop_matches_torch_for_other_strides(rng, stride, K):
    images = rng.standard_normal((2, 3, 9, 8))
    weight = rng.standard_normal((4, 3, K, K))
    expected = F.conv2d(torch.from_numpy(images), torch.from_numpy(weight), stride=stride).numpy()
    assert rel_err(ref.conv2d_strided(images, weight, stride), expected) < 1e-12


def test_patchify_order_is_row_by_row_channel_first(rng):
    B, C, H, W, P = 2, 3, 6, 9, 3
    images = rng.standard_normal((B, C, H, W))
    patches = ref.patchify(images, P)
    assert patches.shape == (B, (H // P) * (W // P), C * P * P)
    for n in range(patches.shape[1]):
        r, c = divmod(n, W // P)  # patch n sits at grid row r, column c
        window = images[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P]  # (B, C, P, P)
        np.testing.assert_array_equal(patches[:, n], window.reshape(B, -1))


def test_cls_and_positional_embeddings(rng):
    B, N, width = 3, 4, 5
    tokens = rng.standard_normal((B, N, width))
    cls = rng.standard_normal(width)
    positional = rng.standard_normal((N + 1, width))
    with_cls = ref.add_cls_token(tokens, cls)
    assert with_cls.shape == (B, N + 1, width)
    for b in range(B):
        np.testing.assert_array_equal(with_cls[b, 0], cls)
        np.testing.assert_array_equal(with_cls[b, 1:], tokens[b])
    out = ref.add_positional_embedding(with_cls, positional)
    for b in range(B):
        for i in range(N + 1):
            np.testing.assert_allclose(out[b, i], with_cls[b, i] + positional[i], rtol=0, atol=1e-15)


def test_embed_image_end_to_end_against_torch(rng):
    B, C, H, W, P, width = 2, 3, 8, 12, 4, 6
    images, weight = rng.standard_normal((B, C, H, W)), rng.standard_normal((width, C, P, P))
    cls, positional = rng.standard_normal(width), rng.standard_normal((6 + 1, width))
    patches = torch_patch_embed(images, weight, P)  # (B, 6, width)
    expected = np.concatenate([np.tile(cls, (B, 1, 1)), patches], axis=1) + positional
    assert rel_err(ref.embed_image(images, weight, cls, positional, P), expected) < 1e-12


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ref.patchify(np.zeros((1, 3, 10, 8)), 4), "multiples of patch_size"),
        (lambda: ref.patchify(np.zeros((1, 3, 8, 10)), 4), "multiples of patch_size"),
        (lambda: ref.patchify(np.zeros((3, 8, 8)), 4), r"4-D \(B, C, H, W\)"),
        (lambda: ref.patchify(np.zeros((1, 3, 8, 8)), 0), "patch_size must be a positive int"),
        (lambda: ref.patch_embed(np.zeros((1, 3, 8, 8)), np.zeros((5, 4, 4, 4)), 4), "weight must be"),
        (lambda: ref.patch_embed(np.zeros((1, 3, 8, 8)), np.zeros((5, 47)), 4), "weight must be"),
        # The arguments swapped, Conv2d(out, in, ...): a (3, width, P, P) kernel for width-channel input.
        (lambda: ref.conv2d_strided(np.zeros((1, 3, 8, 8)), np.zeros((3, 16, 4, 4)), 4), "input channels"),
        (lambda: ref.conv2d_strided(np.zeros((1, 3, 8, 8)), np.zeros((5, 3, 4, 4)), 0), "stride"),
        (lambda: ref.add_cls_token(np.zeros((2, 4, 5)), np.zeros(6)), r"cls must have shape"),
        (lambda: ref.add_cls_token(np.zeros((4, 5)), np.zeros(5)), r"tokens must be"),
        (lambda: ref.add_positional_embedding(np.zeros((2, 5, 5)), np.zeros((4, 5))), "positional"),
        (lambda: ref.sincos_positions_2d(4, 6), "multiple of 4"),
        (lambda: ref.sincos_positions_2d(0, 8), "grid_size must be a positive int"),
        (lambda: ref.attention_rollout(np.zeros((2, 3, 4, 4))), r"\(B, layers, heads, L, L\)"),
        (lambda: ref.attention_rollout(np.zeros((1, 2, 3, 4, 5))), r"\(B, layers, heads, L, L\)"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- fixed 2-D positions


@pytest.mark.parametrize("grid, width", [(7, 16), (4, 8), (1, 4), (5, 36)])
def test_sincos_positions_dot_products_depend_only_on_the_offset(grid, width):
    pos = ref.sincos_positions_2d(grid, width)
    assert pos.shape == (grid * grid, width)
    K = width // 4
    freqs = 10000.0 ** (-np.arange(K) / K)
    for a in range(grid * grid):
        for b in range(grid * grid):
            (ra, ca), (rb, cb) = divmod(a, grid), divmod(b, grid)
            expected = np.cos(freqs * (ra - rb)).sum() + np.cos(freqs * (ca - cb)).sum()
            assert abs(pos[a] @ pos[b] - expected) < 1e-12
    # Every row has the same length, sqrt(2K): sin^2 + cos^2 = 1 for each of the 2K pairs.
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), np.sqrt(2 * K), rtol=1e-13)


def test_sincos_positions_first_half_is_the_row():
    pos = ref.sincos_positions_2d(3, 8)
    np.testing.assert_array_equal(pos[0, :4], pos[2, :4])  # same row 0, columns 0 and 2
    np.testing.assert_array_equal(pos[0, 4:], pos[6, 4:])  # same column 0, rows 0 and 2
    np.testing.assert_allclose(pos[4], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)] * 2, rtol=1e-14)


# --------------------------------------------------------------------------- attention rollout


def random_maps(rng, shape):
    """Row-stochastic random attention maps of the given (B, layers, H, L, L) shape."""
    e = np.exp(2.0 * rng.standard_normal(shape))
    return e / e.sum(axis=-1, keepdims=True)


def test_rollout_of_one_and_two_layers_by_hand(rng):
    B, H, L = 2, 3, 5
    maps = random_maps(rng, (B, 2, H, L, L))
    # One block: rows of the head-average already sum to 1, so (A + I) renormalised is (A + I) / 2.
    one = ref.attention_rollout(maps[:, :1])
    for b in range(B):
        for i in range(L):
            for j in range(L):
                mean = sum(maps[b, 0, h, i, j] for h in range(H)) / H
                assert abs(one[b, i, j] - (mean + (i == j)) / 2) < 1e-14
    # Two blocks: the second block's matrix on the left.
    two = ref.attention_rollout(maps)
    first = (maps[:, 0].mean(axis=1) + np.eye(L)) / 2  # (B, L, L)
    second = (maps[:, 1].mean(axis=1) + np.eye(L)) / 2  # (B, L, L)
    assert rel_err(two, np.einsum("bij,bjk->bik", second, first)) < 1e-14


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_rollout_of_uniform_attention_has_a_closed_form(layers):
    """Uniform attention U = J / L per block: ((U + I) / 2)^k = I / 2^k + (1 - 1 / 2^k) U, as U U = U."""
    B, H, L = 1, 2, 6
    uniform = np.full((L, L), 1.0 / L)
    maps = np.broadcast_to(uniform, (B, layers, H, L, L))
    keep = 0.5**layers
    assert rel_err(ref.attention_rollout(maps)[0], keep * np.eye(L) + (1 - keep) * uniform) < 1e-14


def test_rollout_rows_sum_to_one_and_identity_attention_is_identity(rng):
    maps = random_maps(rng, (3, 4, 2, 7, 7))
    np.testing.assert_allclose(ref.attention_rollout(maps).sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    self_only = np.broadcast_to(np.eye(7), (1, 3, 2, 7, 7))  # every token attends to itself only
    np.testing.assert_array_equal(ref.attention_rollout(self_only)[0], np.eye(7))
