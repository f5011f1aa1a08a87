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
# # Chapter 2 notebook: attention, from a soft lookup to a fused kernel
#
# This notebook follows the chapter text. It treats attention as a soft
# dictionary lookup, shows why the logits are scaled by $1/\sqrt D$ and why the
# softmax must subtract its maximum, runs the online softmax one block at a
# time, draws the attention maps of a small cross-attention between image
# patches and words, draws the masks, checks the hand-derived backward against
# finite differences, compares the three rungs of the ladder (the NumPy
# reference, `tiny_mm.attention` and the Triton kernel in `kernels`), and
# counts the bytes a materialised and a fused attention move.
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

# Import `kernels` before anything else can import Triton. Without a GPU it runs its
# kernels in Triton's interpreter, and that choice must be made before `triton` is
# first imported.
import kernels  # noqa: E402
import chapters.ch02_attention.reference as ref  # noqa: E402

rng = np.random.default_rng(2)
np.set_printoptions(precision=3, suppress=True, linewidth=110)


def rel_err(out, reference) -> float:
    """||out - reference|| / ||reference||, in float64."""
    out, reference = np.asarray(out, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


# %% [markdown]
# ## 1. Attention is a soft lookup
#
# A Python dictionary returns the value whose key *equals* the query. Attention
# returns a weighted average of all the values, each weighted by how well its
# key *matches* the query: the weights are a softmax of the dot products
# $q \cdot k_j$, scaled by $1/\sqrt D$.
#
# Below, four keys point in four different directions and each carries a
# two-number value. A query close to key 2 returns nearly value 2; a query
# halfway between keys 0 and 1 returns nearly the mean of their values; a
# query orthogonal to every key returns the mean of all values.

# %%
D = 4
keys = 3.0 * np.eye(D)  # (Lk=4, D): four orthogonal keys
values = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # (Lk=4, Dv=2)
queries = np.array([
    [0.0, 0.0, 3.0, 0.0],  # matches key 2
    [2.0, 2.0, 0.0, 0.0],  # halfway between keys 0 and 1
    [0.0, 0.0, 0.0, 0.0],  # matches nothing: every logit is 0
])  # (Lq=3, D)

# The reference works on (B, H, L, D) arrays: one batch entry, one head.
out, lse = ref.attention_with_lse(queries[None, None], keys[None, None], values[None, None])
weights = ref.softmax(queries @ keys.T / np.sqrt(D))  # (Lq, Lk), the same weights, spelt out
for name, w, o in zip(["near key 2", "between keys 0 and 1", "matches nothing"], weights, out[0, 0]):
    print(f"{name:<22} weights {w}   output {o}")
assert np.allclose(out[0, 0], weights @ values)

# %% [markdown]
# ## 2. Why divide by $\sqrt D$
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1,
# then $q \cdot k = \sum_{d=1}^{D} q_d k_d$ is a sum of $D$ independent terms
# of variance 1: its variance is $D$. Without the scale, the logits of a
# 64-dimensional head have standard deviation 8, the softmax puts nearly all
# its weight on one key, and its gradient (which is proportional to
# $p(1 - p)$) nearly vanishes. Dividing by $\sqrt D$ brings the standard
# deviation back to 1 at every head size.

# %%
print(f"{'D':>4} {'std q.k':>9} {'sqrt D':>7} {'max weight, unscaled':>21} {'max weight, scaled':>19}")
for dim in (4, 16, 64, 256):
    qs = rng.standard_normal((2000, dim))  # 2000 queries
    ks = rng.standard_normal((64, dim))  # 64 keys
    logits = qs @ ks.T  # (2000, 64)
    unscaled = ref.softmax(logits).max(axis=-1).mean()
    scaled = ref.softmax(logits / np.sqrt(dim)).max(axis=-1).mean()
    print(f"{dim:>4} {logits.std():>9.2f} {np.sqrt(dim):>7.2f} {unscaled:>21.3f} {scaled:>19.3f}")

# %% [markdown]
# Unscaled, the average largest weight among 64 keys climbs towards 1 as
# $D$ grows: every query picks one key and ignores the rest. Scaled, it stays
# about the same for every $D$.
#
# ## 3. A softmax that does not overflow
#
# $e^x$ overflows float64 above $x \approx 709.8$, float32 above $88.7$ and
# float16 above $11.09$ ($e^{11.09} \approx 65{,}504$, float16's largest
# number). The softmax does not change when the same constant is subtracted
# from every logit, so subtract the row's maximum first: every exponent is
# then $\le 0$ and the largest term is exactly 1.

# %%
def naive_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


row16 = np.array([2.0, 11.0, 12.0], dtype=np.float16)  # modest logits, in float16
row64 = np.array([1000.0, 1001.0, 1002.0])  # large logits, in float64
with np.errstate(over="ignore", invalid="ignore"):
    print("float16, naive :", naive_softmax(row16))
    print("float64, naive :", naive_softmax(row64))
print("float16, stable:", ref.softmax(row16.astype(np.float64)).astype(np.float16))
print("float64, stable:", ref.softmax(row64))
print("float16 max:", np.finfo(np.float16).max, "  log of it:", round(float(np.log(np.finfo(np.float16).max)), 3))

# %% [markdown]
# The naive version returns NaN (infinity divided by infinity) for logits as
# small as 12 in float16. The stable version gives the right answer,
# which for the float64 row is $(e^{-2}, e^{-1}, 1) / (e^{-2} + e^{-1} + 1)$.
#
# ## 4. The online softmax, one block at a time
#
# The fused kernel never holds a whole row of logits: it sees the keys one
# block at a time. It keeps three running quantities per query row:
#
# - $m$, the largest logit seen so far;
# - $\ell = \sum_j e^{s_j - m}$ over the keys seen so far;
# - $a = \sum_j e^{s_j - m} v_j$, the unnormalised output.
#
# When a block brings a larger maximum $m'$, everything accumulated so far was
# measured against the old $m$ and is multiplied by $e^{m - m'} \le 1$ before
# the new block is added. At the end, the output is $a / \ell$ and the row's
# log-sum-exp is $m + \log \ell$.
#
# One query row against 48 keys, in blocks of 8. Block 3 holds a key that
# matches the query much better than any before it, so the maximum jumps
# there and the running sum is rescaled.

# %%
Lk_demo, block, Dv_demo = 48, 8, 3
scores = rng.normal(0.0, 1.0, Lk_demo)  # (Lk,) one row of logits
scores[27] = 6.0  # a strong match in block 3
v_demo = rng.standard_normal((Lk_demo, Dv_demo))  # (Lk, Dv)

m, l, acc = -np.inf, 0.0, np.zeros(Dv_demo)
history = []
for start in range(0, Lk_demo, block):
    s_blk = scores[start:start + block]  # (block,)
    m_new = max(m, s_blk.max())
    rescale = np.exp(m - m_new)  # e^{m - m'}: 0 on the first block (m = -inf)
    p_blk = np.exp(s_blk - m_new)  # (block,), every entry <= 1
    l = l * rescale + p_blk.sum()
    acc = acc * rescale + p_blk @ v_demo[start:start + block]
    m = m_new
    history.append((start // block, m, l, rescale))
    print(f"block {start // block}: max {m:6.3f}   rescale old sum by {rescale:.2e}   running sum {l:7.3f}")

online_out, online_lse = acc / l, m + np.log(l)
direct_p = ref.softmax(scores)
print("output, online :", online_out)
print("output, direct :", direct_p @ v_demo)
print(f"lse, online {online_lse:.12f}   direct {float(ref.logsumexp(scores)):.12f}")
assert np.allclose(online_out, direct_p @ v_demo) and np.isclose(online_lse, ref.logsumexp(scores))

blocks_seen = [h[0] for h in history]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
axes[0].bar(np.arange(Lk_demo), scores, color=["C1" if (j // block) % 2 else "C0" for j in range(Lk_demo)])
axes[0].set(xlabel="key j (colours mark the blocks)", ylabel="logit $s_j$", title="one row of logits")
axes[1].step(blocks_seen, [h[1] for h in history], where="post", marker="o")
axes[1].set(xlabel="blocks seen", ylabel="running max $m$", title="running maximum")
axes[2].plot(blocks_seen, [h[2] for h in history], marker="o", label=r"$\ell$ (relative to current $m$)")
axes[2].plot(blocks_seen, [h[2] * np.exp(h[1] - m) for h in history], marker="s", ls="--",
             label=r"$\ell\, e^{m - m_{final}}$ (one common reference)")
axes[2].set(xlabel="blocks seen", ylabel="running sum", title="running sum", yscale="log")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The running sum drops when the maximum jumps (block 3): the old terms are
# shrunk by $e^{m - m'}$, because they are now measured against a larger
# maximum. Measured against the final maximum (dashed line) the same sums only
# ever grow. The result equals the direct softmax to rounding error, and at no
# point was an exponent positive.
#
# ## 5. Cross-attention: words looking at image patches
#
# In cross-attention the queries come from one sequence and the keys and
# values from another, of a different length. Here the "image" is a 4 × 4
# grid of coloured patches (16 keys) and the "caption" has five words (5
# queries). Each patch's key is its RGB colour, centred; each colour word's
# query is the RGB of the colour it names, centred and scaled. The word "the"
# names no colour: its query is zero. The value of each patch is its (row,
# column) position, so each word's output is the weighted centre of where it
# looked.

# %%
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9),
           "yellow": (0.95, 0.9, 0.1), "grey": (0.5, 0.5, 0.5)}
grid = [["red", "red", "green", "green"],
        ["red", "red", "green", "grey"],
        ["blue", "blue", "grey", "yellow"],
        ["blue", "grey", "yellow", "yellow"]]
image = np.array([[COLOURS[c] for c in row] for row in grid])  # (4, 4, 3) RGB
patch_keys = image.reshape(16, 3) - 0.5  # (Lk=16, 3): centred colour of each patch
patch_pos = np.array([(r, c) for r in range(4) for c in range(4)], dtype=float)  # (Lk=16, 2) values

words = ["red", "green", "blue", "yellow", "the"]
strength = 12.0  # how sharply a colour word picks its colour
word_queries = np.array([strength * (np.array(COLOURS[w]) - 0.5) if w in COLOURS else np.zeros(3)
                         for w in words])  # (Lq=5, 3)

q_x = word_queries[None, None]  # (B=1, H=1, Lq=5, D=3)
k_x = patch_keys[None, None]  # (1, 1, Lk=16, 3)
v_x = patch_pos[None, None]  # (1, 1, Lk=16, Dv=2)
centres = ref.attention(q_x, k_x, v_x)[0, 0]  # (5, 2): where each word looked
attn_map = ref.softmax(word_queries @ patch_keys.T / np.sqrt(3))  # (5, 16), rows sum to 1

fig = plt.figure(figsize=(13, 5.2))
ax = fig.add_subplot(2, 1, 1)
im = ax.imshow(attn_map, cmap="viridis", aspect="auto", vmin=0)
ax.set(yticks=range(len(words)), yticklabels=words, xticks=range(16),
       xlabel="patch (row-major)", title="cross-attention weights: 5 words (queries) x 16 patches (keys)")
fig.colorbar(im, ax=ax)
for i, w in enumerate(words):
    ax = fig.add_subplot(2, len(words), len(words) + i + 1)
    ax.imshow(image)
    ax.imshow(attn_map[i].reshape(4, 4), cmap="gray", alpha=0.55, vmin=0, vmax=attn_map.max())
    ax.plot(centres[i, 1], centres[i, 0], "w*", ms=14, mec="k")
    ax.set(title=f'"{w}"', xticks=[], yticks=[])
fig.tight_layout()
plt.show()
for w, c in zip(words, centres):
    print(f'"{w}" looked around row {c[0]:.2f}, column {c[1]:.2f}')

# %% [markdown]
# Bright cells are patches a word attends to; the star is its output, the
# attention-weighted position. Each colour word finds its patches. "red"
# also gives a little weight to the yellow patches, because yellow's RGB is
# partly red: a key that half-matches gets a share. "the" matches nothing, so
# its weights are uniform (1/16 each) and its output is the centre of the grid.
#
# Real cross-attention has the same shape at a larger size: 128 text tokens
# attending to 196 image patches make a 128 × 196 matrix of weights per head,
# 25,088 entries (a number one source gives; it checks out).

# %%
print("128 x 196 =", 128 * 196)

# %% [markdown]
# ## 6. Masks
#
# A mask says which keys each query may see. Three kinds are built in:
#
# - **causal**: query $i$ sees key $j$ only if $j \le i$. When the query and
#   key lengths differ, the reference follows PyTorch's
#   `scaled_dot_product_attention(is_causal=True)`: the triangle starts in the
#   top-left corner. (The other convention, used when new queries continue a
#   cached prefix of keys, aligns it to the bottom-right corner: query $i$ sees
#   key $j$ if $j \le i + L_k - L_q$.)
# - **key padding**: a batch holds sequences of different lengths, padded to
#   the longest; `kv_lengths[b]` says how many keys of example $b$ are real.
# - both at once.

# %%
def bottom_right(Lq: int, Lk: int) -> np.ndarray:
    """The other causal convention, for comparison: query i sees key j iff j <= i + Lk - Lq."""
    return np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)


panels = [
    ("causal, 6 x 6", ref.visible_mask(1, 6, 6, causal=True)[0, 0]),
    ("causal, 4 x 7 (top-left)", ref.visible_mask(1, 4, 7, causal=True)[0, 0]),
    ("causal, 7 x 4 (top-left)", ref.visible_mask(1, 7, 4, causal=True)[0, 0]),
    ("bottom-right, 4 x 7 (not used)", bottom_right(4, 7)),
    ("kv_lengths = 5, 4 x 7", ref.visible_mask(1, 4, 7, kv_lengths=np.array([5]))[0, 0]),
    ("causal + kv_lengths = 3, 6 x 6", ref.visible_mask(1, 6, 6, causal=True, kv_lengths=np.array([3]))[0, 0]),
]
fig, axes = plt.subplots(1, len(panels), figsize=(15, 3))
for ax, (title, mask) in zip(axes, panels):
    ax.imshow(mask, cmap="Greens", vmin=0, vmax=1.3)
    ax.set(title=title, xlabel="key j", ylabel="query i", xticks=range(mask.shape[1]), yticks=range(mask.shape[0]))
    ax.title.set_fontsize(8)
fig.tight_layout()
plt.show()

# The reference's causal mask is the one PyTorch uses, also when Lq != Lk.
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.manual_seed(2)  # the torch draws below are repeatable too

for Lq, Lk in [(6, 6), (4, 7), (7, 4)]:
    qt, kt, vt = (torch.randn(1, 1, n, 8, dtype=torch.float64) for n in (Lq, Lk, Lk))
    mine = ref.attention(qt.numpy(), kt.numpy(), vt.numpy(), causal=True)
    theirs = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).numpy()
    print(f"Lq={Lq}, Lk={Lk}: causal reference vs torch SDPA(is_causal=True), relative error {rel_err(mine, theirs):.1e}")

# %% [markdown]
# ### A query that sees nothing
#
# With `kv_lengths[b] = 0`, or with a general mask that hides a whole row,
# a query has no visible key. Its logits are all $-\infty$, and the textbook
# softmax computes $e^{-\infty - (-\infty)}$: NaN. The reference defines the
# answer instead: the output row is zeros, the row's log-sum-exp is $-\infty$
# (the log of an empty sum), and the row's gradients are zero.

# %%
qz = rng.standard_normal((2, 1, 3, 4))  # (B=2, H=1, Lq=3, D=4)
kz, vz = rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 4))  # (2, 1, Lk=5, 4)
lengths = np.array([5, 0])  # example 1 has no keys at all
out_z, lse_z = ref.attention_with_lse(qz, kz, vz, kv_lengths=lengths)
print("example 1's outputs (no visible key):\n", out_z[1, 0])
print("example 1's log-sum-exps:", lse_z[1, 0])

