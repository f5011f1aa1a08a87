"""Text-to-image in plain NumPy (float64): image tokens, token sampling and diffusion.

The bottom rung of chapter 11's ladder. `tiny_mm.vq` and `tiny_mm.diffusion`
are tested against these functions on the same numbers.

Part 1, image tokens (DALL·E-style generation writes an image as a row of
codebook ids). A vector quantiser (van den Oord et al. 2017, "Neural Discrete
Representation Learning") replaces each encoder vector z_e (one per image
patch) with the nearest of K codebook vectors e_1 ... e_K:

    code  = argmin_k ||z_e - e_k||^2          the token id of the patch
    z_q   = e_code                            what the decoder reads

argmin has no useful gradient, so training uses two tricks:

    straight-through   the decoder's gradient with respect to z_q is handed to
                       z_e unchanged (in torch: z_q = z_e + sg[e - z_e], where
                       sg is stop-gradient, i.e. `.detach()`)
    loss               ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2
                       the first (codebook) term pulls the code towards the
                       encoder output and moves only the codebook; the second
                       (commitment) term pulls the encoder output towards its
                       code and moves only the encoder. beta = 0.25 in the paper.

Here both squared norms are averaged over every element (N vectors of D
numbers), as torch's `mse_loss` does. With M = N * D, the gradients are

    d loss / d z_e[i]   = beta * 2 (z_e[i] - e_code[i]) / M        (+ the decoder's gradient, passed straight through)
    d loss / d e_k      = sum over i with code[i] = k of 2 (e_k - z_e[i]) / M

A code no vector picked gets no gradient at all: it is a "dead" code. The
perplexity exp(entropy of the code histogram) measures how many codes are in
use: K when all are used equally, 1 when one code takes everything.

Part 2, sampling the next token. With logits l (V,), temperature T > 0 and
top-k: keep the logits that are >= the k-th largest (ties at the boundary are
kept), set the rest to -inf, and sample from softmax(l / T). T -> 0 is greedy
(all mass on the argmax); T = 0 is defined here as exactly that.

Part 3, DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").
Steps are indexed t = 0 ... T-1 here (the paper counts 1 ... T; our t is the
paper's t + 1). With betas b_t, alpha_t = 1 - b_t, abar_t = alpha_0 ... alpha_t:

    forward (q_sample)   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)
    x0 from eps          x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    v-prediction         (Salimans & Ho 2022) v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0; from a
                         predicted v, eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v and
                         x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v. Its squared error weighs
                         the noisy steps, where only the caption can tell what x0 is, far
                         more than eps's does (at abar_t -> 0, ||v - v_hat|| = ||x0 - x0_hat||)
    posterior            q(x_{t-1} | x_t, x0) = N(mean, var) with abar_prev = abar_{t-1} (1 at t = 0):
                         mean = sqrt(abar_prev) b_t / (1 - abar_t) * x0
                              + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) * x_t
                         var  = b_t (1 - abar_prev) / (1 - abar_t)
    DDPM step            x0_hat from the predicted eps, then x_{t-1} = mean(x0_hat, x_t) + sqrt(var) z
    DDIM step            (Song et al. 2021) from step t to any earlier step s (s = -1: to x0):
                         sigma = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
                         x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z
                         eta = 0: deterministic; eta = 1 with s = t - 1: exactly the DDPM step.
    guidance             (Ho & Salimans 2022) eps = eps_uncond + w (eps_cond - eps_uncond);
                         w = 1 is the conditional model, w = 0 the unconditional one. The paper
                         writes (1 + w') eps_cond - w' eps_uncond: the same with w = 1 + w'.

Schedules: linear (Ho et al.: T = 1000, b from 1e-4 to 0.02; for other T both
ends are scaled by 1000 / T, as in Nichol & Dhariwal's code, so that abar_{T-1}
stays near 0) and cosine (Nichol & Dhariwal 2021, "Improved DDPM"):
abar(t) = f(t) / f(0), f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, s = 0.008,
with b_t = 1 - abar(t + 1) / abar(t) clipped at 0.999.

Part 4, the latent denoiser's pieces (`tiny_mm.denoiser`). The step t enters as
sinusoids, the transformer's position code with t as the position:

    emb(t) = [cos(t w_0) ... cos(t w_{h-1}), sin(t w_0) ... sin(t w_{h-1})],  w_i = 10000^(-i / h)

and one block of the denoiser reads the latent tokens x (B, N, d) and the
caption's token vectors c (B, T, e), of which the first `lengths[b]` are words:

    x = x + SelfAttn(LN_1(x))
    x = x + CrossAttn(LN_2(x), c)      (keys and values from the words only)
    x = x + MLP(LN_3(x))               (exact GELU)

Part 5, the U-Net's pieces (`tiny_mm.unet`). A 3 x 3 convolution with zero padding,
stride s: out[b, o, i, j] = bias[o] + sum over c, u, v of w[o, c, u, v] xpad[b, c, s i + u, s j + v].
GroupNorm splits the C channels into G groups and standardises each (b, group) over its
channels and positions (biased variance, eps 1e-5), then scales and shifts per channel.
A ResBlock, with SiLU(a) = a / (1 + e^-a) and the step's embedding emb (B, E):

    h = conv_1(SiLU(GN_1(x)));  [scale, shift] = W emb' + b with emb' = SiLU(emb)
    h = conv_2(SiLU(GN_2(h) (1 + scale) + shift));  out = skip(x) + h   (skip: 1 x 1 conv or identity)

and the cross-attention-only block: x = x + CrossAttn(LN_1(x), c); x = x + MLP(LN_2(x)).

No torch here on purpose: the reference must not share a line of code with
what it checks.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "squared_distances",
    "quantize",
    "vq_loss",
    "vq_grads",
    "codebook_usage",
    "next_token_distribution",
    "sample_next_token",
    "linear_betas",
    "cosine_betas",
    "cosine_alphas_cumprod",
    "alphas_cumprod",
    "q_sample",
    "predict_x0",
    "v_target",
    "eps_from_v",
    "posterior_mean_variance",
    "ddpm_step",
    "ddim_timesteps",
    "ddim_step",
    "guided_eps",
    "timestep_embedding",
    "denoiser_block",
    "conv2d",
    "group_norm",
    "res_block",
    "cross_attention_block",
]


def _float(name: str, x, ndim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or inf")
    return x


# --------------------------------------------------------------------------- 1. vector quantisation


# ANCHOR: quantize
def squared_distances(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """||z_i - e_k||^2 for every vector and code: z (N, D), codebook (K, D) -> (N, K)."""
    z, codebook = _float("z", z, 2), _float("codebook", codebook, 2)
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has {z.shape[1]} features but the codes have {codebook.shape[1]}")
    diff = z[:, None, :] - codebook[None, :, :]  # (N, K, D): written out, no expansion trick
    return (diff**2).sum(axis=-1)


def quantize(z: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest code of each vector: z (N, D) -> (codes (N,) ints, z_q (N, D) = codebook[codes])."""
    codes = squared_distances(z, codebook).argmin(axis=1)  # (N,): the first of equal distances
    return codes, np.asarray(codebook, dtype=np.float64)[codes]
