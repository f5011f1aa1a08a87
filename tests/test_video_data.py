"""tiny_mm.data.video: determinism, factors read back from the raw signals, the label rule, the ceilings.

The checks recover each factor with their own code (a centroid track of the
frames, an FFT of the waveform, an energy envelope of it, the caption's words)
and their own tables, never the module's renderer, so a wrong renderer or
table shows up as a failure.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tiny_mm.data.video import (
    CEILINGS,
    NUM_CLASSES,
    VideoClipsDataset,
    VideoConfig,
    action_label,
    class_name,
    sample,
    video_vocab,
)

# The factor tables, written here independently of the module.
DIRECTION_NAMES = ["left", "right", "up", "down"]
PITCH_NAMES = ["low", "high"]
RHYTHM_NAMES = ["steady", "pulsing"]
KIND_NAMES = ["cat", "dog"]
COLOUR_NAMES = ["red", "green", "blue", "yellow"]
# Which factors each modality shows (colour shows in video and caption but is not in the label).
SEES = {
    "video": ("direction", "colour"),
    "audio": ("pitch", "rhythm"),
    "caption": ("kind", "colour"),
}
SIZES = {"direction": 4, "pitch": 2, "rhythm": 2, "kind": 2}


def expected_label(f: dict[str, int]) -> int:
    """The documented rule, written out: digits (direction, pitch, rhythm, kind), radices (4, 2, 2, 2)."""
    return f["direction"] * 8 + f["pitch"] * 4 + f["rhythm"] * 2 + f["kind"]


def direction_from_frames(frames: np.ndarray) -> str:
    """Track the object's centroid: pixels far from the frame's median colour belong to it."""
    centres = []
    for frame in frames:  # (3, H, W)
        background = np.median(frame.reshape(3, -1), axis=1)[:, None, None]  # (3, 1, 1)
        weight = (np.abs(frame - background).sum(axis=0) > 0.3).astype(np.float64)  # (H, W)
        ys, xs = np.mgrid[0 : frame.shape[1], 0 : frame.shape[2]]
        centres.append(((weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()))
    dx = centres[-1][0] - centres[0][0]
    dy = centres[-1][1] - centres[0][1]
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def colour_from_frames(frames: np.ndarray) -> str:
    """The most saturated pixel's hue class, by nearest nominal colour."""
    plain = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
    pixels = frames.transpose(0, 2, 3, 1).reshape(-1, 3)  # (T*H*W, 3)
    spread = pixels.max(axis=1) - pixels.min(axis=1)
    top = pixels[np.argsort(spread)[-20:]].mean(axis=0)  # the 20 most colourful pixels
    return min(plain, key=lambda k: np.linalg.norm(top - np.asarray(plain[k], dtype=np.float64)))


def pitch_from_audio(audio: np.ndarray, sample_rate: int) -> str:
    """The FFT peak: below 600 Hz is low, above is high."""
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(audio), 1 / sample_rate)
    return "low" if freqs[np.argmax(spectrum)] < 600 else "high"


def beeps_in_audio(audio: np.ndarray, sample_rate: int) -> int:
    """Count the runs of loud 10 ms windows (RMS above half the loudest window)."""
    win = sample_rate // 100
    n = len(audio) // win
    rms = np.sqrt((audio[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1))  # (n,)
    loud = rms > 0.5 * rms.max()
    return int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))


def test_shapes_and_dtypes():
    config = VideoConfig(frames=8, image_size=16, frame_seconds=0.1, sample_rate=8000)
    frames, audio, caption, label, factors = VideoClipsDataset(3, config, seed=1)[2]
    assert frames.shape == (8, 3, 16, 16) and frames.dtype == torch.float32
    assert audio.shape == (6400,) and audio.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert torch.isfinite(audio).all() and audio.abs().max() < 1.5
    assert isinstance(caption, str) and isinstance(label, int) and 0 <= label < 32
    assert set(factors) == {"direction", "pitch", "rhythm", "kind", "colour"}
    # Another geometry: the sizes follow the config.
    frames, audio, *_ = VideoClipsDataset(1, VideoConfig(frames=5, image_size=20, sample_rate=4000))[0]
    assert frames.shape == (5, 3, 20, 20) and audio.shape == (2000,)


