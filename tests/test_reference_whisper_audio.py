"""The NumPy log-mel reference of chapter 9 against independent checks and openai-whisper.

Three layers of checks that share no code with the reference:
- its pieces against torch in float64 (periodic Hann window, centred
  reflect-padded STFT) and against definitions (the Slaney mel scale's
  anchor points, unit-area triangles, volume only shifting the features);
- its mel filterbank against the matrices openai-whisper ships;
- the whole front end against ``whisper.audio.log_mel_spectrogram`` on
  signals made here: tones, chirps, noise, silence, clips shorter and longer
  than 30 s, and speech from espeak-ng when it is installed.

openai-whisper computes in float32 (float32 input, float32 filters), so the
bar against it is 1e-4 absolute on the log-mel scale. The largest errors
(up to 8e-5 over 40 random tones and chirps) sit in the quietest bins, just
above the 8-decade floor, where float32 rounding of the loud bins is a large
fraction of the quiet ones; two decades above the floor they stay under 1e-5.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

import chapters.ch09_whisper.reference as ref

whisper_audio = pytest.importorskip("whisper.audio", reason="openai-whisper is not installed")

SR = ref.SAMPLE_RATE
LOG_MEL_ATOL = 1e-4  # against openai-whisper's float32 pipeline


def whisper_log_mel(audio: np.ndarray, n_mels: int, padding: int = 0) -> np.ndarray:
    """openai-whisper's own features of one float32 clip, as float64 NumPy."""
    out = whisper_audio.log_mel_spectrogram(audio.astype(np.float32), n_mels, padding=padding)
    return out.numpy().astype(np.float64)


