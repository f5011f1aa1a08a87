"""`tiny_mm.vqvae`: shapes, refusals, the code round trip, the straight-through gradient, restarts, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.numerics import rel_err
from tiny_mm.data.shapes import ShapesConfig, ShapesDataset
from tiny_mm.vq import VectorQuantizer
from tiny_mm.vqvae import VQVAE, VQVAEConfig, load_vqvae, restart_dead_codes, save_vqvae, train_vqvae

SMALL = VQVAEConfig(image_size=16, hidden=16, code_dim=8, num_codes=12)  # 4 x 4 = 16 tokens


def small_model(rng, dtype=torch.float32) -> VQVAE:
    torch.manual_seed(int(rng.integers(2**31)))
    model = VQVAE(SMALL).to(dtype)
    with torch.no_grad():  # codes of the encoder's scale, so several of them are in use
        model.quantizer.codebook.copy_(torch.as_tensor(rng.standard_normal((12, 8)) * 0.1))
    return model


def images(rng, n: int, size: int = 16, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(rng.uniform(0, 1, (n, 3, size, size)), dtype=dtype)


def test_shapes_and_ranges(rng, one_thread):
    model = small_model(rng)
    x = images(rng, 5)
    recon, vq_loss, codes = model(x)
    assert recon.shape == (5, 3, 16, 16) and recon.dtype == torch.float32
    assert bool((recon >= 0).all() and (recon <= 1).all())
    assert vq_loss.shape == () and vq_loss.item() > 0
    assert codes.shape == (5, SMALL.num_tokens) == (5, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.num_codes
    assert model.encode_latents(x).shape == (5, 16, 8)


def test_decode_codes_of_encode_is_the_forward_reconstruction(rng, one_thread):
    model = small_model(rng, torch.float64)
    x = images(rng, 4, dtype=torch.float64)
    codes = model.encode(x)
    out = model(x)
    assert torch.equal(codes, out.codes)
    assert rel_err(model.decode_codes(codes), out.recon) < 1e-12
    # and the decoder really reads the codes: other codes, another image
    assert rel_err(model.decode_codes((codes + 1) % SMALL.num_codes), out.recon) > 1e-3


def test_codes_are_the_nearest_codebook_entries(rng, one_thread):
    """encode picks argmin ||z_e - e_k||^2, computed here by brute force in float64."""
    model = small_model(rng, torch.float64)
    x = images(rng, 3, dtype=torch.float64)
    z = model.encode_latents(x).detach()  # (B, N, dim)
    dist = ((z[:, :, None, :] - model.quantizer.codebook.detach()[None, None]) ** 2).sum(-1)  # (B, N, K)
    assert torch.equal(model.encode(x), dist.argmin(-1))


def test_straight_through_gradient_reaches_the_encoder(rng, one_thread):
    """The reconstruction loss alone trains the encoder: its gradient is the decoder's gradient at z_q,
    passed to z_e unchanged (computed here separately, by backpropagating it through the encoder)."""
    model = small_model(rng, torch.float64)
    x = images(rng, 3, dtype=torch.float64)
    recon, _, _ = model(x)
    F.mse_loss(recon, x).backward()
    got = [p.grad.clone() for p in model.encoder.parameters()]
    model.zero_grad()

    z_e = model.encode_latents(x)  # (B, N, dim)
    z_q = model.quantizer.lookup(model.quantizer.nearest(z_e)).detach().requires_grad_()  # a leaf
    F.mse_loss(model.decode_latents(z_q), x).backward()
    (z_e * z_q.grad).sum().backward()  # the chain rule with d z_q / d z_e = identity
    for g, p in zip(got, model.encoder.parameters()):
        assert g.abs().sum() > 0
        assert rel_err(g, p.grad) < 1e-12


def test_training_on_shapes_images_lowers_the_loss(one_thread):
    x, _, _ = ShapesDataset(16, ShapesConfig(image_size=16), seed=3).materialize()
    torch.manual_seed(0)
    model = VQVAE(SMALL)
    history = train_vqvae(model, x, steps=30, batch_size=16, lr=3e-3, restart_every=5, seed=0)
    assert set(history) == {"recon", "vq", "perplexity", "restarted"}
    assert all(len(v) == 30 for v in history.values())
    first, last = np.mean(history["recon"][:3]), np.mean(history["recon"][-3:])
    assert last < 0.5 * first, (first, last)


def test_restart_moves_only_the_dead_codes_onto_encoder_vectors(rng):
    vq = VectorQuantizer(10, 4).double()
    with torch.no_grad():
        vq.codebook.copy_(torch.as_tensor(rng.standard_normal((10, 4))))
    before = vq.codebook.detach().clone()
    z_e = torch.as_tensor(rng.standard_normal((2, 5, 4)))
    codes = torch.tensor([[0, 0, 3, 3, 3], [7, 0, 7, 3, 0]])  # codes 0, 3 and 7 alive
    moved = restart_dead_codes(vq, z_e, codes, torch.Generator().manual_seed(0))
    assert moved == 7
    alive = [0, 3, 7]
    assert torch.equal(vq.codebook.detach()[alive], before[alive])
    flat = z_e.reshape(-1, 4)
    for k in sorted(set(range(10)) - set(alive)):
        assert torch.isclose(vq.codebook.detach()[k], flat).all(dim=1).any(), f"code {k} is not a batch vector"
    assert restart_dead_codes(vq, z_e, torch.arange(10).reshape(2, 5), None) == 0  # nothing dead, nothing moved


def test_restarts_keep_the_codebook_alive(rng, one_thread):
    """The codebook starts tiny, so one or two codes take every vector; restarts spread them out.
    (Noise images: every cell differs, so a live codebook has a use for all 12 codes.)"""
    x = images(rng, 8)
    seed = int(rng.integers(2**31))
    used = {}
    for every in (0, 2):
        torch.manual_seed(seed)
        model = VQVAE(SMALL)
        train_vqvae(model, x, steps=10, batch_size=8, restart_every=every, seed=seed)
        used[every] = len(torch.unique(model.encode(x)))
    assert used[2] > used[0] + 3, used


def test_save_and_load_round_trip(rng, tmp_path):
    model = small_model(rng)
    path = tmp_path / "vqvae.pt"
    save_vqvae(model, path)
    loaded = load_vqvae(path)
    assert loaded.config == SMALL
    x = images(rng, 2)
    assert torch.equal(loaded(x).recon, model.eval()(x).recon)
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a VQ-VAE checkpoint"):
        load_vqvae(tmp_path / "bad.pt")


def test_refuses_bad_input(rng):
    model = small_model(rng)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(images(rng, 2, size=32))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        model.decode_codes(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        model.decode_codes(torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        model.decode_codes(torch.full((2, 16), 12))
    with pytest.raises(ValueError, match="steps"):
        train_vqvae(model, images(rng, 2), steps=0)
    with pytest.raises(ValueError, match="restart_every"):
        train_vqvae(model, images(rng, 2), steps=1, restart_every=-1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 30}, "multiple of 4"),
        ({"num_codes": 0}, "num_codes"),
        ({"hidden": 2.5}, "hidden"),
        ({"beta": -1.0}, "beta"),
    ],
)
def test_config_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VQVAEConfig(**kwargs)
    with pytest.raises(ValueError, match="VQVAEConfig"):
        VQVAE({"image_size": 16})
