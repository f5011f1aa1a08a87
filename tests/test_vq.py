"""`tiny_mm.vq` against chapter 11's NumPy reference (hand-derived gradients) on fresh random inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch11_text_to_image.reference as ref
from tests.numerics import rel_err
from tiny_mm.vq import Quantized, VectorQuantizer, codebook_usage


def make_vq(rng, num_codes: int, dim: int, beta: float = 0.25, dtype=torch.float64) -> VectorQuantizer:
    vq = VectorQuantizer(num_codes, dim, beta).to(dtype)
    with torch.no_grad():
        vq.codebook.copy_(torch.from_numpy(rng.standard_normal((num_codes, dim))))
    return vq


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_forward_matches_reference(rng, dtype, tol):
    vq = make_vq(rng, 11, 5, beta=0.3, dtype=dtype)
    z_e = rng.standard_normal((3, 8, 5))
    out = vq(torch.from_numpy(z_e).to(dtype))
    assert isinstance(out, Quantized)
    codebook = vq.codebook.detach().double().numpy()
    codes, z_q = ref.quantize(z_e.reshape(-1, 5), codebook)
    assert out.codes.dtype == torch.long and out.codes.shape == (3, 8)
    np.testing.assert_array_equal(out.codes.flatten().numpy(), codes)
    assert out.z_q.dtype == dtype
    assert rel_err(out.z_q, z_q.reshape(3, 8, 5)) < tol
    expected = ref.vq_loss(z_e.reshape(-1, 5), codebook, beta=0.3)["loss"]
    assert out.loss.shape == () and abs(out.loss.item() - expected) / expected < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradients_match_the_hand_derived_ones(rng, dtype, tol):
    """Autograd through the module, with a random decoder gradient on z_q, against reference.vq_grads."""
    vq = make_vq(rng, 7, 4, beta=0.25, dtype=dtype)
    z_e = rng.standard_normal((2, 10, 4))
    decoder_grad = rng.standard_normal((2, 10, 4))
    z = torch.from_numpy(z_e).to(dtype).requires_grad_()
    z_q, codes, loss = vq(z)
    ((z_q * torch.from_numpy(decoder_grad).to(dtype)).sum() + loss).backward()
    grad_z_e, grad_codebook = ref.vq_grads(
        z_e.reshape(-1, 4), vq.codebook.detach().double().numpy(), decoder_grad.reshape(-1, 4), beta=0.25
    )
    assert rel_err(z.grad, grad_z_e.reshape(2, 10, 4)) < tol
    assert rel_err(vq.codebook.grad, grad_codebook) < tol


def test_straight_through_jacobian_is_the_identity(rng):
    vq = make_vq(rng, 5, 3)
    z_e = torch.from_numpy(rng.standard_normal((1, 4, 3)))
    jac = torch.autograd.functional.jacobian(lambda z: vq(z).z_q, z_e)  # (1, 4, 3, 1, 4, 3)
    torch.testing.assert_close(jac.reshape(12, 12), torch.eye(12, dtype=torch.float64), rtol=0, atol=0)
    # ... while the value is the code, not z_e
    assert rel_err(vq(z_e).z_q, vq.codebook.detach()[vq.nearest(z_e)]) < 1e-15


def test_lookup_gives_the_entries_of_the_codes(rng):
    vq = make_vq(rng, 9, 6, dtype=torch.float32)
    z_e = torch.from_numpy(rng.standard_normal((2, 5, 6))).float()
    out = vq(z_e)
    assert rel_err(vq.lookup(out.codes), out.z_q) < 1e-6
    codes = torch.from_numpy(rng.integers(0, 9, size=(4, 3)))
    np.testing.assert_array_equal(vq.lookup(codes).detach().numpy(), vq.codebook.detach().numpy()[codes.numpy()])


def test_a_vector_on_a_code_picks_that_code(rng):
    vq = make_vq(rng, 6, 4)
    z_e = vq.codebook.detach()[torch.tensor([[4, 0, 5, 4]])] + 1e-7  # (1, 4, 4)
    assert vq.nearest(z_e).tolist() == [[4, 0, 5, 4]]


def test_codebook_usage_matches_reference(rng):
    codes = rng.integers(0, 6, size=(5, 16))
    expected = ref.codebook_usage(codes, 12)
    assert codebook_usage(torch.from_numpy(codes), 12) == pytest.approx(expected, rel=1e-12)
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 4) == pytest.approx((0.25, 1.0))


def test_bad_input_is_refused(rng):
    vq = make_vq(rng, 4, 3)
    with pytest.raises(ValueError, match=r"shape \(B, N, dim=3\)"):
        vq(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(B, N, dim=3\)"):
        vq(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        vq(torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        vq.lookup(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="long"):
        vq.lookup(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="num_codes"):
        VectorQuantizer(0, 3)
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer(4, 3, beta=float("nan"))
    with pytest.raises(ValueError, match="lie in"):
        codebook_usage(torch.tensor([5]), 4)


def test_training_the_codebook_lowers_the_loss(rng, one_thread):
    """A few Adam steps on the codebook alone (fixed z_e) must lower the VQ loss: the codebook term works."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2)
    z_e = torch.from_numpy(rng.standard_normal((1, 64, 2))).float() + 2.0
    opt = torch.optim.Adam(vq.parameters(), lr=0.1)
    first = vq(z_e).loss.item()
    for _ in range(30):
        opt.zero_grad()
        vq(z_e).loss.backward()
        opt.step()
    assert vq(z_e).loss.item() < 0.5 * first
