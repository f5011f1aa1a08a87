"""The NumPy attention reference of chapter 2 against independent checks.

Every other attention rung is tested against this module, so it is checked
in ways that share no code with it: loops written straight from the
definition, central finite differences for the hand-derived backward, and
PyTorch in float64 (``scaled_dot_product_attention`` with autograd, and
``nn.MultiheadAttention`` with the same weights).
"""
import math
import warnings

import numpy as np
import pytest

import chapters.ch02_attention.reference as ref

# (causal, lengths): every mask combination. Lengths are filled in per test
# from the batch size and Lk, so a zero (an example with no visible key) and a
# full length both appear.
MASKS = [(False, None), (True, None), (False, "ragged"), (True, "ragged")]


def rel_err(out, expected):
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"shape {out.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(out)), f"non-finite values in {out}"
    return np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-300)


def lengths_for(kind, rng, B, Lk):
    """None, or per-example key lengths that include 0 (when B > 1) and the full Lk."""
    if kind is None:
        return None
    lengths = rng.integers(0, Lk + 1, size=B)
    lengths[0] = Lk
    if B > 1:
        lengths[1] = 0
    return lengths


def qkv(rng, B, H, Lq, Lk, D, Dv):
    return (rng.standard_normal((B, H, Lq, D)), rng.standard_normal((B, H, Lk, D)),
            rng.standard_normal((B, H, Lk, Dv)))


@pytest.fixture
def strict_floats():
    """Turn numpy's divide/invalid/overflow reports and every warning into errors."""
    with np.errstate(divide="raise", invalid="raise", over="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------- definitions
def sees(i, j, b, causal, lengths):
    return (not causal or j <= i) and (lengths is None or j < lengths[b])


def attention_by_definition(q, k, v, causal, lengths, scale):
    """One query at a time: weights exp(score) over the visible keys, normalised."""
    B, H, Lq, D = q.shape
    Lk, Dv = v.shape[2], v.shape[3]
    out = np.zeros((B, H, Lq, Dv))
    lse = np.full((B, H, Lq), -math.inf)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                keys = [j for j in range(Lk) if sees(i, j, b, causal, lengths)]
                if not keys:
                    continue  # the convention: zeros and lse = -inf
                scores = {j: scale * sum(q[b, h, i, d] * k[b, h, j, d] for d in range(D)) for j in keys}
                top = max(scores.values())
                weights = {j: math.exp(scores[j] - top) for j in keys}
                total = sum(weights.values())
                lse[b, h, i] = top + math.log(total)
                for e in range(Dv):
                    out[b, h, i, e] = sum(weights[j] * v[b, h, j, e] for j in keys) / total
    return out, lse


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("B, Lq, Lk", [(3, 4, 6), (2, 5, 3), (1, 1, 4), (2, 3, 1)])
@pytest.mark.parametrize("causal, kind", MASKS)
def test_visible_mask_follows_the_definition(rng, B, Lq, Lk, causal, kind):
    lengths = lengths_for(kind, rng, B, Lk)
    mask = ref.visible_mask(B, Lq, Lk, causal=causal, kv_lengths=lengths)
    assert mask.dtype == bool and mask.shape == (B, 1, Lq, Lk)
    expected = [[[sees(i, j, b, causal, lengths) for j in range(Lk)] for i in range(Lq)] for b in range(B)]
    assert np.array_equal(mask[:, 0], np.array(expected, dtype=bool))


# --------------------------------------------------------------------------- softmax
def test_softmax_and_logsumexp_match_the_definition(rng):
    x = rng.standard_normal((3, 5)) * 4
    for axis in (0, 1, -1):
        lse = ref.logsumexp(x, axis=axis)
        p = ref.softmax(x, axis=axis)
        rows = np.moveaxis(x, axis, -1)  # the slices the softmax runs along, as rows
        expected_lse = [math.log(sum(math.exp(t) for t in row)) for row in rows]
        assert rel_err(lse, expected_lse) < 1e-14
        expected_p = [[math.exp(t) / sum(math.exp(u) for u in row) for t in row] for row in rows]
        assert rel_err(p, np.moveaxis(np.array(expected_p), -1, axis)) < 1e-14


def test_softmax_is_stable_and_handles_masked_rows(strict_floats):
    x = np.array([[1000.0, 999.0, -np.inf], [-np.inf, -np.inf, -np.inf], [-1000.0, -1001.0, -1002.0]])
    p, lse = ref.softmax(x), ref.logsumexp(x)
    e = math.exp(-1)
    assert rel_err(p[0], [1 / (1 + e), e / (1 + e), 0]) < 1e-15
    assert np.array_equal(p[1], np.zeros(3))  # all -inf: zeros, not NaN
    assert rel_err(p[2], np.array([1, e, e * e]) / (1 + e + e * e)) < 1e-15
    assert lse[1] == -np.inf
    assert abs(lse[0] - (1000 + math.log1p(e))) < 1e-12
    assert abs(lse[2] - (-1000 + math.log(1 + e + e * e))) < 1e-12


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, Dv",
    [(2, 2, 3, 5, 4, 3), (3, 1, 5, 3, 2, 2), (2, 1, 1, 4, 3, 5), (2, 2, 4, 1, 3, 2), (1, 1, 1, 1, 2, 1)],
)
@pytest.mark.parametrize("causal, kind", MASKS)
def test_forward_matches_the_definition(rng, B, H, Lq, Lk, D, Dv, causal, kind):
    q, k, v = qkv(rng, B, H, Lq, Lk, D, Dv)
    lengths = lengths_for(kind, rng, B, Lk)
    scale = rng.uniform(0.2, 2.0) if Lq == 1 else None  # also try a scale that is not 1/sqrt(D)
    out, lse = ref.attention_with_lse(q, k, v, causal=causal, kv_lengths=lengths, scale=scale)
    expected_out, expected_lse = attention_by_definition(
        q, k, v, causal, lengths, 1 / math.sqrt(D) if scale is None else scale
    )
    assert rel_err(out, expected_out) < 1e-13
    assert np.array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    assert np.max(np.abs(lse[finite] - expected_lse[finite]), initial=0.0) < 1e-12
    assert np.array_equal(ref.attention(q, k, v, causal, lengths, scale), out)