def test_collation_and_materialize():
    ds = VideoClipsDataset(6, seed=3)
    frames, audio, captions, labels, factors = next(iter(DataLoader(ds, batch_size=6)))
    assert frames.shape == (6, 8, 3, 16, 16) and audio.shape == (6, 6400) and len(captions) == 6
    m_frames, m_audio, m_captions, m_labels, m_factors = ds.materialize()
    assert torch.equal(m_frames, frames) and torch.equal(m_audio, audio) and m_captions == list(captions)
    assert torch.equal(m_labels, labels) and m_labels.dtype == torch.long
    for k in factors:
        assert torch.equal(m_factors[k], factors[k])


def test_deterministic_and_indices_differ():
    a, b = VideoClipsDataset(10, seed=7), VideoClipsDataset(10, seed=7)
    for i in (0, 5, 9):
        x, y = a[i], b[i]
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2:] == y[2:]
    assert torch.equal(a[-1][0], a[9][0])
    assert not torch.equal(a[0][0], a[1][0]) and not torch.equal(a[0][1], a[1][1])
    other = VideoClipsDataset(10, seed=8)
    assert not torch.equal(a[0][0], other[0][0]) and not torch.equal(a[0][1], other[0][1])


def test_factors_recovered_from_raw_signals():
    config = VideoConfig()
    ds = VideoClipsDataset(48, config, seed=11)
    seen = defaultdict(set)
    for i in range(len(ds)):
        frames, audio, caption, label, f = ds[i]
        frames, audio = frames.numpy(), audio.numpy()
        assert direction_from_frames(frames) == DIRECTION_NAMES[f["direction"]], i
        assert colour_from_frames(frames) == COLOUR_NAMES[f["colour"]], i
        assert pitch_from_audio(audio, config.sample_rate) == PITCH_NAMES[f["pitch"]], i
        beeps = beeps_in_audio(audio, config.sample_rate)
        assert beeps == (1 if RHYTHM_NAMES[f["rhythm"]] == "steady" else 4), (i, beeps)
        words = caption.split()
        assert words == ["a", COLOUR_NAMES[f["colour"]], KIND_NAMES[f["kind"]]], caption
        assert label == expected_label(f)
        for k, v in f.items():
            seen[k].add(v)
    # The check covered every value of every factor.
    assert {k: len(v) for k, v in seen.items()} == {"direction": 4, "pitch": 2, "rhythm": 2, "kind": 2, "colour": 4}


def test_recovery_on_a_larger_geometry():
    config = VideoConfig(frames=6, image_size=24, frame_seconds=0.15, sample_rate=16000, noise=0.05)
    ds = VideoClipsDataset(12, config, seed=2)
    for i in range(len(ds)):
        frames, audio, _, _, f = ds[i]
        assert direction_from_frames(frames.numpy()) == DIRECTION_NAMES[f["direction"]]
        assert pitch_from_audio(audio.numpy(), 16000) == PITCH_NAMES[f["pitch"]]
        assert beeps_in_audio(audio.numpy(), 16000) == (1 if f["rhythm"] == 0 else 4)


def test_label_rule_is_a_bijection(rng):
    combos = [(d, p, r, k) for d in range(4) for p in range(2) for r in range(2) for k in range(2)]
    labels = [action_label(*c) for c in combos]
    assert sorted(labels) == list(range(32)) and NUM_CLASSES == 32
    for d, p, r, k in [combos[i] for i in rng.choice(len(combos), 8, replace=False)]:
        f = {"direction": d, "pitch": p, "rhythm": r, "kind": k}
        assert action_label(d, p, r, k) == expected_label(f)
        name = f"{DIRECTION_NAMES[d]}/{PITCH_NAMES[p]}/{RHYTHM_NAMES[r]}/{KIND_NAMES[k]}"
        assert class_name(expected_label(f)) == name


