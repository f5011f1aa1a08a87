"""Chapter 11's NumPy reference against independent checks.

The reference (chapters/ch11_text_to_image/reference.py) is what `tiny_mm.vq` and
`tiny_mm.diffusion` are tested against, so it is checked here on its own:

    vector quantisation   distances against torch.cdist, loss terms against F.mse_loss,
                          hand gradients against central finite differences and against
                          torch autograd with .detach() as the stop-gradient
    token sampling        against torch.topk + softmax, and the draws' frequencies
    schedules             the papers' numbers, monotonicity, the cosine closed form
    DDPM                  q_sample's mean and variance over many draws; the posterior
                          against Gaussian conditioning of the joint (x_{t-1}, x_t);
                          the step against Ho et al.'s Algorithm 2 written out
    DDIM                  eta = 1 is the DDPM step; eta = 0 with the true noise
                          lands exactly on the forward process and recovers x0
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch11_text_to_image.reference as ref


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{a.shape} != {b.shape}"
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- vector quantisation


def test_distances_and_nearest_code_equal_torch(rng):
    z, codebook = rng.standard_normal((40, 6)), rng.standard_normal((9, 6))
    expected = torch.cdist(torch.from_numpy(z), torch.from_numpy(codebook)) ** 2  # (N, K)
    assert rel(ref.squared_distances(z, codebook), expected.numpy()) < 1e-12
    codes, z_q = ref.quantize(z, codebook)
    np.testing.assert_array_equal(codes, expected.argmin(dim=1).numpy())
    np.testing.assert_array_equal(z_q, codebook[codes])
    # A vector equal to a code picks that code, and of two equal codes the first.
    twin = np.concatenate([codebook, codebook[2:3]])  # code 9 repeats code 2
    assert ref.quantize(codebook[2:3] + 1e-9, twin)[0][0] == 2
    with pytest.raises(ValueError, match="features"):
        ref.squared_distances(z, codebook[:, :5])


def test_vq_loss_terms_equal_mse(rng):
    z_e, codebook = rng.standard_normal((30, 4)), rng.standard_normal((7, 4))
    codes = torch.cdist(torch.from_numpy(z_e), torch.from_numpy(codebook)).argmin(dim=1)
    mse = float(F.mse_loss(torch.from_numpy(z_e), torch.from_numpy(codebook)[codes]))
    terms = ref.vq_loss(z_e, codebook, beta=0.3)
    assert terms["codebook"] == pytest.approx(mse, rel=1e-12)
    assert terms["commitment"] == pytest.approx(mse, rel=1e-12)
    assert terms["loss"] == pytest.approx(1.3 * mse, rel=1e-12)


def test_vq_grads_match_finite_differences(rng):
    """Each term's gradient with the other argument held fixed, which is what stop-gradient means.
    Steps of 1e-6 never change which code is nearest for random inputs."""
    z_e, codebook = rng.standard_normal((12, 3)), rng.standard_normal((5, 3))
    beta, eps = 0.25, 1e-6
    grad_z_e, grad_codebook = ref.vq_grads(z_e, codebook, np.zeros_like(z_e), beta)

    def term(z, cb):  # ||z - e_code(z)||^2 averaged: the codebook and commitment terms' value
        return ref.vq_loss(z, cb, beta)["codebook"]

    numeric_z, numeric_cb = np.zeros_like(z_e), np.zeros_like(codebook)
    for index in np.ndindex(z_e.shape):
        up, down = z_e.copy(), z_e.copy()
        up[index] += eps
        down[index] -= eps
        numeric_z[index] = beta * (term(up, codebook) - term(down, codebook)) / (2 * eps)  # commitment moves z_e
    for index in np.ndindex(codebook.shape):
        up, down = codebook.copy(), codebook.copy()
        up[index] += eps
        down[index] -= eps
        numeric_cb[index] = (term(z_e, up) - term(z_e, down)) / (2 * eps)  # codebook term moves the codes
    assert rel(grad_z_e, numeric_z) < 1e-7
    assert rel(grad_codebook, numeric_cb) < 1e-7


def test_vq_grads_match_autograd_with_stop_gradients(rng):
    """Written with torch: z_q = z_e + (e - z_e).detach(), a random linear 'decoder' loss on z_q."""
    z_e, codebook = rng.standard_normal((25, 4)), rng.standard_normal((6, 4)) * 0.5
    decoder_grad = rng.standard_normal((25, 4))
    beta = 0.4
    z = torch.from_numpy(z_e).requires_grad_()
    cb = torch.from_numpy(codebook).requires_grad_()
    codes = torch.cdist(z.detach(), cb.detach()).argmin(dim=1)
    e = cb[codes]
    z_q = z + (e - z).detach()
    loss = (z_q * torch.from_numpy(decoder_grad)).sum() + F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())
    loss.backward()
    grad_z_e, grad_codebook = ref.vq_grads(z_e, codebook, decoder_grad, beta)
    assert rel(grad_z_e, z.grad.numpy()) < 1e-12
    assert rel(grad_codebook, cb.grad.numpy()) < 1e-12
    unused = np.setdiff1d(np.arange(6), codes.numpy())
    assert np.all(grad_codebook[unused] == 0.0)  # dead codes learn nothing


def test_codebook_usage_and_perplexity(rng):
    assert ref.codebook_usage(np.arange(8).repeat(3), 8) == pytest.approx((1.0, 8.0))
    assert ref.codebook_usage(np.full(20, 3), 8) == pytest.approx((1 / 8, 1.0))
    codes = rng.integers(0, 5, size=200)  # 5 of 16 codes
    counts = np.bincount(codes, minlength=16)
    entropy = torch.distributions.Categorical(probs=torch.from_numpy(counts / 200.0)).entropy()
    usage, perplexity = ref.codebook_usage(codes, 16)
    assert usage == pytest.approx((counts > 0).sum() / 16)
    assert perplexity == pytest.approx(math.exp(float(entropy)), rel=1e-12)
    with pytest.raises(ValueError, match="ids in"):
        ref.codebook_usage(np.array([0, 16]), 16)


# --------------------------------------------------------------------------- sampling a token


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 5), (2.5, 1), (1.3, 12)])
def test_next_token_distribution_equals_topk_softmax(rng, temperature, top_k):
    logits = rng.standard_normal((3, 12)) * 2
    x = torch.from_numpy(logits)
    if top_k is not None:
        values, index = torch.topk(x, top_k, dim=-1)
        x = torch.full_like(x, -math.inf).scatter(-1, index, values)
    expected = torch.softmax(x / temperature, dim=-1)
    probs = ref.next_token_distribution(logits, temperature, top_k)
    assert rel(probs, expected.numpy()) < 1e-12
    if top_k is not None:
        assert np.all((probs > 0).sum(axis=-1) == top_k)


def test_next_token_edge_cases(rng):
    logits = rng.standard_normal(10)
    greedy = ref.next_token_distribution(logits, temperature=0.0, top_k=3)
    np.testing.assert_array_equal(greedy, np.eye(10)[logits.argmax()])
    cold = ref.next_token_distribution(logits, temperature=1e-3)
    assert cold[logits.argmax()] > 1 - 1e-9  # T -> 0 tends to greedy
    tied = np.array([3.0, 1.0, 3.0, 2.0, 2.0, 0.0])
    kept = ref.next_token_distribution(tied, 1.0, top_k=3)  # the 3rd largest (2.0) is tied: both kept
    assert (kept > 0).tolist() == [True, False, True, True, True, False]
    with pytest.raises(ValueError, match="top_k"):
        ref.next_token_distribution(logits, 1.0, top_k=11)
    with pytest.raises(ValueError, match="temperature"):
        ref.next_token_distribution(logits, -1.0)


def test_sampled_tokens_follow_the_distribution(rng):
    logits = rng.standard_normal(8)
    probs = ref.next_token_distribution(logits, 0.8, top_k=4)
    draws = np.array([ref.sample_next_token(logits, rng, 0.8, top_k=4) for _ in range(4000)])
    freq = np.bincount(draws, minlength=8) / len(draws)
    assert np.all(freq[probs == 0] == 0)  # outside the top 4: never
    assert np.abs(freq - probs).max() < 4 * math.sqrt(0.25 / len(draws))  # 4 standard errors at worst


# --------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_ho_et_al():
    betas = ref.linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    abar = ref.alphas_cumprod(betas)
    # abar written out one factor at a time with Python floats.
    log_abar = 0.0
    for b in np.linspace(1e-4, 0.02, 1000):
        log_abar += math.log1p(-float(b))
    assert abar[-1] == pytest.approx(math.exp(log_abar), rel=1e-10)
    assert abar[-1] < 1e-4  # step T-1 is almost pure noise (about 4e-5)
    short = ref.linear_betas(100)  # both ends scaled by 1000 / T
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scaling"):  # T = 20 would make the last beta 0.02 * 1000 / 20 = 1
        ref.linear_betas(20)


@pytest.mark.parametrize("kind, steps", [("linear", 1000), ("linear", 50), ("cosine", 1000), ("cosine", 40)])
def test_alpha_bar_decreases_from_near_one_to_near_zero(kind, steps):
    betas = ref.linear_betas(steps) if kind == "linear" else ref.cosine_betas(steps)
    abar = ref.alphas_cumprod(betas)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(abar) < 0)
    assert abar[0] > 0.97 and abar[-1] < 1e-3


@pytest.mark.parametrize("steps", [1000, 64])
def test_cosine_alpha_bar_matches_its_closed_form(steps):
    s = 0.008
    abar = ref.alphas_cumprod(ref.cosine_betas(steps, s))
    closed = np.array([math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(1, steps + 1)])
    closed /= math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert np.abs(abar[:-1] - closed[:-1]).max() < 1e-12  # every step but the clipped last one
    assert ref.cosine_betas(steps, s)[-1] == 0.999  # the last beta would be 1: clipped


# --------------------------------------------------------------------------- DDPM


def test_q_sample_has_the_right_mean_and_variance(rng):
    """Over many noise draws x_t has mean sqrt(abar_t) x0 and variance 1 - abar_t, per element."""
    abar = ref.alphas_cumprod(ref.linear_betas(100))
    x0 = rng.standard_normal(6)
    t = 37
    draws = 20000
    x_t = ref.q_sample(np.broadcast_to(x0, (draws, 6)), np.full(draws, t), rng.standard_normal((draws, 6)), abar)
    se_mean = math.sqrt((1 - abar[t]) / draws)
    assert np.abs(x_t.mean(axis=0) - math.sqrt(abar[t]) * x0).max() < 5 * se_mean
    assert np.abs(x_t.var(axis=0) / (1 - abar[t]) - 1).max() < 5 * math.sqrt(2 / draws)


def test_predict_x0_inverts_q_sample(rng):
    abar = ref.alphas_cumprod(ref.cosine_betas(50))
    x0, eps = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    t = rng.integers(0, 50, size=4)
    x_t = ref.q_sample(x0, t, eps, abar)
    assert rel(x_t[1], math.sqrt(abar[t[1]]) * x0[1] + math.sqrt(1 - abar[t[1]]) * eps[1]) < 1e-15
    assert rel(ref.predict_x0(x_t, t, eps, abar), x0) < 1e-10
    with pytest.raises(ValueError, match="lie in"):
        ref.q_sample(x0, np.array([0, 1, 2, 50]), eps, abar)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_equals_gaussian_conditioning(rng, kind):
    """Given x0, (x_{t-1}, x_t) is jointly Gaussian per element:
        x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) u,   x_t = sqrt(alpha_t) x_{t-1} + sqrt(b_t) v.
    Conditioning on x_t: mean = m1 + c12 / v2 (x_t - m2), var = v1 - c12^2 / v2."""
    betas = ref.linear_betas(30) if kind == "linear" else ref.cosine_betas(30)
    abar = np.cumprod(1 - betas)
    x0, x_t = rng.standard_normal((2, 7)), rng.standard_normal((2, 7))
    for t in (0, 1, 13, 29):
        mean, var = ref.posterior_mean_variance(x0, x_t, t, betas)
        ap = abar[t - 1] if t > 0 else 1.0
        m1, v1 = math.sqrt(ap) * x0, 1 - ap
        m2, v2 = math.sqrt(1 - betas[t]) * m1, (1 - betas[t]) * v1 + betas[t]
        c12 = math.sqrt(1 - betas[t]) * v1
        assert rel(mean, m1 + c12 / v2 * (x_t - m2)) < 1e-12
        assert abs(var - (v1 - c12**2 / v2)) < 1e-15
    assert ref.posterior_mean_variance(x0, x_t, 0, betas)[1] == 0.0  # the last step adds no noise


def test_ddpm_step_equals_algorithm_2(rng):
    """Ho et al.'s Algorithm 2: x_{t-1} = (x_t - b_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,
    with sigma_t^2 the posterior variance (their 'beta tilde')."""
    betas = ref.linear_betas(40)
    abar = np.cumprod(1 - betas)
    x_t, eps, z = rng.standard_normal((3, 2, 3, 4, 4))
    for t in (0, 5, 39):
        ap = abar[t - 1] if t > 0 else 1.0
        sigma = math.sqrt(betas[t] * (1 - ap) / (1 - abar[t]))
        expected = (x_t - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(1 - betas[t]) + sigma * z
        assert rel(ref.ddpm_step(x_t, t, eps, z, betas), expected) < 1e-12
    assert rel(ref.ddpm_step(x_t, 7, eps, None, betas), ref.ddpm_step(x_t, 7, eps, 0 * z, betas)) < 1e-15


def test_ddpm_step_with_clipping_uses_the_clipped_x0(rng):
    betas = ref.linear_betas(60)
    abar = np.cumprod(1 - betas)
    x_t, eps = rng.standard_normal((2, 3, 8)) * 2
    x0 = np.clip(ref.predict_x0(x_t, 12, eps, abar), -1, 1)
    assert np.any(np.abs(ref.predict_x0(x_t, 12, eps, abar)) > 1)  # the clip does something
    expected, _ = ref.posterior_mean_variance(x0, x_t, 12, betas)
    assert rel(ref.ddpm_step(x_t, 12, eps, None, betas, clip_x0=1.0), expected) < 1e-15


# --------------------------------------------------------------------------- DDIM and guidance


def test_ddim_timesteps():
    assert ref.ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    # evenly spaced from T-1 down to 0, rounded to the nearest step (not truncated: 66.7 -> 67)
    assert ref.ddim_timesteps(101, 4).tolist() == [round(100 * (1 - i / 3)) for i in range(4)]
    steps = ref.ddim_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 0 and len(set(steps.tolist())) == 50
    assert np.all(np.diff(steps) < 0)
    with pytest.raises(ValueError, match="sample_steps"):
        ref.ddim_timesteps(10, 11)


def test_ddim_with_eta_one_is_the_ddpm_step(rng):
    betas = ref.cosine_betas(60)
    abar = np.cumprod(1 - betas)
    x_t, eps, z = rng.standard_normal((3, 4, 10))
    for t in (1, 30, 59):
        ddim = ref.ddim_step(x_t, t, t - 1, eps, abar, eta=1.0, noise=z)
        assert rel(ddim, ref.ddpm_step(x_t, t, eps, z, betas)) < 1e-12
    # and also with the clip: both clip x0 and agree on eps
    assert rel(
        ref.ddim_step(2 * x_t, 30, 29, eps, abar, eta=1.0, noise=z, clip_x0=1.0),
        ref.ddpm_step(2 * x_t, 30, eps, z, betas, clip_x0=1.0),
    ) < 1e-12


def test_ddim_eta_zero_follows_the_forward_process_and_recovers_x0(rng):
    """With the true noise, a deterministic step from t lands on q_sample(x0, t_prev, eps) exactly,
    and a whole shortened run from pure-ish noise returns x0."""
    betas = ref.linear_betas(200)
    abar = np.cumprod(1 - betas)
    x0, eps = rng.standard_normal((2, 3, 6))
    x_t = ref.q_sample(x0, 150, eps, abar)
    assert rel(ref.ddim_step(x_t, 150, 90, eps, abar), ref.q_sample(x0, 90, eps, abar)) < 1e-12
    # a full run, 20 of 200 steps, the oracle recomputing the noise from the known x0 each time
    steps = ref.ddim_timesteps(200, 20)
    x = ref.q_sample(x0, int(steps[0]), rng.standard_normal(x0.shape), abar)
    for i, t in enumerate(steps):
        oracle = (x - math.sqrt(abar[t]) * x0) / math.sqrt(1 - abar[t])
        x = ref.ddim_step(x, int(t), int(steps[i + 1]) if i + 1 < len(steps) else -1, oracle, abar)
    assert rel(x, x0) < 1e-9


def test_guided_eps():
    rng = np.random.default_rng(0)
    c, u = rng.standard_normal((2, 3, 4))
    assert rel(ref.guided_eps(c, u, 1.0), c) < 1e-15
    np.testing.assert_array_equal(ref.guided_eps(c, u, 0.0), u)
    # Ho & Salimans' form with w = scale - 1
    assert rel(ref.guided_eps(c, u, 4.0), (1 + 3.0) * c - 3.0 * u) < 1e-14