def test_large_scores_stay_finite(rng, strict_floats):
    q, k, v = qkv(rng, 2, 2, 4, 6, 8, 8)
    q, k = 30 * q, 30 * k  # scores of order 1e3: exp would overflow without the max shift
    out, lse = ref.attention_with_lse(q, k, v, causal=True)
    grads = ref.attention_grad(q, k, v, rng.standard_normal(out.shape), causal=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    assert all(np.all(np.isfinite(g)) for g in grads)
    # Each output row stays a convex combination of the values it sees.
    assert np.all(out <= np.max(v, axis=2, keepdims=True) + 1e-12)
    assert np.all(out >= np.min(v, axis=2, keepdims=True) - 1e-12)


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, Dv",
    [(2, 2, 3, 4, 3, 2), (2, 1, 4, 2, 2, 3), (2, 1, 1, 3, 3, 2), (2, 2, 3, 1, 2, 2)],
)
@pytest.mark.parametrize("causal, kind", MASKS)
def test_hand_gradient_matches_finite_differences(rng, B, H, Lq, Lk, D, Dv, causal, kind):
    q, k, v = qkv(rng, B, H, Lq, Lk, D, Dv)
    lengths = lengths_for(kind, rng, B, Lk)
    scale = 0.7
    d_out = rng.standard_normal((B, H, Lq, Dv))

    def loss(q, k, v):  # <d_out, O>: its gradient in O is d_out
        return float(np.sum(d_out * ref.attention(q, k, v, causal, lengths, scale)))

    dq, dk, dv = ref.attention_grad(q, k, v, d_out, causal=causal, kv_lengths=lengths, scale=scale)
    num_q = ref.numerical_gradient(lambda x: loss(x, k, v), q)
    num_k = ref.numerical_gradient(lambda x: loss(q, x, v), k)
    num_v = ref.numerical_gradient(lambda x: loss(q, k, x), v)
    for name, grad, num in (("dq", dq, num_q), ("dk", dk, num_k), ("dv", dv, num_v)):
        if np.linalg.norm(num) < 1e-9:  # e.g. Lk = 1: every weight is 1, q does not matter
            assert np.max(np.abs(grad)) < 1e-9, name
        else:
            assert rel_err(grad, num) < 1e-7, name


# --------------------------------------------------------------------------- torch
def torch_mask(torch, B, Lq, Lk, causal, lengths):
    """The boolean attn_mask of F.scaled_dot_product_attention (True = take part), built in torch."""
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        mask = mask & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    if lengths is not None:
        mask = mask & (torch.arange(Lk)[None, :] < torch.as_tensor(lengths)[:, None])[:, None, None, :]
    return mask


