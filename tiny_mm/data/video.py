"""Synthetic tri-modal clips (video, audio, caption) whose action label needs all three.

Chapter 10 compares ways of fusing modalities, so it needs data on which a
single modality provably cannot do the whole job. Every clip is drawn from
five independent, uniform factors; each modality shows some of them:

    factor     values                    carried by
    direction  left, right, up, down     video: a disc moves that way across the frames
    pitch      low, high                 audio: the tone is near 300 Hz or near 900 Hz
    rhythm     steady, pulsing           audio: one long tone, or 4 short beeps
    kind       cat, dog                  caption: the noun ("a red cat")
    colour     red, green, blue, yellow  video AND caption (the disc's colour, the
                                         adjective): shared, but NOT part of the label

The action label is a bijection of the four label factors (see `action_label`):

    label = ((direction * 2 + pitch) * 2 + rhythm) * 2 + kind      32 classes

Because the factors are independent and uniform, a modality that sees only
some of them can do no better than guess uniformly among the label values
consistent with what it sees. The best possible accuracy (`CEILINGS`):

    video alone:   at most 1/8  = 12.5%   (sees direction; pitch, rhythm, kind unknown)
    audio alone:   at most 1/8  = 12.5%   (sees pitch and rhythm; direction, kind unknown)
    caption alone: at most 1/16 = 6.25%   (sees kind; direction, pitch, rhythm unknown)
    video + audio: at most 1/2  = 50%;  video + caption: 1/4 = 25%;  audio + caption: 1/4 = 25%
    all three:     100%  (chance: 1/32 = 3.125%)

The colour links video and caption (useful for contrastive objectives) but
tells nothing about the label.

Per item, `VideoClipsDataset[i]` returns ``(frames, audio, caption, label, factors)``:

    frames  : float32 tensor (T, 3, H, W) in [0, 1]       (T = config.frames, H = W = config.image_size)
    audio   : float32 tensor (S,), S = round(T * frame_seconds * sample_rate), roughly in [-1, 1]
    caption : str, e.g. "a red cat"
    label   : int in [0, 32)
    factors : dict of int ids {"direction", "pitch", "rhythm", "kind", "colour"}

Everything is a pure function of ``(seed, index)``, as in `tiny_mm.data.shapes`:
item ``i`` is drawn from its own generator seeded with ``[seed, i]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from tiny_mm.data.words import WordVocab

__all__ = [
    "DIRECTIONS",
    "PITCHES",
    "RHYTHMS",
    "KINDS",
    "COLOURS",
    "PITCH_HZ",
    "PULSES",
    "NUM_CLASSES",
    "CEILINGS",
    "VideoConfig",
    "ClipSample",
    "action_label",
    "class_name",
    "sample",
    "render_frames",
    "render_audio",
    "video_vocab",
    "VideoClipsDataset",
]

# ANCHOR: factors
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
PITCHES: tuple[str, ...] = ("low", "high")
RHYTHMS: tuple[str, ...] = ("steady", "pulsing")
KINDS: tuple[str, ...] = ("cat", "dog")

# Saturated colours, far from the grey background and from each other.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
}

# Centre frequency of each pitch; each clip jitters it by up to 5%, so the
# two never overlap (300 * 1.05 < 900 * 0.95).
PITCH_HZ: dict[str, float] = {"low": 300.0, "high": 900.0}
PULSES = 4  # beeps in a "pulsing" clip; a "steady" clip has one long tone

# Unit vector (dx, dy) of each direction, x right and y down (image coordinates).
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# ANCHOR_END: factors

NUM_CLASSES = len(DIRECTIONS) * len(PITCHES) * len(RHYTHMS) * len(KINDS)  # 32

# Best accuracy from a subset of modalities: 1 / (number of label values it cannot tell apart).
CEILINGS: dict[str, float] = {
    "video": 1 / (len(PITCHES) * len(RHYTHMS) * len(KINDS)),
    "audio": 1 / (len(DIRECTIONS) * len(KINDS)),
    "caption": 1 / (len(DIRECTIONS) * len(PITCHES) * len(RHYTHMS)),
    "video+audio": 1 / len(KINDS),
    "video+caption": 1 / (len(PITCHES) * len(RHYTHMS)),
    "audio+caption": 1 / len(DIRECTIONS),
    "video+audio+caption": 1.0,
}


# ANCHOR: label
def action_label(direction: int, pitch: int, rhythm: int, kind: int) -> int:
    """The action class of a clip: a mixed-radix number with one digit per factor (0..31)."""
    for name, value, n in (
        ("direction", direction, len(DIRECTIONS)),
        ("pitch", pitch, len(PITCHES)),
        ("rhythm", rhythm, len(RHYTHMS)),
        ("kind", kind, len(KINDS)),
    ):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < n:
            raise ValueError(f"{name} must be an int in [0, {n}), got {value!r}")
    return int(((direction * len(PITCHES) + pitch) * len(RHYTHMS) + rhythm) * len(KINDS) + kind)
# ANCHOR_END: label


def class_name(label: int) -> str:
    """"right/high/pulsing/cat" for a label id: the four factors it encodes."""
    if not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be an int in [0, {NUM_CLASSES}), got {label!r}")
    label, kind = divmod(int(label), len(KINDS))
    label, rhythm = divmod(label, len(RHYTHMS))
    direction, pitch = divmod(label, len(PITCHES))
    return f"{DIRECTIONS[direction]}/{PITCHES[pitch]}/{RHYTHMS[rhythm]}/{KINDS[kind]}"


@dataclass(frozen=True)
class VideoConfig:
    """Clip sizes and noise levels.

    Args:
        frames: T, frames per clip (>= 4).
        image_size: side H = W of each frame in pixels (>= 12).
        frame_seconds: duration of one frame; the audio lasts frames * frame_seconds
            (the product must be at least 0.4 s so 4 beeps and their gaps fit).
        sample_rate: audio samples per second, in [4000, 48000] (above twice the highest tone).
        background: largest grey level of the frame background, drawn per clip in [0, background].
        noise: standard deviation of Gaussian pixel noise.
        audio_noise: standard deviation of Gaussian noise added to the waveform.
    """

    frames: int = 8
    image_size: int = 16
    frame_seconds: float = 0.1
    sample_rate: int = 8000
    background: float = 0.25
    noise: float = 0.02
    audio_noise: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.frames, int) or self.frames < 4:
            raise ValueError(f"frames must be an int >= 4, got {self.frames!r}")
        if not isinstance(self.image_size, int) or self.image_size < 12:
            raise ValueError(f"image_size must be an int >= 12, got {self.image_size!r}")
        if not isinstance(self.sample_rate, int) or not 4000 <= self.sample_rate <= 48000:
            raise ValueError(f"sample_rate must be an int in [4000, 48000], got {self.sample_rate!r}")
        if not isinstance(self.frame_seconds, (int, float)) or not 0.0 < self.frame_seconds <= 1.0:
            raise ValueError(f"frame_seconds must be in (0, 1], got {self.frame_seconds!r}")
        if self.frames * self.frame_seconds < 0.4:
            raise ValueError(
                "the clip must last at least 0.4 s (frames * frame_seconds), "
                f"got {self.frames * self.frame_seconds:g} s"
            )
        if not 0.0 <= self.background <= 0.4:
            raise ValueError(f"background must be in [0, 0.4], got {self.background!r}")
        if not 0.0 <= self.noise <= 0.1:
            raise ValueError(f"noise must be in [0, 0.1], got {self.noise!r}")
        if not 0.0 <= self.audio_noise <= 0.2:
            raise ValueError(f"audio_noise must be in [0, 0.2], got {self.audio_noise!r}")

    @property
    def num_samples(self) -> int:
        """S, the length of each waveform."""
        return round(self.frames * self.frame_seconds * self.sample_rate)


@dataclass(frozen=True)
class ClipSample:
    """Everything needed to render one clip: factor ids plus the nuisance draws.

    x0, y0: the disc's centre in the first frame, in pixels (x right, y down).
    radius: disc radius in pixels; travel: distance it moves from first to last frame.
    freq: tone frequency in Hz; amplitude: tone peak; phase: its starting phase;
    offset: start of the first tone, as a fraction of one beep period (or of the clip, if steady).
    """

    direction: int
    pitch: int
    rhythm: int
    kind: int
    colour: int
    x0: float
    y0: float
    radius: float
    travel: float
    background: float
    freq: float
    amplitude: float
    phase: float
    offset: float
    noise_seed: int

    @property
    def factors(self) -> dict[str, int]:
        return {
            "direction": self.direction,
            "pitch": self.pitch,
            "rhythm": self.rhythm,
            "kind": self.kind,
            "colour": self.colour,
        }

    @property
    def label(self) -> int:
        return action_label(self.direction, self.pitch, self.rhythm, self.kind)

    @property
    def caption(self) -> str:
        return f"a {tuple(COLOURS)[self.colour]} {KINDS[self.kind]}"


# ANCHOR: sample
def sample(config: VideoConfig, seed: int, index: int) -> ClipSample:
    """Draw clip ``index`` of the stream ``seed``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    direction, pitch, rhythm, kind = (int(rng.integers(len(v))) for v in (DIRECTIONS, PITCHES, RHYTHMS, KINDS))
    colour = int(rng.integers(len(COLOURS)))

    S = config.image_size
    radius = 0.15 * S
    travel = 0.4 * S  # long enough that the motion is many pixels, short enough to stay inside
    lo, hi = radius + 1.0, S - radius - 1.0  # the disc's centre stays in [lo, hi] in every frame
    dx, dy = _STEP[DIRECTIONS[direction]]
    # Along the motion, start so the whole path fits; across it, anywhere inside.
    along = rng.uniform(lo, hi - travel)
    across = rng.uniform(lo, hi)
    x0 = along if dx > 0 else (hi - (along - lo) if dx < 0 else across)
    y0 = along if dy > 0 else (hi - (along - lo) if dy < 0 else across)

    return ClipSample(
        direction=direction,
        pitch=pitch,
        rhythm=rhythm,
        kind=kind,
        colour=colour,
        x0=float(x0),
        y0=float(y0),
        radius=float(radius),
        travel=float(travel),
        background=float(rng.uniform(0.0, config.background)),
        freq=float(PITCH_HZ[PITCHES[pitch]] * rng.uniform(0.95, 1.05)),
        amplitude=float(rng.uniform(0.4, 0.8)),
        phase=float(rng.uniform(0.0, 2 * math.pi)),
        offset=float(rng.uniform(0.0, 0.2)),
        noise_seed=int(rng.integers(2**31)),
    )