# What PyTorch does with the same situation (measured with this torch version):
qt, kt, vt = (torch.tensor(a) for a in (qz, kz, vz))
visible = torch.tensor(ref.visible_mask(2, 3, 5, kv_lengths=lengths))  # (B, 1, Lq, Lk), True = may attend
sdpa = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible)
print(f"torch {torch.__version__} SDPA with a boolean mask, example 1:", sdpa[1, 0, 0].numpy())
mha = torch.nn.MultiheadAttention(4, 1, batch_first=True, dtype=torch.float64)
padding = ~visible[:, 0, 0, :]  # (B, Lk), True = padding (MultiheadAttention's convention)
with torch.no_grad():
    mha_out, _ = mha(qt[:, 0], kt[:, 0], vt[:, 0], key_padding_mask=padding)
print("nn.MultiheadAttention with key_padding_mask, example 1:", mha_out[1, 0].numpy())

# %% [markdown]
# This torch version's `scaled_dot_product_attention` also returns zeros;
# `nn.MultiheadAttention` returns NaN. A NaN in a row whose output is later
# ignored still poisons training: multiplying it by a zero weight gives NaN,
# not 0, and it spreads into every gradient it touches.
#
# ## 7. Many heads: split, attend, merge
#
# Multi-head attention runs $H$ attentions side by side on slices of the
# embedding: $(B, L, E) \to (B, H, L, E/H)$, attend per head, then back. The
# split is a reshape and a transpose, and merging undoes it exactly.

