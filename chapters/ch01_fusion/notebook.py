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
# # Chapter 1 notebook: what each fusion strategy costs, and what it can learn
#
# This notebook follows the chapter text. It builds the three fusion models of
# `tiny_mm.fusion` (early, late, cross-modal), checks the exact cost formulas
# of `tiny_mm.counting` against what PyTorch itself counts, recomputes the
# textbook's "196 × 128 against 324²" comparison for a whole layer, plots how
# each strategy's cost grows with the number of image tokens, and finally
# trains the three models on a toy task that needs token-level interaction
# between the modalities.
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
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tiny_mm import counting
from tiny_mm.fusion import CrossModalFusion, EarlyFusion, FusionConfig, LateFusion

# These models are tiny: splitting their small matrix products across threads costs
# more than it saves (several times slower on a busy 2-core machine), so use one.
torch.set_num_threads(1)
torch.manual_seed(0)
STRATEGIES = {"early": EarlyFusion, "late": LateFusion, "cross": CrossModalFusion}
COST_OF = {"early": counting.early_fusion, "late": counting.late_fusion, "cross": counting.cross_modal_fusion}

# %% [markdown]
# ## 1. Three models, one interface
#
# Each model takes $N$ image tokens and $M$ text tokens, both already of width
# $d$, and returns class logits. They differ only in where the two streams
# meet: from the first layer on (early), never inside the encoders (late), or
# through cross-attention layers in which the text reads the image (cross).

# %%
config = FusionConfig(layers=2, width=24, heads=3, num_classes=4)
B, N, M = 2, 9, 5
image = torch.randn(B, N, config.width)  # (B, N, d)
text = torch.randn(B, M, config.width)  # (B, M, d)
models = {name: cls(config) for name, cls in STRATEGIES.items()}
for name, model in models.items():
    logits = model(image, text)  # (B, classes)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name:<6} output {tuple(logits.shape)}   parameters {n_params:>6,}")

# %% [markdown]
# ## 2. The formulas against PyTorch's own counts
#
# `tiny_mm.counting` writes each model's cost as a formula in $B, L, d, h, N,
# M$. Here PyTorch measures the same quantities on the modules above, and the
# two must agree exactly:
#
# - FLOPs: `FlopCounterMode` records every matrix product (2 FLOPs per
#   multiply-add) of the forward pass, and of the backward pass fed a random
#   output gradient.
# - parameters: `sum(p.numel())`.
# - activation memory: `saved_tensors_hooks` sees every tensor autograd keeps
#   for the backward; each distinct storage counts once, parameters excluded.
# - attention-score entries: a dispatch mode adds up the size of every softmax
#   output.

# %%
class SoftmaxEntries(TorchDispatchMode):
    """Counts the elements of every softmax output (the attention probabilities)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._softmax:
            self.entries += out.numel()
        return out


def measure(model: torch.nn.Module) -> dict[str, int]:
    """FLOPs (forward, training), parameters, saved bytes and score entries, measured by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        out = model(image, text)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    training = forward + counter.get_total_flops()

    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t  # keeping it alive means no later tensor can reuse its address

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(image, text)
    mode = SoftmaxEntries()
    with mode, torch.no_grad():
        model(image, text)
    return {
        "flops_forward": forward,
        "flops_training": training,
        "params": sum(p.numel() for p in model.parameters()),
        "activation_bytes": sum(saved.values()),
        "score_entries": mode.entries,
    }


print(f"B={B} N={N} M={M} L={config.layers} d={config.width} h={config.heads}\n")
print(f"{'':<6} {'quantity':<17} {'formula':>10} {'measured':>10}")
for name, model in models.items():
    cost = COST_OF[name](config.layers, config.width, config.heads, N, M, batch=B, num_classes=config.num_classes)
    for key, value in measure(model).items():
        print(f"{name:<6} {key:<17} {getattr(cost, key):>10,} {value:>10,}")
        assert getattr(cost, key) == value, (name, key)

# %% [markdown]
# Every line agrees exactly. (The tests repeat this for random sizes, batch
# sizes and dtypes.) Note that training FLOPs are exactly three times the
# forward: every matrix product $A W$ needs one product for $\partial A$ and
# one for $\partial W$ in the backward pass.
#
# ## 3. The textbook's numbers, per head and per layer
#
# The claim: for 196 image patches and 128 text tokens, cross-attention
# "requires $196 \times 128 = 25{,}088$ computations per head versus $324^2 =
# 104{,}976$ for early fusion, a 4× reduction".