@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, Dv", [(3, 2, 5, 7, 4, 6), (3, 2, 6, 3, 5, 5), (3, 1, 1, 4, 3, 3), (3, 2, 4, 1, 3, 3)]
)
@pytest.mark.parametrize("causal, kind", MASKS)
def test_against_torch_sdpa_float64_autograd(rng, B, H, Lq, Lk, D, Dv, causal, kind):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v = qkv(rng, B, H, Lq, Lk, D, Dv)
    lengths = lengths_for(kind, rng, B, Lk)
    d_out = rng.standard_normal((B, H, Lq, Dv))
    out, lse = ref.attention_with_lse(q, k, v, causal=causal, kv_lengths=lengths)
    dq, dk, dv = ref.attention_grad(q, k, v, d_out, causal=causal, kv_lengths=lengths)

    # torch's answer for a row with no visible key is version- and backend-
    # dependent (NaN or 0), so torch only sees the examples with some visible key;
    # the others are the zero convention, checked here and in the test below.
    keep = np.arange(B) if lengths is None else np.flatnonzero(lengths > 0)
    dropped = np.setdiff1d(np.arange(B), keep)
    for x in (out, dq, dk, dv):
        assert np.all(x[dropped] == 0)
    assert np.all(np.isneginf(lse[dropped]))

    tq, tk, tv = (torch.tensor(x[keep], requires_grad=True) for x in (q, k, v))
    sub_lengths = None if lengths is None else lengths[keep]
    mask = torch_mask(torch, len(keep), Lq, Lk, causal, sub_lengths)
    t_out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    t_out.backward(torch.tensor(d_out[keep]))
    assert rel_err(out[keep], t_out.detach().numpy()) < 1e-12
    scores = (tq @ tk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, -math.inf)
    assert rel_err(lse[keep], torch.logsumexp(scores, dim=-1).detach().numpy()) < 1e-12
    assert rel_err(dv[keep], tv.grad.numpy()) < 1e-12
    for name, ours, theirs in (("dq", dq[keep], tq.grad), ("dk", dk[keep], tk.grad)):
        if torch.linalg.norm(theirs) < 1e-12:  # Lk = 1: softmax is constant, no gradient
            assert np.max(np.abs(ours)) < 1e-12, name
        else:
            assert rel_err(ours, theirs.numpy()) < 1e-12, name


@pytest.mark.parametrize("Lq, Lk", [(3, 7), (7, 3), (1, 5), (5, 1)])
def test_causal_is_top_left_aligned_like_torch_is_causal(rng, Lq, Lk):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng, 2, 2, Lq, Lk, 4, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k), torch.tensor(v), is_causal=True
    )
    assert rel_err(ref.attention(q, k, v, causal=True), expected.numpy()) < 1e-12


# --------------------------------------------------------------------------- masked rows
def test_rows_with_no_visible_key_are_zero_without_warnings(rng, strict_floats):
    B, H, Lq, Lk, D = 3, 2, 4, 5, 3
    q, k, v = qkv(rng, B, H, Lq, Lk, D, 2)
    lengths = np.array([0, 2, 0])
    d_out = rng.standard_normal((B, H, Lq, 2))
    for causal in (False, True):
        out, lse = ref.attention_with_lse(q, k, v, causal=causal, kv_lengths=lengths)
        dq, dk, dv = ref.attention_grad(q, k, v, d_out, causal=causal, kv_lengths=lengths)
        for b in (0, 2):
            assert np.array_equal(out[b], np.zeros_like(out[b]))
            assert np.all(np.isneginf(lse[b]))
            for g in (dq, dk, dv):
                assert np.array_equal(g[b], np.zeros_like(g[b]))
        # The example with two keys is untouched by its neighbours' empty rows...
        alone = ref.attention(q[1:2], k[1:2, :, :2], v[1:2, :, :2], causal=causal)
        assert rel_err(out[1], alone[0]) < 1e-15
        # ...and its padded keys get no gradient.
        assert np.array_equal(dk[1, :, 2:], np.zeros_like(dk[1, :, 2:]))
        assert np.array_equal(dv[1, :, 2:], np.zeros_like(dv[1, :, 2:]))