# %%
x = rng.standard_normal((2, 5, 12))  # (B, L, E=12)
heads = ref.split_heads(x, 3)  # (B, H=3, L, 4)
print("split:", x.shape, "->", heads.shape, "  merged back equal:", np.array_equal(ref.merge_heads(heads), x))
print("head 1 of token 2 is embedding slice [4:8]:", np.array_equal(heads[0, 1, 2], x[0, 2, 4:8]))

# %% [markdown]
# ## 8. The backward pass, by hand and by finite differences
#
# With $S = c\,QK^\top$ (scale $c$), $P = \mathrm{softmax}(S)$ row by row and
# $O = PV$, the chapter derives
#
# $dV = P^\top dO$, $dP = dO\,V^\top$,
# $dS = P \circ (dP - \delta)$ with $\delta_i = \sum_d dO_{id} O_{id}$,
# $dQ = c\, dS\, K$, $dK = c\, dS^\top Q$.
#
# Checked against central finite differences of the scalar $\sum O \circ G$
# for a random $G$ (so that $dO = G$), with a causal mask, $L_q \ne L_k$,
# $D_v \ne D$, and one example with no visible key.

# %%
B, H, Lq, Lk, Dk, Dv = 2, 2, 3, 4, 3, 2
q_g = rng.standard_normal((B, H, Lq, Dk))
k_g = rng.standard_normal((B, H, Lk, Dk))
v_g = rng.standard_normal((B, H, Lk, Dv))
d_out = rng.standard_normal((B, H, Lq, Dv))  # the upstream gradient G
lens = np.array([4, 0])  # example 1: every row empty
opts = dict(causal=True, kv_lengths=lens)