def whisper_30s(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """What whisper's README and `decode` path feed the encoder: pad_or_trim, then log-mel."""
    return whisper_log_mel(whisper_audio.pad_or_trim(audio.astype(np.float32)), n_mels)


def max_abs(out: np.ndarray, expected: np.ndarray) -> float:
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert np.all(np.isfinite(out)), "non-finite values in the reference's output"
    return float(np.max(np.abs(out - expected)))


# --------------------------------------------------------------------------- signals


def tone(rng, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    freq, amp, phase = rng.uniform(60, 7_500), rng.uniform(0.05, 0.9), rng.uniform(0, 2 * np.pi)
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def chirp(rng, seconds: float) -> np.ndarray:
    """A linear sweep from f0 to f1 Hz: every mel band lights up at some point."""
    t = np.arange(int(seconds * SR)) / SR
    f0, f1 = rng.uniform(50, 500), rng.uniform(3_000, 7_900)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)  # integral of the frequency
    return (rng.uniform(0.1, 0.9) * np.sin(phase)).astype(np.float32)


def noise(rng, seconds: float) -> np.ndarray:
    return (rng.uniform(0.01, 0.3) * rng.standard_normal(int(seconds * SR))).astype(np.float32)


SIGNALS = {
    "tone_10s": lambda rng: tone(rng, 10.0),
    "chirp_30s": lambda rng: chirp(rng, 30.0),
    "noise_30s": lambda rng: noise(rng, 30.0),
    "silence_30s": lambda rng: np.zeros(ref.N_SAMPLES, dtype=np.float32),
    "short_tone_plus_noise_2.37s": lambda rng: tone(rng, 2.37) + noise(rng, 2.37),
    "long_chirp_plus_noise_34.5s": lambda rng: chirp(rng, 34.5) + noise(rng, 34.5),
}


# --------------------------------------------------------------------------- pieces


def test_hann_window_is_torchs_periodic_window():
    for n in (4, 7, ref.N_FFT):
        expected = torch.hann_window(n, periodic=True, dtype=torch.float64).numpy()
        assert np.max(np.abs(ref.hann_window(n) - expected)) < 1e-15
    # Periodic: windows hopped by n / 2 add up to exactly one (the symmetric window does not).
    w = ref.hann_window(ref.N_FFT)
    assert np.max(np.abs(w[:200] + w[200:] - 1.0)) < 1e-15


@pytest.mark.parametrize("n", [201, 202, 1_000, 16_037])
def test_frames_are_centred_with_reflect_padding(rng, n):
    x = rng.standard_normal(n)
    padded = np.pad(x, ref.N_FFT // 2, mode="reflect")  # NumPy's own reflect: edge not repeated
    frames = ref.frame_signal(x)
    assert frames.shape == (1 + n // ref.HOP_LENGTH, ref.N_FFT)
    for t in (0, len(frames) // 2, len(frames) - 1):
        start = t * ref.HOP_LENGTH
        assert np.array_equal(frames[t], padded[start : start + ref.N_FFT])


@pytest.mark.parametrize("n", [201, 1_000, 16_037, 48_000])
def test_power_spectrum_matches_torch_stft_in_float64(rng, n):
    x = rng.standard_normal(n)
    window = torch.hann_window(ref.N_FFT, dtype=torch.float64)
    stft = torch.stft(torch.from_numpy(x), ref.N_FFT, ref.HOP_LENGTH, window=window, return_complex=True)
    expected = (stft.abs() ** 2).numpy()[:, :-1]  # whisper drops the last frame
    out = ref.power_spectrum(x)
    assert out.shape == (ref.N_FFT // 2 + 1, n // ref.HOP_LENGTH)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-12


def test_slaney_mel_scale_anchor_points(rng):
    # Linear at 200/3 Hz per mel up to 1 kHz (= 15 mels), then 27 mels per factor 6.4.
    assert ref.hz_to_mel(0.0) == 0.0
    assert abs(ref.hz_to_mel(200.0 / 3.0) - 1.0) < 1e-12
    assert abs(ref.hz_to_mel(1000.0) - 15.0) < 1e-12
    assert abs(ref.hz_to_mel(6400.0) - 42.0) < 1e-12
    assert abs(ref.hz_to_mel(1000.0 * 6.4**2) - 69.0) < 1e-12
    # Continuous at the 1 kHz knee, and mel_to_hz inverts hz_to_mel everywhere.
    assert abs(ref.hz_to_mel(1000.0 - 1e-9) - ref.hz_to_mel(1000.0 + 1e-9)) < 1e-9
    f = np.concatenate([rng.uniform(0, 1000, 50), rng.uniform(1000, 8000, 50)])
    assert np.max(np.abs(ref.mel_to_hz(ref.hz_to_mel(f)) - f)) < 1e-9


def test_filters_have_unit_area_and_peak_at_their_centres():
    # With a 1 Hz bin spacing the Riemann sum over bins is the triangle's area in Hz.
    fb = ref.mel_filterbank(40, n_fft=ref.SAMPLE_RATE)  # (40, 8001)
    assert np.max(np.abs(fb.sum(axis=1) * 1.0 - 1.0)) < 1e-4  # measured 4.4e-5
    edges = ref.mel_to_hz(np.linspace(0, ref.hz_to_mel(8000.0), 42))
    peaks = np.argmax(fb, axis=1)  # bin index == Hz here
    assert np.max(np.abs(peaks - edges[1:-1])) < 1.0  # a neighbouring bin of the true peak
    assert np.all(fb >= 0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filterbank_matches_the_one_whisper_ships(n_mels):
    shipped = whisper_audio.mel_filters("cpu", n_mels).numpy().astype(np.float64)  # float32 in the file
    ours = ref.mel_filterbank(n_mels)
    assert ours.shape == shipped.shape == (n_mels, ref.N_FFT // 2 + 1)
    # Measured: max |diff| 1.3e-9 (80) and 2.3e-9 (128), i.e. 5e-8 of the largest weight:
    # the shipped matrix is our float64 one rounded to float32 (eps 6e-8).
    assert np.max(np.abs(ours - shipped)) < 1e-8
    assert np.max(np.abs(ours - shipped)) / np.max(shipped) < 1.2e-7
    assert np.array_equal(ours > 0, shipped > 0)  # the same support, bin for bin


# --------------------------------------------------------------------------- the whole front end


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("signal", list(SIGNALS))
def test_features_match_openai_whisper(rng, signal, n_mels):
    audio = SIGNALS[signal](rng)
    out = ref.whisper_features(audio, n_mels)
    assert out.shape == (n_mels, ref.N_FRAMES)
    expected = whisper_30s(audio, n_mels)
    assert max_abs(out, expected) < LOG_MEL_ATOL
    # Away from the floor float32 rounding matters far less: bins two decades (0.5) above it.
    loud = out > out.min() + 0.5
    if loud.any():
        assert np.max(np.abs(out - expected)[loud]) < 2e-5


@pytest.mark.parametrize("n", [201, 1_000, 16_001, 40_000])
def test_any_length_matches_openai_whisper_without_padding(rng, n):
    audio = noise(rng, n / SR)[:n] + tone(rng, n / SR)[:n]
    out = ref.log_mel_spectrogram(audio, 80)
    assert out.shape == (80, n // ref.HOP_LENGTH)
    assert max_abs(out, whisper_log_mel(audio, 80)) < LOG_MEL_ATOL


def test_transcribe_path_pads_30s_of_silence_and_floors_over_the_whole_file(rng):
    """whisper.transcribe calls log_mel_spectrogram(audio, padding=N_SAMPLES) on the whole
    recording, then cuts 3,000-frame windows: one floor (peak - 8) for the whole file."""
    audio = chirp(rng, 33.0) + noise(rng, 33.0)
    expected = whisper_log_mel(audio, 80, padding=ref.N_SAMPLES)
    out = ref.log_mel_spectrogram(np.concatenate([audio, np.zeros(ref.N_SAMPLES, np.float32)]), 80)
    assert out.shape == (80, 6_300)
    assert max_abs(out, expected) < LOG_MEL_ATOL


def test_silence_is_the_clamp_everywhere():
    # Zero power -> clamp to 1e-10 -> log10 = -10; the peak is -10 too, so the floor does nothing.
    expected_value = (np.log10(1e-10) + 4.0) / 4.0
    out = ref.whisper_features(np.zeros(ref.N_SAMPLES // 3), 80)
    assert np.all(out == expected_value)
    assert np.all(whisper_30s(np.zeros(ref.N_SAMPLES // 3), 80) == expected_value)


def test_floor_keeps_eight_decades_and_volume_only_shifts(rng):
    audio = chirp(rng, 4.0).astype(np.float64)
    out = ref.log_mel_spectrogram(audio, 80)
    assert np.isclose(out.max() - out.min(), 2.0)  # 8 decades / 4: the floor is reached here
    # Power scales by c^2, log10 by 2 log10(c), the output by log10(c) / 2, floor included.
    for c in (0.25, 7.0):  # much quieter and the floor would sink below the 1e-10 clamp
        shifted = ref.log_mel_spectrogram(c * audio, 80)
        assert np.max(np.abs(shifted - out - np.log10(c) / 2)) < 1e-12


def test_padding_and_trimming_to_30s(rng):
    short, long = rng.standard_normal(1_234), rng.standard_normal(ref.N_SAMPLES + 999)
    padded, trimmed = ref.pad_or_trim(short), ref.pad_or_trim(long)
    assert padded.shape == trimmed.shape == (ref.N_SAMPLES,)
    assert np.array_equal(padded[:1_234], short) and not np.any(padded[1_234:])
    assert np.array_equal(trimmed, long[: ref.N_SAMPLES])
    # Trimming happens before the STFT: samples past 30 s cannot leak into the last frames.
    tail_changed = long.copy()
    tail_changed[ref.N_SAMPLES :] *= 100
    assert np.array_equal(ref.whisper_features(long), ref.whisper_features(tail_changed))


# --------------------------------------------------------------------------- speech


def read_wav_as_16k(data: bytes) -> np.ndarray:
    """A 16-bit mono WAV file (bytes) -> float32 waveform at 16 kHz (linear interpolation).

    The resampling only needs to give *some* speech-like 16 kHz signal: the
    test compares two implementations on the same samples.
    """
    with wave.open(io.BytesIO(data)) as f:
        assert f.getsampwidth() == 2 and f.getnchannels() == 1, "expected 16-bit mono audio"
        rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    x = pcm.astype(np.float64) / 32768.0
    t_out = np.arange(int(len(x) * SR / rate)) / SR
    return np.interp(t_out, np.arange(len(x)) / rate, x).astype(np.float32)


def test_wav_reader_used_by_the_speech_test(rng):
    """Keeps the speech test's helper honest where espeak-ng is missing: 22,050 Hz in, 16 kHz out."""
    rate, seconds = 22_050, 0.5
    t = np.arange(int(rate * seconds)) / rate
    pcm = np.round(0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    x = read_wav_as_16k(buf.getvalue())
    t16 = np.arange(len(x)) / SR
    assert len(x) == int(seconds * SR)
    assert np.max(np.abs(x - 0.5 * np.sin(2 * np.pi * 440 * t16))) < 5e-3


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng); "
    "tones, chirps and noise above still compare with whisper",
)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_speech_from_espeak_matches_openai_whisper(n_mels):
    text = "seven three nine, the quick brown fox jumps over the lazy dog"
    wav = subprocess.run(
        ["espeak-ng", "--stdout", "-s", "160", text],
        capture_output=True, check=True, timeout=30,
    ).stdout
    speech = read_wav_as_16k(wav)
    assert len(speech) > SR, "espeak-ng produced under a second of audio"
    out = ref.whisper_features(speech, n_mels)
    assert max_abs(out, whisper_30s(speech, n_mels)) < LOG_MEL_ATOL


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ref.whisper_features(np.zeros((2, 1_000))), "1-D"),
        (lambda: ref.whisper_features(np.zeros(1_000, dtype=np.int16)), "floating point"),
        (lambda: ref.log_mel_spectrogram(np.zeros(1_000), sample_rate=44_100), "16000 Hz"),
        (lambda: ref.log_mel_spectrogram(np.zeros(200)), "more than 200 samples"),
        (lambda: ref.log_mel_spectrogram(np.array([np.nan] * 1_000)), "NaN"),
        (lambda: ref.mel_filterbank(0), "n_mels"),
        (lambda: ref.mel_filterbank(80, fmax=9_000), "fmax"),
        (lambda: ref.pad_or_trim(np.zeros(10), 0), "length"),
    ],
    ids=["2-D", "int16", "44.1kHz", "too-short", "nan", "n_mels-0", "fmax", "length-0"],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
