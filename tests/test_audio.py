"""tiny_mm.audio (PyTorch, batched) against the NumPy reference of chapter 9 and openai-whisper.

Bars, float32 against the float64 reference: relative error 1e-5 on the
power spectrum, 1e-4 absolute on the log-mel scale (float32 rounding of the
loud bins shows most in the quietest bins, just above the 8-decade floor).
Float64 input is computed in float64 and meets 1e-10.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch09_whisper.reference as ref
from tiny_mm import audio

SR = ref.SAMPLE_RATE
LOG_MEL_ATOL = 1e-4


def rel_err(out: torch.Tensor, expected: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert np.all(np.isfinite(out)), "non-finite values"
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def max_abs(out: torch.Tensor, expected: np.ndarray) -> float:
    out = out.detach().cpu().double().numpy()
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert np.all(np.isfinite(out)), "non-finite values"
    return float(np.max(np.abs(out - expected)))


def batch_of_clips(rng, n: int) -> np.ndarray:
    """(4, n) float32: a tone, a chirp, quiet noise, a loud tone over noise (loudness varies 1000x)."""
    t = np.arange(n) / SR
    seconds = n / SR
    f0, f1 = rng.uniform(50, 500), rng.uniform(3_000, 7_900)
    clips = [
        rng.uniform(0.1, 0.9) * np.sin(2 * np.pi * rng.uniform(60, 7_500) * t + rng.uniform(0, 6)),
        0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2)),
        1e-3 * rng.standard_normal(n),
        0.9 * np.sin(2 * np.pi * rng.uniform(100, 1_000) * t) + 0.05 * rng.standard_normal(n),
    ]
    return np.stack(clips).astype(np.float32)


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("n_mels", [80, 128, 40])
def test_mel_filters_match_the_reference(n_mels):
    expected = ref.mel_filterbank(n_mels)
    assert max_abs(audio.mel_filters(n_mels, dtype=torch.float64), expected) < 1e-14
    f32 = audio.mel_filters(n_mels)
    assert f32.dtype == torch.float32 and rel_err(f32, expected) < 1e-7
    audio.mel_filters(n_mels, dtype=torch.float64).zero_()  # a caller's edit must not reach the cache
    assert max_abs(audio.mel_filters(n_mels, dtype=torch.float64), expected) < 1e-14


@pytest.mark.parametrize("n", [201, 1_601, 16_037])
def test_power_spectrum_matches_the_reference(rng, n):
    x = rng.standard_normal((3, n)).astype(np.float32)
    out = audio.power_spectrum(torch.from_numpy(x))  # (3, 201, n // 160)
    assert out.dtype == torch.float32 and out.shape == (3, 201, n // ref.HOP_LENGTH)
    for b in range(3):
        assert rel_err(out[b], ref.power_spectrum(x[b])) < 1e-5
    out64 = audio.power_spectrum(torch.from_numpy(x).double())
    assert out64.dtype == torch.float64
    assert rel_err(out64[0], ref.power_spectrum(x[0])) < 1e-12


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_features_match_the_reference_per_clip(rng, n_mels):
    for seconds in (3.3, 31.0):  # padded with silence, trimmed
        x = batch_of_clips(rng, int(seconds * SR))
        out = audio.whisper_features(torch.from_numpy(x), n_mels)
        assert out.shape == (4, n_mels, audio.N_FRAMES)
        for b in range(4):
            assert max_abs(out[b], ref.whisper_features(x[b], n_mels)) < LOG_MEL_ATOL


def test_any_length_and_one_dimensional_input(rng):
    x = batch_of_clips(rng, 5_000)
    batched = audio.log_mel_spectrogram(torch.from_numpy(x), 80)
    assert batched.shape == (4, 80, 5_000 // ref.HOP_LENGTH)
    for b in range(4):
        single = audio.log_mel_spectrogram(torch.from_numpy(x[b]), 80)  # (80, 31)
        assert single.shape == (80, 31)
        assert max_abs(single, ref.log_mel_spectrogram(x[b], 80)) < LOG_MEL_ATOL
        assert torch.allclose(single, batched[b], rtol=0, atol=1e-6)  # batching changes nothing


def test_float64_input_stays_float64(rng):
    x = batch_of_clips(rng, 20_000).astype(np.float64)
    out = audio.log_mel_spectrogram(torch.from_numpy(x), 128)
    assert out.dtype == torch.float64
    for b in range(4):
        assert max_abs(out[b], ref.log_mel_spectrogram(x[b], 128)) < 1e-10


def test_half_precision_input_is_computed_in_float32(rng):
    x = torch.from_numpy(batch_of_clips(rng, 8_000)).half()
    out = audio.log_mel_spectrogram(x, 80)
    assert out.dtype == torch.float32
    expected = ref.log_mel_spectrogram(x[1].double().numpy(), 80)  # the same (fp16-rounded) samples
    assert max_abs(out[1], expected) < LOG_MEL_ATOL


def test_silence_gives_the_clamp_value():
    out = audio.whisper_features(torch.zeros(2, 1_000), 80)
    assert torch.all(out == (np.log10(1e-10) + 4.0) / 4.0)


# --------------------------------------------------------------------------- against openai-whisper


def test_each_clip_gets_what_whisper_gives_it_alone(rng):
    """openai-whisper floors a batch at one shared maximum; tiny_mm floors each clip at its own."""
    whisper_audio = pytest.importorskip("whisper.audio", reason="openai-whisper is not installed")
    x = torch.from_numpy(batch_of_clips(rng, 3 * SR))
    padded = whisper_audio.pad_or_trim(x)  # (4, 480000)
    ours = audio.whisper_features(x, 80)
    for b in range(4):
        alone = whisper_audio.log_mel_spectrogram(padded[b], 80).double().numpy()
        assert max_abs(ours[b], alone) < LOG_MEL_ATOL
    # The quiet noise clip (index 2) is floored by its loud neighbours in whisper's batch.
    together = whisper_audio.log_mel_spectrogram(padded, 80)
    alone_quiet = whisper_audio.log_mel_spectrogram(padded[2], 80)
    assert (together[2] - alone_quiet).abs().max() > 0.1


# --------------------------------------------------------------------------- GPU


@pytest.mark.requires_cuda
def test_cuda_matches_the_reference(rng):
    x = batch_of_clips(rng, 10 * SR)
    out = audio.whisper_features(torch.from_numpy(x).cuda(), 128)
    assert out.device.type == "cuda"
    for b in range(4):
        assert max_abs(out[b], ref.whisper_features(x[b], 128)) < LOG_MEL_ATOL


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: audio.log_mel_spectrogram(torch.zeros(2, 3, 1_000)), "n_samples"),
        (lambda: audio.log_mel_spectrogram(torch.tensor(0.5)), "n_samples"),
        (lambda: audio.whisper_features(torch.zeros(2, 1_000, dtype=torch.int16)), "floating point"),
        (lambda: audio.whisper_features(torch.zeros(1_000, dtype=torch.bool)), "floating point"),
        (lambda: audio.log_mel_spectrogram(np.zeros((2, 1_000), np.float32)), "torch.Tensor"),
        (lambda: audio.log_mel_spectrogram(torch.zeros(2, 1_000), sample_rate=8_000), "16000 Hz"),
        (lambda: audio.log_mel_spectrogram(torch.zeros(2, 200)), "more than 200 samples"),
        (lambda: audio.whisper_features(torch.zeros(2, 1_000), 0), "n_mels"),
        (lambda: audio.log_mel_spectrogram(torch.zeros(2, 1_000), 80.0), "n_mels"),
        (lambda: audio.pad_or_trim(torch.zeros(2, 10), 0), "length"),
    ],
    ids=["3-D", "0-D", "int16", "bool", "numpy", "8kHz", "too-short", "n_mels-0", "n_mels-float",
         "length-0"],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
