"""Spoken digit strings, synthesised on the machine with espeak-ng, for a tiny Whisper.

A clip is a string of digits ("3 1 4") read aloud ("three one four") by one of
espeak-ng's voices at one speed. Nothing is downloaded: espeak-ng is a small
formant synthesiser from the distribution's packages (Debian/Ubuntu:
``apt-get install espeak-ng``; ``make test`` installs it where it runs as root
with apt).

The pipeline, in the order of this file:

    tokens     DigitTokenizer: ten words (ids 0-9 = the digits) + <|endoftext|>,
               <|startoftranscript|>, <|pad|>; "3 1 4" <-> [SOT, 3, 1, 4, EOT]
    speech     synthesize("3 1 4", voice, speed, pitch) -> 16-bit mono WAV bytes from
               ``espeak-ng --stdout`` -> read_wav (the standard library's `wave`)
               -> float waveform at 22,050 Hz
    resample   resample(): polyphase windowed-sinc, 22,050 -> 16,000 Hz (Whisper's rate)
    trim       trim_silence(): drop espeak's leading and trailing silence
    features   tiny_mm.audio.log_mel_spectrogram of the clip padded to a fixed few
               seconds (default 3 s = 300 frames -> 150 encoder positions, not 30 s)
    dataset    make_clips(strings, voices, speeds, pitches) -> SpokenDigits: mel (N, 80, 300),
               tokens (N, L), texts, voices, speeds, pitches; draw_strings / split_strings
               draw the strings from a seed, train and held-out ones disjoint; draw_speakers
               draws a voice, a speed and a pitch per clip

Nothing is written to disk unless ``make_clips(..., cache=path)`` asks for it.
"""
from __future__ import annotations

import functools
import io
import math
import re
import shutil
import subprocess
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tiny_mm.audio import HOP_LENGTH, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim

__all__ = [
    "DIGIT_WORDS", "EOT", "SOT", "PAD", "DigitTokenizer",
    "TRAIN_VOICES", "HELDOUT_VOICES", "espeak_available", "require_espeak", "check_voice", "synthesize", "read_wav",
    "resample", "trim_silence", "spoken_clip",
    "SpokenDigits", "draw_strings", "split_strings", "draw_speakers", "make_clips",
    "edit_distance", "word_error_rate",
]

# --------------------------------------------------------------------------- tokens

# ANCHOR: tokenizer
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# As in Whisper's vocabulary the ordinary tokens come first and the specials after them.
EOT, SOT, PAD = 10, 11, 12