def test_torch_agrees_on_masked_rows_where_it_gives_a_number(rng):
    """Where torch returns a finite value for an empty row (2.5+ CPU does), it is our zero."""
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng, 2, 1, 3, 4, 4, 4)
    lengths = np.array([0, 3])
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k), torch.tensor(v),
        attn_mask=torch_mask(torch, 2, 3, 4, False, lengths),
    ).numpy()
    out = ref.attention(q, k, v, kv_lengths=lengths)
    finite = np.isfinite(expected)
    assert finite[1].all()
    assert np.max(np.abs(out[finite] - expected[finite])) < 1e-12


def test_kv_lengths_may_be_a_list_any_int_dtype_or_a_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    q, k, v = qkv(rng, 3, 1, 2, 5, 3, 3)
    expected = ref.attention(q, k, v, kv_lengths=np.array([5, 2, 0]))
    for lengths in ([5, 2, 0], np.array([5, 2, 0], dtype=np.int32), torch.tensor([5, 2, 0])):
        assert np.array_equal(ref.attention(q, k, v, kv_lengths=lengths), expected)


# --------------------------------------------------------------------------- heads
def test_split_and_merge_heads(rng):
    B, L, H, Dh = 2, 5, 3, 4
    x = rng.standard_normal((B, L, H * Dh))
    heads = ref.split_heads(x, H)
    assert heads.shape == (B, H, L, Dh)
    for b, h, i, d in np.ndindex(B, H, L, Dh):
        assert heads[b, h, i, d] == x[b, i, h * Dh + d]
    assert np.array_equal(ref.merge_heads(heads), x)
    y = rng.standard_normal((B, H, L, Dh))
    assert np.array_equal(ref.split_heads(ref.merge_heads(y), H), y)


def random_params(rng, E, Ekv):
    shapes = {"q_weight": (E, E), "k_weight": (E, Ekv), "v_weight": (E, Ekv), "out_weight": (E, E)}
    params = {name: rng.standard_normal(shape) / math.sqrt(shape[1]) for name, shape in shapes.items()}
    params |= {f"{p}_bias": rng.standard_normal(E) for p in ("q", "k", "v", "out")}
    return params


def torch_mha(torch, params, E, Ekv, H):
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=Ekv, vdim=Ekv, dtype=torch.float64)
    t = {name: torch.tensor(value) for name, value in params.items()}
    with torch.no_grad():
        if mha._qkv_same_embed_dim:  # the packed layout CLIP checkpoints use
            mha.in_proj_weight.copy_(torch.cat([t["q_weight"], t["k_weight"], t["v_weight"]]))
        else:
            mha.q_proj_weight.copy_(t["q_weight"])
            mha.k_proj_weight.copy_(t["k_weight"])
            mha.v_proj_weight.copy_(t["v_weight"])
        mha.in_proj_bias.copy_(torch.cat([t["q_bias"], t["k_bias"], t["v_bias"]]))
        mha.out_proj.weight.copy_(t["out_weight"])
        mha.out_proj.bias.copy_(t["out_bias"])
    return mha


@pytest.mark.parametrize(
    "B, Lq, Lk, E, Ekv, H, causal, kind",
    [
        (3, 6, 6, 12, 12, 3, True, "ragged"),  # self-attention, causal, padding
        (2, 5, 5, 8, 8, 2, False, None),
        (3, 4, 7, 8, 6, 2, False, "ragged"),  # cross-attention with kdim != embed_dim
        (2, 7, 3, 6, 10, 3, True, None),  # Lq > Lk, causal
        (2, 1, 5, 4, 4, 1, False, "ragged"),
    ],
)
def test_multi_head_attention_against_torch(rng, B, Lq, Lk, E, Ekv, H, causal, kind):
    torch = pytest.importorskip("torch")
    params = random_params(rng, E, Ekv)
    x_q = rng.standard_normal((B, Lq, E))
    x_kv = x_q if (Lq, E) == (Lk, Ekv) else rng.standard_normal((B, Lk, Ekv))
    # For a row with no visible key nn.MultiheadAttention gives 0 or NaN depending
    # on its code path (torch 2.14: NaN on the no-grad fast path), so every
    # example keeps at least one key here; the zero rule is tested above.
    lengths = None if kind is None else rng.integers(1, Lk + 1, size=B)
    ours = ref.multi_head_attention(x_q, x_kv, params, H, causal=causal, kv_lengths=lengths)

    mha = torch_mha(torch, params, E, Ekv, H)
    kwargs = {}
    if lengths is not None:  # nn.MultiheadAttention's masks say True = *hidden*
        kwargs["key_padding_mask"] = torch.arange(Lk)[None, :] >= torch.as_tensor(lengths)[:, None]
    if causal:
        kwargs["attn_mask"] = torch.ones(Lq, Lk, dtype=torch.bool).triu(diagonal=1)
    x_q_t, x_kv_t = torch.tensor(x_q), torch.tensor(x_kv)
    expected, _ = mha(x_q_t, x_kv_t, x_kv_t, need_weights=False, **kwargs)
    assert ours.shape == (B, Lq, E)
    assert rel_err(ours, expected.detach().numpy()) < 1e-12


