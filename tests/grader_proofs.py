"""What the proofs that a grader can fail share (tests/test_grader_exNN.py).

A proof grades, each once in a child process as `tinymm grade` does and three
at a time: the solution, the stub generated afresh from it, and copies of the
solution with one planted mistake each, made by replacing one piece of its
text (checked to be there exactly once, so a reworded solution cannot quietly
turn a proof into a no-op). Then the solution must score full marks, the stub
zero with NotImplementedError everywhere, and each planted mistake must cost
points on the check it breaks, with a one-line reason that says why.

A proof file sets EXERCISE, TIMEOUT and PLANTED, and imports the fixture and
the three tests below; pytest collects them there, and tests/conftest.py
parametrizes `planted_name` over that file's PLANTED.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from tiny_mm import grading, stubs

ROOT = Path(__file__).resolve().parent.parent


class Planted(NamedTuple):
    """A mistake planted in a copy of the solution, and how the grader must report it."""

    old: str  # text of the solution, present exactly once
    new: str  # what replaces it
    check: str  # start of the name of a check that must fail
    words: str  # words the failing check's reason must contain


def grade_all(exercise: str, planted: dict[str, Planted], tmp: Path, timeout: float) -> dict[str, grading.ExerciseResult]:
    """Grade "solutions", "stubs" and every planted copy; results by those names."""
    solution = (ROOT / "solutions" / f"{exercise}.py").read_text()
    stub = tmp / f"{exercise}.py"
    stub.write_text(stubs.generate()[ROOT / "exercises" / f"{exercise}.py"])
    targets = {"solutions": "solutions", "stubs": str(stub)}
    for name, bug in planted.items():
        assert solution.count(bug.old) == 1, f"the solution no longer has {bug.old!r} to plant {name}"
        path = tmp / f"{name}.py"
        path.write_text(solution.replace(bug.old, bug.new))
        targets[name] = str(path)
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = {name: pool.submit(grading.grade_exercise, exercise, target, timeout)
                for name, target in targets.items()}
        return {name: job.result() for name, job in jobs.items()}


def assert_full_marks(result: grading.ExerciseResult) -> None:
    assert not result.error, result.error
    failed = [(c.name, c.reason) for c in result.checks if c.outcome != "passed"]
    assert not failed, f"the solution fails: {failed}"
    assert result.score == result.max_score > 0


def assert_zero(result: grading.ExerciseResult) -> None:
    assert not result.error, result.error
    assert result.max_score > 0 and result.score == 0
    for check in result.checks:
        assert check.outcome == "failed"
        assert "NotImplementedError" in check.reason, check


def assert_costs_points(result: grading.ExerciseResult, bug: Planted) -> None:
    assert not result.error, result.error
    assert 0 < result.score < result.max_score
    failing = [c for c in result.checks if c.name.startswith(bug.check)]
    assert failing and all(c.outcome == "failed" for c in failing), [(c.name, c.outcome) for c in failing]
    for check in failing:
        assert bug.words in check.reason, check.reason
        assert "\n" not in check.reason and len(check.reason) <= 200


@pytest.fixture(scope="module")
def graded(request, tmp_path_factory) -> dict[str, grading.ExerciseResult]:
    proof = request.module
    return grade_all(proof.EXERCISE, proof.PLANTED, tmp_path_factory.mktemp(f"grader_{proof.EXERCISE}"),
                     proof.TIMEOUT)


def test_solutions_score_full_marks(graded):
    assert_full_marks(graded["solutions"])


def test_untouched_stubs_score_zero(graded):
    assert_zero(graded["stubs"])


def test_planted_bug_costs_points(request, graded, planted_name):
    assert_costs_points(graded[planted_name], request.module.PLANTED[planted_name])
