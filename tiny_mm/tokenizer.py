"""CLIP's byte-level BPE tokenizer, written from the description of the algorithm.

A caption goes through five steps before the text tower sees it:

1. clean-up: repair mis-decoded text (``ftfy``, when installed), undo HTML
   escapes twice (web captions are often escaped twice), collapse runs of
   whitespace to one space, strip, lower-case;
2. pre-tokenising: a regular expression cuts the text into words, single
   digits, runs of punctuation and a few English contractions;
3. bytes to symbols: each word's UTF-8 bytes become printable characters
   (`bytes_to_unicode`), and the last one gets a ``</w>`` marker;
4. BPE: adjacent symbols are merged greedily, always the pair ranked highest
   in the merges file, until no ranked pair is left;
5. ids: ``<start_of_text>`` + the ids of the merged symbols + ``<end_of_text>``,
   padded with zeros (or truncated) to ``context_length`` (77 for CLIP).

The vocabulary (49408 entries) is built from the merges file that open_clip
ships (``bpe_simple_vocab_16e6.txt.gz``): the 256 byte symbols, the same 256
with ``</w>``, the first 48894 merges, then the two special tokens.

Needs the ``regex`` package (the standard ``re`` has no ``\\p{L}`` / ``\\p{N}``
classes) and, for text repair, ``ftfy``.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["Tokenizer", "tokenize", "default_merges_path", "bytes_to_unicode", "clean_text"]

SOT = "<start_of_text>"
EOT = "<end_of_text>"
END_OF_WORD = "</w>"
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408

# Words (letters), single digits, runs of anything else that is not a space, and
# the common English contractions split off their word. The special tokens come
# first so that a caption which spells one out gets the special id, as CLIP does.
_PATTERN = (
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"
)


# --------------------------------------------------------------------------- pieces


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to one printable, non-space character.

    Why bytes: any string is a sequence of UTF-8 bytes, so a vocabulary that
    starts from the 256 bytes can spell every text there is, emoji and CJK
    included; nothing is ever "unknown".

    Why remap them: the merges file is text, with symbols separated by spaces
    and lines. Bytes that are already visible characters (``!`` to ``~``,
    ``¡`` to ``¬``, ``®`` to ``ÿ``) stand for themselves; the others (control
    bytes, the space, ...) are given the characters from U+0100 upward, in
    byte order, so no symbol is ever whitespace.

    The dict's insertion order (visible bytes first, then the rest) is the
    order of the first 256 vocabulary ids.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """CLIP's normalisation: repair, unescape HTML twice, collapse whitespace, strip, lower-case."""
    try:
        import ftfy
    except ImportError:  # repair is a nicety; the rest of the pipeline does not need it
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split())  # str.split() with no argument splits on any run of whitespace
    return text.strip().lower()


def default_merges_path() -> Path:
    """The merges file inside the installed open_clip package (found without importing it).

    Raises FileNotFoundError naming where it looked and what to install.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"CLIP's merges file {MERGES_FILE} ships with the open_clip package, which is not "
            "installed: `pip install open_clip_torch`, or pass the file's path as bpe_path"
        )
    looked = [Path(p) / MERGES_FILE for p in spec.submodule_search_locations]
    for path in looked:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{MERGES_FILE} not found; looked in {', '.join(str(p) for p in looked)}. Reinstall "
        "open_clip_torch, or pass the file's path as bpe_path"
    )


def _read_merges(path: Path, num_merges: int) -> list[tuple[str, str]]:
    """The first ``num_merges`` merge rules of a (gzipped or plain) merges file."""
    if not path.is_file():
        raise FileNotFoundError(f"merges file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; each later line is "left right", best rank first.
    rules = lines[1 : 1 + num_merges]
    if len(rules) < num_merges:
        raise ValueError(f"{path} holds {len(rules)} merges, the vocabulary needs {num_merges}")
    merges = []
    for i, line in enumerate(rules, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {i}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _check_texts(texts: object) -> list[str]:
    """``texts`` as a list of str (one str becomes a list of one); ValueError otherwise."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    wrong = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
    if wrong:
        raise ValueError(
            f"texts must be a str or a list of str, got a list holding {', '.join(wrong)}"
        )
    return list(texts)


