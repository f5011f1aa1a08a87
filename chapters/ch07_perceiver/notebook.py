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
# # Chapter 7 notebook: the Perceiver reads raw pixels
#
# This notebook follows the chapter text:
#
# 1. Fourier position features, drawn as images, and checked against the NumPy reference;
# 2. the FLOPs of Perceiver IO and of a plain transformer encoder against the
#    input length (linear against quadratic), with points checked by `FlopCounterMode`;
# 3. a Perceiver trained on the raw pixels of shapes images, on a CPU;
# 4. where its latents look when they read the pixels.
#
# The models are tiny, so one thread is faster than two on a busy 2-core machine.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`
# and `tiny_mm` import from any folder: run this with .venv's Python (`make lab` does).
import sys

import kernels  # noqa: F401  (before FlopCounterMode, which imports Triton: see kernels/__init__.py)
import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import chapters.ch07_perceiver.reference as ref
from tiny_mm.layers import TransformerBlock
from tiny_mm.perceiver import PerceiverConfig, PerceiverIO, fourier_features, pixel_inputs, train_pixel_classifier

torch.set_num_threads(1)
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Fourier position features
#
# Every point of a 32 x 32 grid gets its two coordinates in [-1, 1], then
# sin and cos of pi f x for K frequencies per axis, from 1 to 16 (half the
# resolution). Below: some of these features, each drawn as a 32 x 32 image.
# The first sine of an axis is half a period across the image; the last
# swings about once every two pixels. It is slightly finer than the grid can
# show (the 32 points are 2/31 apart, so the grid's Nyquist frequency is
# 15.5, not 16), which is why it looks like a slow beat.

# %%
S, K = 32, 6
features = fourier_features((S, S), K)  # (S * S, 2 (2K + 1))
expected = ref.fourier_features((S, S), K)
error = np.linalg.norm(features.double().numpy() - expected) / np.linalg.norm(expected)
print(f"{features.shape[1]} features per point = d (2K + 1) = 2 * {2 * K + 1}; "
      f"torch float32 vs NumPy float64: relative error {error:.1e}")

freqs = np.linspace(1, S / 2, K)
columns = {"x (rows)": 0, "y (columns)": 1}
for k in (0, 2, K - 1):
    columns[f"sin, rows, f = {freqs[k]:.0f}"] = 2 + k
    columns[f"cos, columns, f = {freqs[k]:.0f}"] = 2 + 2 * K + K + k
