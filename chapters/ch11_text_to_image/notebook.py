# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 11 notebook: from a caption to an image
#
# This notebook follows the chapter text:
#
# 1. vector quantisation in two dimensions: which code each point takes,
#    and the dead codes nobody picks;
# 2. a VQ-VAE trained for a few seconds on the shapes images: the image as
#    64 tokens, and what comes back from them;
# 3. the next-token distribution under temperature and top-k;
# 4. the noise schedules, an image noised along each, and DDIM walking back
#    with an oracle;
# 5. the experiment: prompt match for both generators, seen and held-out
#    colour-shape pairs, and a grid of samples per prompt, from the files
#    the experiment's command wrote;
# 6. Stable Diffusion's parameters, counted on the meta device.
#
# Everything runs on a CPU in well under a minute.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`,
# `tiny_mm` and `kernels` import from any folder: run this with .venv's Python
# (`make lab` does).
import sys

import kernels  # noqa: F401  (before anything imports Triton: see kernels/__init__.py)
import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import chapters.ch11_text_to_image.reference as ref
from tiny_mm.notebooks import REPO_ROOT

torch.set_num_threads(1)  # tiny models: a second thread only waits on a busy 2-core machine
torch.manual_seed(0)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Vector quantisation, in two dimensions
#
# Every point takes the nearest of K codes; the codes split the plane into
# cells. A code whose cell holds no point gets no gradient and never moves:
# a dead code. Here the points come from three clusters and the codes start
# spread out, as a VQ-VAE's codebook does before the encoder has settled.

# %%
points = np.concatenate([rng.normal(c, 0.25, size=(150, 2)) for c in ((-1.5, 0.0), (1.0, 1.0), (0.8, -1.2))])
codebook = rng.uniform(-3, 3, size=(12, 2))
codes, _ = ref.quantize(points, codebook)
used = np.bincount(codes, minlength=len(codebook)) > 0
grid = np.stack(np.meshgrid(np.linspace(-3.5, 3.5, 300), np.linspace(-3.5, 3.5, 300)), -1).reshape(-1, 2)
cells, _ = ref.quantize(grid, codebook)

fig, ax = plt.subplots(figsize=(5.5, 5))
ax.imshow(cells.reshape(300, 300), origin="lower", extent=(-3.5, 3.5, -3.5, 3.5), cmap="tab20", alpha=0.35)
ax.scatter(*points.T, s=4, c="black")
ax.scatter(*codebook[used].T, marker="*", s=250, c="gold", edgecolors="black", label="codes in use")
ax.scatter(*codebook[~used].T, marker="X", s=120, c="white", edgecolors="black", label="dead codes")
ax.set(title=f"{used.sum()} of {len(codebook)} codes in use; perplexity "
             f"{ref.codebook_usage(codes, len(codebook))[1]:.1f}")
ax.legend(loc="lower left", fontsize=8)
plt.show()

# %% [markdown]
# ## 2. A VQ-VAE on the shapes
#
# The real tokenizer (`tiny_mm.vqvae.VQVAE`) at a smaller width, trained
# for a few seconds with dead-code restarts: each 32 x 32 image becomes an
# 8 x 8 grid of code ids, and the decoder draws the image back from them.
# The chapter's run trains the full size for 600 steps.

# %%
import time  # noqa: E402

from tiny_mm.data.shapes import ShapesConfig, ShapesDataset, split_by_combinations  # noqa: E402
from tiny_mm.vqvae import VQVAE, VQVAEConfig, train_vqvae  # noqa: E402

seen_pairs, heldout_pairs = split_by_combinations(ShapesConfig())
images, captions, _ = ShapesDataset(1024, ShapesConfig(), seed=3, combinations=seen_pairs).materialize()
vqvae = VQVAE(VQVAEConfig(hidden=32, code_dim=16, num_codes=32))
start = time.perf_counter()
history = train_vqvae(vqvae, images, steps=150, batch_size=32, lr=3e-3, restart_every=10)
vqvae.eval()
print(f"150 steps in {time.perf_counter() - start:.1f} s; reconstruction MSE {np.mean(history['recon'][-10:]):.4f}, "
      f"perplexity of the codes {np.mean(history['perplexity'][-10:]):.1f} of 32")
