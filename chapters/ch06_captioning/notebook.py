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
# # Chapter 6 notebook: a captioner, and where each word looks
#
# This notebook follows the chapter text. It trains a small captioner on
# images of coloured shapes, then looks at what it does:
#
# 1. captions as word ids, and what teacher forcing feeds the decoder;
# 2. a short training run, and its loss curve;
# 3. captions written for images the model never saw;
# 4. for every generated word, the cross-attention over the patch grid;
# 5. greedy decoding against sampling at several temperatures;
# 6. the key/value cache: the same words, less work.
#
# The training run is shorter than `tinymm train captioner`'s recipe, so the
# notebook stays within about a minute on a 2-core CPU.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`
# and `tiny_mm` import from any folder: run this with .venv's Python (`make lab` does).
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import chapters.ch06_captioning.reference as ref
from tiny_mm.captioning import caption_loss, generate, teacher_forcing
from tiny_mm.data.shapes import ShapesConfig, ShapesDataset, normalize
from tiny_mm.data.words import shapes_vocab
from tiny_mm.train_captioner import ATTRIBUTES, TrainConfig, evaluate, train_captioner

np.set_printoptions(precision=3, suppress=True, linewidth=110)
torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and timings stay steady
vocab = shapes_vocab()


def show(ax, image: torch.Tensor, title: str = "", colour: str = "black") -> None:
    """Draw one (3, S, S) image in [0, 1] without axes."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=7, color=colour)
    ax.axis("off")


# %% [markdown]
# ## 1. Captions as word ids
#
# Each image holds one shape; its canonical caption names the size, the
# colour, the shape and the position, always in the same words. The
# vocabulary gives every word one id after the four special tokens
# (`<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3). Teacher forcing feeds the
# decoder the caption without its last id and scores it on the caption
# without its first id; padded targets do not count.

# %%
canonical = ShapesConfig(captions="canonical")
images, captions, labels = ShapesDataset(4, canonical, seed=7).materialize()  # (4, 3, 32, 32)
ids, lengths = vocab.encode(captions)  # (4, T), (4,)
inputs, targets = teacher_forcing(ids)  # (4, T-1) each
fig, axes = plt.subplots(1, 4, figsize=(8, 2.2))
for ax, image, caption in zip(axes, images, captions):
    show(ax, image, caption.replace(" on ", "\non ").replace(" in ", "\nin ").replace(" at ", "\nat "))
fig.tight_layout()
plt.show()
print(f"vocabulary: {len(vocab)} tokens; caption lengths with <bos> and <eos>: {lengths.tolist()}")
for name, row in (("inputs ", inputs[0]), ("targets", targets[0])):
    print(name, " ".join(f"{vocab.itos[i]:>7}" for i in row.tolist()))
print("ids    ", ids[0].tolist())

# %% [markdown]
# The loss of random logits on these targets, from `tiny_mm` and from the
# NumPy reference, and the gradient both ways. Padded positions get no
# gradient at all.

# %%
logits = torch.randn(*targets.shape, len(vocab), dtype=torch.float64, requires_grad=True)  # (4, T-1, 45)
loss = caption_loss(logits, targets)
loss.backward()
expected = ref.masked_cross_entropy(logits.detach().numpy(), targets.numpy())
grad = ref.masked_cross_entropy_grad(logits.detach().numpy(), targets.numpy())
print(f"loss: tiny_mm {float(loss.detach()):.6f}, reference {expected:.6f}  (log 45 = {np.log(45):.6f})")
print(f"gradient: largest difference {np.abs(logits.grad.numpy() - grad).max():.1e}; "
      f"on padded positions the gradient is {np.abs(grad[targets.numpy() == 0]).max():.1f}")

# %% [markdown]
# ## 2. Training
#
# `train_captioner` renders a pool of images once and trains the captioner
# with AdamW. Here: fewer steps and a smaller pool than the full recipe.
# With random weights the loss starts near $\log 45 = 3.8$, a uniform guess
# over the vocabulary. Many words are easy (every caption starts with "a",
# "on the" follows the shape), so it falls fast at first; colour and size
# come next, shape and position take longest. At 300 steps expect most
# captions right and some shapes confused (a star called a triangle);
# the full recipe's 600 steps get nearly all of them.

# %%
config = TrainConfig(steps=300, lr=3e-3, warmup=30, train_images=2000, eval_images=100)
result = train_captioner(config, progress=False)
model = result.model  # a Captioner in eval mode
print(f"{config.steps} steps of {config.batch_size} images in {result.seconds:.1f} s "
      f"({result.steps_per_second:.1f} steps/s); loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
print(f"on {config.eval_images} new images: exact match {result.scores['exact']:.3f}; "
      + ", ".join(f"{a} {result.scores[a]:.3f}" for a in ATTRIBUTES))
assert result.losses[-1] < result.losses[0]

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(result.losses, lw=0.8)
ax.axhline(np.log(len(vocab)), color="grey", ls="--", label="log 45 (uniform guess)")
ax.set(xlabel="step", ylabel="loss (nats per word)", yscale="log", title="teacher-forcing loss")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Captions of images the model never saw
#
# Greedy captions (the most likely word at every step) of new images, with
# the true caption beneath when they differ.

# %%
found = evaluate(model, n_images=12, seed=21)
fig, axes = plt.subplots(2, 6, figsize=(12, 5.6))
for ax, image, said, true in zip(axes.flat, found["images"], found["generated"], found["references"]):
    text = said.replace(" on ", "\non ").replace(" in ", "\nin ").replace(" at ", "\nat ")
    show(ax, image, text if said == true else f"{text}\n(true: {true})", "green" if said == true else "red")
fig.suptitle(f"greedy captions of new images ({sum(s == t for s, t in zip(found['generated'], found['references']))}"
             " of 12 exact; green: exact, red: not)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Which patches does each word read?
#
# `generate` records, for every word it writes, the cross-attention of the
# position that produced it: one distribution over the $4 \times 4$ patches
# per layer and head. Averaged over the heads and drawn on the patch grid over
# the image, it shows where the decoder looked. Function words ("a", "the")
# may look anywhere, or at the background; the colour, shape and position
# words should look at the shape. The last layer is drawn; the first is in the
# printout below.

# %%
show_images, show_captions, _ = ShapesDataset(3, canonical, seed=33).materialize()  # (3, 3, 32, 32)
out = generate(model, normalize(show_images))
grid = model.config.grid_size
size = model.config.image_size
for b in range(3):
    words = [vocab.itos[i] for i in out.tokens[b, 1:].tolist()]
    n = words.index("<eos>") + 1 if "<eos>" in words else len(words)
    fig, axes = plt.subplots(1, n, figsize=(1.45 * n, 1.9))
    for s in range(n):
        heat = out.cross_attention[b, s, -1].mean(0).reshape(grid, grid).numpy()  # (4, 4): last layer
        axes[s].imshow(show_images[b].permute(1, 2, 0).numpy())
        axes[s].imshow(heat, cmap="magma", alpha=0.6, extent=(0, size, size, 0), vmin=0, vmax=heat.max())
        axes[s].set_title(words[s], fontsize=9)
        axes[s].axis("off")
    fig.suptitle(f"true: {show_captions[b]}", fontsize=9)
    fig.tight_layout()
    plt.show()

first_layer = out.cross_attention[0, :, 0].mean(1)  # (S, N): layer 0, averaged over heads
print("layer 0, image 0: the patch each word reads most, and how much of its attention that is")
for s, i in enumerate(out.tokens[0, 1:].tolist()):
    top = int(first_layer[s].argmax())
    print(f"  {vocab.itos[i]:>7}: patch (row {top // grid}, col {top % grid}) {float(first_layer[s, top]):.2f}")
    if i == 2:
        break

# %% [markdown]
# ## 5. Greedy or sampled?
#
# Sampling at temperature $T$ draws each word from $\mathrm{softmax}(z/T)$.
# Small $T$ is nearly greedy; $T = 1$ samples the model's own distribution;
# large $T$ flattens it toward a uniform choice among all 45 tokens, and the
# captions fall apart. For one image, six samples at each temperature:

# %%
image = show_images[:1]  # (1, 3, 32, 32)
greedy = vocab.decode(generate(model, normalize(image)).tokens[0])
print(f"true:   {show_captions[0]}\ngreedy: {greedy}")
g = torch.Generator().manual_seed(0)
for temperature in (0.5, 1.0, 2.0, 5.0):
    samples = generate(model, normalize(image.expand(6, -1, -1, -1)), temperature=temperature, generator=g)
    texts = [vocab.decode(row) for row in samples.tokens]
    right = sum(t == show_captions[0] for t in texts)
    print(f"T = {temperature}: {right} of 6 exact")
    for text in texts[:3]:
        print(f"    {text}")

# %% [markdown]
# ## 6. The key/value cache
#
# Without the cache every step re-reads the whole prefix; with it, each step
# feeds only the newest word, and the image's cross-attention keys and values
# are computed once. The words must be the same; the time should not.

# %%
batch = normalize(ShapesDataset(64, canonical, seed=44).materialize()[0])  # (64, 3, 32, 32)


generate(model, batch)  # a first call pays one-off costs (memory, dispatch); time the later ones
seconds, words = {True: [], False: []}, {}
for _ in range(3):  # alternate the two, so a busy moment of the machine hits both alike
    for use_cache in (True, False):
        start = time.perf_counter()
        words[use_cache] = generate(model, batch, use_cache=use_cache).tokens  # (64, 1 + S)
        seconds[use_cache].append(time.perf_counter() - start)
fast, slow = np.median(seconds[True]), np.median(seconds[False])
same = torch.equal(words[True], words[False])
print(f"64 captions, median of 3: with the cache {1e3 * fast:.0f} ms, without {1e3 * slow:.0f} ms "
      f"({slow / fast:.1f}x); same words: {same}")
assert same

# %% [markdown]
# The saving grows with the caption's length: at step $t$ the uncached
# decoder runs $t$ positions through every layer, the cached one runs one. For
# 11-word captions it is about twofold here; for Whisper's 448-token
# transcripts (chapter 9) it is most of the work.
#
# ## Where next
#
# - `tinymm train captioner` runs the full recipe (600 steps) and prints
#   exact match and per-attribute accuracy on 500 new images; `--out
#   captioner.pt` saves the model, `tiny_mm.captioning.load_captioner` reads it.
# - `tinymm tour --only captioning` checks this chapter's pieces.
