"""Diffusion: the noise schedule, DDPM and DDIM steps, classifier-free guidance, and a sampler.

The model-free half of a text-conditioned diffusion model (the denoiser that
predicts the noise lives with the model). Chapter 11 builds it in this order:

    NoiseSchedule           betas b_t and abar_t = (1 - b_0) ... (1 - b_t), t = 0 ... T-1 (float64 buffers)
      .q_sample             x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: noise an image in one jump
      .training_example     a random step and noise for each image: what a training step needs
      .predict_x0           the same equation solved for x0, given a predicted eps
      .v_target, .eps_from_v   v-prediction (Salimans & Ho 2022): the target, and the eps it implies
      .posterior_mean_variance   q(x_{t-1} | x_t, x0), the Gaussian a DDPM step samples from
      .ddpm_step            x_t -> x_{t-1} (Ho et al. 2020, every step, stochastic)
      .ddim_step            x_t -> x_s for any s < t (Song et al. 2021; eta = 0: deterministic)
    guided_eps              eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022)
    sample                  start from N(0, I) and run a denoiser `denoiser(x_t, t, cond) -> eps`

Steps count from 0 (the papers count from 1: our t is their t + 1). The
schedule is kept in float64 (abar_t near 0 at the last steps is where float32
would lose digits); its values are cast to the image's dtype where they meet it.

Checked against chapters/ch11_text_to_image/reference.py (the formulas are
written out in its docstring).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NoiseSchedule", "guided_eps", "sample"]

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


# ANCHOR: NoiseSchedule
class NoiseSchedule(nn.Module):
    """The T steps of a diffusion process and the arithmetic on them.

    kind "linear": Ho et al.'s b_t from beta_start to beta_end (given for T = 1000;
    both are scaled by 1000 / T so a shorter schedule still ends in near-pure noise).
    kind "cosine": Nichol & Dhariwal's abar(t) = f(t) / f(0),
    f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, b_t clipped at 0.999.

    Buffers (float64, follow `.to(device)` but not dtype casts): betas (T,),
    alphas_cumprod (T,), alphas_cumprod_prev (T,) (abar_{t-1}, 1 at t = 0).
    """

    def __init__(
        self,
        steps: int = 1000,
        kind: str = "linear",
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if kind == "linear":
            scale = 1000.0 / steps
            if not 0 < beta_start * scale <= beta_end * scale < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1 after scaling by 1000 / T = {scale:g}")
            betas = torch.linspace(beta_start * scale, beta_end * scale, steps, dtype=torch.float64)
        elif kind == "cosine":
            t = torch.arange(steps + 1, dtype=torch.float64) / steps  # (T + 1,)
            f = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            abar = f / f[0]  # (T + 1,): the closed form, 1 at t = 0
            betas = (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)  # the last step would be b = 1
        else:
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        abar = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        self.kind = kind
        self.register_buffer("betas", betas)
        self.register_buffer("alphas_cumprod", abar)
        self.register_buffer("alphas_cumprod_prev", torch.cat([abar.new_ones(1), abar[:-1]]))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> NoiseSchedule:
        # .to(device) moves the buffers; a dtype cast (model.half(), .to(torch.float32)) must not
        # round them, so they stay float64 whatever the rest of a model is cast to.
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(fn(buf).device)
        return self

    @property
    def steps(self) -> int:
        """T, the number of steps."""
        return self.betas.shape[0]

    def _at(self, values: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
        """values[t] cast to like's dtype, shaped to broadcast over like (B, ...): t an int or (B,) long."""
        if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
            raise ValueError(f"t must be an int or a (B,) long tensor, got {type(t).__name__}")
        if isinstance(t, Tensor):
            if t.dtype != torch.long or t.ndim != 1 or t.shape[0] != like.shape[0]:
                raise ValueError(f"t must be a (B,) = ({like.shape[0]},) long tensor, got {t.dtype} {tuple(t.shape)}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.steps):
                raise ValueError(f"t must lie in [0, {self.steps}), got [{int(t.min())}, {int(t.max())}]")
            out = values[t.to(values.device)]  # (B,)
            return out.view(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)  # (B, 1, ..., 1)
        if not 0 <= t < self.steps:
            raise ValueError(f"t must lie in [0, {self.steps}), got {t}")
        return values[t].to(like.device, like.dtype)  # (): one step for the whole batch

    @staticmethod
    def _same_shape(**tensors: Tensor) -> None:
        shapes = {name: tuple(x.shape) for name, x in tensors.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"shapes must match: {shapes}")
    # ANCHOR_END: NoiseSchedule

    # ANCHOR: q_sample
    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (B, ...); t int or (B,) long."""
        self._same_shape(x0=x0, noise=noise)
        a = self._at(self.alphas_cumprod, t, x0)  # (B, 1, ..., 1) or ()
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def training_example(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """A uniform random step t (B,) and noise eps (B, ...) per image, and x_t = q_sample(x0, t, eps).

        A denoiser is trained to predict eps from (x_t, t, text) with a mean squared error.
        """
        t = torch.randint(0, self.steps, (x0.shape[0],), generator=generator, device=x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)  # (B, ...)
        return t, noise, self.q_sample(x0, t, noise)

    def predict_x0(self, x_t: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        """q_sample solved for x0: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). Shapes as q_sample."""
        self._same_shape(x_t=x_t, eps=eps)
        a = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()
    # ANCHOR_END: q_sample

    # ANCHOR: ddpm_step
    # ANCHOR: v_prediction
    def v_target(self, x0: Tensor, t: int | Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0: the target of a v-predicting denoiser. Shapes as q_sample."""
        self._same_shape(x0=x0, eps=eps)
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * eps - (1.0 - a).sqrt() * x0

    def eps_from_v(self, x_t: Tensor, t: int | Tensor, v: Tensor) -> Tensor:
        """The noise a predicted v implies: sqrt(1 - abar_t) x_t + sqrt(abar_t) v. Shapes as q_sample."""
        self._same_shape(x_t=x_t, v=v)
        a = self._at(self.alphas_cumprod, t, x_t)
        return (1.0 - a).sqrt() * x_t + a.sqrt() * v
    # ANCHOR_END: v_prediction

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, ...) and variance ((B, 1, ..., 1) or ()) of q(x_{t-1} | x_t, x0); variance 0 at t = 0."""
        self._same_shape(x0=x0, x_t=x_t)
        b = self._at(self.betas, t, x_t)
        a = self._at(self.alphas_cumprod, t, x_t)
        ap = self._at(self.alphas_cumprod_prev, t, x_t)
        mean = ap.sqrt() * b / (1.0 - a) * x0 + (1.0 - b).sqrt() * (1.0 - ap) / (1.0 - a) * x_t
        return mean, b * (1.0 - ap) / (1.0 - a)

    def ddpm_step(
        self, x_t: Tensor, t: int | Tensor, eps: Tensor, noise: Tensor | None = None, clip_x0: float | None = None
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1} (B, ...) given the predicted eps (B, ...).

        x0 is estimated from eps (clipped to [-clip_x0, clip_x0] when given), then
        x_{t-1} = posterior mean + sqrt(posterior variance) * noise; noise None gives the mean.
        """
        x0 = self.predict_x0(x_t, t, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = self.posterior_mean_variance(x0, x_t, t)
        if noise is None:
            return mean
        self._same_shape(x_t=x_t, noise=noise)
        return mean + var.sqrt() * noise
    # ANCHOR_END: ddpm_step

    # ANCHOR: ddim_step
    def timesteps(self, sample_steps: int | None = None) -> list[int]:
        """The steps a sampler visits, descending from T-1 to 0: all T, or sample_steps evenly spaced."""
        n = self.steps if sample_steps is None else sample_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.steps:
            raise ValueError(f"sample_steps must be an int in [1, {self.steps}], got {sample_steps!r}")
        return torch.linspace(self.steps - 1, 0, n, dtype=torch.float64).round().long().tolist()

    def ddim_step(
        self,
        x_t: Tensor,
        t: int,
        t_prev: int,
        eps: Tensor,
        eta: float = 0.0,
        noise: Tensor | None = None,
        clip_x0: float | None = None,
    ) -> Tensor:
        """One DDIM step from step t to an earlier step t_prev (-1: straight to x0). x_t, eps (B, ...).

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * noise.
        eta = 0: deterministic. noise None: no noise term. With clip_x0 the predicted x0
        is clipped and eps re-derived from it, so the two stay consistent.
        """
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if not isinstance(t, int) or not isinstance(t_prev, int) or not -1 <= t_prev < t < self.steps:
            raise ValueError(f"need ints -1 <= t_prev < t < T = {self.steps}, got t={t!r}, t_prev={t_prev!r}")
        a = float(self.alphas_cumprod[t])
        a_prev = 1.0 if t_prev < 0 else float(self.alphas_cumprod[t_prev])
        x0 = self.predict_x0(x_t, t, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
        out = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if noise is None:
            return out
        self._same_shape(x_t=x_t, noise=noise)
        return out + sigma * noise
    # ANCHOR_END: ddim_step


# ANCHOR: guided_eps
def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond), shapes (B, ...).

    scale 1: the conditional prediction; 0: the unconditional one; > 1 pushes further
    from "any image" towards "this text". Ho & Salimans write (1 + w) eps_cond - w eps_uncond:
    the same with scale = 1 + w.
    """
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"eps_cond {tuple(eps_cond.shape)} and eps_uncond {tuple(eps_uncond.shape)} must match")
    return eps_uncond + scale * (eps_cond - eps_uncond)
# ANCHOR_END: guided_eps


# ANCHOR: sample
@torch.no_grad()
def sample(
    denoiser: Denoiser,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    method: str = "ddpm",
    cond: Any = None,
    uncond: Any = None,
    guidance: float = 1.0,
    eta: float = 0.0,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate (B, ...) = shape from pure noise with `denoiser(x_t (B, ...), t (B,) long, cond) -> eps`.

    method "ddpm": every one of the T steps (steps must be None or T).
    method "ddim": `steps` evenly spaced steps (default T), with `eta` (0: deterministic).
    guidance: classifier-free guidance scale. At 1 the denoiser is called once per
    step with `cond`; otherwise twice, with `cond` and with `uncond` (default None:
    a denoiser should read None as "no text"), and the two are mixed by `guided_eps`.
    clip_x0: clip each step's predicted x0 to [-clip_x0, clip_x0].
    Random numbers, all from `generator`, in this order: x_T, then one noise tensor per
    step whose noise is not zero (DDPM: t > 0; DDIM: eta > 0 and not the last step).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if method == "ddpm" and steps not in (None, schedule.steps):
        raise ValueError(f"DDPM visits all T = {schedule.steps} steps; use method='ddim' for steps={steps}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    shape = tuple(shape)
    if not shape or any(not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"shape must be (B, ...) positive ints, got {shape}")
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)  # (B, ...): x_T
    visits = schedule.timesteps(steps if method == "ddim" else None)
    for i, t in enumerate(tqdm(visits, desc=f"sample {method}", unit="step", disable=not progress, file=sys.stderr)):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=x.device)  # (B,)
        eps = denoiser(x, t_batch, cond)  # (B, ...)
        if guidance != 1:
            eps = guided_eps(eps, denoiser(x, t_batch, uncond), guidance)
        if eps.shape != x.shape:
            raise ValueError(f"the denoiser returned shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)}")
        if method == "ddpm":
            noise = torch.randn(shape, generator=generator, dtype=dtype, device=x.device) if t > 0 else None
            x = schedule.ddpm_step(x, t, eps, noise, clip_x0)
        else:
            t_prev = visits[i + 1] if i + 1 < len(visits) else -1
            noisy = eta > 0 and t_prev >= 0
            noise = torch.randn(shape, generator=generator, dtype=dtype, device=x.device) if noisy else None
            x = schedule.ddim_step(x, t, t_prev, eps, eta, noise, clip_x0)
    return x
# ANCHOR_END: sample
