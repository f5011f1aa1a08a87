"""tiny_mm.tokenizer against open_clip's tokenizer, plus hand-worked BPE on a tiny merges file.

The reference for real captions is `open_clip.tokenize` (an independent
implementation reading the same merges file); the tiny merges file's expected
ids are worked out by hand in the test, never taken from the code under test.
"""
from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from tiny_mm import tokenizer as tok
from tiny_mm.tokenizer import Tokenizer, bytes_to_unicode, tokenize

try:  # the reference implementation, and the owner of the merges file
    import open_clip
except ImportError:
    open_clip = None
needs_open_clip = pytest.mark.skipif(open_clip is None, reason="open_clip_torch is not installed")

CORPUS = [
    "a photo of a cat.",
    "A Photo Of A DOG!!!",
    "the quick brown fox jumps over the lazy dog",
    "Don't, won't, can't; I'm you're we've they'll she'd it's",
    "rock 'n' roll 'quoted' \"double\" `back`",
    "3.14159, 1,000,000 and 2024-01-31 at 12:30pm; 42nd 7th",
    "(parens) [brackets] {braces} <angle> a/b\\c | x@y.com #tag $5 %20 ^_^ ~ = + * &",
    "...?!?! -- — – … «quotes» ¿qué? ¡sí!",
    "emoji 😀🐈‍⬛👍🏽 ❤️ 🇫🇷",
    "naïve café résumé Ångström Øre ß Straße ŒUVRE",
    "e\u0301 combining accent vs é",
    "日本語のテキスト 中文字符 한국어 텍스트",
    "Ελληνικά Русский текст العربية हिन्दी ไทย",
    "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &eacute;",
    "  lots\t\tof \n\n whitespace\r\n   here  ",
    "\u00a0non-breaking\u2003em-space\u3000ideographic",
    "mojibake caf\u00c3\u00a9 and \u00e2\u20ac\u0153smart quotes\u00e2\u20ac\u009d",
    "",
    "   ",
    "a",
    "!",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "<start_of_text> spelled-out special tokens <end_of_text>",
    "tab\tseparated\tvalues",
    "x" * 300,
    "a long caption about a picture " * 30,
]

# Characters the random captions are drawn from: letters, digits, punctuation, spaces, unicode.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_()&#/\\")
ALPHABET += [" ", " ", " ", "\t", "\n", "\x1c", "\x85", "\u2028", "é", "ü", "ñ", "ß", "日", "本"]
ALPHABET += ["😀", "👍", "—", "€", "&amp;", "&#39;"]


@pytest.fixture(scope="module")
def tk() -> Tokenizer:
    if open_clip is None:
        pytest.skip("the default merges file ships with open_clip_torch")
    return Tokenizer()


def random_captions(rng, n: int, max_len: int = 60) -> list[str]:
    return ["".join(rng.choice(ALPHABET, size=rng.integers(0, max_len))) for _ in range(n)]


@needs_open_clip
def test_corpus_matches_open_clip_token_for_token():
    ours = tokenize(CORPUS)
    theirs = open_clip.tokenize(CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), 77)
    for i, text in enumerate(CORPUS):
        assert torch.equal(ours[i], theirs[i]), f"text {i} {text[:40]!r}:\n{ours[i]}\n{theirs[i]}"


@needs_open_clip
def test_random_captions_match_open_clip(rng):
    texts = random_captions(rng, 200)
    assert torch.equal(tokenize(texts), open_clip.tokenize(texts))


@needs_open_clip
def test_random_code_points_match_open_clip(rng):
    # Any Unicode scalar value (surrogates excluded), half of them from the busy first planes.
    texts = []
    for _ in range(200):
        n = int(rng.integers(0, 30))
        points = np.where(rng.random(n) < 0.5, rng.integers(0, 0x3000, n), rng.integers(0, 0x30000, n))
        texts.append("".join(chr(c) for c in points if not 0xD800 <= c < 0xE000))
    ours, theirs = tokenize(texts), open_clip.tokenize(texts)
    for i, text in enumerate(texts):
        assert torch.equal(ours[i], theirs[i]), f"{text!r}:\n{ours[i]}\n{theirs[i]}"


@needs_open_clip
@pytest.mark.parametrize("context_length", [2, 5, 16, 77, 100])
def test_context_lengths_match_open_clip(context_length):
    ours = tokenize(CORPUS, context_length=context_length)
    assert ours.shape == (len(CORPUS), context_length)
    assert torch.equal(ours, open_clip.tokenize(CORPUS, context_length=context_length))


@needs_open_clip
def test_single_string_gives_one_row():
    out = tokenize("a diagram")
    assert out.shape == (1, 77)
    assert torch.equal(out, open_clip.tokenize(["a diagram"]))


def test_truncation_keeps_end_token_in_last_slot(tk):
    text = "a long caption about a picture " * 30
    assert len(tk.encode(text)) > 75  # really too long for 77
    row = tokenize(text)[0]
    assert row[0] == tk.sot_id and row[-1] == tk.eot_id
    assert (row == tk.eot_id).sum() == 1 and (row != 0).all()
    # The kept tokens are the text's first 75, in order.
    assert row[1:-1].tolist() == tk.encode(text)[:75]
    with pytest.raises(ValueError, match="context_length"):
        tokenize(text, truncate=False)


