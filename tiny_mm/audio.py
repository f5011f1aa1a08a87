"""Whisper's audio front end in PyTorch: batched waveforms -> log-mel spectrograms.

The PyTorch rung of chapter 9, tested against the NumPy reference in
``chapters/ch09_whisper/reference.py`` (which the chapter derives step by
step) and, above it, against openai-whisper's ``log_mel_spectrogram``.

    audio    : (B, n_samples)        16 kHz mono, floats in about [-1, 1]
    power    : (B, 201, n_frames)    |torch.stft|^2, periodic Hann 400, hop 160,
                                     reflect-centred, last frame dropped
    mel      : (B, n_mels, n_frames) Slaney-style filters (computed here) @ power
    features : (B, n_mels, n_frames) (max(log10(max(mel, 1e-10)), peak - 8) + 4) / 4

with n_frames = n_samples // 160, so 30 s (480,000 samples) -> 3,000 frames.

One deliberate difference from openai-whisper: the 8-decade floor is taken
per clip. ``whisper.audio.log_mel_spectrogram`` given a (B, n_samples) batch
takes one maximum over the whole batch, so a quiet clip's features change
with the loud clip next to it; here every clip gets exactly what whisper
gives it alone.

Every function assumes 16 kHz (Whisper's only rate); resample first.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "CHUNK_LENGTH",
    "N_SAMPLES",
    "N_FRAMES",
    "pad_or_trim",
    "mel_filters",
    "power_spectrum",
    "log_mel_spectrogram",
    "whisper_features",
]

SAMPLE_RATE = 16_000  # Hz
N_FFT = 400  # 25 ms window -> 201 frequency bins
HOP_LENGTH = 160  # 10 ms hop -> 100 frames per second
CHUNK_LENGTH = 30  # seconds per encoder input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480,000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000


# --------------------------------------------------------------------------- checks


def _check_audio(audio: Tensor, sample_rate: int) -> None:
    """ValueError unless audio is a (B, n_samples) or (n_samples,) float tensor at 16 kHz."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"sample_rate must be {SAMPLE_RATE} Hz (Whisper's only rate), got {sample_rate}: "
            "resample the audio first"
        )
    if not isinstance(audio, Tensor):
        raise ValueError(
            f"audio must be a torch.Tensor of shape (B, n_samples), got {type(audio).__name__}"
        )
    if audio.dim() not in (1, 2):
        raise ValueError(
            f"audio must be (B, n_samples) or (n_samples,), got shape {tuple(audio.shape)}"
        )
    if not audio.is_floating_point():
        raise ValueError(
            f"audio must be floating point in about [-1, 1], got dtype {audio.dtype} "
            "(int16 PCM: divide by 32768 first)"
        )


def _check_n_mels(n_mels: int) -> None:
    if not isinstance(n_mels, int) or isinstance(n_mels, bool) or n_mels < 1:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")


# --------------------------------------------------------------------------- pieces