dq, dk, dv = ref.attention_grad(q_g, k_g, v_g, d_out, **opts)
numeric = [
    ref.numerical_gradient(lambda t: float(np.sum(ref.attention(t, k_g, v_g, **opts) * d_out)), q_g),
    ref.numerical_gradient(lambda t: float(np.sum(ref.attention(q_g, t, v_g, **opts) * d_out)), k_g),
    ref.numerical_gradient(lambda t: float(np.sum(ref.attention(q_g, k_g, t, **opts) * d_out)), v_g),
]
for name, hand, num in zip(["dq", "dk", "dv"], (dq, dk, dv), numeric):
    print(f"{name}: relative error vs finite differences {rel_err(hand, num):.1e}")
    assert rel_err(hand, num) < 1e-7
print("gradients of the example with no visible key are zero:",
      all(np.all(g[1] == 0) for g in (dq, dk, dv)))

# The identity behind delta: sum_j P_ij dP_ij equals sum_d dO_id O_id, row by row.
scores_g = np.where(ref.visible_mask(B, Lq, Lk, **opts), q_g @ k_g.swapaxes(-1, -2) / np.sqrt(Dk), -np.inf)
P_g = ref.softmax(scores_g)  # (B, H, Lq, Lk)
O_g = P_g @ v_g
print("max |rowsum(P * dP) - rowsum(dO * O)|:",
      float(np.max(np.abs(np.sum(P_g * (d_out @ v_g.swapaxes(-1, -2)), -1) - np.sum(d_out * O_g, -1)))))

