"""The PyTorch attention (tiny_mm.attention) against independent implementations.

Expected values come from three places, never from the code under test:

- chapters/ch02_attention/reference.py: NumPy float64 attention, its
  hand-derived gradients, the masks and multi-head attention;
- torch.nn.functional.scaled_dot_product_attention, with masks built here;
- torch.nn.MultiheadAttention, holding the same weights.

Gradients here are torch autograd's, so the reference tests also check that
autograd sees the function the chapter differentiates by hand. Masks: a query
row that sees no key (kv_lengths[b] == 0) must give zeros and zero gradients,
never NaN, on every backend.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch02_attention.reference as ref
from tiny_mm.attention import (
    MultiHeadAttention,
    merge_heads,
    scaled_dot_product_attention,
    split_heads,
    visible_mask,
)

# Relative-error budgets of the project (DESIGN.md): float64 is "exact", float32 < 1e-5.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
TRITON_RTOL = 1e-3  # a Triton float32 tl.dot is involved
MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, padded)
MASK_IDS = ["no-mask", "causal", "padded", "causal+padded"]


def assert_close(out, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """||out - expected|| <= rtol * ||expected|| + atol, NaN never passes; message says how far."""
    out = np.asarray(out.detach().double() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    expected = np.asarray(
        expected.detach().double() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64
    )
    assert out.shape == expected.shape, f"{what}: shape {out.shape}, expected {expected.shape}"
    bad = np.argwhere(~np.isfinite(out))
    assert bad.size == 0, f"{what}: non-finite values at {bad[:5].tolist()}"
    err, scale = np.linalg.norm(out - expected), np.linalg.norm(expected)
    assert err <= rtol * scale + atol, (
        f"{what}: ||out - ref|| = {err:.3e}, ||ref|| = {scale:.3e} "
        f"(relative {err / max(scale, 1e-300):.3e}, allowed {rtol:.0e} relative + {atol:.0e})"
    )


def random_lengths(rng: np.random.Generator, batch: int, lk: int, allow_empty: bool = True):
    """(B,) key lengths in [0, Lk]: with B >= 2 one example is empty (if allowed) and one is full."""
    low = 0 if allow_empty else 1
    lengths = rng.integers(low, lk + 1, size=batch)
    if batch >= 2:
        lengths[0], lengths[-1] = low, lk
        rng.shuffle(lengths)
    return lengths


def grad_floor(grad: torch.Tensor, rtol: float) -> float:
    """Absolute floor for comparing a gradient that may be zero in exact arithmetic.

    Two are: dq of a row that sees one key (its softmax is the constant 1), and the key
    projection's bias (adding q . b_k to every score of a row leaves its softmax as it
    is). Computed, they are rounding noise on both sides, so they are judged at the
    precision of entries of size one (the inputs are standard normal): rtol per entry.
    """
    return rtol * math.sqrt(grad.numel())


def to_torch(x: np.ndarray, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def seen(x: torch.Tensor) -> np.ndarray:
    """The float64 copy of what a tensor holds after rounding to its dtype (input to the reference)."""
    return x.detach().double().numpy()


# Shapes (B, H, Lq, Lk, D, Dv): square, Lq < Lk with Dv != D, Lq > Lk, a single query,
# a single key, and one of each.
SHAPES = [
    (2, 2, 7, 7, 5, 5),
    (2, 3, 5, 9, 4, 6),
    (3, 1, 9, 4, 8, 3),
    (2, 2, 1, 6, 4, 4),
    (2, 2, 6, 1, 4, 4),
    (1, 1, 1, 1, 3, 2),
]


# --------------------------------------------------------------------------- the plain rung


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_reference(rng, dtype, causal, padded, shape):
    batch, heads, lq, lk, d, dv = shape
    q = to_torch(rng.standard_normal((batch, heads, lq, d)), dtype, grad=True)
    k = to_torch(rng.standard_normal((batch, heads, lk, d)), dtype, grad=True)
    v = to_torch(rng.standard_normal((batch, heads, lk, dv)), dtype, grad=True)
    d_out = rng.standard_normal((batch, heads, lq, dv))
    lengths = random_lengths(rng, batch, lk) if padded else None
    kv_lengths = None if lengths is None else torch.tensor(lengths)

    out = scaled_dot_product_attention(q, k, v, causal=causal, kv_lengths=kv_lengths)
    assert out.dtype == dtype
    (out * to_torch(d_out, dtype)).sum().backward()

    args = (seen(q), seen(k), seen(v))
    expected = ref.attention(*args, causal=causal, kv_lengths=lengths)
    r_q, r_k, r_v = ref.attention_grad(*args, d_out, causal=causal, kv_lengths=lengths)
    rtol = RTOL[dtype]
    assert_close(out, expected, rtol, what="out")
    # dq is exactly zero where a row sees a single key: see grad_floor.
    for name, grad, expected_grad in (("dq", q.grad, r_q), ("dk", k.grad, r_k), ("dv", v.grad, r_v)):
        assert_close(grad, expected_grad, rtol, grad_floor(grad, rtol), what=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_custom_scale(rng, dtype):
    scale = float(rng.uniform(0.05, 3.0))
    q, k, v = (rng.standard_normal((2, 2, 5, 4)) for _ in range(3))
    tq, tk, tv = (to_torch(x, dtype, grad=True) for x in (q, k, v))
    d_out = rng.standard_normal((2, 2, 5, 4))
    out = scaled_dot_product_attention(tq, tk, tv, causal=True, scale=scale)
    (out * to_torch(d_out, dtype)).sum().backward()
    args = (seen(tq), seen(tk), seen(tv))
    r_q, r_k, r_v = ref.attention_grad(*args, d_out, causal=True, scale=scale)
    assert_close(out, ref.attention(*args, causal=True, scale=scale), RTOL[dtype], what="out")
    assert_close(tq.grad, r_q, RTOL[dtype], what="dq")
    assert_close(tk.grad, r_k, RTOL[dtype], what="dk")
    assert_close(tv.grad, r_v, RTOL[dtype], what="dv")


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zeros_and_zero_gradients(rng, dtype, causal):
    # Example 0 has no key at all: its output and every gradient it sends must be exactly
    # zero and finite; example 1 (three keys) must be unaffected by its neighbour.
    q = to_torch(rng.standard_normal((2, 2, 4, 8)), dtype, grad=True)
    k = to_torch(rng.standard_normal((2, 2, 6, 8)), dtype, grad=True)
    v = to_torch(rng.standard_normal((2, 2, 6, 8)), dtype, grad=True)
    lengths = np.array([0, 3])
    # Anomaly mode raises if any step of the backward returns NaN, even one that a later
    # step would hide (a masked_fill's backward zeroes whatever it receives).
    with torch.autograd.detect_anomaly(check_nan=True):
        out = scaled_dot_product_attention(q, k, v, causal=causal, kv_lengths=torch.tensor(lengths))
        out.float().square().sum().backward()  # a loss whose gradient is not zero where out is not
    for name, x in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        assert torch.count_nonzero(x[0]) == 0, f"{name} of the empty example is not zero"
        assert torch.count_nonzero(x[1]) > 0, f"{name} of the example with keys is zero"
    rtol = RTOL.get(dtype, 1e-2)
    expected = ref.attention(seen(q), seen(k), seen(v), causal=causal, kv_lengths=lengths)
    assert_close(out, expected, rtol, what="out")


@pytest.mark.parametrize("causal", [False, True])
def test_every_example_empty(rng, causal):
    q, k, v = (to_torch(rng.standard_normal((2, 1, 3, 4)), torch.float32, grad=True) for _ in range(3))
    no_keys = torch.zeros(2, dtype=torch.int32)
    out = scaled_dot_product_attention(q, k, v, causal=causal, kv_lengths=no_keys)
    out.sum().backward()
    for name, x in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all() and torch.count_nonzero(x) == 0, f"{name} is not all zero"


@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("lq, lk", [(5, 5), (3, 8), (8, 3), (1, 4), (4, 1)])
def test_visible_mask_matches_reference(rng, causal, padded, lq, lk):
    lengths = random_lengths(rng, 3, lk) if padded else None
    mask = visible_mask(
        3, lq, lk, causal=causal, kv_lengths=None if lengths is None else torch.tensor(lengths)
    )
    assert mask.dtype == torch.bool and mask.shape == (3, 1, lq, lk)
    expected = ref.visible_mask(3, lq, lk, causal=causal, kv_lengths=lengths)
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_split_and_merge_heads_match_reference(rng):
    x = rng.standard_normal((2, 5, 12))
    heads = split_heads(torch.tensor(x), 3)
    assert heads.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(heads.numpy(), ref.split_heads(x, 3))
    np.testing.assert_array_equal(merge_heads(heads).numpy(), x)  # merge undoes split
    y = rng.standard_normal((2, 3, 5, 4))
    np.testing.assert_array_equal(merge_heads(torch.tensor(y)).numpy(), ref.merge_heads(y))


# --------------------------------------------------------------------------- against torch's SDPA


def torch_sdpa_mask(batch: int, lq: int, lk: int, causal: bool, lengths) -> torch.Tensor:
    """Boolean (B, 1, Lq, Lk) mask for F.scaled_dot_product_attention, built here from scratch."""
    mask = torch.ones(batch, 1, lq, lk, dtype=torch.bool)
    if causal:
        mask &= torch.ones(lq, lk, dtype=torch.bool).tril()  # top-left aligned, as is_causal
    if lengths is not None:
        mask &= (torch.arange(lk)[None, :] < torch.as_tensor(lengths)[:, None])[:, None, None, :]
    return mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_torch_sdpa(rng, dtype, causal, padded, shape):
    batch, heads, lq, lk, d, dv = shape
    inputs = [
        rng.standard_normal((batch, heads, lq, d)),
        rng.standard_normal((batch, heads, lk, d)),
        rng.standard_normal((batch, heads, lk, dv)),
    ]
    # Keys for every example: torch's SDPA leaves fully masked rows undefined (NaN in some
    # versions and kernels), so they are tested against the reference above, not here.
    lengths = random_lengths(rng, batch, lk, allow_empty=False) if padded else None
    d_out = to_torch(rng.standard_normal((batch, heads, lq, dv)), dtype)

    ours = [to_torch(x, dtype, grad=True) for x in inputs]
    out = scaled_dot_product_attention(
        *ours, causal=causal, kv_lengths=None if lengths is None else torch.tensor(lengths)
    )
    (out * d_out).sum().backward()

    theirs = [to_torch(x, dtype, grad=True) for x in inputs]
    if padded:
        expected = F.scaled_dot_product_attention(
            *theirs, attn_mask=torch_sdpa_mask(batch, lq, lk, causal, lengths)
        )
    else:  # is_causal checks the top-left alignment independently of any mask we build
        expected = F.scaled_dot_product_attention(*theirs, is_causal=causal)
    (expected * d_out).sum().backward()

    rtol = RTOL[dtype]  # float32 against float32: both sides round, each far below 1e-5
    assert_close(out, expected, rtol, what="out vs torch SDPA")
    for name, a, b in zip(("dq", "dk", "dv"), ours, theirs):
        assert_close(a.grad, b.grad, rtol, grad_floor(a.grad, rtol), what=f"{name} vs torch SDPA")


def test_sdpa_matches_torch_sdpa_outside_empty_rows(rng):
    lq, lk = 5, 7
    q, k, v = (torch.tensor(rng.standard_normal((3, 2, n, 4))) for n in (lq, lk, lk))
    lengths = np.array([4, 0, 7])
    out = scaled_dot_product_attention(q, k, v, causal=True, kv_lengths=torch.tensor(lengths))
    mask = torch_sdpa_mask(3, lq, lk, True, lengths)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = lengths > 0
    assert_close(out[keep], expected[keep], 1e-12, what="out vs torch SDPA")
    assert torch.count_nonzero(out[~keep]) == 0


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    [
        ((2, 5, 4), (2, 5, 4), (2, 5, 4), "4-D"),
        ((2, 2, 5, 4), (3, 2, 5, 4), (3, 2, 5, 4), r"\(B, H\)"),
        ((2, 2, 5, 4), (2, 1, 5, 4), (2, 1, 5, 4), r"\(B, H\)"),
        ((2, 2, 5, 4), (2, 2, 5, 3), (2, 2, 5, 4), "head dim"),
        ((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 5, 4), "number of keys"),
        ((2, 2, 5, 4), (2, 2, 0, 4), (2, 2, 0, 4), "empty"),
        ((2, 2, 0, 4), (2, 2, 5, 4), (2, 2, 5, 4), "empty"),
    ],
)
def test_sdpa_rejects_bad_shapes(q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(torch.ones(q_shape), torch.ones(k_shape), torch.ones(v_shape))


def test_sdpa_rejects_bad_dtypes():
    x = torch.ones(1, 1, 3, 4)
    with pytest.raises(ValueError, match="share a dtype"):
        scaled_dot_product_attention(x, x.double(), x)
    with pytest.raises(ValueError, match="floating"):
        scaled_dot_product_attention(x.long(), x.long(), x.long())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kv_lengths": torch.tensor([1.0, 2.0])}, "integer"),
        ({"kv_lengths": torch.tensor([True, False])}, "integer"),
        ({"kv_lengths": [1, 2]}, "torch.Tensor"),
        ({"kv_lengths": torch.tensor([1, 2, 3])}, r"shape \(B,\)"),
        ({"kv_lengths": torch.tensor([[1, 2]])}, r"shape \(B,\)"),
        ({"kv_lengths": torch.tensor([1, 6])}, r"\[0, Lk\]"),
        ({"kv_lengths": torch.tensor([-1, 2])}, r"\[0, Lk\]"),
        ({"scale": 0.0}, "positive"),
        ({"scale": -1.0}, "positive"),
        ({"scale": math.nan}, "finite"),
        ({"scale": math.inf}, "finite"),
        ({"scale": torch.tensor(0.5)}, "number"),
        ({"causal": 1}, "causal"),
    ],
)
def test_sdpa_rejects_bad_options(kwargs, match):
    q, k = torch.ones(2, 1, 3, 4), torch.ones(2, 1, 5, 4)
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(q, k, k, **kwargs)


def test_split_heads_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        split_heads(torch.ones(2, 3, 10), 3)
    with pytest.raises(ValueError, match="3-D"):
        split_heads(torch.ones(2, 3), 1)
    with pytest.raises(ValueError, match="4-D"):
        merge_heads(torch.ones(2, 3, 4))


def test_visible_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="lk must be a positive int"):
        visible_mask(2, 3, 0)
    with pytest.raises(ValueError, match=r"\[0, Lk\] = \[0, 4\]"):
        visible_mask(2, 3, 4, kv_lengths=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="integer"):
        visible_mask(2, 3, 4, kv_lengths=torch.tensor([2.0, 1.0]))


# --------------------------------------------------------------------------- MultiHeadAttention


def randomize_(module: torch.nn.Module, rng: np.random.Generator) -> None:
    """Fill every parameter with fresh random numbers (biases too: they start at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.tensor(0.3 * rng.standard_normal(tuple(p.shape)), dtype=p.dtype))