# %%
N0, M0, d0, h0 = 196, 128, 768, 12
cross_scores = counting.attention_scores(M0, N0)  # per head and example
early_scores = counting.attention_scores(N0 + M0, N0 + M0)
print(f"cross-attention scores: {M0} x {N0} = {cross_scores:,}")
print(f"early fusion scores:    {N0 + M0}^2 = {early_scores:,}")
print(f"ratio: {early_scores / cross_scores:.3f}")
assert (cross_scores, early_scores) == (25_088, 104_976)

# %% [markdown]
# The arithmetic checks out: 4.18×. But it compares the *one* cross-attention
# operation of a cross-modal model with the *whole* attention of an early-fusion
# layer. A cross-modal model still runs self-attention inside each encoder.
# Below: one complete layer of each strategy (projections, attention, MLPs,
# everything `tiny_mm.counting.fusion_layer` counts) at $d = 768$, $h = 12$,
# for one example in float32.

# %%
layer = {s: counting.fusion_layer(s, d0, h0, N0, M0) for s in ("early", "late", "cross")}
rows = [
    ("score entries per head", lambda c: c.score_entries / h0, "{:,.0f}"),
    ("score memory (MB)", lambda c: c.score_bytes / 1e6, "{:.2f}"),
    ("forward GFLOPs", lambda c: c.flops_forward / 1e9, "{:.3f}"),
    ("training GFLOPs", lambda c: c.flops_training / 1e9, "{:.3f}"),
    ("parameters (M)", lambda c: c.params / 1e6, "{:.3f}"),
    ("activation memory (MB)", lambda c: c.activation_bytes / 1e6, "{:.2f}"),
]
print(f"{'one layer, N=196, M=128':<26}" + "".join(f"{s:>10}" for s in layer) + f"{'early/cross':>13}")
for label, get, fmt in rows:
    values = [get(c) for c in layer.values()]
    print(f"{label:<26}" + "".join(f"{fmt.format(v):>10}" for v in values) + f"{values[0] / values[2]:>13.2f}")

# The attention products alone (Q K^T and P V), and everything else in the early layer.
early_core = counting.attention_core(N0 + M0, N0 + M0, d0, h0)
cross_core = counting.attention_core(M0, N0, d0, h0)
print(f"\nattention products: early {early_core.flops_forward / 1e6:.0f} MFLOPs, "
      f"cross-attention {cross_core.flops_forward / 1e6:.0f} MFLOPs, "
      f"ratio {early_core.flops_forward / cross_core.flops_forward:.2f}")
print(f"share of the early layer's forward FLOPs in the attention products: "
      f"{early_core.flops_forward / layer['early'].flops_forward:.1%}")
print(f"share of the early layer's activation memory in the attention probabilities: "
      f"{layer['early'].score_bytes / layer['early'].activation_bytes:.1%}")

# %% [markdown]
# Where the "4×" holds: the score matrix of the cross-attention itself, its
# memory and the two products that use it ($QK^\top$ and $PV$), 4.18× smaller
# than early fusion's. Where it does not:
#
# - the cross-modal model's scores in total are $N^2 + M^2 + NM = 79{,}888$ per
#   head (the two encoders' self-attention plus the cross-attention), only
#   1.31× fewer than early fusion's $(N+M)^2 = N^2 + M^2 + 2NM$;
# - the products with the scores are 6.6% of an early-fusion layer's FLOPs.
#   The projections and the MLP, which grow like the token count and not its
#   square, are the other 93%. So one cross-modal layer, which runs an image
#   block, a text block *and* a cross-attention block with its own MLP, costs
#   1.39× **more** FLOPs than one early-fusion layer, and late fusion saves
#   only 3%;
# - the probabilities are 24% of an early-fusion layer's activation memory;
#   the cross-modal layer keeps fewer of them but more of everything else,
#   1.32× more in total.
#
# The closed forms make this exact. Per layer and example (forward, MLP width
# $4d$), the difference between cross-modal and early fusion is
# $4Nd^2 + 20Md^2 - 4NMd = 4d\,(Nd + 5Md - NM)$: the extra projections and MLP
# of the cross-attention block, minus the $NM$ score pairs that cross-modal
# fusion does not compute (early fusion computes image→text *and*
# text→image). With $M < d$ this is positive for every $N$.

# %%
for n_img in (196, 1024, 16_384):
    cross_flops = counting.fusion_layer("cross", d0, h0, n_img, M0).flops_forward
    gap = cross_flops - counting.fusion_layer("early", d0, h0, n_img, M0).flops_forward
    assert gap == 4 * d0 * (n_img * d0 + 5 * M0 * d0 - n_img * M0)
    print(f"N = {n_img:>6}: cross - early = {gap / 1e9:+.2f} GFLOPs per layer (closed form agrees)")