# ANCHOR: pad_or_trim
def pad_or_trim(audio: Tensor, length: int = N_SAMPLES) -> Tensor:
    """Cut the last dimension to `length` samples or zero-pad it up to that.

    audio: (..., n_samples) -> (..., length).
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    n = audio.shape[-1]
    if n >= length:
        return audio[..., :length]
    return torch.nn.functional.pad(audio, (0, length - n))  # zeros on the right: silence
# ANCHOR_END: pad_or_trim


# ANCHOR: mel_filters
@functools.lru_cache(maxsize=8)
def _mel_filters_float64(n_mels: int) -> Tensor:
    """(n_mels, 201) Slaney mel filters in float64 on the CPU; cached, never modified."""
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0  # linear below 1 kHz: 200/3 Hz per mel
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0  # log above: 27 mels per x6.4

    def mel_to_hz(m: Tensor) -> Tensor:
        log_part = min_log_hz * torch.exp(logstep * (m - min_log_mel))
        return torch.where(m < min_log_mel, m * f_sp, log_part)

    top_mel = min_log_mel + math.log(SAMPLE_RATE / 2 / min_log_hz) / logstep  # 8 kHz > 1 kHz: log part
    edges = mel_to_hz(torch.linspace(0.0, top_mel, n_mels + 2, dtype=torch.float64))  # (n_mels + 2,)
    bins = torch.arange(N_FFT // 2 + 1, dtype=torch.float64) * SAMPLE_RATE / N_FFT  # (201,) in Hz
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1)
    rising = (bins - lower) / (centre - lower)  # (n_mels, 201)
    falling = (upper - bins) / (upper - centre)  # (n_mels, 201)
    triangles = torch.minimum(rising, falling).clamp(min=0.0)  # (n_mels, 201)
    return triangles * (2.0 / (upper - lower))  # unit area per filter ("slaney" norm)


def mel_filters(
    n_mels: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Whisper's triangular mel filterbank, (n_mels, 201), from fmin 0 to fmax 8 kHz.

    Computed from the Slaney mel scale (no file, no librosa); openai-whisper
    ships the same matrix for n_mels 80 and 128 in ``assets/mel_filters.npz``.
    """
    _check_n_mels(n_mels)
    return _mel_filters_float64(n_mels).to(device=device, dtype=dtype, copy=True)  # the cache stays intact
# ANCHOR_END: mel_filters


def _compute_dtype(audio: Tensor) -> torch.dtype:
    # torch.stft has no half-precision path on the CPU, and fp16 would overflow
    # the power spectrum of loud audio anyway: compute those in float32.
    return torch.float64 if audio.dtype == torch.float64 else torch.float32


# ANCHOR: power_spectrum
def power_spectrum(audio: Tensor, *, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """|STFT|^2 with Whisper's framing. audio: (B, n) -> (B, 201, n // 160); (n,) -> (201, n // 160).

    ``center=True`` reflect-pads 200 samples at each end, so frame t is centred
    on sample 160 t; that gives n // 160 + 1 frames, and the last is dropped
    (30 s -> exactly 3,000). Float32 unless the audio is float64.
    """
    _check_audio(audio, sample_rate)
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(
            f"audio needs more than {N_FFT // 2} samples for the reflect padding, got {audio.shape[-1]}"
        )
    audio = audio.to(_compute_dtype(audio))
    window = torch.hann_window(N_FFT, periodic=True, dtype=audio.dtype, device=audio.device)  # (400,)
    stft = torch.stft(
        audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )  # (B, 201, n // 160 + 1) complex
    return stft[..., :-1].abs() ** 2  # (B, 201, n // 160)
# ANCHOR_END: power_spectrum


# ANCHOR: log_mel
def log_mel_spectrogram(
    audio: Tensor, n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE
) -> Tensor:
    """Whisper's log-mel features of each clip, at whatever length it has (no padding).

    audio: (B, n_samples) -> (B, n_mels, n_samples // 160); a 1-D (n_samples,)
    gives (n_mels, n_samples // 160). The 8-decade floor is relative to each
    clip's own maximum (see the module docstring).
    """
    _check_n_mels(n_mels)
    power = power_spectrum(audio, sample_rate=sample_rate)  # (B, 201, T)
    mel = mel_filters(n_mels, device=power.device, dtype=power.dtype) @ power  # (B, n_mels, T)
    log_spec = mel.clamp(min=1e-10).log10()  # (B, n_mels, T)  silence -> -10, not -inf
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)  per clip
    log_spec = torch.maximum(log_spec, peak - 8.0)  # keep 8 decades below each clip's peak
    return (log_spec + 4.0) / 4.0


def whisper_features(audio: Tensor, n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """The encoder's input: pad or trim each clip to 30 s, then the log-mel.

    audio: (B, n_samples) -> (B, n_mels, 3000); (n_samples,) -> (n_mels, 3000).
    """
    _check_audio(audio, sample_rate)
    _check_n_mels(n_mels)
    return log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES), n_mels, sample_rate=sample_rate)
# ANCHOR_END: log_mel
