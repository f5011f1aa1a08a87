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
# # Chapter 3 notebook: a vision transformer, piece by piece
#
# This notebook follows the chapter text. It cuts a photograph into patches,
# computes the patch embedding four ways and checks they agree, looks at the
# class token and at positional embeddings, then trains a tiny ViT to name
# the shape in a synthetic image and draws where its class token looks.
#
# Everything runs on a CPU in well under a minute.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`
# and `tiny_mm` import from any folder: run this with .venv's Python (`make lab` does).
import copy
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.cbook
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import chapters.ch03_vit.reference as ref
from tiny_mm.data.shapes import ShapesConfig, ShapesDataset, normalize
from tiny_mm.vit import VisionConfig, VisionTransformer, attention_rollout

# The models below are tiny: their matrices are too small for a second thread to pay
# for its synchronisation, and one thread keeps the timings steady on a busy machine.
torch.set_num_threads(1)
rng = np.random.default_rng(3)
np.set_printoptions(precision=3, suppress=True, linewidth=110)


def rel_err(out, reference) -> float:
    """||out - reference|| / ||reference||, in float64."""
    out, reference = np.asarray(out, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


# %% [markdown]
# ## 1. An image, cut into patches
#
# A photograph that ships with matplotlib (Grace Hopper, 600 x 512 pixels),
# cropped to a square and resized to 224 x 224, the input size of CLIP's
# ViT-B/32. With patches of $P = 32$ pixels the grid is $7 \times 7$, so the
# transformer will see $N = 49$ patch tokens, each made of
# $3 \cdot 32^2 = 3072$ numbers.

# %%
def load_photo(size: int = 224) -> np.ndarray:
    """matplotlib's sample photograph as a (3, size, size) float64 array in [0, 1]."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    pixels = matplotlib.image.imread(path)  # (600, 512, 3) uint8
    side = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = torch.from_numpy(pixels[top : top + side, left : left + side].copy())  # (side, side, 3)
    square = square.permute(2, 0, 1)[None].double() / 255  # (1, 3, side, side)
    small = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return small[0].clamp(0, 1).numpy()  # (3, size, size)


photo = load_photo()  # (3, 224, 224)
P = 32
grid = photo.shape[-1] // P
patches = ref.patchify(photo[None], P)[0]  # (49, 3072): patch n = row n // 7, column n % 7
print(f"image {photo.shape}, patch size {P}: a {grid} x {grid} grid, patches {patches.shape}")


def patch_mosaic(patches: np.ndarray, grid: int, P: int, gap: int = 4) -> np.ndarray:
    """Lay flattened (N, 3*P*P) patches out on their grid with white gaps: (H', W', 3) for imshow."""
    step = P + gap
    canvas = np.ones((grid * step - gap, grid * step - gap, 3))
    for n, flat in enumerate(patches):
        r, c = divmod(n, grid)
        canvas[r * step : r * step + P, c * step : c * step + P] = flat.reshape(3, P, P).transpose(1, 2, 0)
    return canvas


fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
axes[0].imshow(photo.transpose(1, 2, 0))
for k in range(1, grid):
    axes[0].axhline(k * P - 0.5, color="w", lw=0.8)
    axes[0].axvline(k * P - 0.5, color="w", lw=0.8)
axes[0].set_title("224 x 224, a 7 x 7 grid of 32-pixel patches")
axes[1].imshow(patch_mosaic(patches, grid, P))
axes[1].set_title("the same patches as 49 separate tokens")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Patch embedding four ways
#
# One weight matrix maps every flattened patch to `width` features. The
# reference computes it as patchify + matrix product and as a strided
# convolution written as a loop; PyTorch gives two more routes, its
# `nn.Conv2d` (what CLIP's `conv1` is) and `F.unfold` (which cuts the patches
# out) followed by a matrix product. Same weights, ViT-B/32's sizes
# (width 768), and the relative differences from the first route:

# %%
width = 768
weight = rng.standard_normal((width, 3, P, P)) / np.sqrt(3 * P * P)  # (768, 3, 32, 32), torch's Conv2d layout

start = time.perf_counter()
tokens_matmul = ref.patch_embed(photo[None], weight, P)  # (1, 49, 768): patchify, then one matmul
tokens_loop = ref.conv_patch_embed(photo[None], weight, P)  # (1, 49, 768): the convolution loop

conv = torch.nn.Conv2d(3, width, kernel_size=P, stride=P, bias=False)  # Conv2d(in_channels, out_channels, ...)
with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(weight))
    image32 = torch.from_numpy(photo[None]).float()  # (1, 3, 224, 224)
    tokens_conv = conv(image32).flatten(2).transpose(1, 2)  # (1, 49, 768), float32
    columns = F.unfold(image32, kernel_size=P, stride=P)  # (1, 3072, 49): one column per patch
    tokens_unfold = columns.transpose(1, 2) @ conv.weight.reshape(width, -1).T  # (1, 49, 768)
print(f"four routes in {time.perf_counter() - start:.2f} s")
for name, tokens in [("conv loop (NumPy, float64)", tokens_loop), ("nn.Conv2d (float32)", tokens_conv),
                     ("F.unfold + matmul (float32)", tokens_unfold)]:
    print(f"{name:<30} relative error vs patchify + matmul: {rel_err(tokens, tokens_matmul):.1e}")
print("unfold's columns are patchify's rows:", rel_err(columns[0].T, patches) < 1e-7)

# %% [markdown]
# The float64 routes agree to rounding ($10^{-16}$), the float32 ones to
# float32 rounding ($10^{-7}$). `F.unfold` flattens each patch channel first,
# then row, then column, the same order as `patchify` and as the kernel of
# `Conv2d`, which is why the flattened kernel multiplies it directly.
#
# ## 3. The class token and the positions
#
# `embed_image` prepends the class token and adds one positional vector per
# position: 49 patch tokens become 50. Attention itself ignores order, so
# without the positional table a shuffled image would give the same class
# token output.

# %%
cls = rng.standard_normal(width) / np.sqrt(width)  # (768,)
positional = rng.standard_normal((grid * grid + 1, width)) / np.sqrt(width)  # (50, 768)
sequence = ref.embed_image(photo[None], weight, cls, positional, P)  # (1, 50, 768)
print("tokens for the transformer:", sequence.shape)
print("position 0 is the class token plus its position:", rel_err(sequence[0, 0], cls + positional[0]) < 1e-15)

# %% [markdown]
# CLIP learns its positional table; the original transformer used fixed
# sines and cosines, and a 2-D version encodes a patch's row with half the
# features and its column with the other half (`reference.sincos_positions_2d`).
# Its dot products depend only on the offset between two patches, so the
# cosine similarity of one patch's vector with all others is a bump centred
# on that patch. Below, one small map per patch of the $7 \times 7$ grid:
# tile $(r, c)$ shows the similarity of patch $(r, c)$ with every patch.

# %%
def similarity_mosaic(table: np.ndarray, grid: int, gap: int = 1) -> np.ndarray:
    """Cosine similarity of each position with all others, as a grid of grid x grid tiles (NaN gaps)."""
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    cos = unit @ unit.T  # (N, N)
    step = grid + gap
    canvas = np.full((grid * step - gap, grid * step - gap), np.nan)
    for n in range(grid * grid):
        r, c = divmod(n, grid)
        canvas[r * step : r * step + grid, c * step : c * step + grid] = cos[n].reshape(grid, grid)
    return canvas


sincos = ref.sincos_positions_2d(grid, width)  # (49, 768)
fig, ax = plt.subplots(figsize=(5.2, 4.4))
im = ax.imshow(similarity_mosaic(sincos, grid), cmap="viridis")
ax.set_title("sine-cosine positions, width 768:\ncosine similarity of each patch with all", fontsize=10)
ax.axis("off")
fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. A tiny ViT that names the shape
#
# To see what attention does, a ViT has to be trained. `tiny_mm.data.shapes`
# draws one coloured shape (circle, square, triangle, star, cross) per 32 x 32
# image, at one of nine places, on a grey background with noise. A
# `VisionTransformer` with 4-pixel patches (an $8 \times 8$ grid, 65 tokens),
# width 48, 2 blocks of 4 heads, and `output_dim` equal to the number of
# shapes, so that `proj` of the class token's output gives the 5 logits. 300
# steps of AdamW on 2,000 images; the accuracy is measured on 300 images of
# another seed.

# %%
shapes = ShapesConfig(image_size=32)
train_images, _, train_labels = ShapesDataset(2000, shapes, seed=0).materialize()  # (2000, 3, 32, 32)
test_set = ShapesDataset(300, shapes, seed=1)
test_images, _, test_labels = test_set.materialize()  # (300, 3, 32, 32)
x_train, y_train = normalize(train_images), train_labels["shape"]  # CLIP's mean and std per channel
x_test, y_test = normalize(test_images), test_labels["shape"]

torch.manual_seed(0)
tiny = VisionConfig(image_size=32, patch_size=4, width=48, layers=2, heads=4,
                    output_dim=len(shapes.shapes), quick_gelu=False)
model = VisionTransformer(tiny)
untrained = copy.deepcopy(model).eval()  # kept to compare its attention with the trained one's
steps, batch, lr = 300, 32, 3e-3
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
generator = torch.Generator().manual_seed(0)


def accuracy(net: VisionTransformer) -> float:
    with torch.no_grad():
        return float((net(x_test).argmax(-1) == y_test).float().mean())


losses, start = [], time.perf_counter()
for step in range(steps):
    idx = torch.randint(0, len(x_train), (batch,), generator=generator)
    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])  # logits (batch, 5) from the class token
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    losses.append(loss.item())
model.eval()
print(f"{steps} steps in {time.perf_counter() - start:.1f} s")
print(f"held-out accuracy: untrained {accuracy(untrained):.3f}, trained {accuracy(model):.3f} (chance 0.2)")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses, lw=0.8)
ax.axhline(np.log(5), color="grey", ls="--", label="log 5 (guessing)")
ax.set(xlabel="step", ylabel="cross-entropy", title="training the tiny ViT")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Where the class token looks
#
# `VisionTransformer.attention_maps` runs the images through the model once
# and returns every block's attention probabilities, (B, layers, heads,
# 65, 65). Row 0 is the class token's query; its columns 1 to 64 are the
# patches, which reshape to the $8 \times 8$ grid. Averaged over the heads and
# drawn over the image, with the attention rollout (the flow through both
# blocks, residual connections included) beside them:

# %%
with torch.no_grad():
    maps = model.attention_maps(x_test)  # (300, 2, 4, 65, 65)
    maps_untrained = untrained.attention_maps(x_test)  # (300, 2, 4, 65, 65)
    rollout = attention_rollout(maps)  # (300, 65, 65)
print("attention maps:", tuple(maps.shape), " rows sum to 1:", bool(torch.allclose(maps.sum(-1), torch.ones(1))))


def cls_to_patches(m: torch.Tensor) -> torch.Tensor:
    """(B, L, L) maps -> (B, 8, 8): the class token's row over the patches, rescaled to sum to 1."""
    row = m[:, 0, 1:]  # (B, 64)
    return (row / row.sum(-1, keepdim=True)).reshape(-1, 8, 8)


views = {
    "block 1": cls_to_patches(maps[:, 0].mean(1)),
    "block 2": cls_to_patches(maps[:, 1].mean(1)),
    "rollout": cls_to_patches(rollout),
}
names = shapes.shapes
examples = [0, 1, 2, 3, 4]
fig, axes = plt.subplots(len(examples), 1 + len(views), figsize=(8, 2.0 * len(examples)))
for row, i in enumerate(examples):
    picture = test_images[i].permute(1, 2, 0).numpy()  # (32, 32, 3)
    axes[row, 0].imshow(picture)
    guess = int(model(x_test[i : i + 1]).argmax())
    axes[row, 0].set_title(f"{names[int(y_test[i])]} (said {names[guess]})", fontsize=9)
    for col, (label, view) in enumerate(views.items(), start=1):
        axes[row, col].imshow(picture)
        heat = np.kron(view[i].numpy(), np.ones((4, 4)))  # (32, 32): one 4 x 4 block per patch
        axes[row, col].imshow(heat, cmap="inferno", alpha=0.6)
        axes[row, col].set_title(label, fontsize=9)
for ax in axes.ravel():
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# How much of the class token's attention lands on the shape? A patch counts
# as "on the shape" when one of its pixels differs from the image's plain
# background by more than 0.15 (the noise has standard deviation 0.02).

# %%
backgrounds = torch.tensor([test_set.sample(i).background for i in range(len(test_set))])  # (300,)
on_shape = (test_images - backgrounds[:, None, None, None]).abs().amax(dim=1) > 0.15  # (300, 32, 32)
shape_patches = on_shape.view(-1, 8, 4, 8, 4).any(dim=4).any(dim=2)  # (300, 8, 8)
print(f"patches on the shape: {float(shape_patches.float().mean()):.1%} of all patches")
candidates = {
    "untrained, block 1": cls_to_patches(maps_untrained[:, 0].mean(1)),
    "untrained, block 2": cls_to_patches(maps_untrained[:, 1].mean(1)),
    **{f"trained, {name}": view for name, view in views.items()},
}
for label, view in candidates.items():
    share = float((view * shape_patches).sum(dim=(1, 2)).mean())
    print(f"{label:<20} class-token attention on the shape: {share:.1%}")

# %% [markdown]
# Before training the class token spreads its attention almost evenly, so
# the shape gets about its share of the patches. After 300 steps, the first
# block's class token puts most of its attention on the handful of patches the
# shape covers: the shape's name is all it is asked for, and the
# background says nothing about it. The second block reads the tokens the first
# one produced, which already carry information from everywhere, so its map is
# a less direct picture of where the information came from; rollout composes
# the two.
#
# The learned positional table of this model, by contrast, shows nothing like
# the sine-cosine bumps of section 3 yet: the mean cosine similarity of
# neighbouring positions is close to that of distant ones. The task does not
# need positions (a star is a star anywhere), and 300 steps are few; the ViT
# paper's learned tables show the grid only after long training on large data.

# %%
table = model.positional_embedding.detach()[1:].numpy()  # (64, 48), the class token's row left out
unit = table / np.linalg.norm(table, axis=1, keepdims=True)
cos = unit @ unit.T  # (64, 64)
r, c = np.divmod(np.arange(64), 8)
distance = np.hypot(r[:, None] - r[None, :], c[:, None] - c[None, :])  # (64, 64), in patches
for low, high in [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 12.0)]:
    pick = (distance > low) & (distance <= high)
    print(f"patches {low:>3} < distance <= {high:<4}: mean cosine similarity {cos[pick].mean():+.3f}")

# %% [markdown]
# ## Your turn
#
# Exercise 5 (`exercises/ex05_cls_token.py`) asks you to add the class token
# and the positional table to a patch encoder and return the class token's
# output as the image's embedding; `tinymm grade ex05` grades it.
