"""tiny_mm.adapters.qformer: the masks, the model and the three losses, against the NumPy reference.

Three kinds of checks:

- the masks and the forward pass (float32) against ``reference_qformer``
  (float64), on fresh random weights, with padded captions;
- behaviour: what each mask must forbid, seen from the outputs (under ITC the
  queries ignore the text and the text ignores the image; under ITG token j
  cannot change anything before it; under ITM everything changes everything;
  padding changes nothing), each paired with a change that must show, so the
  checks can fail;
- the losses against the reference, hard negatives by their distribution, and
  a short training run on shapes captions that lowers the summed loss.
"""
import io

import numpy as np
import pytest
import torch

import chapters.ch08_vlm_adapters.reference_qformer as ref
import tiny_mm.adapters.qformer as qf
from tests.numerics import rel_err
from tiny_mm.adapters.qformer import (
    QFormer, hard_negative_probs, itc_loss, itc_mask, itg_loss, itg_mask, itm_loss, itm_mask, lm_loss,
    objective_mask, qformer_losses, query_pass_flops, sample_hard_negatives, train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


SMALL = dict(num_queries=3, width=16, heads=2, depth=3, image_width=10, vocab_size=20, max_text_len=8)
HEADS = SMALL["heads"]


def make_model(rng, **overrides) -> QFormer:
    """A small QFormer whose every parameter is random (norm gains near 1), so no term hides."""
    torch.manual_seed(int(rng.integers(2**31)))
    model = QFormer(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "log_logit_scale":
                continue
            if ".ln" in name or name.startswith("ln"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif p.dim() == 2 and "embedding" not in name and name != "query_tokens":
                p.normal_(0.0, p.shape[1] ** -0.5)  # (out, in): std 1 / sqrt(fan-in)
            else:
                p.normal_(0.0, 0.5)
    return model


def make_batch(rng, B=4, N=5, T=6, vocab=SMALL["vocab_size"], image_width=SMALL["image_width"]):
    """Random features and captions: BOS first, padding after each length (one caption fills T)."""
    image = torch.from_numpy(rng.standard_normal((B, N, image_width))).float()
    lengths = torch.from_numpy(rng.integers(2, T + 1, size=B))
    lengths[rng.integers(B)] = T
    ids = torch.from_numpy(rng.integers(4, vocab, size=(B, T)))
    ids[:, 0] = 1
    for b in range(B):
        ids[b, lengths[b]:] = 0
    return image, ids, lengths


def params_of(model):
    return {name: t.detach().double().numpy() for name, t in model.state_dict().items()}


def max_change(a, b) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("Q, T", [(1, 1), (3, 4), (4, 1), (2, 7), (0, 3), (3, 0)])
@pytest.mark.parametrize("name", ["itc", "itm", "itg"])
def test_masks_match_the_reference(rng, name, Q, T):
    np.testing.assert_array_equal(objective_mask(name, Q, T).numpy(), ref.MASKS[name](Q, T))
    if T:
        lengths = rng.integers(1, T + 1, size=3)
        expected = ref.hide_padding(ref.MASKS[name](Q, T), Q, lengths)
        np.testing.assert_array_equal(objective_mask(name, Q, T, torch.from_numpy(lengths)).numpy(), expected)


def test_named_masks_are_the_objective_masks():
    for name, make in (("itc", itc_mask), ("itm", itm_mask), ("itg", itg_mask)):
        assert torch.equal(make(2, 3), objective_mask(name, 2, 3))


# --------------------------------------------------------------------------- forward against the reference


@pytest.mark.parametrize("objective", ["itc", "itm", "itg"])
def test_joint_pass_matches_the_reference(rng, objective):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    with torch.no_grad():
        queries, text = model.joint(image, ids, lengths, objective)
    ref_queries, ref_text = ref.qformer_forward(params_of(model), image.double().numpy(), ids.numpy(),
                                                lengths.numpy(), objective, HEADS)
    assert queries.shape == (4, SMALL["num_queries"], SMALL["width"]) and text.shape == (4, 6, SMALL["width"])
    assert rel_err(queries, ref_queries) < 1e-5
    assert rel_err(text, ref_text) < 1e-5


@pytest.mark.parametrize("every", [1, 2, 3])
def test_forward_returns_the_query_outputs_and_matches_the_reference(rng, every):
    model = make_model(rng, cross_attention_every=every)
    assert [layer.has_cross_attention for layer in model.layers] == [i % every == 0 for i in range(3)]
    image, _, _ = make_batch(rng, B=3, N=7)
    with torch.no_grad():
        out = model(image)
    expected, _ = ref.qformer_forward(params_of(model), image.double().numpy(), None, None, "itm", HEADS)
    assert out.shape == (3, SMALL["num_queries"], SMALL["width"])
    assert rel_err(out, expected) < 1e-5


def test_a_qformer_without_text_side_is_the_first_stages_query_path(rng):
    """Built without vocab_size and max_text_len: the layers keep attention, cross-attention and the
    query MLP only, and with the stage-1 model's weights it gives the same query outputs."""
    full = make_model(rng)
    bare = QFormer(*(SMALL[k] for k in ("num_queries", "width", "heads", "depth", "image_width"))).eval()
    missing, unexpected = bare.load_state_dict(full.state_dict(), strict=False)
    assert not missing, missing  # every parameter of the bare model exists in the full one
    text_side = ("token_embedding", "positional_embedding", "decode_token", "itc_", "log_logit_scale",
                 "itm_head", "lm_head")
    assert all(name.startswith(text_side) or ".ln_text." in name or ".mlp_text." in name for name in unexpected)
    image, ids, lengths = make_batch(rng)
    with torch.no_grad():
        out = bare(image)
        assert torch.equal(out, full(image))
    expected, _ = ref.qformer_forward(params_of(bare), image.double().numpy(), None, None, "itm", HEADS)
    assert rel_err(out, expected) < 1e-5
    with pytest.raises(ValueError, match="no text side"):
        bare.joint(image, ids, lengths, "itm")
    with pytest.raises(ValueError, match="no text side"):
        bare.encode_text(ids, lengths)


def test_output_size_does_not_depend_on_the_number_of_image_features(rng):
    model = make_model(rng)
    with torch.no_grad():
        for n in (1, 4, 49):
            image, _, _ = make_batch(rng, B=2, N=n)
            assert model(image).shape == (2, SMALL["num_queries"], SMALL["width"])


# --------------------------------------------------------------------------- what each mask forbids


def other_text(rng, ids, lengths):
    """The same lengths, different words (token 0 stays BOS, padding stays padding)."""
    new = ids.clone()
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        new[b, 1:n] = torch.from_numpy((ids[b, 1:n].numpy() - 4 + rng.integers(1, 15, n - 1)) % 16 + 4)
    return new


def test_itc_queries_ignore_the_text_and_text_ignores_the_image(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    image2, ids2 = make_batch(rng)[0], other_text(rng, ids, lengths)
    with torch.no_grad():
        q, t = model.joint(image, ids, lengths, "itc")
        q_text2, t_text2 = model.joint(image, ids2, lengths, "itc")
        q_image2, t_image2 = model.joint(image2, ids, lengths, "itc")
    assert max_change(q, q_text2) < 1e-6  # new text: queries unchanged
    assert max_change(t, t_image2) < 1e-6  # new image: text unchanged
    # each side still reads its own input
    assert max_change(t, t_text2) > 1e-2 and max_change(q, q_image2) > 1e-2


def test_itc_in_one_pass_equals_the_two_towers_run_apart(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    with torch.no_grad():
        q, t = model.joint(image, ids, lengths, "itc")
        alone_q, alone_t = model(image), model.encode_text(ids, lengths)
    assert rel_err(q, alone_q.double()) < 1e-6
    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, T): padding rows are meaningless
    assert rel_err(t[real], alone_t[real].double()) < 1e-6


def test_itm_lets_everything_see_everything(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    image2, ids2 = make_batch(rng)[0], other_text(rng, ids, lengths)
    with torch.no_grad():
        q, t = model.joint(image, ids, lengths, "itm")
        q_text2, _ = model.joint(image, ids2, lengths, "itm")
        _, t_image2 = model.joint(image2, ids, lengths, "itm")
    assert max_change(q, q_text2) > 1e-2  # the queries read the text
    assert max_change(t, t_image2) > 1e-2  # the text reads the image (through the queries)


def test_itg_token_j_changes_only_positions_from_j_on(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng, T=6)
    lengths[:] = 6  # every caption full length, so every position is real
    ids = torch.from_numpy(rng.integers(4, 20, size=ids.shape))
    ids[:, 0] = 1
    with torch.no_grad():
        q, t = model.joint(image, ids, lengths, "itg")
        for j in range(1, 6):
            changed = ids.clone()
            changed[:, j] = (ids[:, j] - 4 + 7) % 16 + 4  # another word at position j
            q2, t2 = model.joint(image, changed, lengths, "itg")
            assert max_change(q, q2) < 1e-6, f"token {j} reached the queries"
            assert max_change(t[:, :j], t2[:, :j]) < 1e-6, f"token {j} reached an earlier position"
            assert max_change(t[:, j:], t2[:, j:]) > 1e-2, f"token {j} did not reach positions >= {j}"
    # and the image does reach the text
    with torch.no_grad():
        _, t_image2 = model.joint(make_batch(rng)[0], ids, lengths, "itg")
    assert max_change(t, t_image2) > 1e-2


@pytest.mark.parametrize("objective", ["itc", "itm", "itg"])
def test_padding_changes_no_real_output(rng, objective):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng, T=7)
    lengths[0] = 3  # at least one caption with padding
    ids[0, 3:] = 0
    noisy = ids.clone()
    pad = torch.arange(7)[None, :] >= lengths[:, None]  # (B, T)
    noisy[pad] = torch.from_numpy(rng.integers(4, 20, size=int(pad.sum())))
    with torch.no_grad():
        q, t = model.joint(image, ids, lengths, objective)
        q2, t2 = model.joint(image, noisy, lengths, objective)
    assert max_change(q, q2) < 1e-6
    assert max_change(t[~pad], t2[~pad]) < 1e-6
    assert max_change(t[pad], t2[pad]) > 1e-2  # the padding rows themselves did change: the words arrived


# --------------------------------------------------------------------------- losses


def test_itc_loss_matches_the_reference(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    with torch.no_grad():
        loss, logits = itc_loss(model, image, ids, lengths)
    p = params_of(model)
    q, t = ref.qformer_forward(p, image.double().numpy(), ids.numpy(), lengths.numpy(), "itc", HEADS)
    image_emb = q @ p["itc_image_proj.weight"].T + p["itc_image_proj.bias"]  # (B, Q, e)
    text_emb = t[:, 0] @ p["itc_text_proj.weight"].T + p["itc_text_proj.bias"]  # (B, e)
    expected_logits = np.exp(p["log_logit_scale"]) * ref.itc_similarity(image_emb, text_emb)
    assert rel_err(logits, expected_logits) < 1e-5
    expected_loss = ref.contrastive_loss(expected_logits)
    assert abs(float(loss) - expected_loss) < 1e-5 * expected_loss


def test_itg_loss_matches_the_reference(rng):
    model = make_model(rng)
    image, ids, lengths = make_batch(rng)
    with torch.no_grad():
        loss = itg_loss(model, image, ids, lengths)
    p = params_of(model)
    _, t = ref.qformer_forward(p, image.double().numpy(), ids.numpy(), lengths.numpy(), "itg", HEADS)
    expected = ref.lm_loss(t @ p["lm_head.weight"].T + p["lm_head.bias"], ids.numpy(), lengths.numpy())
    assert abs(float(loss) - expected) < 1e-5 * expected


def test_itm_loss_builds_true_pairs_and_both_kinds_of_negatives(rng, monkeypatch):
    model = make_model(rng)
    B = 4
    image, ids, lengths = make_batch(rng, B=B)
    # Fix the negatives the sampler returns (a derangement each), to check what itm_loss does with them.
    picks = iter([torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 1, 0])])
    monkeypatch.setattr(qf, "sample_hard_negatives", lambda logits, generator=None: next(picks))
    with torch.no_grad():
        loss = itm_loss(model, image, ids, lengths, torch.zeros(B, B))
    neg_text, neg_image = np.array([1, 0, 3, 2]), np.array([2, 3, 1, 0])
    x, i, n = image.double().numpy(), ids.numpy(), lengths.numpy()
    images = np.concatenate([x, x, x[neg_image]])
    texts = np.concatenate([i, i[neg_text], i])
    text_lengths = np.concatenate([n, n[neg_text], n])
    p = params_of(model)
    q, _ = ref.qformer_forward(p, images, texts, text_lengths, "itm", HEADS)
    logits = ref.itm_logits(q, p["itm_head.weight"], p["itm_head.bias"])  # (3B, 2)
    labels = np.array([1] * B + [0] * 2 * B)
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(3 * B), labels]))
    assert abs(float(loss) - expected) < 1e-5 * expected