def copy_from_torch_mha(ours: MultiHeadAttention, theirs: torch.nn.MultiheadAttention) -> None:
    """Give our unpacked projections the weights of nn.MultiheadAttention (packed or not)."""
    e = ours.embed_dim
    with torch.no_grad():
        if theirs.in_proj_weight is not None:  # packed: kdim == vdim == E
            weights = theirs.in_proj_weight.split(e)  # three (E, E) row blocks
        else:
            weights = (theirs.q_proj_weight, theirs.k_proj_weight, theirs.v_proj_weight)
        biases = (None,) * 3 if theirs.in_proj_bias is None else theirs.in_proj_bias.split(e)
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), weights, biases):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


def torch_mha_masks(batch: int, lq: int, lk: int, causal: bool, lengths):
    """nn.MultiheadAttention's masks, where True means *blocked*: (Lq, Lk) and (B, Lk)."""
    attn_mask = ~torch.ones(lq, lk, dtype=torch.bool).tril() if causal else None
    key_padding_mask = None
    if lengths is not None:
        key_padding_mask = torch.arange(lk)[None, :] >= torch.as_tensor(lengths)[:, None]
    return attn_mask, key_padding_mask


def their_grads(ours: MultiHeadAttention, theirs: torch.nn.MultiheadAttention) -> dict:
    """nn.MultiheadAttention's parameter gradients, under the names of our parameters."""
    grads = {name: p.grad for name, p in theirs.named_parameters()}
    if ours.packed_in_proj:
        return grads
    e = ours.embed_dim
    out = {"out_proj.weight": grads["out_proj.weight"]}
    if theirs.in_proj_weight is not None:
        weights = grads["in_proj_weight"].split(e)
    else:
        weights = (grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"])
    for prefix, w in zip(("q_proj", "k_proj", "v_proj"), weights):
        out[f"{prefix}.weight"] = w
    if "in_proj_bias" in grads:
        for prefix, b in zip(("q_proj", "k_proj", "v_proj"), grads["in_proj_bias"].split(e)):
            out[f"{prefix}.bias"] = b
        out["out_proj.bias"] = grads["out_proj.bias"]
    return out


# (packed, cross, kdim, vdim, bias): self- and cross-attention, packed and separate weights,
# key/value widths that differ from E (separate weights only), and no biases.
MHA_CASES = [
    (True, False, None, None, True),
    (False, False, None, None, True),
    (True, True, None, None, True),
    (False, True, None, None, True),
    (False, True, 6, 10, True),
    (True, False, None, None, False),
    (False, True, 6, 10, False),
]


@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize(
    "packed, cross, kdim, vdim, bias", MHA_CASES,
    ids=[
        "packed-self", "self", "packed-cross", "cross", "cross-kdim-vdim",
        "packed-nobias", "cross-nobias",
    ],
)
def test_mha_matches_torch_multihead_attention(rng, causal, padded, packed, cross, kdim, vdim, bias):
    batch, lq, embed, heads = 3, 6, 12, 3
    lk = 9 if cross else lq
    theirs = torch.nn.MultiheadAttention(
        embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dtype=torch.float64
    )
    randomize_(theirs, rng)
    ours = MultiHeadAttention(embed, heads, kdim=kdim, vdim=vdim, bias=bias, packed_in_proj=packed)
    ours = ours.double()
    if packed:
        ours.load_state_dict(theirs.state_dict())  # strict: every name must match
    else:
        copy_from_torch_mha(ours, theirs)

    x = rng.standard_normal((batch, lq, embed))
    kv = (
        rng.standard_normal((batch, lk, kdim or embed)),
        rng.standard_normal((batch, lk, vdim or embed)),
    )
    lengths = random_lengths(rng, batch, lk, allow_empty=False) if padded else None
    d_out = torch.tensor(rng.standard_normal((batch, lq, embed)))

    ours_in = [torch.tensor(a, requires_grad=True) for a in (x, *kv)]
    theirs_in = [torch.tensor(a, requires_grad=True) for a in (x, *kv)]
    kv_lengths = None if lengths is None else torch.tensor(lengths)
    if cross:
        out = ours(ours_in[0], ours_in[1], ours_in[2], causal=causal, kv_lengths=kv_lengths)
        query, key, value = theirs_in
    else:
        out = ours(ours_in[0], causal=causal, kv_lengths=kv_lengths)
        query = key = value = theirs_in[0]
    attn_mask, key_padding_mask = torch_mha_masks(batch, lq, lk, causal, lengths)
    expected, _ = theirs(
        query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False
    )
    (out * d_out).sum().backward()
    (expected * d_out).sum().backward()

    assert_close(out, expected, 1e-12, what="out vs nn.MultiheadAttention")
    used = 3 if cross else 1
    for i in range(used):
        assert_close(ours_in[i].grad, theirs_in[i].grad, 1e-12, what=f"input {i} grad")
    expected_grads = their_grads(ours, theirs)
    names = {name for name, _ in ours.named_parameters()}
    assert names == set(expected_grads), f"parameters {sorted(names)} vs {sorted(expected_grads)}"
    for name, p in ours.named_parameters():
        assert_close(p.grad, expected_grads[name], 1e-12, grad_floor(p.grad, 1e-12), what=f"d {name}")


def test_mha_empty_example_returns_out_bias(rng):
    # Example 1 has no key: its attention output is zero, so the layer returns out_proj's
    # bias there, while the other examples still match nn.MultiheadAttention.
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    randomize_(theirs, rng)
    ours = MultiHeadAttention(8, 2, packed_in_proj=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.tensor(rng.standard_normal((3, 5, 8)), requires_grad=True)
    lengths = np.array([5, 0, 2])
    out = ours(x, kv_lengths=torch.tensor(lengths), causal=True)
    out.square().sum().backward()
    attn_mask, key_padding_mask = torch_mha_masks(3, 5, 5, True, lengths)
    expected, _ = theirs(
        x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False
    )
    keep = lengths > 0
    assert_close(out[keep], expected[keep], 1e-12, what="examples with keys")
    assert_close(out[1], ours.out_proj.bias.expand(5, 8), 0.0, what="the example without keys")
    assert torch.isfinite(x.grad).all()
    for name, p in ours.named_parameters():
        assert torch.isfinite(p.grad).all(), f"d {name} is not finite"


def reference_params(module: MultiHeadAttention) -> dict[str, np.ndarray]:
    """Our module's weights under the reference's names (q_weight, q_bias, ...), as float64."""
    e = module.embed_dim
    if module.packed_in_proj:
        weights = module.in_proj_weight.split(e)
        biases = module.in_proj_bias.split(e)
    else:
        weights = (module.q_proj.weight, module.k_proj.weight, module.v_proj.weight)
        biases = (module.q_proj.bias, module.k_proj.bias, module.v_proj.bias)
    params = {}
    for name, w, b in zip(("q", "k", "v"), weights, biases):
        params[f"{name}_weight"], params[f"{name}_bias"] = seen(w), seen(b)
    params["out_weight"], params["out_bias"] = seen(module.out_proj.weight), seen(module.out_proj.bias)
    return params


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize(
    "packed, cross, kdim, vdim",
    # The reference takes one x_kv for keys and values: kdim == vdim in the cross cases.
    [
        (True, False, None, None),
        (False, False, None, None),
        (True, True, None, None),
        (False, True, 20, 20),
    ],
    ids=["packed-self", "self", "packed-cross", "cross-kdim"],
)
def test_mha_matches_reference(rng, dtype, causal, padded, packed, cross, kdim, vdim):
    batch, lq, embed, heads = 3, 5, 16, 4
    lk = 8 if cross else lq
    module = MultiHeadAttention(embed, heads, kdim=kdim, vdim=vdim, packed_in_proj=packed).to(dtype)
    randomize_(module, rng)
    x = to_torch(rng.standard_normal((batch, lq, embed)), dtype)
    lengths = random_lengths(rng, batch, lk) if padded else None  # one example sees nothing
    kv_lengths = None if lengths is None else torch.tensor(lengths)
    if cross:
        kv = to_torch(rng.standard_normal((batch, lk, kdim or embed)), dtype)
        out = module(x, kv, causal=causal, kv_lengths=kv_lengths)  # value=None: value = key
        x_kv = seen(kv)
    else:
        out = module(x, causal=causal, kv_lengths=kv_lengths)
        x_kv = seen(x)
    expected = ref.multi_head_attention(
        seen(x), x_kv, reference_params(module), heads, causal=causal, kv_lengths=lengths
    )
    assert out.shape == (batch, lq, embed) and out.dtype == dtype
    assert_close(out, expected, RTOL[dtype], what="out vs reference.multi_head_attention")


def test_mha_value_defaults_to_key(rng):
    module = MultiHeadAttention(8, 2).double()
    x, kv = torch.tensor(rng.standard_normal((2, 3, 8))), torch.tensor(rng.standard_normal((2, 5, 8)))
    assert torch.equal(module(x, kv), module(x, kv, kv))
    assert torch.equal(module(x), module(x, x, x))


# --------------------------------------------------------------------------- backends


def _kernels_attention():
    import kernels

    return kernels.attention


def run_backend(backend: str, state: dict, x: np.ndarray, kv: np.ndarray, d_out: np.ndarray,
                causal: bool, lengths, dtype: torch.dtype):
    """Output and gradients (input, key/value input, every parameter) of one backend."""
    module = MultiHeadAttention(32, 2, backend=backend).to(dtype)  # head_dim 16: the kernel's smallest
    module.load_state_dict(state)
    tx, tkv = to_torch(x, dtype, grad=True), to_torch(kv, dtype, grad=True)
    kv_lengths = None if lengths is None else torch.tensor(lengths)
    out = module(tx, tkv, causal=causal, kv_lengths=kv_lengths)
    (out * to_torch(d_out, dtype)).sum().backward()
    grads = {"query": tx.grad, "key/value": tkv.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, grads


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("causal, padded", MASKS, ids=MASK_IDS)
def test_sdpa_backend_matches_torch_backend(rng, causal, padded):
    # Fully masked rows included: the "sdpa" backend must zero them, gradients too, with
    # no NaN at any step of the backward (anomaly mode would raise).
    state = MultiHeadAttention(32, 2).double().state_dict()
    x, kv = rng.standard_normal((3, 7, 32)), rng.standard_normal((3, 10, 32))
    d_out = rng.standard_normal((3, 7, 32))
    lengths = random_lengths(rng, 3, 10) if padded else None
    with torch.autograd.detect_anomaly(check_nan=True):
        results = {
            backend: run_backend(backend, state, x, kv, d_out, causal, lengths, torch.float64)
            for backend in ("torch", "sdpa")
        }
    (out, grads), (ref_out, ref_grads) = results["sdpa"], results["torch"]
    assert_close(out, ref_out, 1e-12, what="sdpa backend out")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], 1e-12, grad_floor(g, 1e-12), what=f"sdpa backend d {name}")


def test_auto_backend_on_cpu_runs_the_plain_rung(rng, monkeypatch):
    import tiny_mm.attention as attention

    calls = []
    plain = attention.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return plain(*args, **kwargs)

    monkeypatch.setattr(attention, "scaled_dot_product_attention", spy)
    module = MultiHeadAttention(8, 2)
    module(torch.tensor(rng.standard_normal((2, 3, 8)), dtype=torch.float32))
    assert calls == [(2, 2, 3, 4)], "backend='auto' on CPU tensors did not run the plain rung once"


@pytest.mark.parametrize(
    "causal, padded, dtype, rtol",
    [
        (False, False, torch.float32, TRITON_RTOL),
        (True, True, torch.float32, TRITON_RTOL),
        (True, True, torch.float16, 1e-2),
    ],
    ids=["no-mask-float32", "causal+padded-float32", "causal+padded-float16"],
)
def test_triton_backend_matches_torch_backend(rng, monkeypatch, causal, padded, dtype, rtol):
    kernel = _kernels_attention()
    calls = []

    def spy(*args, **kwargs):  # proves the triton backend really runs the kernel
        calls.append(tuple(args[0].shape))
        return kernel(*args, **kwargs)

    monkeypatch.setattr("kernels.attention", spy)
    # Tiny: the kernel runs under the Triton interpreter on CPU. Lk = 11 is not a multiple
    # of any block size, and one example has no key at all when padded.
    state = {k: v.float() for k, v in MultiHeadAttention(32, 2).state_dict().items()}
    x, kv = rng.standard_normal((2, 5, 32)), rng.standard_normal((2, 11, 32))
    d_out = rng.standard_normal((2, 5, 32))
    lengths = np.array([0, 7]) if padded else None
    out, grads = run_backend("triton", state, x, kv, d_out, causal, lengths, dtype)
    assert out.dtype == dtype
    assert calls == [(2, 2, 5, 16)], "backend='triton' did not call kernels.attention once"
    state64 = {k: v.double() for k, v in state.items()}
    ref_out, ref_grads = run_backend("torch", state64, x, kv, d_out, causal, lengths, torch.float64)
    assert_close(out, ref_out, rtol, what="triton backend out")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], rtol, grad_floor(g, rtol), what=f"triton backend d {name}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_auto_backend_on_cuda_runs_the_kernel(rng, monkeypatch, dtype, causal):
    kernel = _kernels_attention()
    calls = []

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return kernel(*args, **kwargs)

    monkeypatch.setattr("kernels.attention", spy)
    module = MultiHeadAttention(128, 2).cuda()
    state = module.state_dict()
    x = torch.tensor(rng.standard_normal((2, 100, 128)), dtype=torch.float32, device="cuda")
    kv_lengths = torch.tensor([0, 77], device="cuda")
    out = module.to(dtype)(x.to(dtype), causal=causal, kv_lengths=kv_lengths)
    assert calls == [(2, 2, 100, 64)]
    exact = MultiHeadAttention(128, 2, backend="torch").double().cuda()
    exact.load_state_dict(state)
    expected = exact(x.double(), causal=causal, kv_lengths=kv_lengths)
    assert_close(out.cpu(), expected.cpu(), 1e-2, what=f"auto backend {dtype} on CUDA")


