"""What every stop of the tour shares: the Stop record and how a check is judged."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["Stop", "relative_error", "verdict"]


@dataclass(frozen=True)
class Stop:
    name: str  # for --only
    title: str
    chapter: str  # the page to read
    run: Callable[[bool], bool]  # run(quick) prints its findings, returns True if all checks held


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has a NaN, so a NaN never passes)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return math.inf
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def verdict(error: float, limit: float) -> str:
    return "ok" if error < limit else "FAIL"
