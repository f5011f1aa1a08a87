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
# # Chapter 4 notebook: the contrastive loss, step by step
#
# This notebook follows the chapter text. It builds CLIP's symmetric loss from
# raw embeddings, looks at what the temperature does, checks two numbers the
# source texts give, checks the hand-derived gradient against finite
# differences, trains a tiny pair of encoders with the loss, and finally
# compares the three rungs of the ladder: the NumPy reference, the PyTorch
# loss in `tiny_mm` and the fused Triton kernel in `kernels`.
#
# Everything runs on a CPU in well under a minute.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`,
# `tiny_mm` and `kernels` import from any folder: run this with .venv's Python
# (`make lab` does).
import sys


import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import chapters.ch04_contrastive.reference as ref

# Import `kernels` before anything else can import Triton. Without a GPU it runs its
# kernels in Triton's interpreter, and that choice must be made before `triton` is
# first imported (creating a torch optimiser already imports it, via torch._dynamo).
import kernels  # noqa: E402

rng = np.random.default_rng(4)
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Embeddings, normalised
#
# A batch of $N$ matched pairs: row $i$ of the image embeddings and row $i$ of
# the text embeddings describe the same thing. To have something to look at,
# the "text" rows are noisy copies of the "image" rows, so matched pairs point
# in similar directions. CLIP compares directions only, so every row is scaled
# to unit length first.

# %%
N, d = 8, 64
image_raw = rng.standard_normal((N, d))  # (N, d)
text_raw = image_raw + 3.0 * rng.standard_normal((N, d))  # (N, d): related to its image, not equal

image = ref.l2_normalize(image_raw)  # (N, d), unit rows
text = ref.l2_normalize(text_raw)  # (N, d)
print("row norms after normalising:", np.linalg.norm(image, axis=1))

# %% [markdown]
# ## 2. The similarity matrix
#
# $C = I T^\top$ holds every cosine similarity at once: $C_{ij}$ compares image
# $i$ with text $j$. The logits are $S = s\,C$ with the logit scale
# $s = 1/\tau$; CLIP starts at $\tau = 0.07$, i.e. $s \approx 14.3$.

# %%
tau = 0.07
s = 1 / tau
cosine = image @ text.T  # (N, N)
S = ref.similarity(image, text, s)  # (N, N) = s * cosine
assert np.allclose(S, s * cosine)
print(f"logit scale s = 1/{tau} = {s:.4f}")
print("matched pairs (diagonal) mean cosine:", round(float(np.mean(np.diag(cosine))), 3))
print("other pairs (off-diagonal) mean cosine:", round(float(np.mean(cosine[~np.eye(N, dtype=bool)])), 3))

fig, ax = plt.subplots(figsize=(4.2, 3.6))
im = ax.imshow(cosine, cmap="viridis")
ax.set(xlabel="text j", ylabel="image i", title="cosine similarity $C_{ij}$")
fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Softmax both ways, then the loss
#
# Each **row** of $S$ is a classification problem "which text goes with image
# $i$?"; each **column** is "which image goes with text $j$?". The row softmax
# $P$ has rows summing to one, the column softmax $Q$ has columns summing to
# one. The loss is the mean negative log-probability of the right answer,
# averaged over both directions.

# %%
P_row = ref.softmax(S, axis=1)  # (N, N), rows sum to 1
P_col = ref.softmax(S, axis=0)  # (N, N), columns sum to 1
assert np.allclose(P_row.sum(axis=1), 1) and np.allclose(P_col.sum(axis=0), 1)

image_to_text = -np.mean(np.log(np.diag(P_row)))
text_to_image = -np.mean(np.log(np.diag(P_col)))
loss = (image_to_text + text_to_image) / 2
print(f"image->text {image_to_text:.4f}   text->image {text_to_image:.4f}   loss {loss:.4f}")
print(f"reference clip_loss        {ref.clip_loss(image, text, s):.4f}")
assert np.isclose(loss, ref.clip_loss(image, text, s))
print("retrieval accuracy (image->text, text->image):", ref.retrieval_accuracy(S))

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
for ax, P, title in zip(axes, (P_row, P_col), ("row softmax (image -> text)", "column softmax (text -> image)")):
    im = ax.imshow(P, cmap="magma", vmin=0, vmax=1)
    ax.set(xlabel="text j", ylabel="image i", title=title)
