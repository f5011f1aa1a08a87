"""`tiny_mm.training`: the schedule every recipe uses, and the shared command-line helpers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from tiny_mm.training import comma_names, out_folder_problem, warmup_cosine


@pytest.mark.parametrize("steps, warmup", [(100, 10), (7, 3), (50, 0), (5, 5)])
def test_warmup_cosine(steps, warmup):
    lr = 0.3
    values = [warmup_cosine(s, steps, lr, warmup) for s in range(steps)]
    for s in range(warmup):  # linear: lr / warmup, 2 lr / warmup, ..., lr
        assert values[s] == pytest.approx(lr * (s + 1) / warmup)
    decay = steps - warmup
    for s in range(warmup, steps):  # then half a cosine period from lr down to 0
        assert values[s] == pytest.approx(lr * (1 + math.cos(math.pi * (s - warmup) / max(decay, 1))) / 2)
    if decay > 1:
        assert values[warmup] == pytest.approx(lr) and values[-1] < values[warmup]
        assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))


def test_comma_names():
    assert comma_names(" late, cross ,,bottleneck") == ("late", "cross", "bottleneck")
    assert comma_names("") == ()


def test_out_folder_problem(tmp_path: Path):
    assert out_folder_problem(None) is None
    assert out_folder_problem(tmp_path / "new") is None
    assert out_folder_problem(tmp_path) is None
    (tmp_path / "file").write_text("x")
    assert "is a file" in out_folder_problem(tmp_path / "file")