# --------------------------------------------------------------------------- construction and checks


def test_mha_parameter_names_and_torch_state_dict():
    separate = MultiHeadAttention(12, 3, kdim=5, vdim=7)
    assert separate.head_dim == 4
    assert {n: tuple(p.shape) for n, p in separate.named_parameters()} == {
        "q_proj.weight": (12, 12), "q_proj.bias": (12,),
        "k_proj.weight": (12, 5), "k_proj.bias": (12,),
        "v_proj.weight": (12, 7), "v_proj.bias": (12,),
        "out_proj.weight": (12, 12), "out_proj.bias": (12,),
    }
    for bias in (True, False):
        packed = MultiHeadAttention(12, 3, packed_in_proj=True, bias=bias)
        theirs = torch.nn.MultiheadAttention(12, 3, bias=bias, batch_first=True)
        ours_shapes = {n: tuple(t.shape) for n, t in packed.state_dict().items()}
        assert ours_shapes == {n: tuple(t.shape) for n, t in theirs.state_dict().items()}


def test_mha_extra_repr():
    text = repr(MultiHeadAttention(12, 3, kdim=5, vdim=7, backend="sdpa"))
    for part in ("embed_dim=12", "num_heads=3", "head_dim=4", "kdim=5", "vdim=7", "backend='sdpa'"):
        assert part in text, f"{part} missing from {text}"


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, 3), {}, "multiple of num_heads"),
        ((0, 1), {}, "embed_dim"),
        ((8, 0), {}, "num_heads"),
        ((8, 2), {"kdim": 0}, "kdim"),
        ((8, 2), {"packed_in_proj": True, "kdim": 6}, "kdim == vdim == embed_dim"),
        ((8, 2), {"packed_in_proj": True, "vdim": 6}, "kdim == vdim == embed_dim"),
        ((8, 2), {"backend": "cuda"}, "backend"),
    ],
)
def test_mha_rejects_bad_settings(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(*args, **kwargs)


@pytest.mark.parametrize(
    "query, key, value, kwargs, match",
    [
        ((2, 3, 7), None, None, {}, "query must have 8 features"),
        ((3, 8), None, None, {}, "3-D"),
        ((2, 3, 8), (2, 4, 6), None, {}, "key must have 8 features"),
        ((2, 3, 8), (3, 4, 8), None, {}, "batch size"),
        ((2, 3, 8), (2, 4, 8), (2, 5, 8), {}, "same length Lk"),
        ((2, 3, 8), None, (2, 3, 8), {}, "value was given without key"),
        ((2, 3, 8), (2, 4, 8), None, {"kv_lengths": torch.tensor([1, 5])}, r"\[0, Lk\] = \[0, 4\]"),
        ((2, 3, 8), None, None, {"kv_lengths": torch.tensor([3])}, r"shape \(B,\)"),
        ((2, 3, 8), None, None, {"causal": "yes"}, "causal"),
    ],
)
def test_mha_rejects_bad_inputs(query, key, value, kwargs, match):
    module = MultiHeadAttention(8, 2)
    make = lambda shape: None if shape is None else torch.ones(shape)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        module(make(query), make(key), make(value), **kwargs)


def test_mha_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="share a dtype"):
        MultiHeadAttention(8, 2)(torch.ones(2, 3, 8), torch.ones(2, 4, 8, dtype=torch.float64))