# ANCHOR_END: sample


# ANCHOR: render_frames
def render_frames(s: ClipSample, config: VideoConfig) -> np.ndarray:
    """The clip's frames: float32 (T, 3, H, W) in [0, 1].

    Frame k shows a disc of the clip's colour centred at (x0, y0) + k / (T - 1) * travel * step,
    blended over a grey background with 2x2 sub-pixel coverage (smooth edges), plus noise.
    """
    T, S = config.frames, config.image_size
    a = 2  # sub-pixel samples per axis
    t = (np.arange(S * a, dtype=np.float32) + 0.5) / a  # (S*a,) sub-pixel centres
    dx, dy = _STEP[DIRECTIONS[s.direction]]
    colour = np.asarray(tuple(COLOURS.values())[s.colour], dtype=np.float32)[:, None, None]  # (3, 1, 1)
    frames = np.full((T, 3, S, S), s.background, dtype=np.float32)  # (T, 3, H, W)
    for k in range(T):
        progress = s.travel * k / (T - 1)
        cx, cy = s.x0 + progress * dx, s.y0 + progress * dy
        inside = (t[None, :] - cx) ** 2 + (t[:, None] - cy) ** 2 <= s.radius**2  # (S*a, S*a)
        coverage = inside.reshape(S, a, S, a).mean(axis=(1, 3), dtype=np.float32)  # (H, W)
        frames[k] += coverage[None] * (colour - frames[k])  # alpha-blend the disc
    if config.noise > 0:
        rng = np.random.default_rng([s.noise_seed, 0])
        frames += rng.normal(0.0, config.noise, size=frames.shape).astype(np.float32)
    return np.clip(frames, 0.0, 1.0, out=frames)
