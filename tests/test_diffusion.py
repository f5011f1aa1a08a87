"""`tiny_mm.diffusion` against chapter 11's NumPy reference, and the sampler against oracles.

The oracle denoiser knows x0 and returns the exact noise of the current x_t,
eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t); with it both samplers must end on x0.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import chapters.ch11_text_to_image.reference as ref
from tests.numerics import rel_err
from tiny_mm.diffusion import NoiseSchedule, guided_eps, sample

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def ref_betas(kind: str, steps: int) -> np.ndarray:
    return ref.linear_betas(steps) if kind == "linear" else ref.cosine_betas(steps)


def t64(x: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


@pytest.mark.parametrize("kind, steps", [("linear", 1000), ("linear", 64), ("cosine", 1000), ("cosine", 30)])
def test_schedule_buffers_match_reference(kind, steps):
    schedule = NoiseSchedule(steps, kind)
    betas = ref_betas(kind, steps)
    assert schedule.steps == steps and schedule.kind == kind
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        assert getattr(schedule, name).dtype == torch.float64
        assert name in dict(schedule.named_buffers())
    assert rel_err(schedule.betas, betas) < 1e-14
    assert rel_err(schedule.alphas_cumprod, ref.alphas_cumprod(betas)) < 1e-14
    assert schedule.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])
    assert bool((schedule.alphas_cumprod.diff() < 0).all())  # decreasing
    # A model cast to float32 or half carries the schedule along without rounding it.
    schedule.float()
    schedule.to(torch.float16)
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    assert rel_err(schedule.alphas_cumprod, ref.alphas_cumprod(betas)) < 1e-14


def test_schedule_refuses_bad_settings():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="steps"):
        NoiseSchedule(0)
    with pytest.raises(ValueError, match="scaling"):
        NoiseSchedule(20, "linear")  # the last beta would be 0.02 * 1000 / 20 = 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_and_predict_x0_match_reference(rng, dtype, kind):
    schedule = NoiseSchedule(80, kind)
    abar = ref.alphas_cumprod(ref_betas(kind, 80))
    x0, eps = rng.standard_normal((2, 5, 3, 4, 4))
    t = rng.integers(0, 80, size=5)
    t[0], t[1] = 0, 79  # both ends
    x_t = schedule.q_sample(t64(x0, dtype), torch.from_numpy(t), t64(eps, dtype))
    assert x_t.dtype == dtype
    assert rel_err(x_t, ref.q_sample(x0, t, eps, abar)) < TOL[dtype]
    # one int step for the whole batch
    one_step = schedule.q_sample(t64(x0, dtype), 17, t64(eps, dtype))
    assert rel_err(one_step, ref.q_sample(x0, 17, eps, abar)) < TOL[dtype]
    x_t_ref = ref.q_sample(x0, t, eps, abar)
    x0_hat = schedule.predict_x0(t64(x_t_ref, dtype), torch.from_numpy(t), t64(eps, dtype))
    # float32: dividing by sqrt(abar_t) ~ 0.005 at the last step amplifies the input's rounding
    assert rel_err(x0_hat, ref.predict_x0(x_t_ref, t, eps, abar)) < (1e-12 if dtype == torch.float64 else 1e-4)


def test_q_sample_empirical_mean_and_variance(rng):
    schedule = NoiseSchedule(100, "cosine")
    x0 = torch.from_numpy(rng.standard_normal(5))
    draws, t = 20000, 61
    noise = torch.from_numpy(rng.standard_normal((draws, 5)))
    x_t = schedule.q_sample(x0.expand(draws, 5), torch.full((draws,), t), noise)
    abar = float(ref.alphas_cumprod(ref.cosine_betas(100))[t])  # the reference's value, not the module's
    assert (x_t.mean(0) - math.sqrt(abar) * x0).abs().max() < 5 * math.sqrt((1 - abar) / draws)
    assert (x_t.var(0) / (1 - abar) - 1).abs().max() < 5 * math.sqrt(2 / draws)


def test_training_example_is_q_sample_with_random_steps(rng):
    schedule = NoiseSchedule(50)
    x0 = torch.from_numpy(rng.standard_normal((64, 2, 3))).float()
    t, noise, x_t = schedule.training_example(x0, torch.Generator().manual_seed(3))
    assert t.shape == (64,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 50
    assert len(set(t.tolist())) > 20  # spread over the steps
    assert noise.shape == x0.shape and noise.dtype == torch.float32
    abar = ref.alphas_cumprod(ref.linear_betas(50))
    assert rel_err(x_t, ref.q_sample(x0.double().numpy(), t.numpy(), noise.double().numpy(), abar)) < 1e-6
    again = schedule.training_example(x0, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], t) and torch.equal(again[2], x_t)  # the generator decides


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_and_ddpm_step_match_reference(rng, dtype):
    schedule = NoiseSchedule(60, "linear")
    betas = ref.linear_betas(60)
    x0, x_t, eps, z = rng.standard_normal((4, 3, 2, 5))
    for t in (0, 1, 31, 59):
        mean, var = schedule.posterior_mean_variance(t64(x0, dtype), t64(x_t, dtype), t)
        mean_ref, var_ref = ref.posterior_mean_variance(x0, x_t, t, betas)
        assert rel_err(mean, mean_ref) < TOL[dtype]
        assert abs(float(var) - float(var_ref)) <= TOL[dtype] * max(float(var_ref), 1e-300)
        step = schedule.ddpm_step(t64(x_t, dtype), t, t64(eps, dtype), t64(z, dtype))
        assert rel_err(step, ref.ddpm_step(x_t, t, eps, z, betas)) < TOL[dtype]
        mean_only = schedule.ddpm_step(t64(x_t, dtype), t, t64(eps, dtype))
        assert rel_err(mean_only, ref.ddpm_step(x_t, t, eps, None, betas)) < TOL[dtype]
    # per-sample steps, and the clip
    t = np.array([0, 12, 59])
    step = schedule.ddpm_step(t64(2 * x_t, dtype), torch.from_numpy(t), t64(eps, dtype), t64(z, dtype), clip_x0=1.0)
    assert rel_err(step, ref.ddpm_step(2 * x_t, t, eps, z, betas, clip_x0=1.0)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_matches_reference(rng, dtype, eta):
    schedule = NoiseSchedule(100, "cosine")
    abar = ref.alphas_cumprod(ref.cosine_betas(100))
    x_t, eps, z = rng.standard_normal((3, 2, 3, 4, 4))
    for t, t_prev in ((99, 80), (50, 49), (10, -1), (0, -1)):
        out = schedule.ddim_step(t64(x_t, dtype), t, t_prev, t64(eps, dtype), eta, t64(z, dtype))
        assert rel_err(out, ref.ddim_step(x_t, t, t_prev, eps, abar, eta, z)) < TOL[dtype] * (10 if t == 99 else 1)
    clipped = schedule.ddim_step(t64(3 * x_t, dtype), 40, 20, t64(eps, dtype), eta, t64(z, dtype), clip_x0=1.0)
    assert rel_err(clipped, ref.ddim_step(3 * x_t, 40, 20, eps, abar, eta, z, clip_x0=1.0)) < TOL[dtype]


def test_timesteps_match_reference():
    schedule = NoiseSchedule(1000)
    assert schedule.timesteps() == list(range(999, -1, -1))
    for n in (1, 7, 50, 999):
        assert schedule.timesteps(n) == ref.ddim_timesteps(1000, n).tolist()
    with pytest.raises(ValueError, match="sample_steps"):
        schedule.timesteps(1001)


def test_step_functions_refuse_bad_input(rng):
    schedule = NoiseSchedule(30, "cosine")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="lie in"):
        schedule.q_sample(x, 30, x)
    with pytest.raises(ValueError, match="lie in"):
        schedule.q_sample(x, torch.tensor([0, -1]), x)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        schedule.q_sample(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="long"):
        schedule.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="shapes must match"):
        schedule.q_sample(x, 3, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="t_prev"):
        schedule.ddim_step(x, 5, 5, x)
    with pytest.raises(ValueError, match="eta"):
        schedule.ddim_step(x, 5, 4, x, eta=-0.1)
    with pytest.raises(ValueError, match="must match"):
        guided_eps(x, torch.zeros(3, 2), 2.0)


# --------------------------------------------------------------------------- guidance and the sampler


def test_guided_eps_matches_reference(rng):
    c, u = rng.standard_normal((2, 4, 3, 2))
    for scale in (0.0, 1.0, 2.5, 7.5):
        assert rel_err(guided_eps(t64(c), t64(u), scale), ref.guided_eps(c, u, scale)) < 1e-15
    assert torch.equal(guided_eps(t64(c), t64(u), 0.0), t64(u))


class Linear:
    """A toy denoiser whose answer depends on x_t, t and the condition: eps = a(t) x_t + cond.

    cond: a (B, 1, 1) tensor, or None for "no text" (then 0). Records its calls."""

    def __init__(self, steps: int) -> None:
        self.steps, self.calls = steps, []

    def __call__(self, x, t, cond):
        self.calls.append(cond)
        a = 0.3 + 0.5 * t.to(x.dtype) / self.steps  # (B,)
        return a.view(-1, *([1] * (x.ndim - 1))) * x + (0.0 if cond is None else cond)

    def numpy(self, x, t, cond):
        return (0.3 + 0.5 * t / self.steps) * x + (0.0 if cond is None else cond)


@pytest.mark.parametrize("method, steps, eta, guidance", [
    ("ddpm", None, 0.0, 1.0), ("ddpm", None, 0.0, 3.0), ("ddim", 12, 0.0, 2.0), ("ddim", 9, 0.7, 1.0),
])
def test_sample_equals_a_reference_loop(rng, method, steps, eta, guidance):
    """The whole sampler against the reference's steps, fed the same random numbers in the
    documented order (x_T, then one noise tensor per noisy step)."""
    T, shape = 40, (3, 2, 5)
    schedule = NoiseSchedule(T, "cosine")
    betas = ref.cosine_betas(T)
    abar = ref.alphas_cumprod(betas)
    cond_np = rng.standard_normal((3, 1, 1))
    denoiser = Linear(T)
    out = sample(denoiser, shape, schedule, steps=steps, method=method, cond=t64(cond_np), guidance=guidance,
                 eta=eta, clip_x0=1.5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g, dtype=torch.float64).numpy()
    visits = ref.ddim_timesteps(T, steps or T)
    for i, t in enumerate(visits):
        eps = denoiser.numpy(x, t, cond_np)
        if guidance != 1:
            eps = ref.guided_eps(eps, denoiser.numpy(x, t, None), guidance)
        if method == "ddpm":
            noise = torch.randn(shape, generator=g, dtype=torch.float64).numpy() if t > 0 else None
            x = ref.ddpm_step(x, int(t), eps, noise, betas, clip_x0=1.5)
        else:
            t_prev = int(visits[i + 1]) if i + 1 < len(visits) else -1
            noise = torch.randn(shape, generator=g, dtype=torch.float64).numpy() if eta > 0 and t_prev >= 0 else None
            x = ref.ddim_step(x, int(t), t_prev, eps, abar, eta, noise, clip_x0=1.5)
    assert rel_err(out, x) < 1e-12
    per_step = 1 if guidance == 1 else 2
    assert len(denoiser.calls) == per_step * len(visits)


class Oracle:
    """Knows x0: returns the exact noise of x_t, (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule) -> None:
        self.x0, self.abar = x0, schedule.alphas_cumprod

    def __call__(self, x, t, cond):
        a = self.abar[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ..., 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta_zero_with_the_oracle_recovers_x0(rng, kind):
    schedule = NoiseSchedule(200, kind)
    x0 = torch.from_numpy(rng.uniform(-1, 1, size=(4, 3, 8, 8)))
    for steps in (200, 25, 3):
        out = sample(Oracle(x0, schedule), x0.shape, schedule, steps=steps, method="ddim",
                     generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert rel_err(out, x0) < 1e-10
    out32 = sample(Oracle(x0.float(), schedule), x0.shape, schedule, steps=25, method="ddim",
                   generator=torch.Generator().manual_seed(0))
    assert out32.dtype == torch.float32 and rel_err(out32, x0) < 1e-4


def test_ddpm_with_the_oracle_ends_at_x0(rng):
    """Every step is a sample of q(x_{t-1} | x_t, x0) with the true x0: the chain is the true
    posterior chain, and its last step (variance 0, x0 coefficient 1) lands on x0."""
    schedule = NoiseSchedule(100, "linear")
    x0 = torch.from_numpy(rng.uniform(-1, 1, size=(2, 3, 6, 6)))
    out = sample(Oracle(x0, schedule), x0.shape, schedule, method="ddpm", generator=torch.Generator().manual_seed(1),
                 dtype=torch.float64)
    assert rel_err(out, x0) < 1e-8
    out32 = sample(Oracle(x0.float(), schedule), x0.shape, schedule, method="ddpm",
                   generator=torch.Generator().manual_seed(1))
    assert rel_err(out32, x0) < 1e-3


def test_guidance_zero_is_unconditional_and_one_is_conditional(rng):
    T, shape = 50, (2, 3, 4)
    schedule = NoiseSchedule(T, "cosine")
    cond, other = t64(rng.standard_normal((2, 1, 1))), t64(rng.standard_normal((2, 1, 1)))

    def run(**kwargs):
        return sample(Linear(T), shape, schedule, steps=10, method="ddim", eta=0.5,
                      generator=torch.Generator().manual_seed(5), dtype=torch.float64, **kwargs)

    assert torch.equal(run(cond=cond, uncond=other, guidance=0.0), run(cond=other))  # exactly: u + 0 (c - u)
    assert torch.equal(run(cond=cond, uncond=other, guidance=1.0), run(cond=cond))
    assert torch.equal(run(cond=cond, guidance=0.0), run(cond=None))  # uncond defaults to None
    assert rel_err(run(cond=cond, uncond=other, guidance=1.0 + 1e-9), run(cond=cond)) < 1e-7  # the mixing path
    assert rel_err(run(cond=cond, uncond=other, guidance=3.0), run(cond=cond)) > 1e-2  # guidance changes samples


def test_sample_is_repeatable_quiet_and_checks_its_arguments(capsys):
    schedule = NoiseSchedule(30)
    denoiser = Linear(30)
    a = sample(denoiser, (2, 4), schedule, generator=torch.Generator().manual_seed(2))
    b = sample(denoiser, (2, 4), schedule, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == (2, 4) and a.dtype == torch.float32
    assert capsys.readouterr().err == ""  # the progress bar is off by default
    sample(denoiser, (2, 4), schedule, steps=3, method="ddim", progress=True)
    assert "sample ddim" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method"):
        sample(denoiser, (2, 4), schedule, method="euler")
    with pytest.raises(ValueError, match="DDPM visits all"):
        sample(denoiser, (2, 4), schedule, steps=10)
    with pytest.raises(ValueError, match="sample_steps"):
        sample(denoiser, (2, 4), schedule, steps=31, method="ddim")
    with pytest.raises(ValueError, match="shape"):
        sample(denoiser, (2, 0), schedule)
    with pytest.raises(ValueError, match="guidance"):
        sample(denoiser, (2, 4), schedule, guidance=float("inf"))
    with pytest.raises(ValueError, match=r"denoiser returned shape \(2, 1\)"):
        sample(lambda x, t, cond: x[:, :1], (2, 4), schedule)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_v_prediction_matches_reference(rng, dtype, kind):
    schedule = NoiseSchedule(60, kind)
    abar = ref.alphas_cumprod(ref_betas(kind, 60))
    x0, eps = rng.standard_normal((2, 4, 3, 5))
    t = rng.integers(0, 60, size=4)
    t[0], t[1] = 0, 59  # both ends
    tt = torch.from_numpy(t)
    v = schedule.v_target(t64(x0, dtype), tt, t64(eps, dtype))
    assert v.dtype == dtype and rel_err(v, ref.v_target(x0, t, eps, abar)) < TOL[dtype]
    x_t = ref.q_sample(x0, t, eps, abar)
    back = schedule.eps_from_v(t64(x_t, dtype), tt, t64(ref.v_target(x0, t, eps, abar), dtype))
    assert rel_err(back, ref.eps_from_v(x_t, t, ref.v_target(x0, t, eps, abar), abar)) < TOL[dtype]
    # and the true v gives back the true noise: the two maps are each other's inverse on x_t
    assert rel_err(back, eps) < TOL[dtype] * 10


def test_ddim_with_a_v_oracle_recovers_x0(rng):
    # A denoiser that predicts the exact v, turned into eps by eps_from_v, is the eps oracle.
    schedule = NoiseSchedule(100, "cosine")
    x0 = torch.from_numpy(rng.uniform(-1, 1, size=(3, 8, 4)))
    abar = schedule.alphas_cumprod

    def v_oracle(x_t, t, cond):
        a = abar[t].view(-1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.eps_from_v(x_t, t, schedule.v_target(x0, t, eps))

    out = sample(v_oracle, x0.shape, schedule, steps=10, method="ddim", dtype=torch.float64,
                 generator=torch.Generator().manual_seed(0))
    assert rel_err(out, x0) < 1e-9