def test_hard_negatives_follow_the_softmax_without_the_positive(rng):
    logits = torch.from_numpy(rng.standard_normal((4, 4)) * 1.5).float()
    expected = ref.hard_negative_probs(logits.double().numpy())
    assert rel_err(hard_negative_probs(logits), expected) < 1e-6
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    draws = torch.stack([sample_hard_negatives(logits, generator) for _ in range(3000)])  # (3000, 4)
    assert not (draws == torch.arange(4)).any(), "a positive was drawn as its own negative"
    counts = np.stack([np.bincount(draws[:, i].numpy(), minlength=4) for i in range(4)]) / 3000
    # 3000 draws: a frequency's standard deviation is at most 0.0092; 0.04 is over 4 of them.
    assert np.abs(counts - expected).max() < 0.04, (counts, expected)


def test_lm_loss_ignores_the_padding_logits(rng):
    logits = torch.from_numpy(rng.standard_normal((3, 6, 7)))
    ids = torch.from_numpy(rng.integers(0, 7, (3, 6)))
    lengths = torch.tensor([6, 3, 2])
    loss = lm_loss(logits, ids, lengths)
    assert abs(float(loss) - ref.lm_loss(logits.numpy(), ids.numpy(), lengths.numpy())) < 1e-12
    noisy = logits.clone()
    noisy[1, 2:] += 5 * torch.randn(4, 7, dtype=torch.float64)  # positions whose targets are padding
    noisy[2, 1:] += 5 * torch.randn(5, 7, dtype=torch.float64)
    assert float(lm_loss(noisy, ids, lengths)) == float(loss)


