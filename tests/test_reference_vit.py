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
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