# %% [markdown]
# ## 9. Three rungs, one attention
#
# The same float32 inputs go through the plain PyTorch rung
# (`tiny_mm.attention.scaled_dot_product_attention`, which builds the whole
# matrix), PyTorch's own `F.scaled_dot_product_attention` (given the
# reference's boolean mask) and the Triton kernel `kernels.attention` (run
# here by Triton's CPU interpreter). Each forward and each gradient is compared
# with the float64 NumPy reference. $L_q = 13$ and $L_k = 21$ are not
# multiples of any block size, so the kernel's edge masks are exercised;
# example 1 has only 9 real keys.

# %%
from tiny_mm.attention import scaled_dot_product_attention  # noqa: E402


def torch_rung(fn, arrays, d_out_np, dtype=torch.float32):
    """Output and (dq, dk, dv) of fn(q, k, v) on copies of the NumPy arrays, as float64 NumPy."""
    q, k, v = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays)
    out = fn(q, k, v)
    out.backward(torch.tensor(d_out_np, dtype=dtype))
    return [t.detach().double().numpy() for t in (out, q.grad, k.grad, v.grad)]


B, H, Lq, Lk, Dh = 2, 2, 13, 21, 16
arrays = [rng.standard_normal((B, H, n, Dh)) for n in (Lq, Lk, Lk)]  # q, k, v in float64
d_out_r = rng.standard_normal((B, H, Lq, Dh))
lens_t = torch.tensor([Lk, 9])