# ANCHOR_END: quantize


# ANCHOR: vq_loss
def vq_loss(z_e: np.ndarray, codebook: np.ndarray, beta: float = 0.25) -> dict[str, float]:
    """VQ-VAE loss terms for z_e (N, D) and codebook (K, D), each a mean over the N * D numbers.

    Returns {"codebook": ||sg[z_e] - e||^2, "commitment": ||z_e - sg[e]||^2,
    "loss": codebook + beta * commitment}. The two terms have the same value; they
    differ in what they move (see `vq_grads`).
    """
    codes, z_q = quantize(z_e, codebook)
    err = float(((np.asarray(z_e, dtype=np.float64) - z_q) ** 2).mean())
    return {"codebook": err, "commitment": err, "loss": err + beta * err}


def vq_grads(
    z_e: np.ndarray, codebook: np.ndarray, grad_z_q: np.ndarray, beta: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of (decoder loss + vq loss), by hand.

    z_e (N, D), codebook (K, D), grad_z_q (N, D): the decoder's gradient with
    respect to z_q. Returns (grad_z_e (N, D), grad_codebook (K, D)):

        grad_z_e      = grad_z_q + beta * 2 (z_e - e_code) / M     straight-through + commitment
        grad_codebook[k] = sum over i with code i = k of 2 (e_k - z_e[i]) / M      codebook term only
    """
    z_e = _float("z_e", z_e, 2)
    grad_z_q = _float("grad_z_q", grad_z_q, 2)
    if grad_z_q.shape != z_e.shape:
        raise ValueError(f"grad_z_q must have the shape of z_e {z_e.shape}, got {grad_z_q.shape}")
    codes, z_q = quantize(z_e, codebook)
    m = z_e.size
    grad_z_e = grad_z_q + beta * 2.0 * (z_e - z_q) / m  # (N, D)
    grad_codebook = np.zeros(np.shape(codebook))  # (K, D): unused codes stay 0
    np.add.at(grad_codebook, codes, 2.0 * (z_q - z_e) / m)  # several vectors may share a code
    return grad_z_e, grad_codebook
# ANCHOR_END: vq_loss


def codebook_usage(codes: np.ndarray, num_codes: int) -> tuple[float, float]:
    """(fraction of the K codes used at least once, perplexity exp(-sum p log p)) of a batch of codes."""
    codes = np.asarray(codes).ravel()
    if codes.size == 0 or codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codes must be a non-empty array of ids in [0, {num_codes})")
    p = np.bincount(codes, minlength=num_codes) / codes.size  # (K,)
    used = p > 0
    entropy = -float((p[used] * np.log(p[used])).sum())  # 0 log 0 = 0
    return float(used.mean()), math.exp(entropy)


# --------------------------------------------------------------------------- 2. sampling a token


# ANCHOR: next_token
def next_token_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """The exact distribution a temperature / top-k sampler draws from: logits (..., V) -> probs (..., V).

    temperature 0: all mass on the largest logit (greedy). top_k None: every token
    may be drawn; otherwise only the logits >= the k-th largest one (ties kept).
    """
    logits = _float("logits", logits)
    if logits.ndim == 0:
        raise ValueError("logits must have a vocabulary axis")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    vocab = logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be None or in [1, {vocab}], got {top_k}")
    if temperature == 0:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, logits.argmax(axis=-1)[..., None], 1.0, axis=-1)
        return probs
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[..., vocab - top_k][..., None]  # (..., 1): the k-th largest
        logits = np.where(logits >= kth, logits, -np.inf)
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)  # exp never overflows; exp(-inf) = 0
    weights = np.exp(scaled)
    return weights / weights.sum(axis=-1, keepdims=True)


def sample_next_token(
    logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None
) -> int:
    """One draw from `next_token_distribution` of logits (V,)."""
    probs = next_token_distribution(logits, temperature, top_k)
    if probs.ndim != 1:
        raise ValueError(f"logits must be 1-D (V,), got shape {probs.shape}")
    return int(rng.choice(probs.shape[0], p=probs))
# ANCHOR_END: next_token


# --------------------------------------------------------------------------- 3. diffusion


def _steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


# ANCHOR: schedules
def linear_betas(steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s schedule, (T,): evenly spaced from beta_start to beta_end, both scaled by 1000 / T."""
    steps = _steps(steps)
    scale = 1000.0 / steps
    if not 0 < beta_start * scale <= beta_end * scale < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1 after scaling by 1000 / T = {scale:g}")
    return np.linspace(beta_start * scale, beta_end * scale, steps)


def cosine_alphas_cumprod(steps: int, s: float = 0.008) -> np.ndarray:
    """The cosine schedule's closed form abar(t) = f(t) / f(0) at t = 0 ... T: (T + 1,), starting at 1."""
    t = np.arange(_steps(steps) + 1) / steps  # (T + 1,)
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's schedule, (T,): b_t = 1 - abar(t + 1) / abar(t), clipped at max_beta."""
    abar = cosine_alphas_cumprod(steps, s)  # (T + 1,)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = (1 - b_0) ... (1 - b_t): betas (T,) -> (T,)."""
    return np.cumprod(1.0 - _float("betas", betas, 1))
# ANCHOR_END: schedules


def _at(values: np.ndarray, t, ndim: int) -> np.ndarray:
    """values[t] shaped to broadcast over a (B, ...) array of ndim dims: t an int or (B,) ints."""
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer) or t.ndim > 1:
        raise ValueError(f"t must be an int or a (B,) array of ints, got {t!r}")
    if t.min() < 0 or t.max() >= len(values):
        raise ValueError(f"t must lie in [0, {len(values)}), got {t}")
    out = values[t]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim)) if t.ndim == 1 else out