def test_multi_head_attention_without_biases(rng):
    E, H = 6, 2
    params = random_params(rng, E, E)
    no_bias = params | {f"{p}_bias": None for p in ("q", "k", "v", "out")}
    zero_bias = params | {f"{p}_bias": np.zeros(E) for p in ("q", "k", "v", "out")}
    x = rng.standard_normal((2, 4, E))
    expected = ref.multi_head_attention(x, x, zero_bias, H)
    assert np.array_equal(ref.multi_head_attention(x, x, no_bias, H), expected)


# --------------------------------------------------------------------------- errors
def _bad_calls():
    q, k, v = np.ones((2, 3, 4, 5)), np.ones((2, 3, 6, 5)), np.ones((2, 3, 6, 7))
    d_out = np.ones((2, 3, 4, 7))
    params = random_params(np.random.default_rng(0), 6, 6)
    x = np.ones((2, 4, 6))
    return [
        ("q rank", lambda: ref.attention(q[0], k, v), "4-D"),
        ("k rank", lambda: ref.attention(q, k[..., None], v), "4-D"),
        ("v rank", lambda: ref.attention(q, k, v[0]), "4-D"),
        ("empty", lambda: ref.attention(q[:, :, :0], k, v), "empty"),
        ("batch", lambda: ref.attention(q, k[:1], v[:1]), "batch size"),
        ("heads", lambda: ref.attention(q, k[:, :2], v), "heads"),
        ("head dim", lambda: ref.attention(q, k[..., :4], v), "head dimension D"),
        ("keys", lambda: ref.attention(q, k, v[:, :, :5]), "number of keys Lk"),
        ("lengths shape", lambda: ref.attention(q, k, v, kv_lengths=[6, 6, 6]), r"shape \(B,\)"),
        ("lengths 2-D", lambda: ref.attention(q, k, v, kv_lengths=[[6], [6]]), r"shape \(B,\)"),
        ("lengths float", lambda: ref.attention(q, k, v, kv_lengths=np.array([2.0, 3.0])), "integers"),
        ("lengths high", lambda: ref.attention(q, k, v, kv_lengths=[7, 1]), r"\[0, Lk\]"),
        ("lengths negative", lambda: ref.attention(q, k, v, kv_lengths=[-1, 1]), r"\[0, Lk\]"),
        ("scale zero", lambda: ref.attention(q, k, v, scale=0.0), "positive"),
        ("scale negative", lambda: ref.attention(q, k, v, scale=-1.0), "positive"),
        ("scale nan", lambda: ref.attention_with_lse(q, k, v, scale=float("nan")), "finite"),
        ("grad d_out", lambda: ref.attention_grad(q, k, v, d_out[..., :5]), "d_out"),
        ("grad keys", lambda: ref.attention_grad(q, k, v[:, :, :5], d_out), "number of keys Lk"),
        ("mask size", lambda: ref.visible_mask(2, 0, 3), "Lq"),
        ("mask lengths", lambda: ref.visible_mask(2, 3, 3, kv_lengths=[4, 1]), r"\[0, Lk\]"),
        ("split rank", lambda: ref.split_heads(np.ones((4, 6)), 2), "3-D"),
        ("split divisible", lambda: ref.split_heads(x, 4), "divisible"),
        ("split heads", lambda: ref.split_heads(x, 0), "n_heads"),
        ("merge rank", lambda: ref.merge_heads(x), "4-D"),
        ("mha rank", lambda: ref.multi_head_attention(x[0], x, params, 2), "x_q"),
        ("mha batch", lambda: ref.multi_head_attention(x, x[:1], params, 2), "batch size"),
        ("mha missing", lambda: ref.multi_head_attention(x, x, {"q_bias": params["q_bias"]}, 2), "missing"),
        ("mha weight", lambda: ref.multi_head_attention(x, np.ones((2, 4, 5)), params, 2), "k_weight"),
        ("mha heads", lambda: ref.multi_head_attention(x, x, params, 4), "divisible"),
    ]


@pytest.mark.parametrize("call, message", [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
