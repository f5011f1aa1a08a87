"""The arbitrary boolean ``attn_mask`` of tiny_mm.attention (used by Flamingo and the Q-Former).

The reference is chapter 2's NumPy float64 softmax with the mask applied here
by hand (hidden scores set to -inf), and torch's own
``F.scaled_dot_product_attention`` given an additive float mask. Rows that see
no key must give zeros and finite gradients, as with the other masks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch02_attention.reference as ref
from tests.numerics import rel_err
from tiny_mm.attention import MultiHeadAttention, scaled_dot_product_attention, visible_mask


def numpy_masked_attention(q, k, v, visible: np.ndarray, scale: float) -> np.ndarray:
    """softmax over visible keys (float64), rows with no visible key -> 0; visible broadcasts to (B,H,Lq,Lk)."""
    scores = np.where(visible, scale * q @ k.swapaxes(-1, -2), -np.inf)
    return ref.softmax(scores, axis=-1) @ v


def random_mask(rng, shape, empty_row: bool = True) -> np.ndarray:
    mask = rng.random(shape) < 0.6
    if empty_row:
        mask[(0,) * (len(shape) - 2) + (0,)] = False  # one query that sees nothing
    return mask


@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 7), (2, 3, 5, 7), (5, 7), (1, 3, 5, 7)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_with_attn_mask_matches_numpy(rng, mask_shape, causal, padded):
    q, k, v = (rng.standard_normal(s) for s in [(2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)])
    mask = random_mask(rng, mask_shape)
    lengths = np.array([4, 7]) if padded else None
    visible = mask & ref.visible_mask(2, 5, 7, causal, lengths)  # every mask must pass
    expected = numpy_masked_attention(q, k, v, visible, 0.5)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, k, v))
    out = scaled_dot_product_attention(
        tq, tk, tv, causal=causal, scale=0.5, attn_mask=torch.tensor(mask),
        kv_lengths=None if lengths is None else torch.tensor(lengths),
    )
    assert rel_err(out, expected) < 1e-5
    out.square().sum().backward()
    for name, t in (("dq", tq), ("dk", tk), ("dv", tv)):
        assert torch.isfinite(t.grad).all(), f"{name} is not finite"
    empty = ~np.broadcast_to(visible, (2, 3, 5, 7)).any(-1)  # (B, H, Lq): queries that see nothing
    assert empty.any(), "the test should hold an empty row"
    assert torch.count_nonzero(tq.grad[torch.tensor(empty)]) == 0, "an empty row sends a gradient"
    assert torch.count_nonzero(out.detach()[torch.tensor(empty)]) == 0, "an empty row is not zero"


def test_torch_sdpa_backend_agrees_with_plain_rung(rng):
    q, k, v = (torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in [(2, 2, 4, 3), (2, 2, 6, 3), (2, 2, 6, 3)])
    mask = torch.tensor(random_mask(rng, (2, 2, 4, 6), empty_row=False))
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # torch's own float form
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=additive.double())
    for backend in ("torch", "sdpa"):
        mha = MultiHeadAttention(6, 2, backend=backend)
        ours = mha._attend(q, k, v, False, None, mask)
        assert rel_err(ours, expected) < 1e-5, backend


def test_mha_mask_hides_keys_exactly(rng):
    # Changing a hidden key must not change the output at all; changing a visible one must.
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, kdim=5, vdim=5)
    x = torch.randn(1, 3, 8)
    ctx = torch.randn(1, 4, 5)
    mask = torch.tensor([[True, True, False, False]] * 3)  # (Lq, Lk): keys 2 and 3 hidden
    base = mha(x, ctx, attn_mask=mask)
    ctx2 = ctx.clone()
    ctx2[0, 3] += 10.0
    assert torch.equal(mha(x, ctx2, attn_mask=mask), base)
    ctx2[0, 1] += 10.0
    assert not torch.allclose(mha(x, ctx2, attn_mask=mask), base)
    probs = mha.attention_probs(x, ctx, attn_mask=mask)  # (1, 2, 3, 4)
    assert torch.count_nonzero(probs[..., 2:]) == 0
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 3))


def test_visible_mask_combines_attn_mask():
    mask = torch.tensor([[True, False, True], [False, True, True]])  # (Lq, Lk) = (2, 3)
    got = visible_mask(2, 2, 3, causal=True, kv_lengths=torch.tensor([3, 1]), attn_mask=mask)
    expected = mask.numpy()[None, None] & ref.visible_mask(2, 2, 3, True, np.array([3, 1]))
    assert got.shape == (2, 1, 2, 3)
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 2, 5, 7), "bool"),
        (torch.ones(3, 5, 7, dtype=torch.bool), "broadcast"),
        (torch.ones(5, 8, dtype=torch.bool), "broadcast"),
        (torch.ones(1, 2, 2, 5, 7, dtype=torch.bool), "broadcast"),
        ([[True]], "bool torch.Tensor"),
    ],
)
def test_bad_attn_mask_is_named(rng, mask, match):
    q, k, v = (torch.randn(s) for s in [(2, 2, 5, 4), (2, 2, 7, 4), (2, 2, 7, 4)])
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_triton_backend_refuses_attn_mask():
    pytest.importorskip("triton")
    mha = MultiHeadAttention(32, 2, backend="triton")
    x = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