fig.colorbar(im, ax=axes.tolist())
plt.show()

# %% [markdown]
# The two matrices differ, and each direction is blind to something. An image
# appears in only **one** row (its own) but in **every** column. Replace image
# 0 by a "hub" that resembles all captions a little and its own a bit more:
# its row still picks the right caption, so the image-to-text loss barely
# moves, but the hub now competes in every column and the text-to-image loss
# jumps. Only the symmetric loss sees both kinds of damage (a hub *text* is
# the mirror case, caught by the rows).

# %%
def direction_losses(img: np.ndarray, txt: np.ndarray, scale: float) -> tuple[float, float]:
    """(image -> text, text -> image) mean losses; their average is ref.clip_loss."""
    logits = ref.similarity(img, txt, scale)
    diag = np.diag(logits)
    return float(np.mean(ref.logsumexp(logits, 1) - diag)), float(np.mean(ref.logsumexp(logits, 0) - diag))


hub_image = image.copy()
hub_image[0] = ref.l2_normalize((text.sum(axis=0) + text[0])[None, :])[0]  # near every caption, nearest its own
for label, img in [("original batch", image), ("image 0 made a hub", hub_image)]:
    i2t, t2i = direction_losses(img, text, s)
    print(f"{label:<20} image->text {i2t:.3f}   text->image {t2i:.3f}   symmetric {(i2t + t2i) / 2:.3f}")

# %% [markdown]
# ## 4. What the temperature does
#
# The softmax only sees differences between logits, and $s$ multiplies every
# difference. Below: one row of cosines turned into probabilities at four
# temperatures, and the loss of the whole batch as $\tau$ varies.

# %%
row = cosine[0]  # (N,) image 0 against every text
taus = [1.0, 0.2, 0.07, 0.01]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
width = 0.8 / len(taus)
for k, t in enumerate(taus):
    p = ref.softmax(row[None, :] / t, axis=1)[0]
    axes[0].bar(np.arange(N) + k * width, p, width, label=f"tau = {t}")
axes[0].set(xlabel="text j (j = 0 is the match)", ylabel="probability", title="softmax of image 0's row")
axes[0].legend()

tau_grid = np.geomspace(0.005, 2.0, 60)
axes[1].semilogx(tau_grid, [ref.clip_loss(image, text, 1 / t) for t in tau_grid], label="this batch")
axes[1].axhline(np.log(N), color="grey", ls="--", label="log N (uniform softmax)")
axes[1].axvline(0.07, color="k", lw=0.8)
axes[1].set(xlabel="temperature tau", ylabel="loss", title="loss against temperature")
axes[1].legend()
fig.tight_layout()
plt.show()
for t in taus:
    print(f"tau = {t:<5} p(match | image 0) = {ref.softmax(row[None, :] / t, axis=1)[0, 0]:.3f}")

# %% [markdown]
# At $\tau = 1$ the cosines (all in $[-1, 1]$) barely move the softmax away
# from uniform and the loss sits near $\log N$ whatever the embeddings are.
# Small $\tau$ makes the softmax sharp: pairs ranked correctly cost almost
# nothing, but a pair ranked wrongly costs about $s$ times its cosine gap, so
# for this batch (one image in eight ranked wrongly) the loss has a minimum
# near $\tau \approx 0.02$ and rises again below it.
#
# ## 5. Checking a claim: "random embeddings give loss $\approx \log 8 = 2.08$"
#
# For random unit vectors in $d$ dimensions the cosine of two of them has
# mean 0 and variance exactly $1/d$, so each logit has standard deviation
# $\sigma = s/\sqrt d$. With $s = 1/0.07$ and $d = 512$, $\sigma \approx 0.63$:
# not small. The loss is a mean of $\mathrm{lse}(\text{row}) - S_{ii}$, and
# $E[\mathrm{lse}]$ exceeds $\log N$ because $E[e^z] = e^{\sigma^2/2}$ for
# Gaussian $z$. A second-order expansion gives
# $E[\text{loss}] \approx \log N + \sigma^2/2 - (e^{\sigma^2} - 1)/(2N)$.
# Measure it:

