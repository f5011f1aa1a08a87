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
# # Chapter 8 notebook: adapters between a frozen image encoder and a frozen language model
#
# This notebook follows the chapter text:
#
# 1. Flamingo's media mask on an interleaved sequence, drawn as an image;
# 2. closed gates: at initialisation Flamingo *is* the frozen language model;
# 3. the two texts the language model is pretrained on (captions alone, or
#    captions after their attribute words);
# 4. a short run of the captioning experiment: Flamingo's gates opening,
#    the loss of each adapter, their captions of held-out images;
# 5. how much of each model is trained: the trainable-parameter fractions.
#
# The training runs here are short so the notebook stays within about half a
# minute on a 2-core CPU; `tinymm train adapters` runs the full experiment
# (the chapter text gives its numbers).

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

import chapters.ch08_vlm_adapters.reference as ref
from tiny_mm.adapters.flamingo import FlamingoLM, media_mask
from tiny_mm.data.words import shapes_vocab
from tiny_mm.language_model import LMConfig, TinyLM, count_parameters, text_stream
from tiny_mm.train_adapters import ATTRIBUTES, AdapterConfig, build_captioner, format_table, run_experiment

torch.set_num_threads(1)  # small models: one thread is as fast, and steady on a busy machine
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. The media mask
#
# An interleaved sequence: some text, an image, text about it, a second image,
# more text. `I` marks where each `<image>` marker sits. Each image becomes
# R = 3 latent vectors after the resampler; the mask says which of them each
# text token may read: only those of the image whose marker most recently
# precedes it. The first tokens, before any image, read nothing.

# %%
words = "hello . I a red star . I a blue circle on the left".split()
locations = torch.tensor([[w == "I" for w in words]])  # (1, L) bool
T, R = 2, 3
mask = media_mask(locations, T, R)[0, 0]  # (L, T * R)
assert np.array_equal(mask.numpy(), ref.media_mask_reference(locations.numpy(), T, R)[0])

