"""A word-level vocabulary for the shapes captions (chapters 6 and 8).

The shapes world has a few dozen words, so a caption model needs no BPE: one
token per word, with a comma as a word of its own. The vocabulary is every
word the caption generator (`tiny_mm.data.shapes`) can write, in a fixed
order, after four special tokens:

    <pad> = 0   fills a batch of captions to one length (masked out of losses)
    <bos> = 1   starts every caption: the decoder's first input
    <eos> = 2   ends every caption: generation stops when it is produced
    <unk> = 3   any word the shapes world never writes

`encode` turns captions into a padded (B, L) id tensor ``<bos> w1 ... wn
<eos> <pad> ...`` with the lengths; `decode` turns ids back into a caption.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from tiny_mm.data import shapes

__all__ = ["PAD", "BOS", "EOS", "UNK", "SPECIALS", "WordVocab", "split_words", "shapes_vocab"]

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def split_words(text: str) -> list[str]:
    """"a red star, big, on the left" -> ["a", "red", "star", ",", "big", ",", "on", "the", "left"]."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a str, got {type(text).__name__}")
    return re.findall(r"[a-z]+|,", text.lower())


class WordVocab:
    """Words <-> ids, with the four special tokens first.

    Args:
        words: the ordinary words, each once (specials are added in front).
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("words must not repeat")
        clash = set(words) & set(SPECIALS)
        if clash:
            raise ValueError(f"words must not include the special tokens {sorted(clash)}")
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode_one(self, text: str) -> list[int]:
        """"a red star" -> [BOS, id(a), id(red), id(star), EOS]."""
        return [BOS, *(self.stoi.get(w, UNK) for w in split_words(text)), EOS]

    def encode(self, texts: Sequence[str], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Captions -> (ids (B, L) int64 padded with PAD, lengths (B,) counting BOS and EOS).

        L is the longest caption's length, or max_len; a caption longer than
        max_len is an error (silently cutting it would train on broken captions).
        """
        if isinstance(texts, str):
            raise ValueError("encode takes a list of captions; wrap a single one in a list")
        rows = [self.encode_one(t) for t in texts]
        if not rows:
            raise ValueError("encode needs at least one caption")
        longest = max(map(len, rows))
        length = longest if max_len is None else max_len
        if longest > length:
            raise ValueError(f"a caption has {longest} tokens with <bos> and <eos>, more than max_len = {length}")
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, torch.tensor([len(r) for r in rows])

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> caption: stops at the first EOS, skips BOS and PAD, rejoins commas."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (L,), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        words = []
        for i in ids:
            if not 0 <= int(i) < len(self.itos):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.itos)} tokens")
            if i == EOS:
                break
            if i not in (BOS, PAD):
                words.append(self.itos[i])
        return " ".join(words).replace(" ,", ",")


def shapes_vocab() -> WordVocab:
    """Every word the shapes captions can contain (canonical and varied), in a fixed order."""
    texts = [
        *shapes.SHAPES,
        *shapes.COLOURS,
        *(w for words in shapes.SIZE_WORDS.values() for w in words),
        *(w for words in shapes.WHERE_WORDS.values() for w in words),
        *(p.format(size="", colour="", shape="", where="") for p in shapes._OBJECT_PHRASES),
        *(f.format("") for f in shapes.CAPTION_FRAMES),
        "a an and",
    ]
    words: list[str] = []
    for text in texts:
        for w in split_words(text):
            if w not in words:
                words.append(w)
    return WordVocab(words)