# %% [markdown]
# ## 4. Cost against the number of image tokens
#
# Text fixed at $M = 128$ tokens, $d = 768$, $h = 12$, one layer, one example,
# float32; $N$ from 16 to 16,384 image tokens (16,384 is a 512 × 512 image cut
# into 4 × 4 patches). Left: forward FLOPs. Middle: the memory of
# the attention probabilities (the part that grows like the square of the
# length). Right: each strategy's cost relative to early fusion.

# %%
n_grid = np.unique(np.geomspace(16, 16_384, 40).astype(int))
curves = {s: [counting.fusion_layer(s, d0, h0, int(n), M0) for n in n_grid] for s in ("early", "late", "cross")}
styles = {"early": "C0", "late": "C1", "cross": "C2"}

def column(strategy: str, field: str) -> np.ndarray:
    """One Cost field along n_grid, as floats."""
    return np.array([getattr(c, field) for c in curves[strategy]], dtype=float)


fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for s in curves:
    flops, scores = column(s, "flops_forward"), column(s, "score_bytes")
    axes[0].loglog(n_grid, flops, color=styles[s], label=s)
    axes[1].loglog(n_grid, scores / 2**20, color=styles[s], label=s)
    axes[2].semilogx(n_grid, flops / column("early", "flops_forward"), color=styles[s], label=f"{s}: FLOPs")
    axes[2].semilogx(n_grid, scores / column("early", "score_bytes"), color=styles[s], ls="--",
                     label=f"{s}: score memory")
crossover = 6 * d0 - M0  # N where early fusion's attention products equal its linear layers' FLOPs
for ax in axes:
    ax.axvline(N0, color="grey", lw=0.8)
axes[0].axvline(crossover, color="k", ls=":", lw=0.8)
axes[0].set(xlabel="image tokens N", ylabel="forward FLOPs per layer", title=f"FLOPs (M = {M0}, d = {d0})")
axes[1].set(xlabel="image tokens N", ylabel="MiB", title="attention probabilities, float32")
axes[2].set(xlabel="image tokens N", ylabel="relative to early fusion", title="ratio to early fusion")
axes[0].legend()
axes[1].legend()
axes[2].legend(fontsize=7)
fig.tight_layout()
plt.show()

for n_img in (196, 1024, 4096, 16_384):
    e, l, c = (counting.fusion_layer(s, d0, h0, n_img, M0) for s in ("early", "late", "cross"))
    core = counting.attention_core(n_img + M0, n_img + M0, d0, h0).flops_forward
    print(f"N = {n_img:>6}: FLOPs late/early {l.flops_forward / e.flops_forward:.2f}, "
          f"cross/early {c.flops_forward / e.flops_forward:.2f}; score memory late/early "
          f"{l.score_bytes / e.score_bytes:.2f}, cross/early {c.score_bytes / e.score_bytes:.2f}; "
          f"early's attention products {core / e.flops_forward:.0%} of its layer")

# %% [markdown]
# The grey line is $N = 196$, the dotted one $N + M = 6d$, where the quadratic
# attention products of an early-fusion layer ($4(N+M)^2 d$) catch up with its
# linear layers ($24(N+M)d^2$). Below that length the scores barely move the
# FLOPs: late fusion stays within 4% of early fusion, and cross-modal fusion
# costs more because of its extra block. What the strategies change there is
# the score memory. At thousands of image tokens the image's own $N^2$
# self-attention dominates every strategy alike; cross-modal fusion as built
# here only saves the half of the cross terms in which image tokens attend to
# text.
#
# ## 5. What each strategy can learn: a toy task
#
# An "image" is a strip of $K = 12$ cells, each a different colour (a random
# permutation of 12 colours). The "text" is one token, a question: *which
# colour is in cell $p$?* The answer is one of 12 classes; guessing gives
# $1/12 = 8.3\%$.
#
# Each image token is a learned colour vector plus a learned position vector;
# the question token is a learned vector per cell index, from a separate
# table (the model must learn which question matches which position). Every
# image holds every colour exactly once, so a summary of the image that ignores
# *where* each colour is says nothing about the answer.
#
# - **Early** and **cross-modal** fusion can let the question token attend to
#   the image token at position $p$ and copy its colour: one attention lookup.
# - **Late** fusion pools the image to one vector before it sees the
#   question. The pooled vector must hold the entire colour-by-position table,
#   and the small head (`Linear(2d, d)`, GELU, `Linear(d, classes)`) must
#   decode the right entry from it.
#
# Tiny models ($d = 32$, $h = 4$, $L = 1$), the same batches for all of them,
# 400 AdamW steps of 64 fresh examples each. A fourth run removes the GELU from
# late fusion's head, so that its logits are a sum of an image term and a
# question term (the chapter text shows why that can never be fully right).

