"""The checks every training recipe makes of its settings, written once.

A recipe is a dataclass; its ``__post_init__`` calls these with its own field
names, so a bad setting fails at once with a message that names the field,
not 600 steps later with a stack trace from inside the optimiser.
"""
from __future__ import annotations

import math

__all__ = ["check_ints", "check_optimiser", "check_threads"]


def check_ints(owner: object, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """ValueError unless each named attribute of owner is an int (not a bool), >= 1 or >= 0."""
    for names, low, word in ((positive, 1, "a positive"), (non_negative, 0, "a non-negative")):
        for name in names:
            value = getattr(owner, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be {word} int, got {value!r}")


def check_optimiser(lr: object, weight_decay: object = 0.0) -> None:
    """ValueError unless lr is finite and positive and weight_decay lies in [0, 1)."""
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    if isinstance(weight_decay, bool) or not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < 1):
        raise ValueError(f"weight_decay must be in [0, 1), got {weight_decay!r}")


def check_threads(threads: object) -> None:
    """ValueError unless threads is None (torch's default) or a positive int."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