def _abar_prev(abar: np.ndarray) -> np.ndarray:
    return np.concatenate([[1.0], abar[:-1]])  # abar_{t-1}, with abar_{-1} = 1 (nothing added yet)


# ANCHOR: q_sample
def q_sample(x0: np.ndarray, t, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. x0, eps (B, ...); t int or (B,); abar (T,)."""
    a = _at(abar, t, np.ndim(x0))
    return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * eps


def predict_x0(x_t: np.ndarray, t, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """q_sample solved for x0: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _at(abar, t, np.ndim(x_t))
    return (x_t - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
# ANCHOR_END: q_sample


# ANCHOR: v_prediction
def v_target(x0: np.ndarray, t, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022): what a v-predicting model learns."""
    a = _at(abar, t, np.ndim(x0))
    return np.sqrt(a) * np.asarray(eps, dtype=np.float64) - np.sqrt(1.0 - a) * np.asarray(x0, dtype=np.float64)


def eps_from_v(x_t: np.ndarray, t, v: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """The noise a predicted v implies: eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    a = _at(abar, t, np.ndim(x_t))
    return np.sqrt(1.0 - a) * np.asarray(x_t, dtype=np.float64) + np.sqrt(a) * np.asarray(v, dtype=np.float64)
# ANCHOR_END: v_prediction


# ANCHOR: posterior
def posterior_mean_variance(x0: np.ndarray, x_t: np.ndarray, t, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (B, ...) and variance (broadcastable) of q(x_{t-1} | x_t, x0); the variance is 0 at t = 0."""
    abar = alphas_cumprod(betas)
    nd = np.ndim(x_t)
    b, a, ap = _at(betas, t, nd), _at(abar, t, nd), _at(_abar_prev(abar), t, nd)
    mean = np.sqrt(ap) * b / (1.0 - a) * x0 + np.sqrt(1.0 - b) * (1.0 - ap) / (1.0 - a) * x_t
    return mean, b * (1.0 - ap) / (1.0 - a)


def ddpm_step(
    x_t: np.ndarray, t, eps: np.ndarray, noise: np.ndarray | None, betas: np.ndarray, clip_x0: float | None = None
) -> np.ndarray:
    """One ancestral step x_t -> x_{t-1} given the predicted eps (B, ...); noise None gives the mean.

    clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] first (images live in a box).
    """
    x0 = predict_x0(x_t, t, eps, alphas_cumprod(betas))
    if clip_x0 is not None:
        x0 = np.clip(x0, -clip_x0, clip_x0)
    mean, var = posterior_mean_variance(x0, x_t, t, betas)
    return mean if noise is None else mean + np.sqrt(var) * noise
# ANCHOR_END: posterior


# ANCHOR: ddim
def ddim_timesteps(steps: int, sample_steps: int) -> np.ndarray:
    """The sample_steps steps (descending ints from T-1 to 0) a shortened sampler visits."""
    steps, sample_steps = _steps(steps), _steps(sample_steps)
    if sample_steps > steps:
        raise ValueError(f"sample_steps must be <= T = {steps}, got {sample_steps}")
    return np.round(np.linspace(steps - 1, 0, sample_steps)).astype(np.int64)


def ddim_step(
    x_t: np.ndarray,
    t: int,
    t_prev: int,
    eps: np.ndarray,
    abar: np.ndarray,
    eta: float = 0.0,
    noise: np.ndarray | None = None,
    clip_x0: float | None = None,
) -> np.ndarray:
    """One DDIM step from step t to step t_prev < t (t_prev = -1: straight to x0); x_t, eps (B, ...).

    eta = 0 is deterministic; noise (B, ...) is used when eta > 0 (None: no noise).
    With clip_x0 the predicted x0 is clipped and eps re-derived from it, so the two agree.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not -1 <= t_prev < t < len(abar):
        raise ValueError(f"need -1 <= t_prev < t < T = {len(abar)}, got t={t}, t_prev={t_prev}")
    a = abar[t]
    a_prev = 1.0 if t_prev < 0 else abar[t_prev]
    x0 = predict_x0(x_t, t, eps, abar)
    if clip_x0 is not None:
        x0 = np.clip(x0, -clip_x0, clip_x0)
        eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a)) * math.sqrt(1.0 - a / a_prev)
    out = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    return out if noise is None else out + sigma * noise
