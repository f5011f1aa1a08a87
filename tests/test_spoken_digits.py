"""Spoken digits (`tiny_mm.data.spoken_digits`): word error rate, resampler, tokenizer, synthesis.

What must hold:

- the edit distance equals the number of edits planted into random strings, in
  cases where that number is provably the distance (edits that bring in words the
  reference never uses, or that only shorten or only lengthen it), and agrees with
  an exhaustive recursive definition on small random pairs; WER(x, x) = 0; an
  empty hypothesis costs every reference word;
- the resampler equals its defining sum (computed here sample by sample in float64),
  keeps a sine a sine at the same frequency (the analytic sine at 16 kHz), gives
  16000/22050 as many samples, and removes a tone above the new Nyquist frequency;
- the WAV reader accepts espeak-ng's header (a data size it could not know);
- tokenizer round trips; strings drawn from a seed repeat and the held-out ones are new;
- with espeak-ng on the machine: clip and feature shapes, the disk cache round trip,
  errors for an unknown voice and a clip too long for its window. Without it those
  tests skip and say why, and the error says how to install it.
"""
from __future__ import annotations

import functools
import io
import math
import shutil
import struct
import wave

import numpy as np
import pytest
import torch

from tiny_mm.data import spoken_digits as sd
from tiny_mm.data.spoken_digits import (
    EOT, PAD, SOT, DigitTokenizer, draw_strings, edit_distance, make_clips, read_wav, resample,
    split_strings, trim_silence, word_error_rate,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng; `make test` installs it as root)",
)


# --------------------------------------------------------------------------- word error rate


def random_words(rng, n: int) -> list[str]:
    return [str(d) for d in rng.integers(0, 10, size=n)]


def fresh(i: int) -> str:
    """A word no reference uses: each one in a hypothesis needs its own substitution or insertion."""
    return f"x{i}"


@pytest.mark.parametrize("trial", range(20))
def test_planted_fresh_substitutions_and_insertions(rng, trial):
    # Every fresh word needs one edit of its own, so distance >= k_sub + k_ins; planting them
    # took exactly that many, so distance <= k_sub + k_ins.
    ref = random_words(rng, int(rng.integers(1, 15)))
    k_sub = int(rng.integers(0, len(ref) + 1))
    hyp = list(ref)
    for n, i in enumerate(rng.choice(len(ref), size=k_sub, replace=False)):
        hyp[i] = fresh(n)
    k_ins = int(rng.integers(0, 6))
    for n in range(k_ins):
        hyp.insert(int(rng.integers(0, len(hyp) + 1)), fresh(100 + n))
    assert edit_distance(ref, hyp) == k_sub + k_ins
    assert edit_distance(hyp, ref) == k_sub + k_ins  # the distance is symmetric


@pytest.mark.parametrize("trial", range(20))
def test_planted_fresh_substitutions_and_deletions(rng, trial):
    # With S substitutions, I insertions and D deletions, D - I = k_del (the length change) and
    # S + I >= k_sub (fresh words), so S + I + D >= k_sub + k_del + I >= k_sub + k_del.
    ref = random_words(rng, int(rng.integers(2, 15)))
    positions = rng.permutation(len(ref))
    k_del, k_sub = int(rng.integers(0, len(ref) + 1)), 0
    k_sub = int(rng.integers(0, len(ref) - k_del + 1))
    deleted, substituted = set(positions[:k_del].tolist()), positions[k_del : k_del + k_sub].tolist()
    hyp = [fresh(i) if i in substituted else w for i, w in enumerate(ref)]
    hyp = [w for i, w in enumerate(hyp) if i not in deleted]
    assert edit_distance(ref, hyp) == k_sub + k_del


@pytest.mark.parametrize("trial", range(10))
def test_only_insertions_or_only_deletions(rng, trial):
    # Any alignment needs at least |len(ref) - len(hyp)| insertions or deletions.
    ref = random_words(rng, int(rng.integers(0, 12)))
    longer = list(ref)
    k = int(rng.integers(1, 6))
    for _ in range(k):
        longer.insert(int(rng.integers(0, len(longer) + 1)), str(rng.integers(0, 10)))  # even repeated digits
    assert edit_distance(ref, longer) == k and edit_distance(longer, ref) == k