# %%
def random_loss(n: int, dim: int, scale: float, trials: int, gen: np.random.Generator) -> np.ndarray:
    """Loss of `trials` batches of n random unit-vector pairs in `dim` dimensions."""
    out = np.empty(trials)
    for t in range(trials):
        a = ref.l2_normalize(gen.standard_normal((n, dim)))
        b = ref.l2_normalize(gen.standard_normal((n, dim)))
        out[t] = ref.clip_loss(a, b, scale)
    return out


d_clip = 512
sigma = s / np.sqrt(d_clip)
print(f"logit std s/sqrt(d) = {sigma:.3f}")
print(f"{'N':>5} {'log N':>7} {'measured':>16} {'expansion':>10}")
results = {}
for n, trials in [(8, 4000), (32, 800), (128, 200), (512, 25)]:
    losses = random_loss(n, d_clip, s, trials, rng)
    results[n] = losses.mean()
    predicted = np.log(n) + sigma**2 / 2 - (np.exp(sigma**2) - 1) / (2 * n)
    print(f"{n:>5} {np.log(n):>7.3f} {losses.mean():>9.3f} ± {losses.std() / np.sqrt(trials):.3f} {predicted:>10.3f}")

assert results[8] > np.log(8) + 0.1  # the claim is low by more than noise

# %% [markdown]
# The claim does not check out at $\tau = 0.07$: a batch of 8 random pairs
# starts near **2.25**, not 2.08. The gap, about $\sigma^2/2 \approx 0.2$,
# does not shrink with $N$. "$\log N$" is exact only when all logits are equal
# (for example $\tau \to \infty$), which is the uniform-softmax line in the
# plot above.
#
# ## 6. The gradient, by hand and by finite differences
#
# `reference.clip_loss_grad` implements the chapter's derivation:
# $G = (\mathrm{softmax_{row}}(S) + \mathrm{softmax_{col}}(S) - 2\,\mathrm{Id})/(2N)$,
# $dI = s\,G\,T$, $dT = s\,G^\top I$, $ds = \sum G \circ (I T^\top)$.
# `clip_loss_raw_grad` adds the chain rule through the normalisation. Central
# differences in float64 should agree to about $10^{-8}$ relative error or better.

# %%
def rel_err(out, reference) -> float:
    out, reference = np.asarray(out, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


n_small, d_small, s_small = 5, 7, 9.0
img_raw = rng.standard_normal((n_small, d_small))
txt_raw = rng.standard_normal((n_small, d_small))
img_u, txt_u = ref.l2_normalize(img_raw), ref.l2_normalize(txt_raw)

dI, dT, ds = ref.clip_loss_grad(img_u, txt_u, s_small)
checks = {
    "d_image": rel_err(dI, ref.numerical_gradient(lambda x: ref.clip_loss(x, txt_u, s_small), img_u)),
    "d_text": rel_err(dT, ref.numerical_gradient(lambda x: ref.clip_loss(img_u, x, s_small), txt_u)),
    "d_logit_scale": rel_err(ds, ref.numerical_gradient(lambda x: ref.clip_loss(img_u, txt_u, x[0]), np.array([s_small]))),
}
dI_raw, dT_raw, _ = ref.clip_loss_raw_grad(img_raw, txt_raw, s_small)
checks["d_image_raw"] = rel_err(dI_raw, ref.numerical_gradient(lambda x: ref.clip_loss_raw(x, txt_raw, s_small), img_raw))
checks["d_text_raw"] = rel_err(dT_raw, ref.numerical_gradient(lambda x: ref.clip_loss_raw(img_raw, x, s_small), txt_raw))
for name, err in checks.items():
    print(f"{name:<14} relative error vs finite differences: {err:.1e}")
assert max(checks.values()) < 1e-6

# The normalisation's gradient is orthogonal to each raw row: stretching a row changes nothing.
print("max |<x_i, dx_i>|:", float(np.max(np.abs(np.sum(img_raw * dI_raw, axis=1)))))

# %% [markdown]
# ## 7. A tiny alignment run with `tiny_mm.ClipLoss`
#
# Two "modalities" generated from a shared hidden cause: a 6-dimensional
# latent $z$ is seen through two different random linear maps plus noise,
# giving 32-d "image" features and 24-d "text" features. Two learnable linear
# maps project each into a shared 16-d space, and `ClipLoss` (with its
# learnable log-temperature, starting at $\log(1/0.07)$ and capped at a scale
# of 100) trains them. Retrieval on held-out pairs tells whether the maps
# learned the shared cause or memorised the training pairs.

# %%
import torch

import tiny_mm

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
k_latent, d_img, d_txt, d_emb = 6, 32, 24, 16
A = torch.randn(k_latent, d_img, generator=gen)  # how the latent shows in "images"
B = torch.randn(k_latent, d_txt, generator=gen)  # ... and in "texts"


def make_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, k_latent, generator=gen)  # (n, k): the shared cause of each pair
    return z @ A + torch.randn(n, d_img, generator=gen), z @ B + torch.randn(n, d_txt, generator=gen)