def _check_context_length(context_length: object) -> None:
    """ValueError unless context_length is an int with room for the start and end tokens."""
    is_int = isinstance(context_length, int) and not isinstance(context_length, bool)
    if not is_int or context_length < 2:
        raise ValueError(
            "context_length must be an int >= 2 (room for the start and end tokens), "
            f"got {context_length!r}"
        )


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """CLIP's byte-level BPE tokenizer.

    Args:
        bpe_path: the merges file; by default the one open_clip ships.
        vocab_size: 49408 for CLIP; the number of merges read is
            ``vocab_size - 2 * 256 - 2``.

    Attributes:
        encoder: symbol -> id;  decoder: id -> symbol.
        sot_id, eot_id: ids of ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407).
    """

    def __init__(
        self, bpe_path: str | os.PathLike | None = None, vocab_size: int = CLIP_VOCAB_SIZE
    ) -> None:
        try:
            import regex
        except ImportError as err:
            raise ImportError(
                "the CLIP tokenizer needs the `regex` package for its \\p{L}/\\p{N} classes: "
                "`pip install regex`"
            ) from err
        num_merges = vocab_size - 2 * 256 - 2
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least {2 * 256 + 2}, got {vocab_size}")
        path = default_merges_path() if bpe_path is None else Path(bpe_path)
        merges = _read_merges(path, num_merges)

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        byte_symbols = list(self.byte_encoder.values())
        # Each byte appears twice: inside a word and as a word's last symbol.
        # The "</w>" copy lets the vocabulary tell "ing" ending a word from
        # "ing" inside one, and lets decode put the spaces back.
        self.decoder: list[str] = (
            byte_symbols
            + [s + END_OF_WORD for s in byte_symbols]
            + [left + right for left, right in merges]
            + [SOT, EOT]
        )
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(self.decoder)}
        self.ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.vocab_size = len(self.decoder)
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        # Words repeat a lot in captions; BPE on a word is the slow part, so remember it.
        self.cache: dict[str, list[int]] = {SOT: [self.sot_id], EOT: [self.eot_id]}

    # ANCHOR: bpe
    def bpe(self, word: str) -> list[str]:
        """Split one pre-token (already mapped to byte symbols) into vocabulary symbols."""
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            # The adjacent pair with the best (lowest) rank is merged first,
            # everywhere it occurs, left to right.
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break  # no adjacent pair is a known merge: done
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols
    # ANCHOR_END: bpe

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after CLIP's clean-up, without start/end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self.pattern.findall(clean_text(text)):
            if piece not in self.cache:
                symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                self.cache[piece] = [self.encoder[s] for s in self.bpe(symbols)]
            ids.extend(self.cache[piece])
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor): each ``</w>`` becomes a space.

        The result is the cleaned, lower-cased text, with a space after every
        word-final symbol, so punctuation comes back spaced out ("a , b").
        A padded row from `tokenize` should be cut after its end token first:
        the padding id 0 is the symbol "!".
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        # Symbols stand for bytes, and one character may be spread over several
        # symbols, so gather all the bytes first and decode UTF-8 once at the end.
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            symbol = self.decoder[i]
            if i in (self.sot_id, self.eot_id):
                if not skip_special_tokens:
                    out += symbol.encode("utf-8")
                continue
            word_end = symbol.endswith(END_OF_WORD)
            if word_end:
                symbol = symbol[: -len(END_OF_WORD)]
            out += bytes(self.byte_decoder[c] for c in symbol)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").rstrip(" ")

    # ANCHOR: tokenize
    def __call__(
        self, texts: str | Sequence[str], context_length: int = 77, *, truncate: bool = True
    ) -> torch.LongTensor:
        """Token ids of one text or a list of texts, as a (n, context_length) LongTensor.

        Row i is ``[sot, ids of texts[i], eot, 0, 0, ...]``. A text too long to
        fit is cut, and its last slot becomes the end token again: the text
        tower pools at the end token's position, which it finds with
        ``argmax`` over the row, because the end token has the largest id in
        the vocabulary. With ``truncate=False`` a text that does not fit is a
        ValueError.
        """
        texts = _check_texts(texts)
        _check_context_length(context_length)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (n, context_length)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} needs {len(ids)} tokens, more than context_length="
                        f"{context_length}; pass truncate=True to cut it"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
    # ANCHOR_END: tokenize


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, *, truncate: bool = True
) -> torch.LongTensor:
    """CLIP token ids of ``texts``: a (n, context_length) LongTensor (n = 1 for one str).

    Uses the merges file shipped with open_clip; build a `Tokenizer` to use another.
    """
    texts = _check_texts(texts)  # checked before the merges file is read
    _check_context_length(context_length)
    return _default_tokenizer()(texts, context_length, truncate=truncate)