@functools.lru_cache(maxsize=None)
def exhaustive(a: tuple, b: tuple) -> int:
    """The definition, recursively: the cheapest first move (delete, insert, substitute or match)."""
    if not a or not b:
        return len(a) + len(b)
    return min(exhaustive(a[1:], b) + 1, exhaustive(a, b[1:]) + 1, exhaustive(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_against_the_recursive_definition(rng):
    for _ in range(200):
        a = tuple(str(d) for d in rng.integers(0, 3, size=int(rng.integers(0, 8))))  # few symbols: many matches
        b = tuple(str(d) for d in rng.integers(0, 3, size=int(rng.integers(0, 8))))
        assert edit_distance(a, b) == exhaustive(a, b), (a, b)


def test_word_error_rate_of_a_set(rng):
    refs = [" ".join(random_words(rng, int(rng.integers(3, 7)))) for _ in range(30)]
    assert word_error_rate(refs, refs) == 0.0
    assert word_error_rate(refs, [""] * len(refs)) == 1.0  # every word deleted
    # Plant k_i fresh substitutions into string i: WER = sum k_i / sum of reference words.
    hyps, planted = [], 0
    for r in refs:
        words = r.split()
        k = int(rng.integers(0, len(words) + 1))
        for n, i in enumerate(rng.choice(len(words), size=k, replace=False)):
            words[i] = fresh(n)
        hyps.append(" ".join(words))
        planted += k
    assert word_error_rate(refs, hyps) == pytest.approx(planted / sum(len(r.split()) for r in refs))
    # Insertions can push it above 1.
    assert word_error_rate(["1"], ["1 2 3"]) == 2.0


@pytest.mark.parametrize(
    "refs, hyps, match",
    [(["1 2"], ["1", "2"], "1 references but 2"), ("1 2", "1 2", "lists of transcripts"), ([""], ["1"], "no words")],
)
def test_word_error_rate_bad_input(refs, hyps, match):
    with pytest.raises(ValueError, match=match):
        word_error_rate(refs, hyps)


# --------------------------------------------------------------------------- resampling


def defining_sum(x: np.ndarray, m: int, orig: int, new: int, zeros: int = 16, rolloff: float = 0.945) -> float:
    """Output sample m of the windowed-sinc resampler, straight from its formula, in float64."""
    c = rolloff * min(1.0, new / orig)
    half = math.ceil(zeros / c)
    t = m * orig / new
    k = np.arange(len(x))
    tau = t - k
    w = np.where(np.abs(tau) < half, 0.5 * (1 + np.cos(np.pi * tau / half)), 0.0)
    return float(np.sum(x * c * np.sinc(c * tau) * w))


@pytest.mark.parametrize("rates", [(22_050, 16_000), (44_100, 16_000), (8_000, 16_000), (48_000, 16_000)])
def test_resample_equals_its_defining_sum(rng, rates):
    orig, new = rates
    x = rng.standard_normal(int(rng.integers(700, 1500)))
    out = resample(torch.from_numpy(x), orig, new).numpy()
    assert out.shape == (len(x) * new // orig,)
    ms = rng.choice(len(out), size=40, replace=False)
    ms[:2] = [0, len(out) - 1]  # the edges, where the zero padding is used
    ref = np.array([defining_sum(x, int(m), orig, new) for m in ms])
    assert np.linalg.norm(out[ms] - ref) / np.linalg.norm(ref) < 1e-12


def test_resample_keeps_a_sine_at_its_frequency(rng):
    for _ in range(5):
        f = float(rng.uniform(100.0, 5000.0))
        phase, amplitude = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.1, 1.0))
        n = int(rng.integers(22_050, 33_075))  # 1 to 1.5 s
        x = amplitude * np.sin(2 * np.pi * f * np.arange(n) / 22_050 + phase)
        y = resample(torch.tensor(x, dtype=torch.float32), 22_050, 16_000)
        assert y.dtype == torch.float32 and y.shape == (n * 16_000 // 22_050,)
        assert abs(len(y) / n - 16_000 / 22_050) < 1 / n
        ref = amplitude * np.sin(2 * np.pi * f * np.arange(len(y)) / 16_000 + phase)
        inner = slice(100, -100)  # away from the ends, where the filter reaches past the clip
        err = np.linalg.norm(y.numpy()[inner] - ref[inner]) / np.linalg.norm(ref[inner])
        assert err < 2e-3, (f, err)  # the filter's pass band: within 0.2% up to 5 kHz
        # The spectrum's peak sits at f (zero-padded FFT: 0.1 Hz bins; a Hann window narrows the peak).
        spectrum = np.abs(np.fft.rfft(y.numpy() * np.hanning(len(y)), n=160_000))
        assert abs(np.argmax(spectrum) * 0.1 - f) < 0.5, f


def test_resample_removes_tones_above_the_new_nyquist(rng):
    f = float(rng.uniform(8_600, 10_000))  # above 8 kHz: would alias to 16000 - f
    x = np.sin(2 * np.pi * f * np.arange(22_050) / 22_050)
    y = resample(torch.from_numpy(x), 22_050, 16_000).numpy()[200:-200]
    assert np.sqrt(np.mean(y**2)) < 0.01 * np.sqrt(0.5)  # -40 dB at least


def test_resample_batches_and_checks(rng):
    x = torch.tensor(rng.standard_normal((3, 2_000)))
    rows = torch.stack([resample(r, 22_050, 16_000) for r in x])
    assert torch.equal(resample(x, 22_050, 16_000), rows)
    with pytest.raises(ValueError, match="orig_rate must be a positive int"):
        resample(x, 0, 16_000)
    with pytest.raises(ValueError, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int16), 22_050)


# --------------------------------------------------------------------------- WAV reading and trimming


def wav_bytes(pcm: np.ndarray, rate: int, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1), f.setsampwidth(width), f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def test_read_wav_with_a_streamed_header(rng):
    pcm = rng.integers(-32768, 32768, size=5_001).astype("<i2")
    data = bytearray(wav_bytes(pcm, 22_050))
    assert read_wav(bytes(data))[1] == 22_050
    # espeak-ng --stdout writes sizes it cannot know yet: ~2^31 in the RIFF and data headers.
    data[4:8], data[40:44] = struct.pack("<I", 0x7FFFFFFF), struct.pack("<I", 0x7FFFF000)
    samples, rate = read_wav(bytes(data))
    assert rate == 22_050 and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, pcm.astype(np.float32) / 32768)
    with pytest.raises(ValueError, match="16-bit mono"):
        read_wav(wav_bytes(np.zeros(10, dtype=np.uint8), 8_000, width=1))