with torch.no_grad():
    tokens = vqvae.encode(images[:6])  # (6, 64)
    back = vqvae.decode_codes(tokens)  # (6, 3, 32, 32)
fig, axes = plt.subplots(3, 6, figsize=(11, 5.6))
for i in range(6):
    axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
    axes[0, i].set_title(captions[i], fontsize=6)
    axes[1, i].imshow(tokens[i].view(8, 8).numpy(), cmap="tab20", vmin=0, vmax=31)
    for (r, c), code in np.ndenumerate(tokens[i].view(8, 8).numpy()):
        axes[1, i].text(c, r, str(code), ha="center", va="center", fontsize=5)
    axes[2, i].imshow(back[i].permute(1, 2, 0).clamp(0, 1).numpy())
for ax in axes.flat:
    ax.set(xticks=[], yticks=[])
axes[0, 0].set_ylabel("image")
axes[1, 0].set_ylabel("64 tokens")
axes[2, 0].set_ylabel("decoded")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Drawing the next token
#
# One row of logits, and the distribution the sampler draws from under
# three temperatures, with and without top-k. Temperature sharpens or
# flattens; top-k cuts the tail to zero, so a long tail of unlikely codes
# (a stray speck in a plain background) can never be drawn.

# %%
logits = np.sort(rng.normal(0, 1.5, 20))[::-1]
fig, axes = plt.subplots(1, 4, figsize=(12, 2.8), sharey=True)
for ax, (temperature, top_k) in zip(axes, ((1.0, None), (0.5, None), (2.0, None), (1.0, 5))):
    probs = ref.next_token_distribution(logits, temperature, top_k)
    ax.bar(range(20), probs, color="tab:blue" if top_k is None else "tab:orange")
    ax.set(title=f"T = {temperature:g}" + ("" if top_k is None else f", top-{top_k}"), xlabel="token (by logit)")
axes[0].set_ylabel("probability")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Noise, and the way back
#
# How much of the clean image is left at step t, sqrt(abar_t), along the
# linear and the cosine schedule (T = 1000), and one image noised to
# several steps along the cosine one. The linear schedule destroys the
# image long before the last step; the cosine one spends its steps more
# evenly, which is why the chapter's model uses it.

# %%
from tiny_mm.diffusion import NoiseSchedule, sample  # noqa: E402

schedules = {"linear": NoiseSchedule(1000, "linear"), "cosine": NoiseSchedule(1000, "cosine")}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 2]})
for name, schedule in schedules.items():
    axes[0].plot(schedule.alphas_cumprod.sqrt().numpy(), label=name)
axes[0].set(xlabel="step t", ylabel="sqrt(abar_t): signal left", title="two schedules")
axes[0].legend()
x0 = images[:1] * 2 - 1  # (1, 3, 32, 32) in [-1, 1]
noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
steps = [0, 100, 250, 500, 750, 999]
strip = [((schedules["cosine"].q_sample(x0.double(), t, noise.double())[0] + 1) / 2).clamp(0, 1) for t in steps]
axes[1].imshow(torch.cat(strip, dim=2).permute(1, 2, 0).numpy())
axes[1].set(xticks=[16 + 32 * i for i in range(len(steps))], xticklabels=[f"t = {t}" for t in steps], yticks=[],
            title="x_t along the cosine schedule")
fig.tight_layout()
plt.show()

# %% [markdown]
# The way back: DDIM with an oracle that knows the clean image, so that its
# noise prediction is exact. From pure noise, every step's prediction of
# x0 is the clean image, and the walk lands on it whatever the number of
# steps. A trained denoiser only approximates this oracle; the quality of
# its approximation is the whole game.

# %%
abar = schedules["cosine"].alphas_cumprod


def oracle(x_t, t, cond):
    a = abar[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - a.sqrt() * x0.to(x_t.dtype)) / (1 - a).sqrt()


for n in (50, 10, 3):
    out = sample(oracle, x0.shape, schedules["cosine"], steps=n, method="ddim", dtype=torch.float64,
                 generator=torch.Generator().manual_seed(1))
    print(f"DDIM from {n:>2} steps with the oracle: largest pixel error {float((out - x0).abs().max()):.1e}")

