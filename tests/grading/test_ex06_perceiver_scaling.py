"""Grader of exercise 6: the FLOPs of a Perceiver IO pass, and what doubling inputs and outputs costs.

Every expected value is measured, never computed by a formula of ours:
tiny_mm.perceiver.PerceiverIO modules of sizes drawn at random for each run
are run under ``torch.utils.flop_counter.FlopCounterMode``, which adds up
2 m n k for every matrix product the forward really performs. A model of the
Perceiver's ImageNet size (50,176 pixel inputs) is built on the meta device:
shapes only, no memory, and the counter still counts.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex06` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

# The Triton kernels switch Triton's interpreter on at import; FlopCounterMode imports
# Triton too, so the kernels must come first (see tests/conftest.py).
import kernels  # noqa: F401

import numbers
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.grading.conftest import Learner, fail
from tiny_mm.perceiver import PerceiverConfig, PerceiverIO

EXERCISE = "ex06_perceiver_scaling"
DRAWS = 3  # random size sets per check
ARGS = ("input_len", "output_len", "num_latents", "width", "depth", "input_dim", "query_dim", "output_dim")


# ---------------------------------------------------------------- helpers


def random_sizes(rng: np.random.Generator) -> dict[str, int]:
    """Small random sizes (they run in milliseconds); every size differs from the others."""
    width = int(rng.choice([16, 24, 32]))
    return {
        "input_len": int(rng.integers(20, 120)),
        "output_len": int(rng.integers(1, 40)),
        "num_latents": int(rng.integers(2, 16)),
        "width": width,
        "depth": int(rng.integers(1, 4)),
        "input_dim": int(rng.integers(3, 30)),
        "query_dim": int(rng.choice([8, 12, 20])),
        "output_dim": int(rng.integers(1, 11)),
        "heads": int(rng.choice([1, 2, 4])),  # divides every width: heads must not change the count
    }


def measure(s: dict[str, int], device: str = "cpu") -> int:
    """FLOPs FlopCounterMode counts in one forward pass of a PerceiverIO of sizes s (batch 1)."""
    with torch.device(device):
        config = PerceiverConfig(input_dim=s["input_dim"], num_latents=s["num_latents"], width=s["width"],
                                 depth=s["depth"], heads=s.get("heads", 1), cross_heads=s.get("heads", 1))
        model = PerceiverIO(config, query_dim=s["query_dim"], output_dim=s["output_dim"])
        inputs = torch.randn(1, s["input_len"], s["input_dim"])  # (1, M, C)
        queries = torch.randn(1, s["output_len"], s["query_dim"])  # (1, O, E)
    # Not under torch.no_grad(): FlopCounterMode's module tracker trips on no_grad views of parameters.
    with FlopCounterMode(display=False) as counter:
        model(inputs, queries)
    return counter.get_total_flops()


# The first FlopCounterMode pass imports and sets up a good deal of torch (seconds on a busy
# CPU): pay it here, at collection, not inside the first check's time limit.
measure({"input_len": 3, "output_len": 1, "num_latents": 2, "width": 8, "depth": 1, "input_dim": 3,
         "query_dim": 8, "output_dim": 2})


def call_text(name: str, s: dict[str, int]) -> str:
    return f"{name}({', '.join(f'{k}={s[k]}' for k in ARGS)})"


def check_flops(learner: Learner, s: dict[str, int], what: str) -> None:
    expected = measure(s, "meta" if s["input_len"] > 10_000 else "cpu")
    got = learner.call("perceiver_io_flops", *(s[k] for k in ARGS))
    call = call_text("perceiver_io_flops", s)
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        fail(f"{call} returned {type(got).__name__} {got!r}; return an int")
    if int(got) != expected:
        fail(f"{call} returned {int(got):,}; FlopCounterMode counts {expected:,} in {what} "
             f"(off by {int(got) - expected:+,})")


# ---------------------------------------------------------------- checks


@pytest.mark.points(4)
def test_flops_of_small_models(learner, rng):
    """perceiver_io_flops equals FlopCounterMode on random PerceiverIO models"""
    for _ in range(DRAWS):
        check_flops(learner, random_sizes(rng), "a PerceiverIO of these sizes")


@pytest.mark.points(2)
def test_flops_at_imagenet_size(learner, rng):
    """perceiver_io_flops at the Perceiver's ImageNet size (meta device)"""
    # 224 x 224 pixels, each RGB + 2 (2 * 64 + 1) Fourier features; 512 latents of width 1024.
    sizes = {"input_len": 224 * 224, "output_len": 1, "num_latents": 512, "width": 1024, "depth": 6,
             "input_dim": 261, "query_dim": 1024, "output_dim": 1000, "heads": 8}
    check_flops(learner, sizes, "a PerceiverIO with 50,176 pixel inputs and 512 latents")


@pytest.mark.points(3)
def test_doubling_factor(learner, rng):
    """doubling_factor equals the measured ratio when inputs and outputs double"""
    draws = [random_sizes(rng) for _ in range(DRAWS)]
    draws[0] |= {"input_len": int(rng.integers(2, 6)), "output_len": 1, "num_latents": 16, "depth": 3}  # latents dominate
    draws[1] |= {"input_len": int(rng.integers(300, 600)), "num_latents": 2, "depth": 1}  # inputs dominate
    for s in draws:
        expected = measure(s | {"input_len": 2 * s["input_len"], "output_len": 2 * s["output_len"]}) / measure(s)
        got = learner.call("doubling_factor", *(s[k] for k in ARGS))
        call = call_text("doubling_factor", s)
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            fail(f"{call} returned {type(got).__name__} {got!r}; return a float")
        if not abs(float(got) - expected) <= 1e-9 * expected:
            fail(f"{call} returned {float(got):.6g}; doubling M and O really multiplies the measured FLOPs "
                 f"by {expected:.6g}")


BAD: list[tuple[str, tuple[Any, ...]]] = [
    ("perceiver_io_flops", (0, 1, 8, 16, 2, 3, 8, 4)),
    ("perceiver_io_flops", (10, 1, 8, -16, 2, 3, 8, 4)),
    ("perceiver_io_flops", (10, 1, 8, 16, 2.0, 3, 8, 4)),
    ("perceiver_io_flops", (10, True, 8, 16, 2, 3, 8, 4)),
    ("doubling_factor", (10, 1, 0, 16, 2, 3, 8, 4)),
    ("doubling_factor", (10, 1, 8, 16, 2, 3, 8, -1)),
]


@pytest.mark.points(1)
def test_rejects_bad_sizes(learner):
    """ValueError on sizes that are not positive ints"""
    for name, args in BAD:
        learner.raises(ValueError, name, *args)