def _best_accuracy(factors: list[dict[str, int]], labels: list[int], keys: tuple[str, ...]) -> float:
    """Fit the best predictor that sees only `keys` (majority label per key value) on the first
    half; score it on the second half, so the estimate is not biased upwards by noise."""
    half = len(labels) // 2
    votes: dict[tuple, Counter] = defaultdict(Counter)
    for f, y in zip(factors[:half], labels[:half]):
        votes[tuple(f[k] for k in keys)][y] += 1
    hits = 0
    for f, y in zip(factors[half:], labels[half:]):
        counts = votes.get(tuple(f[k] for k in keys))
        hits += counts is not None and counts.most_common(1)[0][0] == y
    return hits / (len(labels) - half)


def test_per_modality_ceilings():
    config = VideoConfig()
    n = 6000
    drawn = [sample(config, 5, i) for i in range(n)]  # factors only: nothing rendered
    factors = [s.factors for s in drawn]
    labels = [expected_label(f) for f in factors]
    assert labels == [s.label for s in drawn]
    label_factors = set(SIZES)
    for combo in ("video", "audio", "caption", "video+audio", "video+caption", "audio+caption", "video+audio+caption"):
        keys = tuple(sorted({k for m in combo.split("+") for k in SEES[m]}))
        hidden = label_factors - set(keys)
        ceiling = 1.0 / float(np.prod([SIZES[k] for k in hidden])) if hidden else 1.0
        assert CEILINGS[combo] == pytest.approx(ceiling), combo
        # Within one value of the visible factors, every label consistent with it turns up.
        groups: dict[tuple, set] = defaultdict(set)
        for f, y in zip(factors, labels):
            groups[tuple(f[k] for k in keys)].add(y)
        assert all(len(ys) == round(1 / ceiling) for ys in groups.values()), combo
        # And a predictor that sees only these factors scores the ceiling (4 standard errors).
        acc = _best_accuracy(factors, labels, keys)
        tol = 4 * np.sqrt(ceiling * (1 - ceiling) / (n / 2)) + 1e-9
        assert abs(acc - ceiling) <= tol, (combo, acc, ceiling)


def test_vocab_covers_captions():
    vocab = video_vocab()
    ds = VideoClipsDataset(40, seed=0)
    captions = [ds.sample(i).caption for i in range(40)]
    ids, lengths = vocab.encode(captions)
    assert (ids != 3).all()  # no <unk>
    assert [vocab.decode(row) for row in ids] == captions
    assert lengths.tolist() == [5] * 40


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"frames": 3}, "frames"),
        ({"frames": 8.0}, "frames"),
        ({"image_size": 8}, "image_size"),
        ({"sample_rate": 1000}, "sample_rate"),
        ({"frame_seconds": 0.0}, "frame_seconds"),
        ({"frames": 4, "frame_seconds": 0.05}, "0.4 s"),
        ({"background": 0.9}, "background"),
        ({"noise": -0.1}, "noise"),
        ({"audio_noise": 1.0}, "audio_noise"),
    ],
)
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        VideoConfig(**kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="length"):
        VideoClipsDataset(-1)
    with pytest.raises(ValueError, match="seed"):
        VideoClipsDataset(4, seed=-2)
    with pytest.raises(ValueError, match="config"):
        VideoClipsDataset(4, config={"frames": 8})
    with pytest.raises(IndexError, match="out of range"):
        VideoClipsDataset(4)[4]
    with pytest.raises(ValueError, match="direction"):
        action_label(4, 0, 0, 0)
    with pytest.raises(ValueError, match="kind"):
        action_label(0, 0, 0, 2)
    with pytest.raises(ValueError, match="label"):
        class_name(32)
