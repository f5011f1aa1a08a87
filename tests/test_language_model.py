"""The tiny language model against chapter 8's NumPy reference, its two doors, and its pretraining.

- logits match the float64 reference with random weights, with and without a prefix;
- the prefix and the hooks change nothing unless used (a hook returning x is a no-op);
- it is causal: a later word never changes an earlier position's logits;
- a short pretraining lowers the next-word loss and leaves a frozen model, on either stream;
- the "context" stream writes before a caption exactly that caption's attribute words
  (checked by parsing the stream, against the dataset's captions), in a random order;
- bad inputs are refused with a ValueError.
"""
import re
from collections import Counter

import numpy as np
import pytest
import torch

import chapters.ch08_vlm_adapters.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.data.shapes import WHERE_WORDS, ShapesConfig, ShapesDataset
from tiny_mm.data.words import PAD, shapes_vocab
from tiny_mm.language_model import LMConfig, TinyLM, next_word_loss, pretrain_lm, text_stream

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
SMALL = LMConfig(vocab_size=45, context_length=20, width=24, layers=2, heads=3)




@pytest.mark.parametrize("B, L, P, k", [(2, 7, 0, 0), (3, 5, 4, 0), (3, 5, 4, 1), (1, 1, 1, 1), (2, 12, 8, 5)])
def test_logits_match_reference(rng, B, L, P, k):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    ids = rng.integers(0, 45, size=(B, L))
    prefix = rng.standard_normal((B, P, 24)) if P else None
    out = lm(torch.from_numpy(ids), None if prefix is None else torch.from_numpy(prefix).float(), prefix_position=k)
    assert out.shape == (B, P + L, 45)
    expected = ref.lm_logits(ids, float64_weights(lm), SMALL.layers, SMALL.heads, prefix=prefix, prefix_position=k)
    assert rel_err(out, expected) < 1e-5


def test_identity_hook_and_causality(rng):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    ids = torch.from_numpy(rng.integers(0, 45, size=(2, 9)))
    seen = []
    with torch.no_grad():
        plain = lm(ids)
        hooked = lm(ids, layer_hook=lambda i, x: seen.append(i) or x)
        assert torch.equal(plain, hooked) and seen == [0, 1]  # called once before each block
        changed = ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 45
        assert torch.equal(lm(changed)[:, :5], plain[:, :5])  # the future never leaks back
        assert not torch.allclose(lm(changed)[:, 5:], plain[:, 5:])
        bumped = lm(ids, layer_hook=lambda i, x: x + 1.0 if i == 1 else x)
        assert not torch.allclose(bumped, plain)  # what a hook returns is what the next block reads


def test_next_word_loss_ignores_padding(rng):
    logits = torch.from_numpy(rng.standard_normal((2, 5, 45)))
    ids = torch.tensor([[1, 7, 9, 2, PAD], [1, 8, 2, PAD, PAD]])
    log_probs = torch.log_softmax(logits, dim=-1)
    picks = [log_probs[0, 0, 7], log_probs[0, 1, 9], log_probs[0, 2, 2], log_probs[1, 0, 8], log_probs[1, 1, 2]]
    expected = -torch.stack(picks).mean()
    assert abs(float(next_word_loss(logits, ids)) - float(expected)) < 1e-12
    changed = logits.clone()
    changed[1, 3:] = 100.0  # positions whose target is padding do not count
    assert float(next_word_loss(changed, ids)) == float(next_word_loss(logits, ids))


@pytest.mark.parametrize("stream", ["captions", "context"])
def test_pretraining_lowers_the_loss_and_freezes(stream):
    lm, losses = pretrain_lm(SMALL, steps=60, batch_size=32, captions=200, stream=stream)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert not lm.training and all(not p.requires_grad for p in lm.parameters())


def test_bad_input():
    lm = TinyLM(SMALL)
    with pytest.raises(ValueError, match="int64"):
        lm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids must lie"):
        lm(torch.full((1, 3), 45))
    with pytest.raises(ValueError, match="prefix"):
        lm(torch.zeros(2, 3, dtype=torch.long), prefix=torch.zeros(2, 4, 23))
    with pytest.raises(ValueError, match="context_length"):
        lm(torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_position"):
        lm(torch.zeros(1, 3, dtype=torch.long), prefix=torch.zeros(1, 2, 24), prefix_position=4)
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(width=10, heads=3)
    with pytest.raises(ValueError, match="vocab"):
        pretrain_lm(LMConfig(vocab_size=50), steps=1)


def split_stream(tokens):
    """Parse a pretraining stream into (context words, caption) pairs, independently of text_stream."""
    itos = shapes_vocab().itos
    words = [itos[i] for i in tokens.tolist()]
    assert words[0] == "<bos>" and words[-1] == "<eos>"
    pairs, text = [], " ".join(words)
    for chunk in re.findall(r"<bos> (.*?) <eos>", text):
        assert "<bos>" not in chunk and "<eos>" not in chunk and "<pad>" not in chunk
        match = re.fullmatch(r"((?:\w+ )*?)(an? .*)", chunk)  # a caption starts at its article
        assert match is not None, chunk
        pairs.append((match.group(1).split(), match.group(2)))
    assert sum(len(c) + len(cap.split()) + 2 for c, cap in pairs) == len(words)  # nothing left between
    return pairs


def caption_attributes(text):
    """The attribute words of a canonical caption, read with a regex and the dataset's phrase table."""
    size, colour, shape, where = re.fullmatch(r"an? (\w+) (\w+) (\w+) (.+)", text).groups()
    position = next(name for name, phrases in WHERE_WORDS.items() if phrases[0] == where)
    return Counter([size, colour, shape, *position.split()])


@pytest.mark.parametrize("kind", ["captions", "context"])
def test_text_stream_writes_the_attributes_of_the_caption_that_follows(kind):
    n, seed = 300, 4
    pairs = split_stream(text_stream(n, kind, seed=seed))
    truth = ShapesDataset(n, ShapesConfig(captions="canonical"), seed=seed + 1000)
    assert [cap for _, cap in pairs] == [truth.sample(k).caption for k in range(n)]  # the dataset's captions, in order
    with_context = [(c, cap) for c, cap in pairs if c]
    if kind == "captions":
        assert not with_context
        return
    assert 0.7 * n < len(with_context) < 0.9 * n  # about the default context_fraction, 0.8
    for context, cap in with_context:
        assert Counter(context) == caption_attributes(cap)  # exactly the caption's attributes, no more
    # The order is random: the colour word is not always in the same slot.
    colours = set(ShapesConfig().colours)
    slots = {next(i for i, w in enumerate(c) if w in colours) for c, _ in with_context}
    assert len(slots) >= 3


def test_text_stream_all_or_nothing_and_bad_input():
    everything = split_stream(text_stream(40, "context", context_fraction=1.0))
    assert all(c for c, _ in everything)
    assert not any(c for c, _ in split_stream(text_stream(40, "context", context_fraction=0.0)))
    with pytest.raises(ValueError, match="kind"):
        text_stream(10, "novels")
    with pytest.raises(ValueError, match="captions"):
        text_stream(0, "context")
    with pytest.raises(ValueError, match="context_fraction"):
        text_stream(10, "context", context_fraction=1.5)
    with pytest.raises(ValueError, match="kind"):
        pretrain_lm(SMALL, steps=1, stream="novels")