# ANCHOR_END: ddim


# ANCHOR: guidance
def guided_eps(eps_cond: np.ndarray, eps_uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
# ANCHOR_END: guidance


# --------------------------------------------------------------------------- part 4: the denoiser


# ANCHOR: denoiser
def timestep_embedding(t: np.ndarray, dim: int, max_period: float = 10_000.0) -> np.ndarray:
    """Sinusoids of the steps t (B,) -> (B, dim): cosines of the h = dim / 2 frequencies, then sines."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    freqs = max_period ** (-np.arange(half) / half)  # (h,)
    angles = np.asarray(t, dtype=np.float64)[:, None] * freqs[None]  # (B, h)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1)  # (B, dim)


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased, as LayerNorm
    return (x - mean) / np.sqrt(var + eps) * gain + bias


_erf = np.vectorize(math.erf)


def _attention(x: np.ndarray, context: np.ndarray, p: dict, prefix: str, heads: int,
               lengths: np.ndarray | None) -> np.ndarray:
    """Multi-head attention from x (B, Lq, d) to context (B, Lk, e); key j of row b is read only
    if j < lengths[b] (None: every key)."""
    w = {n: np.asarray(p[prefix + n], dtype=np.float64) for n in (
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
        "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias")}
    q = x @ w["q_proj.weight"].T + w["q_proj.bias"]  # (B, Lq, d)
    k = context @ w["k_proj.weight"].T + w["k_proj.bias"]  # (B, Lk, d)
    v = context @ w["v_proj.weight"].T + w["v_proj.bias"]  # (B, Lk, d)
    batch, lq, d = q.shape
    lk, dh = k.shape[1], d // heads
    allowed = np.ones((batch, 1, lk), dtype=bool) if lengths is None else \
        (np.arange(lk)[None, :] < np.asarray(lengths)[:, None])[:, None, :]  # (B, 1, Lk)
    out = np.zeros((batch, lq, d))
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(0, 2, 1) / math.sqrt(dh)  # (B, Lq, Lk)
        scores = np.where(allowed, scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)  # (B, Lq, Lk)
        out[:, :, cols] = probs @ v[:, :, cols]
    return out @ w["out_proj.weight"].T + w["out_proj.bias"]  # (B, Lq, d)


def denoiser_block(x: np.ndarray, text: np.ndarray, lengths: np.ndarray, params: dict, heads: int) -> np.ndarray:
    """One block of the latent denoiser: x (B, N, d), text (B, T, e), lengths (B,) -> (B, N, d).

    params: the block's state dict as float64 arrays (ln_1, self_attn, ln_2, cross_attn,
    ln_3, mlp.c_fc, mlp.c_proj).
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    text = np.asarray(text, dtype=np.float64)
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    x = x + _attention(h, h, p, "self_attn.", heads, None)  # every latent reads every latent
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    x = x + _attention(h, text, p, "cross_attn.", heads, lengths)  # and the caption's words
    h = _layer_norm(x, p["ln_3.weight"], p["ln_3.bias"])
    hidden = h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]  # (B, N, hidden)
    hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))  # exact GELU
    return x + hidden @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