fig, axes = plt.subplots(1, len(columns), figsize=(2.1 * len(columns), 2.4))
for ax, (title, index) in zip(axes, columns.items()):
    ax.imshow(features[:, index].reshape(S, S), cmap="RdBu", vmin=-1, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Linear against quadratic
#
# The chapter's formula (`reference.perceiver_io_flops`) for a Perceiver IO
# with 256 latents of width 256 and 6 latent blocks, and
# (`reference.transformer_encoder_flops`) for a plain 6-block encoder of width
# 256 on the same inputs, both with 29 features per input. First, both
# formulas against torch's FLOP counter on real modules, at small sizes.

# %%
def counted(module: nn.Module, *args: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


for M in (64, 256):
    io = PerceiverIO(PerceiverConfig(input_dim=29, num_latents=32, width=32, depth=2, heads=4), 32, 10)
    plain = nn.Sequential(nn.Linear(29, 32), *(TransformerBlock(32, 4) for _ in range(2)))
    x = torch.randn(1, M, 29)  # (1, M, C)
    got = counted(io, x, torch.randn(1, 1, 32)), counted(plain, x)
    want = (ref.perceiver_io_flops(M, 1, 32, 32, 2, input_dim=29, query_dim=32, output_dim=10),
            ref.transformer_encoder_flops(M, 32, 2, input_dim=29))
    print(f"M = {M:>4}: Perceiver IO counted {got[0]:>11,} formula {want[0]:>11,};  "
          f"plain encoder counted {got[1]:>11,} formula {want[1]:>11,}  {'ok' if got == want else 'MISMATCH'}")

# %%
sizes = dict(num_latents=256, width=256, depth=6, input_dim=29, query_dim=256, output_dim=10)
lengths = np.unique(np.logspace(6, 16, 21, base=2).astype(int))
io_flops = [ref.perceiver_io_flops(int(m), 1, **sizes) for m in lengths]
plain_flops = [ref.transformer_encoder_flops(int(m), 256, 6, input_dim=29) for m in lengths]

fig, ax = plt.subplots(figsize=(6, 4))
ax.loglog(lengths, io_flops, "o-", label="Perceiver IO (256 latents)")
ax.loglog(lengths, plain_flops, "s-", label="plain transformer encoder")
ax.axvline(256, color="grey", lw=0.8, ls=":")
ax.set_xlabel("input length M")
ax.set_ylabel("forward FLOPs")
ax.set_title("6 blocks of width 256: linear against quadratic")
ax.legend()
plt.show()

print("doubling M and O (one output per input, as for optical flow):")
for m in (64, 1024, 16384):
    io_ratio = ref.perceiver_io_flops(2 * m, 2 * m, **sizes) / ref.perceiver_io_flops(m, m, **sizes)
    plain_ratio = ref.transformer_encoder_flops(2 * m, 256, 6, input_dim=29) / ref.transformer_encoder_flops(
        m, 256, 6, input_dim=29)
    print(f"  M = {m:>6,}: Perceiver IO x{io_ratio:.2f}, plain encoder x{plain_ratio:.2f}")

# %% [markdown]
# Below about 256 inputs (as many as the latents) the plain encoder is the
# cheaper one: the Perceiver pays for its latents whatever the input. Past
# it the curves part: the plain encoder's slope on log axes tends to 2,
# the Perceiver's to 1.
#
# ## 3. A Perceiver trained on raw pixels
#
# Every pixel of a 16 x 16 shapes image is one input (RGB + 26 Fourier
# features); the Perceiver must say in which of the 9 cells of a 3 x 3 grid
# the shape sits. A set of pixels has no order: without the Fourier features
# the question would have no answer.

# %%
run = train_pixel_classifier()
print(f"{len(run.losses)} steps in {run.seconds:.0f} s; held-out accuracy {run.test_accuracy:.1%} "
      f"(train {run.train_accuracy:.1%}, chance {run.chance:.1%})")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(run.losses, lw=0.8)
ax.axhline(np.log(len(run.class_names)), color="grey", ls=":", label="log 9 (guessing)")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
plt.show()

# %% [markdown]
# The loss stays at log 9 for a hundred steps or more, then drops within a
# few dozen: the model has found how to read the shape's position.
#
# ## 4. Where the latents look
#
# `PerceiverEncoder.read_attention` returns each latent's attention over the
# 256 pixels in its read, per head. For a few held-out images: the image,
# and the four heads of the latent whose attention is most concentrated
# (lowest entropy, on average over these images).

# %%
model = run.model.eval()
images = run.test_images[:4]  # (4, 3, 16, 16)
with torch.no_grad():
    inputs = pixel_inputs(images, run.num_bands)  # (4, 256, 29)
    probs = model.encoder.read_attention(inputs)  # (4, heads, N, 256)
    predicted = model(inputs).argmax(-1)  # (4,)
entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 1))  # (N,): low = focused
latent = int(entropy.argmin())
heads = probs.shape[1]
print(f"latent {latent}: attention entropy {entropy[latent]:.2f} nats; uniform over 256 pixels would be "
      f"{np.log(256):.2f}; the least focused latent has {entropy.max():.2f}")

fig, axes = plt.subplots(len(images), heads + 1, figsize=(1.7 * (heads + 1), 1.8 * len(images)))
for row, image in enumerate(images):
    axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
    axes[row, 0].set_title(f"says: {run.class_names[predicted[row]]}\nis: "
                           f"{run.class_names[run.test_labels[row]]}", fontsize=7)
    for head in range(heads):
        axes[row, head + 1].imshow(probs[row, head, latent].reshape(16, 16).numpy(), cmap="magma")
        axes[row, head + 1].set_title(f"latent {latent}, head {head}", fontsize=7)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# The read is sharp: a head puts nearly all its weight on one or two of the
# 256 pixels. In this run two heads pick a pixel on the shape, so what they
# bring back carries that pixel's Fourier features: where the shape is. The
# other two look at the same fixed pixel in every image, whatever it shows:
# a constant read, which the model is free to use as a reference or ignore.
# (Another seed may split the heads differently.)