# %%
K = 12  # cells per image = number of colours = number of classes
WIDTH = 32


def make_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """colours (batch, K): a permutation per image; question (batch,): a cell index; answer (batch,)."""
    colours = torch.argsort(torch.rand(batch, K, generator=gen), dim=1)  # (batch, K)
    question = torch.randint(0, K, (batch,), generator=gen)  # (batch,)
    answer = colours[torch.arange(batch), question]  # (batch,): the colour in the asked cell
    return colours, question, answer


class ColourQuestion(torch.nn.Module):
    """Embeds the toy inputs as tokens of width d and hands them to a fusion model."""

    def __init__(self, fusion_cls: type, layers: int = 1) -> None:
        super().__init__()
        self.colour = torch.nn.Embedding(K, WIDTH)
        self.position = torch.nn.Embedding(K, WIDTH)
        self.question = torch.nn.Embedding(K, WIDTH)  # its own table: "cell 3" is a word, not a position
        self.fusion = fusion_cls(FusionConfig(layers=layers, width=WIDTH, heads=4, num_classes=K))

    def forward(self, colours: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        image_tokens = self.colour(colours) + self.position.weight  # (B, K, d)
        text_tokens = self.question(question)[:, None, :]  # (B, 1, d)
        return self.fusion(image_tokens, text_tokens)  # (B, K) logits


STEPS, BATCH = 400, 64
# name -> (fusion model, replace late fusion's Linear + GELU head by a single Linear?)
RUNS = {
    "early": (EarlyFusion, False),
    "late": (LateFusion, False),
    "cross": (CrossModalFusion, False),
    "late, linear head": (LateFusion, True),
}
history: dict[str, dict[str, list[float]]] = {}
final: dict[str, float] = {}
test_colours, test_question, test_answer = make_batch(2000, torch.Generator().manual_seed(123))
for name, (cls, linear_head) in RUNS.items():
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)  # the same batches for every model
    model = ColourQuestion(cls)
    if linear_head:  # no GELU: the logits become a(image) + b(question), see the chapter text
        model.fusion.fuse = torch.nn.Linear(2 * WIDTH, WIDTH)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    history[name] = {"loss": [], "acc": []}
    for step in range(STEPS):
        colours, question, answer = make_batch(BATCH, data)
        logits = model(colours, question)  # (BATCH, K)
        loss = torch.nn.functional.cross_entropy(logits, answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history[name]["loss"].append(loss.item())
        history[name]["acc"].append((logits.argmax(-1) == answer).float().mean().item())
    with torch.no_grad():
        final[name] = (model(test_colours, test_question).argmax(-1) == test_answer).float().mean().item()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name:<18} {n_params:>6,} parameters   held-out accuracy {final[name]:.3f}   (chance {1 / K:.3f})")

# %%
def smooth(values: list[float], width: int = 20) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


run_style = {"early": ("C0", "-"), "late": ("C1", "-"), "cross": ("C2", "-"), "late, linear head": ("C1", ":")}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for name, (colour, line) in run_style.items():
    axes[0].plot(smooth(history[name]["loss"]), color=colour, ls=line, label=name)
    axes[1].plot(smooth(history[name]["acc"]), color=colour, ls=line, label=name)
axes[0].axhline(np.log(K), color="grey", ls="--", label=f"log {K} (guessing)")
axes[1].axhline(1 / K, color="grey", ls="--", label="chance")
axes[0].set(xlabel="step", ylabel="cross-entropy", title="training loss (20-step mean)")
axes[1].set(xlabel="step", ylabel="accuracy", title="training accuracy (20-step mean, fresh batches)")
axes[0].legend(fontsize=8)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

assert final["early"] > 0.9 and final["cross"] > 0.9, final
assert final["late"] < 0.5 and final["late, linear head"] < 0.2, final

# %% [markdown]
# Early and cross-modal fusion solve the task; late fusion, with twice the
# parameters of early fusion, creeps up slowly from chance. Every training
# batch is new, so the training curves measure generalisation too.
#
# Late fusion is not *incapable* here: its head has a hidden layer with a
# GELU, and a wide enough head on a rich enough pooled vector could decode
# anything. But it must learn to pack the whole image into one vector, and to
# unpack the right cell from it, where attention needs one lookup. Without the
# GELU (the dotted curve) the logits are a sum of an image term and a question
# term, and then no encoder, however large, can answer every question right:
# the chapter text proves it with two images that differ by one swap of two
# colours. That variant stays at chance.
#
# ## 6. Other numbers from the sources
#
# The per-layer formula "$24nd^2 + 4n^2d$ FLOPs (attention plus
# feed-forward)" and the cross-attention cost "$4mnd$ per layer":

