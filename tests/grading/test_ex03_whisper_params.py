"""Grader of exercise 3: Whisper's and GPT-2's parameters, and the decoder's key/value cache.

Every count is compared with a model actually built: tiny_mm.whisper's
AudioEncoder and TextDecoder, transformers' GPT2LMHeadModel, on sizes drawn
at random for each run (small, so they build in milliseconds), and on Whisper
medium's and GPT-2 XL's own sizes built on the meta device (shapes only, no
memory). The cache is a real KVCache filled by running a small decoder in
float32 and bfloat16, its bytes read off the tensors it holds.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex03` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tests.grading.conftest import Learner, fail
from tiny_mm.whisper import AudioEncoder, KVCache, TextDecoder, WhisperDims

EXERCISE = "ex03_whisper_params"
DRAWS = 3  # random size sets per check


# ---------------------------------------------------------------- helpers


def random_sizes(rng: np.random.Generator) -> dict[str, int]:
    """Small sizes: 1-3 layers, d in {64, 96, 128}, heads dividing d, small vocabulary and contexts."""
    d = int(rng.choice([64, 96, 128]))
    return {
        "n_layers": int(rng.integers(1, 4)),
        "d_model": d,
        "n_head": int(rng.choice([1, 2, 4, 8])),  # each divides 64, 96 and 128
        "n_mels": int(rng.choice([80, 128])),
        "n_audio_ctx": int(rng.integers(4, 40)),
        "n_vocab": int(rng.integers(50, 400)),
        "n_text_ctx": int(rng.integers(8, 48)),
    }


def whisper_dims(s: dict[str, int]) -> WhisperDims:
    return WhisperDims(s["n_mels"], s["n_audio_ctx"], s["d_model"], s["n_head"], s["n_layers"],
                       s["n_vocab"], s["n_text_ctx"], s["d_model"], s["n_head"], s["n_layers"])


def count(model: nn.Module) -> int:
    """What parameters() holds: each tensor once, however many modules share it (a tied head)."""
    return sum(p.numel() for p in model.parameters())


def gpt2(n_layers: int, d_model: int, n_head: int, n_vocab: int, n_ctx: int) -> nn.Module:
    config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_head, vocab_size=n_vocab,
                        n_positions=n_ctx, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def check_count(learner: Learner, name: str, args: tuple[int, ...], kwargs: dict[str, int],
                expected: int, what: str) -> None:
    """The learner's name(*args, **kwargs) must return the int `expected`."""
    got = learner.call(name, *args, **kwargs)
    call = f"{name}({', '.join([*map(str, args), *(f'{k}={v}' for k, v in kwargs.items())])})"
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        fail(f"{call} returned {type(got).__name__} {got!r}; return an int")
    if int(got) != expected:
        fail(f"{call} returned {int(got):,}; {what} has {expected:,} (off by {int(got) - expected:+,})")


# ---------------------------------------------------------------- checks


@pytest.mark.points(3)
def test_encoder_params(learner, rng):
    """encoder_params counts an AudioEncoder's parameters"""
    for _ in range(DRAWS):
        s = random_sizes(rng)
        expected = count(AudioEncoder(whisper_dims(s)))
        check_count(learner, "encoder_params", (s["n_layers"], s["d_model"]),
                    {"n_mels": s["n_mels"], "n_audio_ctx": s["n_audio_ctx"]}, expected, "AudioEncoder")


@pytest.mark.points(3)
def test_decoder_params(learner, rng):
    """decoder_params counts a TextDecoder's parameters"""
    for _ in range(DRAWS):
        s = random_sizes(rng)
        expected = count(TextDecoder(whisper_dims(s)))
        check_count(learner, "decoder_params", (s["n_layers"], s["d_model"]),
                    {"n_vocab": s["n_vocab"], "n_text_ctx": s["n_text_ctx"]}, expected,
                    "TextDecoder (its output layer is the tied token embedding)")


@pytest.mark.points(2)
def test_gpt2_params(learner, rng):
    """gpt2_params counts GPT2LMHeadModel's parameters"""
    for _ in range(DRAWS):
        s = random_sizes(rng)
        model = gpt2(s["n_layers"], s["d_model"], s["n_head"], s["n_vocab"], s["n_text_ctx"])
        check_count(learner, "gpt2_params", (s["n_layers"], s["d_model"]),
                    {"n_vocab": s["n_vocab"], "n_ctx": s["n_text_ctx"]}, count(model),
                    "GPT2LMHeadModel (lm_head is wte, counted once)")


def filled_cache(s: dict[str, int], n_tokens: int, dtype: torch.dtype) -> tuple[KVCache, int]:
    """A KVCache after a small decoder (in `dtype`) read n_tokens tokens; and the bytes its tensors hold."""
    decoder = TextDecoder(whisper_dims(s)).to(dtype)
    cache = KVCache(s["n_layers"])
    tokens = torch.randint(0, s["n_vocab"], (1, n_tokens))  # (1, n_tokens)
    audio = torch.randn(1, s["n_audio_ctx"], s["d_model"], dtype=dtype)  # (1, T, d)
    with torch.no_grad():
        decoder(tokens, audio, cache)
    assert cache.length == n_tokens
    held = [t for layer in (*cache.self_attn, *cache.cross_attn) for t in (layer.k, layer.v)]
    return cache, sum(t.numel() * t.element_size() for t in held)


@pytest.mark.points(3)
def test_kv_cache_bytes(learner, rng):
    """kv_cache_bytes equals what a filled KVCache holds"""
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        s = random_sizes(rng)
        n_tokens = int(rng.integers(1, s["n_text_ctx"] + 1))
        _, expected = filled_cache(s, n_tokens, dtype)
        check_count(learner, "kv_cache_bytes", (s["n_layers"], s["d_model"]),
                    {"n_tokens": n_tokens, "n_audio_ctx": s["n_audio_ctx"],
                     "dtype_bytes": torch.empty(0, dtype=dtype).element_size()},
                    expected, f"a {dtype} KVCache filled by a decoder (batch 1)")


@pytest.mark.points(2)
def test_medium_and_xl(learner):
    """Whisper medium and GPT-2 XL at full size (meta device)"""
    medium = WhisperDims(80, 1500, 1024, 16, 24, 51865, 448, 1024, 16, 24)
    with torch.device("meta"):  # shapes only: a 24-layer model without its 3 GB
        encoder, decoder = AudioEncoder(medium), TextDecoder(medium)
        xl = gpt2(48, 1600, 25, 50257, 1024)
    check_count(learner, "encoder_params", (24, 1024), {}, count(encoder), "Whisper medium's AudioEncoder")
    check_count(learner, "decoder_params", (24, 1024), {}, count(decoder), "Whisper medium's TextDecoder")
    check_count(learner, "gpt2_params", (48, 1600), {}, count(xl), "GPT-2 XL (GPT2LMHeadModel)")


BAD: list[tuple[str, tuple[Any, ...]]] = [
    ("encoder_params", (0, 64)),
    ("encoder_params", (2, -64)),
    ("decoder_params", (2, 64.0)),
    ("decoder_params", (-1, 64)),
    ("gpt2_params", (2, 0)),
    ("gpt2_params", (True, 64)),
    ("kv_cache_bytes", (2, 0)),
    ("kv_cache_bytes", (2, 64, 0)),
]


@pytest.mark.points(1)
def test_rejects_bad_sizes(learner):
    """ValueError on sizes that are not positive ints"""
    for name, args in BAD:
        learner.raises(ValueError, name, *args)
