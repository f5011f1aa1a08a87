"""Whisper's audio front end in plain NumPy (float64): waveform -> log-mel spectrogram.

This is the bottom rung of the ladder for chapter 9: the PyTorch version in
``tiny_mm.audio`` is tested against these functions, and these functions are
tested against openai-whisper's ``whisper.audio.log_mel_spectrogram``.

The recipe, step by step (each step is one function below):

    audio  : (n_samples,)    mono waveform at 16 kHz, floats in about [-1, 1]
    pad_or_trim              zero-pad or cut to 30 s = 480,000 samples
    frames : (n_frames, 400) reflect-pad 200 samples at each end, then a 400-sample
                             window every 160 samples (25 ms windows, 10 ms hop)
    power  : (201, n_frames - 1)
                             |rfft(frame * periodic Hann)|^2; the last frame is dropped
    mel    : (n_mels, n_frames - 1)
                             Slaney-style triangular filters (80 or 128) @ power
    log    : log10(max(mel, 1e-10)), floored 8 decades below its maximum,
             then (log + 4) / 4 so typical speech lands roughly in [-1, 1]

For 30 s of audio: 480,000 samples -> 3,001 frames -> 3,000 after the drop,
which the encoder's stride-2 convolution halves to 1,500 positions.

No torch here on purpose: the reference must not share a line of code with
what it checks. Every function assumes 16 kHz; resample first (the functions
that take ``sample_rate`` refuse anything else rather than silently producing
a spectrogram on the wrong frequency axis).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "CHUNK_LENGTH",
    "N_SAMPLES",
    "N_FRAMES",
    "pad_or_trim",
    "hann_window",
    "frame_signal",
    "power_spectrum",
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
    "log_mel_spectrogram",
    "whisper_features",
]

# ANCHOR: constants
SAMPLE_RATE = 16_000  # Hz: every Whisper model hears 16 kHz mono
N_FFT = 400  # 25 ms analysis window -> 201 frequency bins, 40 Hz apart
HOP_LENGTH = 160  # 10 ms between frames -> 100 frames per second
CHUNK_LENGTH = 30  # seconds the encoder sees at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480,000 samples in a chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames in a chunk
# ANCHOR_END: constants


def _as_signal(audio, sample_rate: int) -> np.ndarray:
    """ValueError unless audio is a 1-D finite floating-point waveform at 16 kHz; float64 copy."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"sample_rate must be {SAMPLE_RATE} Hz (Whisper's only rate), got {sample_rate}: "
            "resample the audio first"
        )
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be a 1-D waveform (n_samples,), got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(
            f"audio must be floating point in about [-1, 1], got dtype {audio.dtype} "
            "(int16 PCM: divide by 32768 first)"
        )
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    return audio.astype(np.float64)


# ANCHOR: pad_or_trim
def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Cut the waveform to `length` samples, or append zeros (silence) up to it.

    audio: (n_samples,) -> (length,). Whisper always encodes exactly 30 s: a
    short clip is followed by silence, a long one is cut (the transcriber
    slides a 30 s window over long audio instead).
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be a 1-D waveform (n_samples,), got shape {audio.shape}")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if len(audio) >= length:
        return audio[:length]
    return np.concatenate([audio, np.zeros(length - len(audio), dtype=audio.dtype)])
# ANCHOR_END: pad_or_trim


# ANCHOR: stft
def hann_window(n: int) -> np.ndarray:
    """The *periodic* Hann window of length n: 0.5 - 0.5 cos(2 pi k / n), k = 0 .. n-1.

    Periodic (divide by n, not n - 1) is what ``torch.hann_window`` returns by
    default: the window is one period of a raised cosine, so copies shifted by
    n / 2 sum to exactly one.
    """
    k = np.arange(n)
    return 0.5 - 0.5 * np.cos(2 * np.pi * k / n)


def frame_signal(audio: np.ndarray, n_fft: int = N_FFT, hop: int = HOP_LENGTH) -> np.ndarray:
    """Slice the waveform into overlapping frames centred on t = 0, hop, 2 hop, ...

    audio: (n_samples,) -> (1 + n_samples // hop, n_fft). To centre the first
    frame on sample 0, the signal is first extended by n_fft // 2 samples at
    each end by *reflection* (x[2], x[1] | x[0], x[1], x[2] ...: the edge
    sample is not repeated), as ``torch.stft(center=True)`` does.
    """
    half = n_fft // 2
    if len(audio) <= half:
        raise ValueError(
            f"audio needs more than {half} samples for the reflect padding, got {len(audio)}"
        )
    padded = np.concatenate([audio[half:0:-1], audio, audio[-2 : -half - 2 : -1]])  # (n + 2 half,)
    n_frames = 1 + len(audio) // hop
    starts = hop * np.arange(n_frames)  # (n_frames,)
    return padded[starts[:, None] + np.arange(n_fft)]  # (n_frames, n_fft)