# %% [markdown]
# ## 5. The experiment
#
# `tinymm train text-to-image --out chapters/ch11_text_to_image` trained a
# VQ-VAE, a TinyDalle over its codes and a text-conditioned U-Net on the
# pixels, and judged their samples with a tiny CLIP: a sample
# *matches* its prompt when the
# class the CLIP sees (of all 30 colour-shape pairs) is the prompt's. The
# same CLIP on real images of the same prompts is the best score the metric
# allows. The files it wrote are read here; the plot shows prompt match for
# the pairs seen in training and the held-out ones.

# %%
import json  # noqa: E402

folder = REPO_ROOT / "chapters" / "ch11_text_to_image"
results_file, samples_file = folder / "results.json", folder / "samples.npz"
if not (results_file.is_file() and samples_file.is_file()):
    print(f"no {results_file.relative_to(REPO_ROOT)} / samples.npz: run "
          "`tinymm train text-to-image --out chapters/ch11_text_to_image` to make them")
    run = None
else:
    run = json.loads(results_file.read_text())
    rows = run["rows"]
    labels = [f"{r['generator']}\n{r['setting']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.38
    for i, split in enumerate(("seen", "heldout")):
        ax.bar(np.arange(len(rows)) + (i - 0.5) * width, [100 * r[split]["match"] for r in rows], width,
               label="seen pairs" if split == "seen" else "held-out pairs")
    ax.axhline(80, color="grey", ls=":", lw=1)
    ax.text(len(rows) - 0.5, 81, "target for seen pairs: 80%", ha="right", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set(ylabel="prompt match (%)", ylim=(0, 105), title="the judge sees the prompt's colour and shape")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    plt.show()
    for name, m in run["models"].items():
        print(f"{name:<10} {m['params']:>9,} parameters, trained in {m['seconds']:.0f} s, "
              f"final loss {m['final_loss']:.4f}")

# %% [markdown]
# A grid of samples per prompt: the first five prompts name pairs held out
# of training (no model ever saw, say, a red star), the last five pairs it
# saw. Each row of each panel is one prompt, sampled four times.

# %%
if run is not None:
    with np.load(samples_file) as found:
        prompts = list(found["prompts"])
        panels = {k: found[k] for k in found.files if k != "prompts"}
    shown = [k for k in panels if k != "real images"]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(2.3 * (1 + len(shown)) + 1.5, 0.75 * len(prompts) + 1))
    for ax, key in zip(axes, ["real images", *shown]):
        grid = panels[key]  # (P, K, 32, 32, 3)
        P, K = grid.shape[:2]
        ax.imshow(grid.transpose(0, 2, 1, 3, 4).reshape(P * 32, K * 32, 3))
        ax.set(xticks=[], yticks=[], title=key, )
        for p in range(P):
            ax.axhline(p * 32 - 0.5, color="white", lw=0.5)
    axes[0].set_yticks([16 + 32 * p for p in range(len(prompts))], prompts, fontsize=7)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## 6. Stable Diffusion, counted
#
# The textbook gives Stable Diffusion "about 860M parameters total". Built
# on the meta device from their published configurations (no weights,
# nothing downloaded), the three parts of Stable Diffusion v1 count as
# below: 860M is the U-Net alone.

# %%
from tiny_mm.counting_sd import stable_diffusion_params  # noqa: E402

parts = stable_diffusion_params()
total = sum(parts.values())
for name, n in parts.items():
    print(f"{name:<32} {n:>13,}  ({100 * n / total:.1f}%)")
print(f"{'total':<32} {total:>13,}")
fig, ax = plt.subplots(figsize=(8, 1.6))
left = 0
for name, n in parts.items():
    ax.barh(0, n / 1e6, left=left / 1e6, label=f"{name}: {n / 1e6:.0f}M")
    left += n
ax.axvline(860, color="black", ls="--", lw=1)
ax.text(862, 0.3, "the textbook's 'total'", fontsize=8)
ax.set(yticks=[], xlabel="parameters (millions)")
ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=3)
fig.tight_layout()
plt.show()