train_img, train_txt = make_pairs(256)
test_img, test_txt = make_pairs(256)
image_map = torch.nn.Linear(d_img, d_emb, bias=False)
text_map = torch.nn.Linear(d_txt, d_emb, bias=False)
loss_fn = tiny_mm.ClipLoss(normalize=True)  # raw projections in, normalised inside
params = [*image_map.parameters(), *text_map.parameters(), *loss_fn.parameters()]
opt = torch.optim.Adam(params, lr=3e-2)


def held_out_accuracy() -> float:
    with torch.no_grad():
        logits = (torch.nn.functional.normalize(image_map(test_img), dim=-1)
                  @ torch.nn.functional.normalize(text_map(test_txt), dim=-1).T)  # (256, 256)
    return float(np.mean(ref.retrieval_accuracy(logits.numpy())))


history = {"step": [], "loss": [], "scale": [], "held_out": []}
batch = 64
for step in range(150):
    idx = torch.randperm(train_img.shape[0])[:batch]
    loss = loss_fn(image_map(train_img[idx]), text_map(train_txt[idx]))
    history["step"].append(step)
    history["loss"].append(loss.item())
    history["scale"].append(float(loss_fn.logit_scale))  # the scale this step used
    opt.zero_grad()
    loss.backward()
    opt.step()
    history["held_out"].append(held_out_accuracy() if step % 10 == 0 or step == 149 else np.nan)

print(f"loss: first {history['loss'][0]:.3f}, last {history['loss'][-1]:.3f} (log {batch} = {np.log(batch):.3f})")
print(f"logit scale: first {history['scale'][0]:.2f}, last {history['scale'][-1]:.2f}"
      f" (temperature {1 / history['scale'][-1]:.4f})")
print(f"held-out retrieval accuracy among 256 candidates: {history['held_out'][-1]:.3f} (chance {1 / 256:.4f})")
assert history["loss"][-1] < 0.5 * history["loss"][0]

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].plot(history["step"], history["loss"])
axes[0].axhline(np.log(batch), color="grey", ls="--", label=f"log {batch}")
axes[0].set(xlabel="step", ylabel="loss", title="training loss (batch of 64)")
axes[0].legend()
axes[1].plot(history["step"], history["scale"])
axes[1].set(xlabel="step", ylabel="s = 1 / tau", title="learned logit scale")
steps_eval = [st for st, a in zip(history["step"], history["held_out"]) if not np.isnan(a)]
axes[2].plot(steps_eval, [a for a in history["held_out"] if not np.isnan(a)], marker="o")
axes[2].set(xlabel="step", ylabel="accuracy", title="held-out retrieval (256 pairs)", ylim=(0, 1))
fig.tight_layout()
plt.show()