class DigitTokenizer:
    """Transcripts of digit strings <-> token ids.

    A transcript is digits separated by spaces, "3 1 4" (each digit is a word,
    which is what the word error rate counts). Ids 0-9 are the digits
    themselves, then <|endoftext|> (10), <|startoftranscript|> (11) and
    <|pad|> (12): 13 tokens in all.
    """

    specials = ("<|endoftext|>", "<|startoftranscript|>", "<|pad|>")

    def __init__(self) -> None:
        self.itos: list[str] = [str(d) for d in range(10)] + list(self.specials)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """"3 1 4" (or "three one four") -> [SOT, 3, 1, 4, EOT]."""
        if not isinstance(text, str):
            raise ValueError(f"a transcript must be a str, got {type(text).__name__}")
        ids = []
        for word in text.split():
            if word.isdecimal() and len(word) == 1:
                ids.append(int(word))
            elif word.lower() in DIGIT_WORDS:
                ids.append(DIGIT_WORDS.index(word.lower()))
            else:
                raise ValueError(f"{word!r} in {text!r} is not a digit (0-9 or zero ... nine)")
        return [SOT, *ids, EOT]

    def encode_batch(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        """Transcripts -> (ids (B, length) int64 padded with PAD, lengths (B,) counting SOT and EOT)."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("encode_batch takes a non-empty list of transcripts")
        rows = [self.encode(t) for t in texts]
        longest = max(map(len, rows))
        if longest > length:
            raise ValueError(f"a transcript has {longest} tokens with SOT and EOT, more than length = {length}")
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)  # (B, length)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, torch.tensor([len(r) for r in rows])

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> "3 1 4": skips SOT, stops at the first EOT. A stray PAD or SOT after the
        start is kept as a word of its own ("<|pad|>"), so the word error rate counts it."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (L,), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        words = []
        for position, i in enumerate(ids):
            if not 0 <= int(i) < len(self.itos):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.itos)} tokens")
            if i == EOT:
                break
            if i == SOT and position == 0:
                continue
            words.append(self.itos[i])
        return " ".join(words)
# ANCHOR_END: tokenizer


# --------------------------------------------------------------------------- speech

# espeak-ng voices: an accent ("en-us") and optionally a speaker variant ("+f3": another
# pitch, formants and breathiness). Training draws from the first list; the held-out
# voices combine an accent and variants that training never hears.
_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-029", "en-gb-x-gbcwmd")
_VARIANTS = ("", "+m1", "+m3", "+m4", "+f1", "+f3", "+f5")
TRAIN_VOICES = tuple(accent + variant for accent in _ACCENTS for variant in _VARIANTS)
HELDOUT_VOICES = ("en-gb-scotland+m2", "en-gb-scotland+f2")

INSTALL_HINT = (
    "espeak-ng is not installed (it synthesises the spoken digits). "
    "Debian/Ubuntu: `apt-get install espeak-ng` (`make test` does it where it runs as root); "
    "macOS: `brew install espeak-ng`."
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def require_espeak() -> None:
    """RuntimeError with how to install espeak-ng, unless it is on PATH."""
    if not espeak_available():
        raise RuntimeError(INSTALL_HINT)


@functools.lru_cache(maxsize=1)
def _espeak_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(accents, variants) espeak-ng knows: the Language and Other Languages columns of
    ``--voices`` ("en" is listed as another name of en-gb: "(en 2)") and the file names of
    ``--voices=variant`` ("f3", "m2", ...)."""
    def table(*args: str) -> list[list[str]]:
        listing = subprocess.run(["espeak-ng", *args], capture_output=True, text=True, timeout=30).stdout
        return [line.split() for line in listing.splitlines()[1:] if len(line.split()) >= 5]

    rows = table("--voices")
    accents = frozenset(row[1] for row in rows) | frozenset(
        name for row in rows for name in re.findall(r"\(([^\s()]+)", " ".join(row[5:]))
    )
    variants = frozenset(row[4].split("/")[-1] for row in table("--voices=variant"))
    return accents, variants


def check_voice(voice: str) -> None:
    """ValueError unless ``voice`` is an espeak-ng accent, optionally + a variant ("en-us+f3").

    espeak-ng itself falls back to its default voice for a name it does not know,
    which would silently make every "held-out voice" the same one.
    """
    if not isinstance(voice, str) or voice.count("+") > 1:
        raise ValueError(f"voice must be 'accent' or 'accent+variant' such as 'en-us+f3', got {voice!r}")
    require_espeak()
    accent, _, variant = voice.partition("+")
    accents, variants = _espeak_voices()
    if accent not in accents or (variant and variant not in variants):
        raise ValueError(f"espeak-ng has no voice {voice!r} (accents: `espeak-ng --voices`, "
                         "variants: `espeak-ng --voices=variant`)")


# ANCHOR: synthesize
def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit mono WAV bytes -> (samples (n,) float32 in [-1, 1), sample rate).

    ``espeak-ng --stdout`` cannot seek back to write the data size into the
    header, so the header claims ~2^30 frames; `wave` then reads to the end of
    the bytes, which is the whole clip.
    """
    with wave.open(io.BytesIO(data)) as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise ValueError(
                f"expected 16-bit mono WAV, got {8 * f.getsampwidth()}-bit with {f.getnchannels()} channels"
            )
        rate = f.getframerate()
        pcm = f.readframes(f.getnframes())
    pcm = pcm[: len(pcm) // 2 * 2]  # whole 2-byte samples only
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, rate


def synthesize(text: str, voice: str = "en", speed: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak the digit string ``text`` ("3 1 4") with espeak-ng.

    voice: an espeak-ng voice, e.g. "en-us" or "en+f3" (see TRAIN_VOICES).
    speed: words per minute (espeak-ng's -s, 80 ... 450).
    pitch: espeak-ng's -p, 0 ... 99 (50 is the voice's own pitch).
    Returns (samples (n,) float32, sample rate), 22,050 Hz for espeak-ng's voices.
    The digits are spelt out as words first ("three one four"), so the reading
    never depends on how a voice says a number.
    """
    require_espeak()
    words = " ".join(DIGIT_WORDS[i] for i in DigitTokenizer().encode(text)[1:-1])
    if not words:
        raise ValueError("nothing to say: the digit string is empty")
    if isinstance(speed, bool) or not isinstance(speed, int) or not 80 <= speed <= 450:
        raise ValueError(f"speed must be an int number of words per minute in [80, 450], got {speed!r}")
    if isinstance(pitch, bool) or not isinstance(pitch, int) or not 0 <= pitch <= 99:
        raise ValueError(f"pitch must be an int in [0, 99], got {pitch!r}")
    check_voice(voice)
    done = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), words], capture_output=True, timeout=60
    )
    if done.returncode != 0 or len(done.stdout) <= 44:  # 44 bytes: a header without samples
        message = done.stderr.decode(errors="replace").strip()
        raise ValueError(f"espeak-ng made no audio for voice {voice!r}: {message or 'no output'}")
    return read_wav(done.stdout)