for causal in (False, True):
    expect = [ref.attention(*arrays, causal=causal, kv_lengths=lens_t.numpy()),
              *ref.attention_grad(*arrays, d_out_r, causal=causal, kv_lengths=lens_t.numpy())]
    visible_t = torch.tensor(ref.visible_mask(B, Lq, Lk, causal=causal, kv_lengths=lens_t.numpy()))
    rungs = {
        "tiny_mm (float32)": (1e-5, lambda q, k, v: scaled_dot_product_attention(
            q, k, v, causal=causal, kv_lengths=lens_t)),
        "torch SDPA (float32)": (1e-5, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible_t)),
        "kernels, interpreter (float32)": (1e-3, lambda q, k, v: kernels.attention(
            q, k, v, causal=causal, kv_lengths=lens_t)),
    }
    print(f"causal={causal}, Lq={Lq}, Lk={Lk}, D={Dh}, kv_lengths={lens_t.tolist()}")
    for label, (tol, fn) in rungs.items():
        errors = [rel_err(got, exp) for got, exp in zip(torch_rung(fn, arrays, d_out_r), expect)]
        print(f"  {label:<31}" + "  ".join(f"{n} {e:.1e}" for n, e in zip(["out", "dq", "dk", "dv"], errors)))
        assert max(errors) < tol, (label, errors)

