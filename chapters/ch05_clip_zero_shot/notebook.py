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
# # Chapter 5 notebook: a tiny CLIP, and what zero-shot classification does with it
#
# This notebook follows the chapter text. It trains a tiny CLIP on images of
# coloured shapes, then looks at what it learned:
#
# 1. the similarity matrix of a batch: every image against every caption;
# 2. zero-shot predictions on colour-shape pairs the model never saw in training;
# 3. the template ensemble against single templates;
# 4. a confusion matrix over all 30 colour-shape classes;
# 5. nearest neighbours: which images the model finds closest to a query.
#
# Along the way the PyTorch zero-shot code (`tiny_mm.zeroshot`) is compared with
# the chapter's NumPy reference. The training run here is deliberately short
# so the notebook stays within about a minute on a 2-core CPU;
# `tinymm train clip` runs the full recipe.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`
# and `tiny_mm` import from any folder: run this with .venv's Python (`make lab` does).
import sys

import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import chapters.ch05_clip_zero_shot.reference as ref
from tiny_mm.data.shapes import ZERO_SHOT_TEMPLATES, ShapesConfig, ShapesDataset, class_names, normalize
from tiny_mm.tokenizer import tokenize
from tiny_mm.train_clip import TrainConfig, shapes_zero_shot, train_clip
from tiny_mm.zeroshot import build_classifier, confusion_matrix

np.set_printoptions(precision=3, suppress=True, linewidth=110)