# ANCHOR_END: synthesize


# --------------------------------------------------------------------------- resampling

# ANCHOR: resample
def resample(audio: Tensor, orig_rate: int, new_rate: int = SAMPLE_RATE, *, zeros: int = 16,
             rolloff: float = 0.945) -> Tensor:
    """Change the sample rate with a polyphase windowed-sinc filter.

    audio: (..., n) float -> (..., n * new_rate // orig_rate).

    Output sample m sits at input time t = m * orig / new (in input samples); it is
    the sum of the inputs around t weighted by a low-pass sinc, the interpolator
    of a band-limited signal:

        y[m] = sum_k x[k] c sinc(c (t - k)) w(t - k),   c = rolloff * min(1, new / orig)

    c puts the cut-off just below the lower Nyquist frequency (8 kHz for 16 kHz out,
    so nothing above it folds back as an alias); w is a Hann window over ``zeros``
    zero crossings of the sinc on each side. With up / down = new / orig in lowest
    terms (320 / 441 for 22,050 -> 16,000 Hz), the fraction t - floor(t) takes only
    `up` values: `up` filters ("phases"), computed once. And the pattern repeats:
    every block of `down` inputs gives `up` outputs, output m0 of a block using
    its own phase at its own offset in the block. So the phases, each placed at
    its offset, form one (up, K) matrix, and resampling is one matrix product with
    the overlapping blocks of the input (a strided view, no copy). Float64 inside;
    the output has the input's dtype. Samples outside the clip count as zeros.
    """
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise ValueError(f"{name} must be a positive int in Hz, got {rate!r}")
    if not isinstance(audio, Tensor) or not audio.is_floating_point() or audio.dim() == 0:
        raise ValueError("audio must be a floating-point tensor of shape (..., n)")
    if not 0 < rolloff <= 1 or zeros < 1:
        raise ValueError(f"need 0 < rolloff <= 1 and zeros >= 1, got {rolloff}, {zeros}")
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    if up > 4096:
        raise ValueError(f"{orig_rate} -> {new_rate} Hz needs {up} filter phases; at most 4096 are supported")
    n_out = audio.shape[-1] * up // down
    if n_out == 0:
        return audio[..., :0].clone()
    cutoff = rolloff * min(1.0, up / down)  # as a fraction of the input's Nyquist frequency
    half = math.ceil(zeros / cutoff)  # taps on each side of t: `zeros` zero crossings of the sinc

    # The up phases: output m0 of a block sits at t = m0 * down / up = start + frac.
    m0 = torch.arange(up)
    start, frac = m0 * down // up, (m0 * down % up).double() / up  # (up,) each
    taps = torch.arange(-half + 1, half + 1)  # (2 half,): inputs k = start + j around t
    tau = frac[:, None] - taps  # (up, 2 half): t - k
    window = 0.5 * (1 + torch.cos(math.pi * tau / half))  # Hann, zero at |t - k| = half
    filters = cutoff * torch.sinc(cutoff * tau) * window  # (up, 2 half); torch.sinc is sin(pi x)/(pi x)

    # Each phase at its offset in a block: input k = start + j is column start + j + half - 1.
    width = int(start[-1]) + 2 * half  # K
    matrix = torch.zeros(up, width, dtype=torch.float64)  # (up, K)
    matrix.scatter_(1, start[:, None] + taps + half - 1, filters)

    blocks = -(-n_out // up)  # R = ceil(n_out / up)
    left = half - 1  # so that input k = -half + 1 (the first tap of output 0) is column 0
    right = max(0, down * (blocks - 1) + width - left - audio.shape[-1])
    padded = torch.nn.functional.pad(audio.to(torch.float64), (left, right))  # (..., left + n + right)
    windows = padded.unfold(-1, width, down)[..., :blocks, :]  # (..., R, K): block r starts at input r * down
    out = (windows @ matrix.T).flatten(-2)  # (..., R, up) -> (..., R * up)
    return out[..., :n_out].to(audio.dtype)  # (..., n_out)
# ANCHOR_END: resample


def trim_silence(audio: Tensor, rate: int = SAMPLE_RATE, *, threshold: float = 0.01,
                 margin: float = 0.05) -> Tensor:
    """Cut leading and trailing near-silence: (n,) -> (n',).

    A 10 ms frame counts as sound when its peak exceeds ``threshold`` times the
    clip's peak (-40 dB); ``margin`` seconds are kept on each side of the sound.
    espeak-ng leaves a few hundred ms of silence at the end, which would only use
    up the fixed window.
    """
    if audio.dim() != 1 or audio.numel() == 0:
        raise ValueError(f"trim_silence takes one clip (n,) with n >= 1, got shape {tuple(audio.shape)}")
    peak = audio.abs().max()
    if peak == 0:
        return audio
    frame = max(1, rate // 100)
    loud = (audio.abs() > threshold * peak).nonzero()[:, 0]  # sample indices above the threshold
    keep = int(margin * rate) + frame
    return audio[max(0, int(loud[0]) - keep) : int(loud[-1]) + keep + 1]


def spoken_clip(text: str, voice: str = "en", speed: int = 175, pitch: int = 50) -> Tensor:
    """One clip at 16 kHz, silence trimmed: (n,) float32."""
    samples, rate = synthesize(text, voice, speed, pitch)
    return trim_silence(resample(torch.from_numpy(samples), rate, SAMPLE_RATE))


# --------------------------------------------------------------------------- the data set

# ANCHOR: SpokenDigits
@dataclass
class SpokenDigits:
    """Clips ready for the model.

    mel: (N, n_mels, 100 * seconds) log-mel features (tiny_mm.audio), each clip
        padded with silence to the same few seconds.
    tokens: (N, L) [SOT, digits..., EOT, PAD...]; lengths: (N,) counting SOT and EOT.
    texts: N transcripts such as "3 1 4"; voices, speeds, pitches: who spoke each, how
        fast (words per minute), how high (espeak-ng's 0-99).
    seconds: the clips' duration (longest clip before padding: ``longest``).
    """

    mel: Tensor
    tokens: Tensor
    lengths: Tensor
    texts: list[str]
    voices: list[str]
    speeds: list[int]
    pitches: list[int]
    seconds: float
    longest: float

    def __len__(self) -> int:
        return len(self.texts)


def draw_strings(n: int, seed: int, *, min_digits: int = 3, max_digits: int = 6,
                 exclude: set[str] = frozenset()) -> list[str]:
    """n distinct digit strings ("3 1 4"), lengths uniform in [min_digits, max_digits], none in exclude."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    possible = sum(10**k for k in range(min_digits, max_digits + 1)) - len(exclude)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= possible // 2:
        raise ValueError(f"n must be an int in [1, {possible // 2}] (half of the strings possible), got {n!r}")
    rng = np.random.default_rng(seed)
    strings: dict[str, None] = {}  # insertion-ordered set
    while len(strings) < n:
        k = int(rng.integers(min_digits, max_digits + 1))
        s = " ".join(str(d) for d in rng.integers(0, 10, size=k))
        if s not in exclude:
            strings[s] = None
    return list(strings)


def split_strings(n_train: int, n_test: int, seed: int, **lengths) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out strings: no held-out string is ever heard in training."""
    train = draw_strings(n_train, seed, **lengths)
    return train, draw_strings(n_test, seed + 1, exclude=set(train), **lengths)


def draw_speakers(n: int, seed: int, voices: Sequence[str] = TRAIN_VOICES, speeds: tuple[int, int] = (160, 240),
                  pitches: tuple[int, int] = (50, 50)) -> tuple[list[str], list[int], list[int]]:
    """Per clip: a voice (uniform among ``voices``), a speed in words per minute and a pitch
    (each uniform in its (low, high) range, ends included)."""
    if not voices:
        raise ValueError("voices must name at least one espeak-ng voice")
    if not 80 <= speeds[0] <= speeds[1] <= 450:
        raise ValueError(f"speeds must be (low, high) words per minute within [80, 450], got {speeds}")
    if not 0 <= pitches[0] <= pitches[1] <= 99:
        raise ValueError(f"pitches must be (low, high) within [0, 99], got {pitches}")
    rng = np.random.default_rng([seed, 7])
    chosen = [voices[i] for i in rng.integers(0, len(voices), size=n)]
    fast = [int(s) for s in rng.integers(speeds[0], speeds[1] + 1, size=n)]
    return chosen, fast, [int(p) for p in rng.integers(pitches[0], pitches[1] + 1, size=n)]


def make_clips(
    texts: Sequence[str],
    voices: Sequence[str],
    speeds: Sequence[int],
    pitches: Sequence[int] | None = None,
    *,
    seconds: float = 3.0,
    n_mels: int = 80,
    workers: int = 2,
    cache: str | Path | None = None,
) -> SpokenDigits:
    """Synthesise, resample, trim and featurise one clip per (text, voice, speed, pitch).

    pitches: None speaks every clip at pitch 50 (each voice's own).

    seconds: every clip is padded with silence to this length (100 mel frames per
        second); a clip that does not fit is an error, never silently cut.
    workers: espeak-ng processes run at once (each clip is one short process).
    cache: a .pt file; if it exists and holds the same texts, voices, speeds, pitches and
        settings it is loaded instead, otherwise the clips are made and saved there.
    """
    pitches = [50] * len(texts) if pitches is None else pitches
    if not (len(texts) == len(voices) == len(speeds) == len(pitches)) or len(texts) == 0:
        raise ValueError(f"need one voice, speed and pitch per text, got {len(texts)}, {len(voices)}, "
                         f"{len(speeds)}, {len(pitches)}")
    frames = round(seconds * SAMPLE_RATE / HOP_LENGTH)
    if frames < 2 or frames % 2 or abs(frames * HOP_LENGTH - seconds * SAMPLE_RATE) > 1e-6:
        raise ValueError(f"seconds must be a positive multiple of 0.02 (an even number of 10 ms frames), got {seconds}")
    key = {"texts": list(texts), "voices": list(voices), "speeds": [int(s) for s in speeds],
           "pitches": [int(p) for p in pitches],
           "seconds": float(seconds), "n_mels": int(n_mels)}
    if cache is not None and Path(cache).is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["key"] == key:
            return SpokenDigits(**stored["data"], **{k: key[k] for k in ("texts", "voices", "speeds", "pitches")})
    require_espeak()
    n_samples = frames * HOP_LENGTH
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # espeak-ng runs outside the GIL
        clips = list(pool.map(spoken_clip, texts, voices, speeds, pitches))
    longest = max(c.shape[0] for c in clips)
    if longest > n_samples:
        worst = int(np.argmax([c.shape[0] for c in clips]))
        raise ValueError(
            f"clip {texts[worst]!r} ({voices[worst]}, {speeds[worst]} wpm) lasts {longest / SAMPLE_RATE:.2f} s, "
            f"more than seconds = {seconds}: raise seconds or the slowest speed"
        )
    audio = torch.stack([pad_or_trim(c, n_samples) for c in clips])  # (N, n_samples), silence after each clip
    # In chunks: the STFT of all clips at once would hold ~0.5 MB of complex numbers per clip.
    mel = torch.cat([log_mel_spectrogram(chunk, n_mels) for chunk in audio.split(256)])  # (N, n_mels, frames)
    tokens, lengths = DigitTokenizer().encode_batch(list(texts), max(map(len, (t.split() for t in texts))) + 2)
    data = {"mel": mel, "tokens": tokens, "lengths": lengths, "seconds": float(seconds),
            "longest": longest / SAMPLE_RATE}
    if cache is not None:
        torch.save({"key": key, "data": data}, cache)
    return SpokenDigits(**data, **{k: key[k] for k in ("texts", "voices", "speeds", "pitches")})
# ANCHOR_END: SpokenDigits


# --------------------------------------------------------------------------- scoring

# ANCHOR: wer
def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences: the fewest substitutions,
    insertions and deletions that turn the reference into the hypothesis.

    Dynamic programming, one row at a time: row[j] is the distance between the
    reference words read so far and the first j hypothesis words.
    """
    row = list(range(len(hypothesis) + 1))  # from no reference words: j insertions
    for i, ref_word in enumerate(reference, start=1):
        diagonal, row[0] = row[0], i  # i deletions reach an empty hypothesis
        for j, hyp_word in enumerate(hypothesis, start=1):
            diagonal, row[j] = row[j], min(
                row[j] + 1,  # delete ref_word
                row[j - 1] + 1,  # insert hyp_word
                diagonal + (ref_word != hyp_word),  # match, or substitute
            )
    return row[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """WER of a set: the summed word-level edit distances over the summed reference words.

    Summing before dividing weighs every word the same (a mean of per-string rates
    would weigh a word of a short string more). Can exceed 1 (insertions).
    """
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("word_error_rate takes lists of transcripts, not one string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    words = sum(len(r.split()) for r in references)
    if words == 0:
        raise ValueError("the references hold no words")
    return sum(edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses)) / words
# ANCHOR_END: wer