# float16 through the kernel: logits, softmax statistics and accumulators stay float32 inside.
got16 = torch_rung(lambda q, k, v: kernels.attention(q, k, v, causal=True, kv_lengths=lens_t),
                   arrays, d_out_r, dtype=torch.float16)
expect16 = [ref.attention(*arrays, causal=True, kv_lengths=lens_t.numpy()),
            *ref.attention_grad(*arrays, d_out_r, causal=True, kv_lengths=lens_t.numpy())]
errors16 = [rel_err(g, e) for g, e in zip(got16, expect16)]
print("  kernels, interpreter (float16)  " + "  ".join(f"{n} {e:.1e}" for n, e in zip(["out", "dq", "dk", "dv"], errors16)))
assert max(errors16) < 1e-2

# %% [markdown]
# ## 10. What each rung keeps, and how much arithmetic it does
#
# Autograd keeps whatever the backward will need. For the plain PyTorch rung
# that includes the $L_q \times L_k$ matrix of probabilities; the kernel keeps
# its inputs, its output and one log-sum-exp per query row. Counting the bytes
# of the saved tensors (unique storages, the inputs and the output excluded):

# %%
def saved_bytes(fn, bh: int, L: int, dim: int) -> int:
    """Bytes autograd saves in fn's forward, not counting q, k, v and the output."""
    q, k, v = (torch.randn(1, bh, L, dim, requires_grad=True) for _ in range(3))
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v)
    for t in (q, k, v, out):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


bh_mem, L_mem, d_mem = 2, 96, 16
for label, fn in [("tiny_mm rung", scaled_dot_product_attention), ("kernels.attention", kernels.attention)]:
    b = saved_bytes(fn, bh_mem, L_mem, d_mem)
    print(f"{label:<18} B*H = {bh_mem}, L = {L_mem}: {b:>8,} bytes saved"
          f" = {b / (bh_mem * L_mem * L_mem * 4):.2f} float32 L x L matrices = {b / (bh_mem * L_mem * 4):.1f} floats per row")

# %% [markdown]
# And the arithmetic, counted by `torch.utils.flop_counter.FlopCounterMode`
# on the PyTorch rung (it counts the matrix products): the forward is
# $4 B H L_q L_k D$, two products of $2 B H L_q L_k D$ each. Its backward does
# four products, twice the forward. A fused backward must also recompute $S$,
# a fifth product: $2.5\times$ the forward at the least. `kernels.attention`
# splits its backward into a pass that owns dK and dV and a pass that owns dQ,
# so it recomputes $S$ and $dP$ twice: seven products, $3.5\times$.

# %%
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

B, H, Lq, Lk, Dh = 2, 3, 10, 14, 8
q, k, v = (torch.randn(B, H, n, Dh, requires_grad=True) for n in (Lq, Lk, Lk))
with FlopCounterMode(display=False) as counter:
    out = scaled_dot_product_attention(q, k, v)
forward_flops = counter.get_total_flops()
with FlopCounterMode(display=False) as counter:
    out.backward(torch.randn_like(out))
backward_flops = counter.get_total_flops()
formula = 4 * B * H * Lq * Lk * Dh
print(f"forward : counted {forward_flops:>7,}   4*B*H*Lq*Lk*D = {formula:,}")
print(f"backward: counted {backward_flops:>7,}   = {backward_flops / formula:.1f} x forward")