def test_trim_silence_keeps_the_sound_and_a_margin(rng):
    audio = torch.zeros(16_000)
    begin, end = int(rng.integers(2_000, 6_000)), int(rng.integers(9_000, 14_000))
    audio[begin:end] = torch.tensor(rng.uniform(0.2, 1.0, end - begin), dtype=torch.float32)
    out = trim_silence(audio)
    keep = int(0.05 * 16_000) + 160
    assert torch.equal(out, audio[begin - keep : end - 1 + keep + 1])
    assert torch.equal(trim_silence(torch.zeros(100)), torch.zeros(100))


# --------------------------------------------------------------------------- tokens and strings


def test_tokenizer_round_trip(rng):
    tok = DigitTokenizer()
    assert len(tok) == 13 and (EOT, SOT, PAD) == (10, 11, 12)
    for text in draw_strings(50, int(rng.integers(1000)), min_digits=1, max_digits=8):
        ids = tok.encode(text)
        assert ids[0] == SOT and ids[-1] == EOT and ids[1:-1] == [int(w) for w in text.split()]
        assert tok.decode(ids) == text
        assert tok.encode(" ".join(sd.DIGIT_WORDS[int(w)] for w in text.split())) == ids  # the spoken form
    ids, lengths = tok.encode_batch(["3 1 4", "1 5 9 2 6"], 9)
    assert ids.tolist() == [[SOT, 3, 1, 4, EOT, PAD, PAD, PAD, PAD], [SOT, 1, 5, 9, 2, 6, EOT, PAD, PAD]]
    assert lengths.tolist() == [5, 7]
    assert tok.decode([SOT, 4, PAD, 2, EOT, 7]) == "4 <|pad|> 2"  # a stray PAD counts as a word; stop at EOT
    for bad, match in (("3 x", "not a digit"), ("31", "not a digit")):
        with pytest.raises(ValueError, match=match):
            tok.encode(bad)
    with pytest.raises(ValueError, match="more than length"):
        tok.encode_batch(["1 2 3"], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([SOT, 13])


def test_strings_repeat_with_the_seed_and_held_out_ones_are_new(rng):
    seed = int(rng.integers(10_000))
    train, test = split_strings(300, 100, seed)
    assert (train, test) == split_strings(300, 100, seed)
    assert not set(train) & set(test) and len(set(train)) == 300 and len(set(test)) == 100
    assert {len(s.split()) for s in train} == {3, 4, 5, 6}
    with pytest.raises(ValueError, match="half of the strings possible"):
        draw_strings(60, seed, min_digits=2, max_digits=2)


def test_speakers_repeat_with_the_seed_and_held_out_voices_are_new(rng):
    seed = int(rng.integers(10_000))
    voices, speeds, pitches = sd.draw_speakers(500, seed, pitches=(30, 70))
    assert (voices, speeds, pitches) == sd.draw_speakers(500, seed, pitches=(30, 70))
    assert set(voices) == set(sd.TRAIN_VOICES)  # 500 draws: each of the 35 voices comes up
    assert 160 <= min(speeds) and max(speeds) <= 240 and 30 <= min(pitches) and max(pitches) <= 70
    # No held-out voice shares its accent or its speaker variant with a training voice.
    split = [v.partition("+") for v in sd.TRAIN_VOICES]
    for accent, _, variant in (v.partition("+") for v in sd.HELDOUT_VOICES):
        assert accent not in {a for a, _, _ in split} and variant not in {v for _, _, v in split}


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        sd.synthesize("1 2 3")
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        make_clips(["1 2 3"], ["en"], [170])


# --------------------------------------------------------------------------- synthesis (espeak-ng)


@needs_espeak
def test_synthesis_shapes(rng):
    text = " ".join(str(d) for d in rng.integers(0, 10, size=4))
    samples, rate = sd.synthesize(text, "en-us+f3", 200, 60)
    assert rate == 22_050 and samples.dtype == np.float32 and samples.ndim == 1
    assert 0.5 * rate < len(samples) < 4 * rate and 0.05 < np.abs(samples).max() <= 1.0
    clip = sd.spoken_clip(text, "en-us+f3", 200)
    assert clip.dtype == torch.float32 and clip.dim() == 1
    assert clip.shape[0] < len(samples) * 16_000 / 22_050  # espeak's trailing silence trimmed


@needs_espeak
def test_make_clips_shapes_and_cache(tmp_path, rng):
    texts = draw_strings(4, int(rng.integers(1000)))
    voices, speeds, pitches = sd.draw_speakers(4, 0, pitches=(20, 40))
    data = make_clips(texts, voices, speeds, pitches, seconds=3.0, cache=tmp_path / "c.pt")
    assert data.mel.shape == (4, 80, 300) and data.mel.dtype == torch.float32
    assert torch.isfinite(data.mel).all() and data.longest <= 3.0
    assert data.tokens.shape == (4, max(len(t.split()) for t in texts) + 2)
    assert [DigitTokenizer().decode(row) for row in data.tokens] == texts
    # The last frame is the silence after each clip: every bin at the floor, 8 decades (2 after
    # Whisper's scaling by 1/4) below that clip's peak.
    floor = data.mel.amax(dim=(1, 2))[:, None] - 2.0  # (4, 1)
    torch.testing.assert_close(data.mel[:, :, -1], floor.expand(4, 80), rtol=0, atol=1e-6)
    again = make_clips(texts, voices, speeds, pitches, seconds=3.0, cache=tmp_path / "c.pt")  # from the cache
    assert torch.equal(again.mel, data.mel) and again.texts == texts and again.pitches == pitches
    other = make_clips(texts, voices, speeds, seconds=3.0, cache=tmp_path / "c.pt")  # pitch 50: made anew
    assert other.pitches == [50] * 4 and not torch.equal(other.mel, data.mel)


@needs_espeak
def test_synthesis_errors():
    with pytest.raises(ValueError, match="espeak-ng has no voice"):
        sd.synthesize("1 2 3", "no-such-voice-xyz")
    with pytest.raises(ValueError, match="speed must be"):
        sd.synthesize("1 2 3", "en", 10)
    with pytest.raises(ValueError, match="pitch must be"):
        sd.synthesize("1 2 3", "en", 170, 100)
    with pytest.raises(ValueError, match="more than seconds"):
        make_clips(["7 7 7 7 7 7"], ["en"], [160], seconds=1.0)
    with pytest.raises(ValueError, match="multiple of 0.02"):
        make_clips(["1 2 3"], ["en"], [160], seconds=1.005)