# ANCHOR_END: denoiser


# ANCHOR: unet
def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """x (B, C, H, W), w (O, C, k, k), b (O,) -> (B, O, H', W'), H' = (H + 2 padding - k) // stride + 1."""
    x, w, b = (np.asarray(a, dtype=np.float64) for a in (x, w, b))
    batch, _, height, width = x.shape
    out_ch, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1
    out = np.zeros((batch, out_ch, oh, ow))
    for u in range(k):  # one kernel tap at a time: a matrix product over the channels
        for v in range(k):
            window = xp[:, :, u : u + stride * oh : stride, v : v + stride * ow : stride]  # (B, C, H', W')
            out += np.einsum("oc,bchw->bohw", w[:, :, u, v], window)
    return out + b[None, :, None, None]


def group_norm(x: np.ndarray, groups: int, gain: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """x (B, C, H, W) standardised over each group of C / groups channels and all positions."""
    x = np.asarray(x, dtype=np.float64)
    batch, channels, height, width = x.shape
    g = x.reshape(batch, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape) * np.asarray(gain)[None, :, None, None] + np.asarray(bias)[None, :, None, None]


def _silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def res_block(x: np.ndarray, emb: np.ndarray, params: dict, groups: int) -> np.ndarray:
    """One ResBlock: x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W). params: its state dict
    (norm_1, conv_1, emb_proj, norm_2, conv_2, and skip when the channels change)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    h = conv2d(_silu(group_norm(x, groups, p["norm_1.weight"], p["norm_1.bias"])),
               p["conv_1.weight"], p["conv_1.bias"], padding=1)
    modulation = _silu(np.asarray(emb, dtype=np.float64)) @ p["emb_proj.weight"].T + p["emb_proj.bias"]
    scale, shift = np.split(modulation[:, :, None, None], 2, axis=1)  # (B, C_out, 1, 1) each
    h = group_norm(h, groups, p["norm_2.weight"], p["norm_2.bias"]) * (1 + scale) + shift
    h = conv2d(_silu(h), p["conv_2.weight"], p["conv_2.bias"], padding=1)
    skip = conv2d(x, p["skip.weight"], p["skip.bias"]) if "skip.weight" in p else np.asarray(x, dtype=np.float64)
    return skip + h


def cross_attention_block(x: np.ndarray, text: np.ndarray, lengths: np.ndarray, params: dict,
                          heads: int) -> np.ndarray:
    """x (B, L, d) reads the caption's words text (B, T, e), then an MLP: -> (B, L, d)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    x = x + _attention(h, np.asarray(text, dtype=np.float64), p, "cross_attn.", heads, lengths)
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    hidden = h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]
    hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
    return x + hidden @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
# ANCHOR_END: unet