# %% [markdown]
# ## 11. Bytes moved: materialised against fused
#
# The shape of the chapter: $B \cdot H = 32$, $L_q = L_k = 4096$, $D = 64$,
# float16 (2 bytes), log-sum-exps in float32. The materialised forward runs
# three kernels (scores, softmax, weighted sum) and each one writes or reads
# the whole $L \times L$ matrix through the GPU's main memory (HBM). The
# materialised backward is what autograd runs on the saved probabilities. The
# fused kernels read their inputs and write their outputs; every tile of $S$
# and $P$ lives and dies on chip. (A fused kernel also re-reads each key/value
# tile once per block of queries; on a GPU those re-reads are mostly served
# from its L2 cache, and the last line counts the case where none are.)

# %%
def attention_bytes(bh: int, L: int, D: int, itemsize: int = 2, block_m: int = 64) -> dict[str, int]:
    """HBM bytes read + written by each way of computing attention (square, no mask)."""
    vec = bh * L * D * itemsize  # one of Q, K, V, O, dO, dQ, dK, dV
    mat = bh * L * L * itemsize  # one L x L matrix (S, P, dP or dS)
    row = bh * L * 4  # one float32 number per query row (lse or delta)
    delta_pass = 2 * vec + row  # read O, dO; write delta
    return {
        "materialised forward": (2 * vec + mat) + (mat + mat) + (mat + vec + vec),  # QK^T; softmax; PV
        "materialised backward": (mat + 2 * vec)  # dV = P^T dO
        + (2 * vec + mat)  # dP = dO V^T
        + (2 * mat + mat)  # dS = P * (dP - rowsum(dP * P))
        + 2 * (mat + 2 * vec),  # dQ = dS K, dK = dS^T Q
        "fused forward": 3 * vec + vec + row,  # read Q, K, V; write O and lse
        "fused backward, one pass": delta_pass + (4 * vec + 2 * row + 3 * vec),  # Q, K, V, dO, lse, delta -> dQ, dK, dV
        "kernels.attention backward, two passes": delta_pass
        + (4 * vec + 2 * row + 2 * vec)  # dK/dV pass: Q, K, V, dO, lse, delta -> dK, dV
        + (4 * vec + 2 * row + vec),  # dQ pass: the same inputs -> dQ
        "fused forward, every K/V tile from HBM": (L // block_m) * 2 * vec + 2 * vec + row,
    }


BH, L, Dh = 32, 4096, 64
flops = 4 * BH * L * L * Dh
work = {"forward": 1.0, "materialised backward": 2.0, "one pass": 2.5, "two passes": 3.5}
counts = attention_bytes(BH, L, Dh)
print(f"B*H = {BH}, L = {L}, D = {Dh}, float16;  forward FLOPs 4*B*H*L*L*D = {flops:,} = {flops / 1e9:.1f} GFLOP")
print(f"{'':<40}{'bytes':>15}{'GiB':>8}{'FLOP/byte':>11}")
for name, nbytes in counts.items():
    factor = next((f for key, f in work.items() if key in name), 1.0)
    print(f"{name:<40}{nbytes:>15,}{nbytes / 2**30:>8.3f}{flops * factor / nbytes:>11.0f}")
print(f"forward: the materialised version moves {counts['materialised forward'] / counts['fused forward']:.1f} x the bytes")
print(f"saved for the backward: P, {BH * L * L * 2:,} bytes (materialised) against lse, {BH * L * 4:,} bytes (fused)")

# %% [markdown]
# Four passes over a 1 GiB matrix dominate the materialised forward; the fused
# one moves 64.5 MiB, 64 times less. On a GPU that streams about 3.35 TB/s from
# HBM and multiplies float16 at about 990 TFLOP/s (an H100 SXM's vendor
# figures, not measured here), a kernel needs about 295 FLOP per byte moved
# before arithmetic rather than memory limits it. The materialised forward
# does 32, so it waits on memory for at least 1.3 ms where the arithmetic
# alone takes 0.14 ms; the fused one does about 2,000. Even if none of the
# fused kernel's key/value re-reads were caught by the cache (last line), it
# would move half the bytes of the materialised one and store none of its
# matrices. `tinymm bench attention` measures the real times.
