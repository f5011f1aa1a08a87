"""The Q-Former's NumPy reference (chapter 8) against torch's own functions and against the paper's rules.

Every piece the reference writes by hand is checked against an independent
implementation in float64: LayerNorm, GELU and attention against
``torch.nn.functional``, multi-head attention against ``torch.nn.MultiheadAttention``
(whose bool mask means the opposite: True = hidden), the losses against
``F.cross_entropy``. The masks, built entry by entry, are checked block by
block against the rules as the BLIP-2 paper states them.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch08_vlm_adapters.reference_qformer as ref


def rel_err(out, expected):
    out, expected = np.asarray(out, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"shape {out.shape} != {expected.shape}"
    assert np.all(np.isfinite(out)), "non-finite values"
    return np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-300)


SIZES = [(1, 1), (3, 4), (4, 1), (2, 6), (0, 3), (3, 0)]


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("Q, T", SIZES)
def test_the_three_masks_block_by_block(Q, T):
    itc, itm, itg = ref.itc_mask(Q, T), ref.itm_mask(Q, T), ref.itg_mask(Q, T)
    for mask in (itc, itm, itg):
        assert mask.shape == (Q + T, Q + T) and mask.dtype == bool
    # Queries-to-queries: visible under all three (the queries always talk to each other).
    for mask in (itc, itm, itg):
        assert mask[:Q, :Q].all()
    # ITC: the two off-diagonal blocks are empty, text sees all text.
    assert not itc[:Q, Q:].any() and not itc[Q:, :Q].any() and itc[Q:, Q:].all()
    # ITM: nothing hidden.
    assert itm.all()
    # ITG: queries never see text; text sees every query and the text at or before it.
    assert not itg[:Q, Q:].any() and itg[Q:, :Q].all()
    np.testing.assert_array_equal(itg[Q:, Q:], np.tril(np.ones((T, T), dtype=bool)))


def test_hide_padding_hides_exactly_the_columns_after_each_caption(rng):
    Q, T = 3, 5
    lengths = rng.integers(1, T + 1, size=4)
    for make in (ref.itc_mask, ref.itm_mask, ref.itg_mask):
        base = make(Q, T)
        padded = ref.hide_padding(base, Q, lengths)
        assert padded.shape == (4, Q + T, Q + T)
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(padded[b, :, : Q + n], base[:, : Q + n])
            assert not padded[b, :, Q + n :].any()


# --------------------------------------------------------------------------- layers


def test_layer_norm_and_gelu_match_torch(rng):
    x = rng.standard_normal((3, 5, 8)) * 3 + 1
    weight, bias = rng.standard_normal(8), rng.standard_normal(8)
    x_t, weight_t, bias_t = map(torch.from_numpy, (x, weight, bias))
    expected = F.layer_norm(x_t, (8,), weight_t, bias_t, eps=1e-5)
    assert rel_err(ref.layer_norm(x, weight, bias), expected.numpy()) < 1e-13
    y = rng.standard_normal((4, 7)) * 4
    assert rel_err(ref.gelu(y), F.gelu(torch.from_numpy(y)).numpy()) < 1e-13


def test_attention_matches_torch_sdpa_with_a_bool_mask(rng):
    B, H, Lq, Lk, D = 2, 3, 5, 6, 4
    q, k, v = (rng.standard_normal(s) for s in ((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D)))
    mask = rng.random((B, 1, Lq, Lk)) < 0.6
    mask[..., 0] = True  # every row sees a key
    q_t, k_t, v_t = map(torch.from_numpy, (q, k, v))
    expected = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=torch.from_numpy(mask))
    assert rel_err(ref.attention(q, k, v, mask), expected.numpy()) < 1e-12


def test_multi_head_attention_matches_torch_multiheadattention(rng):
    B, Lq, Lk, E, kdim, heads = 2, 4, 6, 8, 5, 2
    mha = torch.nn.MultiheadAttention(E, heads, kdim=kdim, vdim=kdim, batch_first=True).double()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(p.shape) * 0.5))
    in_b = mha.in_proj_bias.detach().numpy()
    params = {
        "m.q_proj.weight": mha.q_proj_weight.detach().numpy(), "m.q_proj.bias": in_b[:E],
        "m.k_proj.weight": mha.k_proj_weight.detach().numpy(), "m.k_proj.bias": in_b[E : 2 * E],
        "m.v_proj.weight": mha.v_proj_weight.detach().numpy(), "m.v_proj.bias": in_b[2 * E :],
        "m.out_proj.weight": mha.out_proj.weight.detach().numpy(),
        "m.out_proj.bias": mha.out_proj.bias.detach().numpy(),
    }
    query, context = rng.standard_normal((B, Lq, E)), rng.standard_normal((B, Lk, kdim))
    visible = rng.random((Lq, Lk)) < 0.5
    visible[:, -1] = True
    expected, _ = mha(torch.from_numpy(query), torch.from_numpy(context), torch.from_numpy(context),
                      attn_mask=torch.from_numpy(~visible))  # torch's True = hidden
    out = ref.multi_head_attention(query, context, params, "m", heads, visible)
    assert rel_err(out, expected.detach().numpy()) < 1e-12


# --------------------------------------------------------------------------- losses


def test_itc_similarity_is_the_best_query_cosine(rng):
    image, text = rng.standard_normal((3, 4, 6)), rng.standard_normal((5, 6))
    image_t, text_t = F.normalize(torch.from_numpy(image), dim=-1), F.normalize(torch.from_numpy(text), dim=-1)
    cosines = image_t @ text_t.T  # (3, 4, 5)
    assert rel_err(ref.itc_similarity(image, text), cosines.amax(dim=1).numpy()) < 1e-13


def test_contrastive_loss_matches_cross_entropy(rng):
    logits = rng.standard_normal((5, 5)) * 4
    t, labels = torch.from_numpy(logits), torch.arange(5)
    expected = (F.cross_entropy(t, labels) + F.cross_entropy(t.T, labels)) / 2
    assert abs(ref.contrastive_loss(logits) - float(expected)) < 1e-12 * float(expected)


def test_hard_negative_probs_is_a_softmax_over_the_other_columns(rng):
    logits = rng.standard_normal((6, 6)) * 3
    masked = torch.from_numpy(logits).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    probs = ref.hard_negative_probs(logits)
    assert rel_err(probs, torch.softmax(masked, dim=-1).numpy()) < 1e-13
    assert np.all(np.diag(probs) == 0)


def test_itm_logits_average_the_per_query_logits(rng):
    out, weight, bias = rng.standard_normal((3, 4, 6)), rng.standard_normal((2, 6)), rng.standard_normal(2)
    per_query = F.linear(torch.from_numpy(out), torch.from_numpy(weight), torch.from_numpy(bias))  # (3, 4, 2)
    assert rel_err(ref.itm_logits(out, weight, bias), per_query.mean(dim=1).numpy()) < 1e-13


def test_lm_loss_matches_cross_entropy_with_padding_ignored(rng):
    B, T, V = 3, 6, 7
    logits, ids = rng.standard_normal((B, T, V)), rng.integers(0, V, (B, T))
    lengths = np.array([6, 3, 2])
    targets = torch.from_numpy(ids[:, 1:].copy())
    for b, n in enumerate(lengths):
        targets[b, n - 1 :] = -100  # torch's ignore_index: the targets past the caption's end
    expected = F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, V), targets.reshape(-1))
    assert abs(ref.lm_loss(logits, ids, lengths) - float(expected)) < 1e-12 * float(expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ref.itc_mask(-1, 3), "num_queries must be an int"),
        (lambda: ref.itg_mask(2, 1.5), "text_len must be an int"),
        (lambda: ref.itm_mask(0, 0), "sequence is empty"),
        (lambda: ref.hide_padding(ref.itc_mask(2, 3), 2, np.array([0, 2])), r"must lie in \[1, 3\]"),
        (lambda: ref.hide_padding(ref.itc_mask(2, 3), 2, np.array([4])), r"must lie in \[1, 3\]"),
        (lambda: ref.hide_padding(ref.itc_mask(2, 3), 2, np.array([1.0])), "integer"),
        (lambda: ref.hard_negative_probs(np.zeros((1, 1))), "B >= 2"),
        (lambda: ref.hard_negative_probs(np.zeros((2, 3))), "square"),
        (lambda: ref.attention(*(np.ones((1, 1, 2, 2)),) * 3, np.zeros((1, 1, 2, 2), bool)), "sees no key"),
        (lambda: ref.qformer_forward({}, np.zeros((1, 2, 3)), None, None, "lm", 1), "objective must be"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
