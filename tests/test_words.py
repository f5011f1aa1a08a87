"""The word vocabulary of the shapes captions: every caption round-trips, nothing is unknown."""
from __future__ import annotations

import pytest
import torch

from tiny_mm.data import shapes
from tiny_mm.data.words import BOS, EOS, PAD, UNK, WordVocab, shapes_vocab


@pytest.mark.parametrize("captions", ["canonical", "varied"])
@pytest.mark.parametrize("max_objects", [1, 2])
def test_every_shapes_caption_round_trips(captions, max_objects):
    vocab = shapes_vocab()
    config = shapes.ShapesConfig(captions=captions, max_objects=max_objects)
    texts = [shapes.sample(config, 7, i).caption for i in range(300)]
    ids, lengths = vocab.encode(texts)
    assert (ids != UNK).all(), "a shapes caption holds a word outside the vocabulary"
    for text, row, n in zip(texts, ids, lengths):
        assert row[0] == BOS and row[n - 1] == EOS and (row[n:] == PAD).all()
        assert vocab.decode(row) == text


def test_encode_pads_and_checks_length():
    vocab = WordVocab(["red", "star", ","])
    ids, lengths = vocab.encode(["red star", "star, red red"], max_len=8)
    assert ids.shape == (2, 8) and lengths.tolist() == [4, 6]
    assert ids[0].tolist() == [BOS, 4, 5, EOS, PAD, PAD, PAD, PAD]
    assert vocab.encode(["blue"])[0][0, 1] == UNK
    with pytest.raises(ValueError, match="max_len"):
        vocab.encode(["red star red star"], max_len=4)
    with pytest.raises(ValueError, match="list"):
        vocab.encode("red star")
    with pytest.raises(ValueError, match="outside"):
        vocab.decode(torch.tensor([1, 99]))
    with pytest.raises(ValueError, match="repeat"):
        WordVocab(["red", "red"])