# --------------------------------------------------------------------------- training


def shapes_batch(n: int, seed: int):
    """n shapes images as 16 raw 8x8 patches each (the 'frozen encoder'), with their captions."""
    from tiny_mm.data.shapes import ShapesConfig, ShapesDataset
    from tiny_mm.data.words import shapes_vocab

    images, captions, _ = ShapesDataset(n, ShapesConfig(captions="canonical"), seed=seed).materialize()
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # (n, 3, 4, 4, 8, 8)
    feats = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, 16, 3 * 64)  # (n, 16, 192)
    vocab = shapes_vocab()
    ids, lengths = vocab.encode(captions)
    return feats, ids, lengths, len(vocab)


def test_a_few_steps_on_shapes_captions_lower_the_summed_loss(rng):
    feats, ids, lengths, vocab_size = shapes_batch(8, int(rng.integers(1000)))
    torch.manual_seed(int(rng.integers(2**31)))
    model = QFormer(4, 32, 4, 2, feats.shape[-1], vocab_size, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = qformer_losses(model.eval(), feats, ids, lengths, generator)
        before = {k: float(v) for k, v in before.items()}
    for _ in range(25):
        train_step(model, optimizer, feats, ids, lengths, generator)
    with torch.no_grad():
        after = qformer_losses(model.eval(), feats, ids, lengths, generator)
        after = {k: float(v) for k, v in after.items()}
    assert all(np.isfinite(list(after.values())))
    assert after["total"] < 0.8 * before["total"], (before, after)
    assert after["itc"] < before["itc"] and after["itg"] < before["itg"], (before, after)

    # Saving and loading round-trips: a fresh model with the loaded weights gives the same queries.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = QFormer(4, 32, 4, 2, feats.shape[-1], vocab_size, 16)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(feats), model(feats))


# --------------------------------------------------------------------------- sizes and cost


def test_query_pass_flops_formula_matches_torch_flop_counter(rng):
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(4):
        heads = int(rng.integers(1, 4))
        size = dict(num_queries=int(rng.integers(1, 9)), width=heads * int(rng.integers(2, 9)),
                    depth=int(rng.integers(1, 6)), image_width=int(rng.integers(3, 20)))
        every, ratio = int(rng.integers(1, 4)), float(rng.choice([2.0, 4.0, 2.5]))
        n = int(rng.integers(1, 30))
        with torch.device("meta"):
            model = QFormer(size["num_queries"], size["width"], heads, size["depth"], size["image_width"],
                            11, 5, cross_attention_every=every, mlp_ratio=ratio)
            image = torch.empty(1, n, size["image_width"])
        with FlopCounterMode(display=False) as counter:
            model(image)
        expected = query_pass_flops(num_image_tokens=n, cross_attention_every=every, mlp_ratio=ratio, **size)
        assert counter.get_total_flops() == expected, (size, every, ratio, n)


def test_layer_sizes_match_transformers_blip2_qformer_at_blip2_sizes():
    """Same parameter count, layer by layer, as transformers' Blip2QFormerModel (image side; built
    on the meta device, nothing downloaded): self-attention, cross-attention in layers 0, 2, ..., 10
    with keys and values from 1408-wide EVA features, and the queries' own feed-forward network."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        theirs = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())  # BLIP-2's defaults
        ours = QFormer(32, 768, 12, 12, 1408, 30522, 512, itc_dim=256)
        bare = QFormer(32, 768, 12, 12, 1408)  # no text side, as transformers keeps it

    def count(module, *prefixes):
        return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefixes))

    for i in range(12):
        hf, me = f"encoder.layer.{i}.", f"layers.{i}."
        assert count(ours, me + "ln_1", me + "attn.") == count(theirs, hf + "attention.")
        assert count(ours, me + "ln_cross", me + "cross_attn.") == count(theirs, hf + "crossattention.")
        assert count(ours, me + "ln_query", me + "mlp_query.") == count(
            theirs, hf + "intermediate_query.", hf + "output_query.")
        assert ours.layers[i].has_cross_attention == (i % 2 == 0)
    assert ours.query_tokens.shape == (32, 768)
    # In all: theirs has a LayerNorm on the queries where ours has ln_post; ours adds the queries
    # themselves and ln_image (transformers keeps both outside, in Blip2Model).
    extra = ours.query_tokens.numel() + count(bare, "ln_image.")
    assert sum(p.numel() for p in bare.parameters()) == sum(p.numel() for p in theirs.parameters()) + extra


# --------------------------------------------------------------------------- bad input


def bad_calls():
    model = QFormer(**SMALL)
    image, ids, lengths = torch.randn(2, 5, 10), torch.ones(2, 4, dtype=torch.long), torch.tensor([4, 2])
    return [
        (lambda: model(torch.randn(2, 5, 9)), r"image_feats must have shape \(B, N, 10\)"),
        (lambda: model(torch.randn(5, 10)), r"image_feats must have shape"),
        (lambda: model(torch.ones(2, 5, 10, dtype=torch.long)), "floating point"),
        (lambda: model.joint(image, ids.float(), lengths, "itc"), "ids must be an integer"),
        (lambda: model.joint(image, torch.ones(2, 9, dtype=torch.long), lengths, "itc"), "max_text_len = 8"),
        (lambda: model.joint(image, ids + 30, lengths, "itc"), "vocab_size = 20"),
        (lambda: model.joint(image, ids, torch.tensor([0, 2]), "itc"), r"text_lengths must lie in \[1, T\]"),
        (lambda: model.joint(image, ids, torch.tensor([5, 2]), "itc"), r"text_lengths must lie in \[1, T\]"),
        (lambda: model.joint(image, ids, torch.tensor([2]), "itc"),
         r"lengths must have shape \(B,\) = \(2,\)"),
        (lambda: lm_loss(torch.randn(2, 4, 20), ids, torch.tensor([2])), r"lengths must have shape"),
        (lambda: itm_loss(model, image, ids, lengths, torch.zeros(3, 3)), r"itc_logits must be \(B, B\)"),
        (lambda: model.joint(image, ids, lengths.float(), "itc"), "integer tensor"),
        (lambda: model.joint(image[:1], ids, lengths, "itc"), "same batch size"),
        (lambda: model.joint(image, ids, lengths, "lm"), "objective must be one of"),
        (lambda: QFormer(**{**SMALL, "heads": 3}), "not divisible by heads"),
        (lambda: QFormer(**{**SMALL, "num_queries": 0}), "num_queries must be an int >= 1"),
        (lambda: QFormer(**{**SMALL, "cross_attention_every": 0}), "cross_attention_every"),
        (lambda: QFormer(**{**SMALL, "max_text_len": None}), "give both vocab_size and max_text_len"),
        (lambda: itc_mask(-1, 2), "num_queries must be an int >= 0"),
        (lambda: itg_mask(2, 0, torch.tensor([1])), "no text"),
        (lambda: qformer_losses(model, image[:1], ids[:1], lengths[:1]), "at least two pairs"),
        (lambda: lm_loss(torch.randn(2, 4, 20), ids, torch.tensor([1, 1])), "no caption has a token"),
        (lambda: lm_loss(torch.randn(2, 3, 20), ids, lengths), r"logits must be \(B, T, V\)"),
        (lambda: hard_negative_probs(torch.zeros(1, 1)), "B >= 2"),
        (lambda: qf.itc_similarity(torch.randn(2, 3, 4), torch.randn(2, 5)), "need image_emb"),
        (lambda: qf.contrastive_loss(torch.randn(2, 3)), "square"),
        (lambda: query_pass_flops(4, 0, 8, 2, 5), "num_image_tokens must be an int >= 1"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_raises_value_error(index):
    call, match = bad_calls()[index]
    with pytest.raises(ValueError, match=match):
        call()