def show(ax, image: torch.Tensor, title: str = "", colour: str = "black") -> None:
    """Draw one (3, S, S) image in [0, 1] without axes."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8, color=colour)
    ax.axis("off")


# %% [markdown]
# ## 1. Training a tiny CLIP
#
# `train_clip` renders a pool of training images once, from the 25 colour-shape
# pairs that `split_by_combinations` keeps for training, tokenizes their
# captions once, and trains `tiny_clip_config()` (a ViT on 32-pixel images and
# a two-layer text tower, both 64 wide) with chapter 4's symmetric loss. Five
# pairs never appear in training: red star, blue square, yellow cross, purple
# circle and orange triangle.
#
# The full recipe (`TrainConfig()`'s defaults, what `tinymm train clip` runs)
# takes a couple of minutes. Here: fewer steps of a smaller batch, drawn from a
# smaller pool of images, on one CPU thread, which keeps the run steady on a
# busy machine. The cell prints what fraction of the full recipe's work that
# is: expect a model clearly better than chance, but well short of what the
# full recipe reaches.

# %%
config = TrainConfig(steps=200, batch_size=64, lr=3e-3, warmup=20, train_images=2048, eval_images=200, threads=1)
result = train_clip(config, progress=False)
model = result.model  # a CLIP in eval mode
context = model.config.text.context_length  # 20 tokens: every shapes caption fits

full = TrainConfig()
print(f"{config.steps} steps of {config.batch_size} pairs in {result.seconds:.1f} s "
      f"({result.steps_per_second:.1f} steps/s): {config.steps * config.batch_size:,} pairs seen, "
      f"{config.steps * config.batch_size / (full.steps * full.batch_size):.0%} of the full recipe's "
      f"{full.steps * full.batch_size:,}")
print(f"loss: first {result.losses[0]:.3f}, last {result.losses[-1]:.3f} (log {config.batch_size} = "
      f"{np.log(config.batch_size):.3f})")
print("held out of training:", ", ".join(f"{c} {s}" for c, s in result.heldout_combinations))
print(f"zero-shot top-1, held-out pairs: {result.heldout['top1']:.3f}   seen pairs: {result.seen['top1']:.3f}"
      f"   (chance among 30 classes: {1 / 30:.3f})")
assert result.losses[-1] < result.losses[0]

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(result.losses)
ax.axhline(np.log(config.batch_size), color="grey", ls="--", label=f"log {config.batch_size}")
ax.set(xlabel="step", ylabel="loss", title="training loss")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The similarity matrix of a batch
#
# Eight new images, with their own captions. Row $i$ holds the cosine
# similarity of image $i$ with every caption; a model that has learned
# something puts the largest value of each row on the diagonal. Captions that
# share a colour or a shape with the image should score higher than captions
# that share nothing.

# %%
batch = ShapesDataset(8, ShapesConfig(), seed=5)
images, captions, _ = batch.materialize()  # (8, 3, 32, 32) in [0, 1], 8 str
with torch.no_grad():
    image_emb = F.normalize(model.encode_image(normalize(images)), dim=-1)  # (8, E)
    text_emb = F.normalize(model.encode_text(tokenize(captions, context)), dim=-1)  # (8, E)
cosine = (image_emb @ text_emb.T).numpy()  # (8, 8)

fig = plt.figure(figsize=(6.5, 7.5))
grid = fig.add_gridspec(2, 8, height_ratios=[1, 7])
for i in range(8):
    show(fig.add_subplot(grid[0, i]), images[i], f"image {i}")
ax = fig.add_subplot(grid[1, :])
im = ax.imshow(cosine, cmap="viridis", vmin=-1, vmax=1)
for i in range(8):
    for j in range(8):
        ax.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="black" if cosine[i, j] > 0.3 else "white")
ax.set_xticks(range(8), [f"caption {j}" for j in range(8)], rotation=45, ha="right", fontsize=8)
ax.set_yticks(range(8), [f"image {i}" for i in range(8)], fontsize=8)
ax.set(title="cosine(image i, caption j)")
fig.colorbar(im, ax=ax, fraction=0.04)
fig.tight_layout()
plt.show()
for j, caption in enumerate(captions):
    print(f"caption {j}: {caption}")
print("rows whose best caption is their own:", int((cosine.argmax(axis=1) == np.arange(8)).sum()), "of 8")

# %% [markdown]
# ## 3. Zero-shot on colour-shape pairs never seen in training
#
# The classifier is written from text alone: for each of the 30 colour-shape
# names ("red star", ...) the four `ZERO_SHOT_TEMPLATES` ("a {}", "a photo of a
# {}", ...) are embedded, normalised, averaged and normalised again. Then every
# image of a held-out pair is compared with the 30 class vectors, and the most
# similar one is the prediction. The model has seen red things and stars, but
# never a red star.

# %%
heldout = shapes_zero_shot(model, result.heldout_combinations, n_images=200, seed=3)
classes = heldout["classes"]  # the 30 class names, colour-major
print(f"held-out pairs, 200 images: top-1 {heldout['top1']:.3f}, top-5 {heldout['top5']:.3f}")

fig, axes = plt.subplots(3, 8, figsize=(12, 6.4))
for ax, image, p, t in zip(axes.flat, heldout["images"], heldout["pred"], heldout["labels"]):
    right = bool(p == t)
    show(ax, image, f"{classes[p]}\n(true: {classes[t]})", "green" if right else "red")
fig.suptitle("zero-shot predictions on held-out pairs (green: right, red: wrong)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The same numbers from the NumPy reference
#
# `tiny_mm.zeroshot.build_classifier` and the chapter's `reference.py` compute
# the template ensemble independently: the reference gets the raw prompt
# embeddings, a $(C, T, E)$ array, and does the normalise-average-normalise in
# float64. The two classifiers should agree to float32 precision, and so
# should the predictions and the accuracy.

# %%
with torch.no_grad():
    prompts = [t.format(name) for name in classes for t in ZERO_SHOT_TEMPLATES]  # C * T strings, class-major
    raw = model.encode_text(tokenize(prompts, context)).double().numpy()  # (C * T, E)
    image_raw = model.encode_image(normalize(heldout["images"])).double().numpy()  # (N, E)
W_ref = ref.template_ensemble(raw.reshape(len(classes), len(ZERO_SHOT_TEMPLATES), -1))  # (E, C)
W_torch = build_classifier(model, classes, ZERO_SHOT_TEMPLATES, lambda t: tokenize(t, context)).double().numpy()
logits_ref = ref.cosine_logits(image_raw, W_ref)  # (N, C)

rel = np.linalg.norm(W_torch - W_ref) / np.linalg.norm(W_ref)
labels = heldout["labels"].numpy()
print(f"classifier: relative error tiny_mm vs reference {rel:.1e}")
print(f"top-1: tiny_mm {heldout['top1']:.3f}, reference {ref.topk_accuracy(logits_ref, labels, 1):.3f}")
print(f"top-5: tiny_mm {heldout['top5']:.3f}, reference {ref.topk_accuracy(logits_ref, labels, 5):.3f}")
agree = float(np.mean(ref.predict(logits_ref) == heldout["pred"].numpy()))
print(f"predictions that agree: {agree:.3f}")
assert rel < 1e-5
assert agree > 0.99  # a near-tie may flip between float32 and float64, nothing more

# %% [markdown]
# ## 4. One template, or the ensemble?
#
# Each template alone gives a classifier too. Below: top-1 accuracy on the same
# held-out images with each of the four templates on its own, with the bare
# class name as its own "template" ("{}"), and with the ensemble of the four.
# On CIFAR-10 the same comparison is `tinymm zeroshot --templates single`
# against the default 18-template ensemble.

# %%
candidates = {f'"{t}"': (t,) for t in ("{}", *ZERO_SHOT_TEMPLATES)}
candidates["ensemble of 4"] = ZERO_SHOT_TEMPLATES
top1 = {}
for label, templates in candidates.items():
    out = shapes_zero_shot(model, result.heldout_combinations, n_images=200, seed=3, templates=templates)
    top1[label] = out["top1"]
    print(f"{label:<22} top-1 {out['top1']:.3f}   top-5 {out['top5']:.3f}")
rate = top1["ensemble of 4"]
print(f"standard error of a top-1 rate near {rate:.2f} on 200 images: {np.sqrt(rate * (1 - rate) / 200):.3f}")

fig, ax = plt.subplots(figsize=(7, 3))
ax.bar(range(len(top1)), list(top1.values()), color=["C0"] * (len(top1) - 1) + ["C1"])
ax.set_xticks(range(len(top1)), list(top1), rotation=20, ha="right", fontsize=8)
ax.axhline(1 / 30, color="grey", ls="--", label="chance (1/30)")
ax.set(ylabel="top-1", ylim=(0, 1), title="held-out pairs: single templates and the ensemble")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# On 200 images, one image is half a point, and the standard error printed
# above is a few points: differences smaller than that are noise, whichever
# way they go. What the ensemble offers is not a guaranteed gain but
# independence from the choice: averaging the unit vectors keeps what the
# prompts share (the colour and the shape) and dilutes what each adds on its
# own, so nobody has to guess which phrasing the model prefers. Which phrasing
# a model prefers depends on the captions it was trained on: "there is a {}"
# and "a picture of a {}" echo two of the frames of the shapes captions.
#
# ## 5. A confusion matrix over all 30 classes
#
# Now images of all 30 pairs, seen and held out, classified among all 30
# classes. Row $i$ counts the images of true class $i$ by predicted class.
# Held-out classes are marked with `*`. For a mistake on a held-out pair, ask
# which word survived: a red star taken for a red triangle kept its colour, a
# red star taken for a purple star kept its shape. The counts below say which
# of the two the model composes more reliably.

# %%
everything = shapes_zero_shot(model, ShapesConfig().combinations, n_images=600, seed=4)
counts = confusion_matrix(everything["pred"], everything["labels"], len(classes)).numpy()  # (30, 30)
assert np.array_equal(counts, ref.confusion_matrix(everything["pred"].numpy(), everything["labels"].numpy(),
                                                   len(classes)))
held_names = set(class_names(result.heldout_combinations))
ticks = [f"{name} *" if name in held_names else name for name in classes]

fig, ax = plt.subplots(figsize=(8.5, 8))
im = ax.imshow(counts, cmap="Blues")
ax.set_xticks(range(len(classes)), ticks, rotation=90, fontsize=7)
ax.set_yticks(range(len(classes)), ticks, fontsize=7)
ax.set(xlabel="predicted", ylabel="true", title="confusion matrix, 600 images (* = never seen in training)")
fig.colorbar(im, ax=ax, fraction=0.04)
fig.tight_layout()
plt.show()

kept = {"colour": 0, "shape": 0, "neither": 0}
for i, name in enumerate(classes):
    if name in held_names:
        row = counts[i]
        wrong = [(int(row[j]), classes[j]) for j in np.argsort(-row, kind="stable") if j != i and row[j] > 0][:3]
        print(f"{name:<16} {row[i]:>3} of {row.sum():>3} right; most often mistaken for: {wrong}")
        colour, shape = name.split()
        for j in np.flatnonzero(row):
            if j != i:
                guess_colour, guess_shape = classes[j].split()
                which = "colour" if guess_colour == colour else "shape" if guess_shape == shape else "neither"
                kept[which] += int(row[j])
print(f"mistakes on held-out pairs that kept the colour: {kept['colour']}, the shape: {kept['shape']}, "
      f"neither: {kept['neither']}")
print(f"all 600 images: top-1 {everything['top1']:.3f}")

# %% [markdown]
# ## 6. Nearest neighbours
#
# The image embeddings can be searched without any text: embed a gallery of
# images once, then rank the gallery by cosine similarity with a query image.
# (Exercise 7 builds exactly this for a folder of photos.) Each row below is a
# query, then its five nearest gallery images. The queries include held-out
# pairs; the gallery holds images of every pair.

# %%
gallery, _, _ = ShapesDataset(300, ShapesConfig(), seed=9).materialize()  # (300, 3, 32, 32)
queries, query_captions, query_labels = ShapesDataset(
    4, ShapesConfig(), seed=10, combinations=result.heldout_combinations[:2] + result.train_combinations[:2]
).materialize()  # (4, 3, 32, 32)
with torch.no_grad():
    gallery_emb = model.encode_image(normalize(gallery)).double().numpy()  # (300, E)
    query_emb = model.encode_image(normalize(queries)).double().numpy()  # (4, E)
ids, scores = ref.nearest_neighbours(query_emb, gallery_emb, k=5)  # (4, 5), (4, 5)

fig, axes = plt.subplots(4, 6, figsize=(9, 6.6))
for row in range(4):
    pair = ShapesConfig().combinations[int(query_labels["combo"][row])]
    show(axes[row, 0], queries[row], "query, " + ("held out" if pair in result.heldout_combinations else "seen"), "blue")
    for col in range(5):
        show(axes[row, col + 1], gallery[ids[row, col]], f"{scores[row, col]:.2f}")
fig.suptitle("query image, then its 5 nearest gallery images (cosine similarity)")
fig.tight_layout()
plt.show()
for row in range(4):
    print(f"query {row}: {query_captions[row]}")

# %% [markdown]
# The same search works with a sentence as the query: embed the text with the
# text tower and rank the gallery images by cosine similarity. Here the query
# names a held-out pair.

# %%
colour, shape = result.heldout_combinations[0]
sentence = f"a photo of a {colour} {shape}"
with torch.no_grad():
    sentence_emb = model.encode_text(tokenize([sentence], context)).double().numpy()  # (1, E)
ids, scores = ref.nearest_neighbours(sentence_emb, gallery_emb, k=8)  # (1, 8), (1, 8)
fig, axes = plt.subplots(1, 8, figsize=(11, 1.9))
for ax, i, score in zip(axes, ids[0], scores[0]):
    show(ax, gallery[i], f"{score:.2f}")
fig.suptitle(f'text query: "{sentence}"')
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Where next
#
# - `tinymm train clip` runs the full recipe and prints held-out and seen
#   accuracy; `--out tiny_clip.safetensors` saves the model, and
#   `tiny_mm.load_clip(path)` reads it back.
# - `tinymm zeroshot --checkpoint PATH --dataset cifar10 --data-dir DIR` does
#   section 3 on CIFAR-10 with a real CLIP checkpoint, if you have one and the
#   data on disk; `--templates single` repeats section 4 there.
# - Exercise 2 (`tinymm grade ex02`) asks you to write the zero-shot
#   classifier yourself, and exercise 7 (`tinymm grade ex07`) the photo search.