# %% [markdown]
# The first loss is far above $\log 64$: with 16-dimensional embeddings the
# random logits have standard deviation about $14.3/\sqrt{16} \approx 3.6$,
# the effect of section 5 at full strength. The learned scale dips for a few
# steps, then keeps rising while the training pairs become easier to
# tell apart: a sharper softmax lowers the loss of pairs already ranked
# first. Left alone it would grow without bound on separable data, which is
# one reason CLIP caps it at 100.
# Held-out retrieval stops improving after a few dozen steps while the
# training loss keeps falling: with only 256 training pairs the maps begin to
# memorise them.
#
# ## 8. Three rungs, one loss
#
# The same float32 inputs through the PyTorch loss (matmul + cross-entropy,
# autograd) and the fused Triton kernel (run here by Triton's CPU
# interpreter), each compared with the float64 NumPy reference. $N = 37$ is
# deliberately not a multiple of the kernel's block size and $d = 24$ is not a
# power of two, so the kernel's masks are exercised.

# %%
def rung(fn, image_np: np.ndarray, text_np: np.ndarray, scale: float):
    """Loss and gradients (image, text, scale) of a torch-level loss function on float32 copies."""
    img = torch.tensor(image_np, dtype=torch.float32, requires_grad=True)
    txt = torch.tensor(text_np, dtype=torch.float32, requires_grad=True)
    sc = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    out = fn(img, txt, sc)
    out.backward()
    return out.item(), img.grad.numpy(), txt.grad.numpy(), sc.grad.item()


n_r, d_r, s_r = 37, 24, 1 / 0.07
image_r = ref.l2_normalize(rng.standard_normal((n_r, d_r)))
text_r = ref.l2_normalize(image_r + 0.5 * rng.standard_normal((n_r, d_r)))
reference_values = (ref.clip_loss(image_r, text_r, s_r), *ref.clip_loss_grad(image_r, text_r, s_r))

names = ["loss", "d_image", "d_text", "d_logit_scale"]
tolerance = {"tiny_mm.clip_loss (float32)": 1e-5, "kernels.clip_loss (float32, interpreter)": 1e-3}
rungs = {
    "tiny_mm.clip_loss (float32)": rung(tiny_mm.clip_loss, image_r, text_r, s_r),
    "kernels.clip_loss (float32, interpreter)": rung(kernels.clip_loss, image_r, text_r, s_r),
}
print(f"NumPy reference (float64): loss = {reference_values[0]:.6f}")
for label, values in rungs.items():
    errors = [rel_err(v, r) for v, r in zip(values, reference_values)]
    print(f"{label:<42}" + "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errors)))
    assert max(errors) < tolerance[label], (label, errors)

# %% [markdown]
# ## 9. What each rung keeps for the backward pass
#
# The PyTorch loss is short because autograd stores what it needs, and what it
# needs here is several $N \times N$ matrices. Counting the bytes autograd
# saves (unique storages, the inputs excluded) shows the difference:

# %%
def saved_bytes(fn, n: int, dim: int) -> int:
    """Bytes of the tensors autograd saves in fn's forward, not counting the two inputs."""
    img = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(img, txt, torch.tensor(1 / 0.07, requires_grad=True))
    for x in (img, txt):
        storages.pop(x.untyped_storage().data_ptr(), None)
    return sum(storages.values())


n_mem, d_mem = 256, 32
for label, fn in [("tiny_mm.clip_loss", tiny_mm.clip_loss), ("kernels.clip_loss", kernels.clip_loss)]:
    b = saved_bytes(fn, n_mem, d_mem)
    print(f"{label:<18} N = {n_mem}: {b:>9,} bytes saved = {b / (n_mem * n_mem * 4):.2f} float32 N x N matrices")

# %% [markdown]
# At $N = 32{,}768$ one float32 $N \times N$ matrix is
# $32768^2 \cdot 4 = 4{,}294{,}967{,}296$ bytes (4 GiB), so the plain PyTorch
# loss keeps several GiB alive between forward and backward, while the kernel
# keeps only the two vectors of log-sum-exps (and the inputs it was given).
# `tinymm bench contrastive` measures time and peak memory of each rung; the
# exercise `exercises/ex01_clip_loss.py` (graded by `tinymm grade ex01`) asks
# you to write the loss yourself.