def power_spectrum(audio: np.ndarray, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """|STFT|^2 of the waveform, with Whisper's framing, last frame dropped.

    audio: (n_samples,) -> (n_fft // 2 + 1, n_samples // hop) = (201, n_frames);
    row f is the frequency f * 16000 / 400 = 40 f Hz. Whisper drops the last
    frame so that 480,000 samples give exactly 3,000 frames.
    """
    audio = _as_signal(audio, sample_rate)
    frames = frame_signal(audio) * hann_window(N_FFT)  # (n_frames + 1, 400)
    spectrum = np.fft.rfft(frames, axis=-1)  # (n_frames + 1, 201) complex
    power = spectrum.real**2 + spectrum.imag**2  # (n_frames + 1, 201)
    return power[:-1].T  # (201, n_frames)
# ANCHOR_END: stft


# ANCHOR: mel_scale
# Slaney's mel scale (the Auditory Toolbox; librosa's default, htk=False): linear
# below 1 kHz at 200/3 Hz per mel, so 1 kHz is mel 15; logarithmic above, with
# 27 mels per factor of 6.4 in frequency.
_F_SP = 200.0 / 3.0  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0  # where the log part starts
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # = 15 mels
_LOGSTEP = np.log(6.4) / 27.0  # natural-log step per mel above 1 kHz


def hz_to_mel(f) -> np.ndarray:
    """Frequency in Hz -> Slaney mels (any shape, elementwise)."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(m) -> np.ndarray:
    """Slaney mels -> frequency in Hz (any shape, elementwise); inverse of `hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    linear = m * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log, linear)
# ANCHOR_END: mel_scale


# ANCHOR: mel_filterbank
def mel_filterbank(
    n_mels: int,
    *,
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Triangular filters evenly spaced on the Slaney mel scale, each of unit area in Hz.

    Returns (n_mels, n_fft // 2 + 1): row i weighs the power-spectrum bins into
    mel band i. The n_mels + 2 edge frequencies are evenly spaced in mels from
    fmin to fmax (default: the Nyquist frequency, 8 kHz); filter i rises from
    edge i to a peak at edge i + 1 and falls to zero at edge i + 2.

    "Slaney" normalisation scales filter i by 2 / (edge[i + 2] - edge[i]) so
    every triangle has area one: the wide high-frequency bands do not collect
    more energy just for being wide.
    """
    if not isinstance(n_mels, (int, np.integer)) or n_mels < 1:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2}, got fmin={fmin}, fmax={fmax}")
    bin_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft  # (n_bins,) centre of each rfft bin
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (bin_hz - lower) / (centre - lower)  # (n_mels, n_bins)  0 at lower, 1 at the centre
    falling = (upper - bin_hz) / (upper - centre)  # (n_mels, n_bins)  1 at the centre, 0 at upper
    triangles = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, n_bins)
    return triangles * (2.0 / (upper - lower))  # (n_mels, n_bins)
# ANCHOR_END: mel_filterbank


# ANCHOR: log_mel
def log_mel_spectrogram(
    audio: np.ndarray, n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Whisper's log-mel spectrogram of a waveform of any length (no padding to 30 s).

    audio: (n_samples,) at 16 kHz, n_samples > 200 -> (n_mels, n_samples // 160).

        log  = log10(max(mel power, 1e-10))    1e-10 keeps silence finite (-10)
        log  = max(log, log.max() - 8)         keep 8 decades (80 dB) below the peak
        out  = (log + 4) / 4

    The floor follows the loudest bin of *this* spectrogram, so turning the
    volume up by a factor c shifts every value by log10(c) / 2 and changes
    nothing else (as long as no bin hits the 1e-10 clamp).
    """
    power = power_spectrum(audio, sample_rate=sample_rate)  # (201, n_frames)
    mel = mel_filterbank(n_mels, sample_rate=sample_rate) @ power  # (n_mels, n_frames)
    log_spec = np.log10(np.maximum(mel, 1e-10))  # (n_mels, n_frames)
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def whisper_features(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """What the encoder sees for one clip: pad or trim to 30 s, then the log-mel.

    audio: (n_samples,) at 16 kHz -> (n_mels, 3000).
    """
    return log_mel_spectrogram(pad_or_trim(_as_signal(audio, SAMPLE_RATE)), n_mels)
# ANCHOR_END: log_mel