# ANCHOR_END: render_frames


# ANCHOR: render_audio
def render_audio(s: ClipSample, config: VideoConfig) -> np.ndarray:
    """The clip's soundtrack: float32 (S,), a sine tone gated by the rhythm's envelope, plus noise.

    steady:  one tone from offset * D / 4 until D * (1 - offset / 4)   (D = clip duration)
    pulsing: PULSES beeps; beep j starts at (j + offset) * D / PULSES and lasts half a period.
    Each gate opens and closes with a 5 ms linear ramp, so the tone does not click.
    """
    n = config.num_samples
    sr = config.sample_rate
    duration = n / sr
    time = np.arange(n, dtype=np.float64) / sr  # (S,) seconds
    if RHYTHMS[s.rhythm] == "steady":
        spans = [(s.offset * duration / 4, duration * (1 - s.offset / 4))]
    else:
        period = duration / PULSES
        spans = [((j + s.offset) * period, (j + s.offset + 0.5) * period) for j in range(PULSES)]
    ramp = 0.005  # seconds
    envelope = np.zeros(n)  # (S,)
    for start, end in spans:
        # A trapezoid: 0 before start, rising over `ramp`, 1, falling over `ramp` to 0 at end.
        rise = np.clip((time - start) / ramp, 0.0, 1.0)
        fall = np.clip((end - time) / ramp, 0.0, 1.0)
        envelope = np.maximum(envelope, np.minimum(rise, fall))
    wave = s.amplitude * envelope * np.sin(2 * math.pi * s.freq * time + s.phase)  # (S,)
    if config.audio_noise > 0:
        rng = np.random.default_rng([s.noise_seed, 1])
        wave += rng.normal(0.0, config.audio_noise, size=n)
    return wave.astype(np.float32)