# %%
for n_tok in (77, 196, 257, 324):
    assert counting.transformer_block(n_tok, d0, h0).flops_forward == 24 * n_tok * d0**2 + 4 * n_tok**2 * d0
print("24 n d^2 + 4 n^2 d is exactly one TransformerBlock's forward (MLP width 4d)")

m_txt, n_img, blip_layers = 128, 196, 6
core = counting.attention_core(m_txt, n_img, d0, h0).flops_forward
sublayer = counting.multi_head_attention(m_txt, n_img, d0, h0).flops_forward
block = counting.cross_attention_block(m_txt, n_img, d0, h0).flops_forward
print(f"4 m n d = {4 * m_txt * n_img * d0:,} = attention products {core:,}")
print(f"x {blip_layers} layers: {blip_layers * core / 1e6:.0f} MFLOPs (the source: 462 MFLOPs)")
print(f"the cross-attention sublayer with its four projections: {sublayer / 1e6:.0f} MFLOPs per layer, "
      f"{blip_layers * sublayer / 1e9:.2f} GFLOPs for {blip_layers} layers ({sublayer / core:.1f}x the products)")
print(f"a whole cross-attention block (with its MLP): {block / 1e9:.2f} GFLOPs per layer")
image_encoder = 12 * counting.transformer_block(n_img, d0, h0).flops_forward
text_encoder = 12 * counting.transformer_block(m_txt, d0, h0).flops_forward
print(f"for scale: 12 layers over 196 image tokens {image_encoder / 1e9:.1f} GFLOPs, "
      f"over 128 text tokens {text_encoder / 1e9:.1f} GFLOPs")
image_products = 12 * counting.attention_core(n_img, n_img, d0, h0).flops_forward
text_products = 12 * counting.attention_core(m_txt, m_txt, d0, h0).flops_forward
print(f"their self-attention products alone: image {image_products / 1e9:.2f} G, text {text_products / 1e9:.2f} G")
cross_12 = 12 * sublayer
print(f"cross-attention sublayers in all 12 text layers: {cross_12 / 1e9:.1f} GFLOPs, "
      f"{cross_12 / (image_encoder + text_encoder + cross_12):.0%} of encoders + cross-attention")
late_layer = counting.fusion_layer("late", d0, h0, n_img, m_txt).flops_forward
print(f"a cross-attention block on top of a late-fusion layer: +{block / late_layer:.0%} "
      f"({1 - core / block:.0%} of it projections and MLP)")

# %% [markdown]
# And the per-example cost of CLIP ViT-L/14's two towers (the source: about
# 55 GFLOPs per image and 5.5 per text, a 10× ratio). The image tower is 24
# layers of width 1024 (16 heads) over 257 tokens (256 patches of 14 × 14
# pixels plus a class token); the text tower 12 layers of width 768 (12 heads)
# over 77 tokens. The transformer blocks only (the patch embedding adds
# $2 \cdot 256 \cdot 588 \cdot 1024 = 0.31$ GFLOPs):

# %%
vit_l = 24 * counting.transformer_block(257, 1024, 16).flops_forward
clip_text = 12 * counting.transformer_block(77, 768, 12).flops_forward
print(f"image tower {vit_l / 1e9:.1f} GFLOPs, text tower {clip_text / 1e9:.1f} GFLOPs, "
      f"ratio {vit_l / clip_text:.1f}")
print(f"the source's image sum: 2*24*256^2*1024 = {2 * 24 * 256**2 * 1024 / 1e9:.2f} G "
      f"+ 2*24*256*4*1024^2 = {2 * 24 * 256 * 4 * 1024**2 / 1e9:.1f} G")

# Activation memory in float16 (2 bytes; the attention probabilities take 4 + 2 bytes each, see probs_bytes).
vit_l_mem = 24 * counting.transformer_block(257, 1024, 16, dtype_bytes=2)
text_mem = 12 * counting.transformer_block(77, 768, 12, dtype_bytes=2)
print(f"saved for the backward, float16: image {vit_l_mem.activation_bytes / 1e6:.0f} MB "
      f"({vit_l_mem.score_bytes / 1e6:.0f} MB of it probabilities), text {text_mem.activation_bytes / 1e6:.1f} MB")