fig, ax = plt.subplots(figsize=(4.5, 5))
ax.imshow(mask.numpy(), cmap="Greens", aspect="auto")
ax.set_yticks(range(len(words)), ["<image>" if w == "I" else w for w in words], fontsize=8)
ax.set_xticks(range(T * R), [f"img{m} z{r}" for m in range(T) for r in range(R)], rotation=90, fontsize=8)
ax.set_title("media mask: which latents each token reads", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Closed gates
#
# Every gated layer adds tanh(alpha) times its branch, and alpha starts at 0.
# So a FlamingoLM built around a language model computes exactly what the
# language model computes: the same bits, not merely close ones.

# %%
torch.manual_seed(0)
lm = TinyLM(LMConfig())
flamingo = FlamingoLM(lm, media_width=64, num_latents=8, every=2)
ids = torch.randint(0, 45, (2, 10))
with torch.no_grad():
    same = torch.equal(flamingo(ids, torch.randn(2, 2, 17, 64), locations[:, :10].repeat(2, 1)), lm(ids))
print("logits equal the frozen LM's at initialisation:", same)

# %% [markdown]
# ## 3. Two texts to pretrain the language model on
#
# A prefix adapter can only steer what the frozen model already reads. The
# chapter's experiment pretrains the language model two ways: on captions alone,
# where nothing before a caption ever helps predict it, and on the "context"
# stream, where most captions follow their own attribute words in a random order,
# so that copying from the context pays. A few captions of each stream:

# %%
vocab = shapes_vocab()
for kind in ("captions", "context"):
    words = " ".join(vocab.itos[i] for i in text_stream(4, kind, seed=3).tolist())
    print(f"{kind:>8}:", words.replace("<eos> ", "<eos>\n          "), "\n")

# %% [markdown]
# ## 4. A short run of the experiment
#
# `run_experiment` trains the frozen parts first (a tiny ViT classifying the
# shapes' attributes, a language model on the context stream), then each adapter
# alone on the same image features and captions. Short here: 80 steps per
# adapter instead of the full run's 400, and 100 steps of language-model
# pretraining instead of 1,500, too few for it to learn to read its context;
# so expect rough captions, and prefix adapters near chance. In the full run
# Flamingo reaches 92% exact captions and the prefix adapters 5% at best; given
# perfect features (the labels), LLaVA's linear map reaches 53.5% against a model
# that reads its context and 1% against one trained on captions alone (the
# chapter text, section 5).

# %%
config = AdapterConfig(
    adapters=("flamingo", "llava", "qformer"), steps=80, batch_size=48, lr=5e-3, encoder_steps=120,
    lm_steps=100, train_images=500, eval_images=48, threads=1, gate_every=5,
)
experiment = run_experiment(config, progress=False)
print(format_table(experiment.results))
if experiment.skipped:
    print("skipped (module missing):", experiment.skipped)

# %% [markdown]
# The losses: Flamingo starts exactly at the language model's own loss (its
# gates are closed); the prefix adapters start from a blank prefix, close to it.

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for result in experiment.results:
    smooth = np.convolve(result.losses, np.ones(5) / 5, mode="valid")
    ax.plot(np.arange(len(smooth)) + 4, smooth, label=result.name)
ax.set_xlabel("step")
ax.set_ylabel("caption loss (nats / word)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Flamingo's gates during training: tanh(alpha) of the cross-attention and of
# the dense branch, for each gated layer (before blocks 0 and 2). They start
# at 0 and open as the new layers become useful; the sign does not matter, the
# branch learns its own sign.

# %%
flamingo_result = next(r for r in experiment.results if r.name == "flamingo")
steps = [s for s, _ in flamingo_result.gates]
fig, ax = plt.subplots(figsize=(6, 3.2))
for block in flamingo_result.gates[0][1]:
    for branch, style in ((0, "-"), (1, "--")):
        values = [g[block][branch] for _, g in flamingo_result.gates]
        ax.plot(steps, values, style, label=f"block {block} {'attn' if branch == 0 else 'dense'}")
ax.axhline(0, color="grey", lw=0.5)
ax.set_xlabel("step")
ax.set_ylabel("tanh(alpha)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Captions of held-out images, one column per adapter (green: the whole
# caption right).

# %%
n = 6
fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 3.2))
for i, ax in enumerate(axes):
    ax.imshow(experiment.eval_images[i].permute(1, 2, 0).numpy())
    ax.axis("off")
    lines = [f"true: {experiment.eval_captions[i]}"]
    lines += [f"{r.name}: {r.samples[i][0]}" for r in experiment.results]
    ax.set_title("\n".join(lines), fontsize=6, loc="left")
plt.tight_layout()
plt.show()
for r in experiment.results:
    print(f"{r.name:<9} exact {100 * r.exact:5.1f}%  " + "  ".join(f"{a} {100 * r.attributes[a]:5.1f}%" for a in ATTRIBUTES))

# %% [markdown]
# ## 5. How much is trained
#
# The fraction counts every parameter the captioner runs: image encoder,
# language model and adapter. In this tiny world the adapters are large next
# to a 205k-parameter language model; at real sizes (a 7B to 70B language
# model) the same designs train a few percent or less.

# %%
sizes = []
for name in ("flamingo", "llava", "llava-mlp", "qformer"):
    if name in experiment.skipped:
        continue
    model = build_captioner(name, experiment.lm, 64)
    trainable = count_parameters(model, trainable_only=True)
    total = count_parameters(model) + count_parameters(experiment.encoder)
    sizes.append((name, trainable, total))
    print(f"{name:<10} trainable {trainable:>8,} of {total:>8,}  ({100 * trainable / total:.1f}%)")

fig, ax = plt.subplots(figsize=(5, 2.6))
ax.barh([s[0] for s in sizes], [100 * s[1] / s[2] for s in sizes], color="tab:blue")
ax.set_xlabel("trainable parameters (% of the whole captioner)")
plt.tight_layout()
plt.show()