# ANCHOR_END: render_audio


def video_vocab() -> WordVocab:
    """The caption vocabulary: "a", the colours and the kinds, after the four special tokens (11 ids)."""
    return WordVocab(["a", *COLOURS, *KINDS])


class VideoClipsDataset(Dataset):
    """``length`` clips, item ``i`` rendered on demand from ``(seed, i)``.

    ``dataset[i]`` returns ``(frames, audio, caption, label, factors)``: frames (T, 3, H, W)
    float32, audio (S,) float32, caption str, label int, factors dict of ints. The default
    DataLoader collation gives ((B, T, 3, H, W), (B, S), list of B str, (B,), dict of (B,)).
    """

    def __init__(self, length: int, config: VideoConfig | None = None, seed: int = 0) -> None:
        self.config = VideoConfig() if config is None else config
        if not isinstance(self.config, VideoConfig):
            raise ValueError(f"config must be a VideoConfig, got {type(self.config).__name__}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ClipSample:
        """The factors and nuisance draws of item ``index`` (nothing rendered)."""
        if not isinstance(index, (int, np.integer)) or not -self.length <= index < self.length:
            raise IndexError(f"index {index!r} out of range for a dataset of length {self.length}")
        return sample(self.config, self.seed, int(index) % self.length)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str, int, dict[str, int]]:
        s = self.sample(index)
        frames = torch.from_numpy(render_frames(s, self.config))  # (T, 3, H, W)
        audio = torch.from_numpy(render_audio(s, self.config))  # (S,)
        return frames, audio, s.caption, s.label, s.factors

    def materialize(self) -> tuple[Tensor, Tensor, list[str], Tensor, dict[str, Tensor]]:
        """Everything at once: frames (N, T, 3, H, W), audio (N, S), N captions, labels (N,),
        factors {name: (N,) LongTensor}. For small sets, faster to train on than a DataLoader."""
        c = self.config
        frames = np.empty((self.length, c.frames, 3, c.image_size, c.image_size), dtype=np.float32)
        audio = np.empty((self.length, c.num_samples), dtype=np.float32)  # (N, S)
        captions: list[str] = []
        labels: list[int] = []
        factors: dict[str, list[int]] = {k: [] for k in ("direction", "pitch", "rhythm", "kind", "colour")}
        for i in range(self.length):
            s = self.sample(i)
            frames[i] = render_frames(s, c)
            audio[i] = render_audio(s, c)
            captions.append(s.caption)
            labels.append(s.label)
            for k, v in s.factors.items():
                factors[k].append(v)
        return (
            torch.from_numpy(frames),
            torch.from_numpy(audio),
            captions,
            torch.tensor(labels, dtype=torch.long),
            {k: torch.tensor(v, dtype=torch.long) for k, v in factors.items()},
        )