@needs_open_clip
def test_end_token_position_is_argmax(rng, tk):
    texts = [t for t in CORPUS if "_of_text>" not in t] + random_captions(rng, 50)
    ids = tokenize(texts)
    reference = open_clip.tokenize(texts)
    for i in range(len(texts)):
        pos = int(ids[i].argmax())
        assert ids[i, pos] == tk.eot_id
        # open_clip's row places its end token at the same index, and only padding follows.
        assert reference[i, pos] == tk.eot_id
        assert (ids[i, pos + 1 :] == 0).all()


def test_spelled_out_end_token_is_found_first_by_argmax(tk):
    # A CLIP quirk kept for parity: "<end_of_text>" typed in a caption becomes the
    # end token, and argmax (first maximum) pools there, not at the real end.
    row = tokenize("a <end_of_text> b")[0]
    assert row[:5].tolist()[:2] == [tk.sot_id, tk.encode("a")[0]]
    assert int(row.argmax()) == 2 and (row == tk.eot_id).sum() == 2


@needs_open_clip
def test_ids_and_vocabulary_layout(tk):
    assert tk.vocab_size == 49408
    assert (tk.sot_id, tk.eot_id) == (49406, 49407)
    reference = open_clip.tokenizer.SimpleTokenizer()
    assert tk.encoder == reference.encoder


def test_bytes_to_unicode_is_a_visible_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    chars = list(table.values())
    assert len(set(chars)) == 256
    assert not any(c.isspace() for c in chars)
    assert all(c.isprintable() for c in chars)
    # Visible ASCII stands for itself.
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))


def test_decode_round_trip_on_normalised_words(rng, tk):
    words = ["photo", "cat", "dog", "Red", "SQUARE", "über", "naïve", "日本", "x", "zebra", "42"]
    for _ in range(30):
        text = (" " * int(rng.integers(1, 4))).join(rng.choice(words, size=rng.integers(1, 8)))
        expected = " ".join(text.split()).lower()
        digits_spaced = " ".join(" ".join(w) if w.isdigit() else w for w in expected.split())
        assert tk.decode(tk.encode(text)) == digits_spaced


def test_decode_then_encode_gives_the_same_ids(rng, tk):
    for text in CORPUS + random_captions(rng, 100):
        ids = tk.encode(text)
        assert tk.encode(tk.decode(ids, skip_special_tokens=False)) == ids, repr(text)


def test_decode_special_tokens_and_tensor_input(tk):
    row = tokenize("hello world")[0]
    end = int(row.argmax())
    assert tk.decode(row[: end + 1]) == "hello world"
    assert tk.decode(row[: end + 1].tolist(), skip_special_tokens=False) == (
        "<start_of_text>hello world <end_of_text>"
    )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tk.decode([49408])


def write_merges(path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: test\n" + "\n".join(lines) + "\n")


def test_tiny_merges_file_worked_by_hand(tmp_path):
    # ids: 0..255 the byte symbols (visible ASCII first, so "a" is ord("a") - ord("!")),
    # 256..511 the same with </w>, then the merges in rank order, then sot, eot.
    path = tmp_path / "tiny.txt.gz"
    write_merges(path, ["a b", "ab c</w>", "a a", "aa a</w>"])
    t = Tokenizer(path, vocab_size=512 + 4 + 2)
    a, d = ord("a") - ord("!"), ord("d") - ord("!")
    ab, abc_end, aa, aaa_end = 512, 513, 514, 515
    assert (t.sot_id, t.eot_id) == (516, 517)
    assert t.encode("abc") == [abc_end]  # a b c</w> -> ab c</w> -> abc</w>
    assert t.encode("ABC abd") == [abc_end, ab, 256 + d]  # lower-cased; ab d</w> stops
    assert t.encode("aaa") == [aaa_end]  # a a a</w> -> aa a</w> -> aaa</w>
    # "a a" is merged left to right without overlap: a a a a</w> -> aa a a</w>,
    # and neither (aa, a) nor (a, a</w>) is a merge, so BPE stops there.
    assert t.encode("aaaa") == [aa, a, 256 + a]
    # Letters and each digit are separate pre-tokens, so each ends a word.
    assert t.encode("a12") == [256 + a, 256 + ord("1") - ord("!"), 256 + ord("2") - ord("!")]


def test_missing_and_malformed_merges_files(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer(missing)
    short = tmp_path / "short.txt.gz"
    write_merges(short, ["a b"])
    with pytest.raises(ValueError, match="merges"):
        Tokenizer(short)  # CLIP's vocabulary needs 48894 merges
    bad = tmp_path / "bad.txt.gz"
    write_merges(bad, ["a b c"])
    with pytest.raises(ValueError, match="two symbols"):
        Tokenizer(bad, vocab_size=512 + 1 + 2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        tok.default_merges_path()


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 5], {"a"}])
def test_bad_texts_raise(bad):
    with pytest.raises(ValueError, match="str"):
        tokenize(bad)


@pytest.mark.parametrize("length", [0, 1, -5, 2.5, True, "77"])
def test_bad_context_length_raises(length):
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a cat", context_length=length)


@needs_open_clip
def test_empty_list_gives_no_rows():
    assert tokenize([]).shape == (0, 77)
