"""The autograder can fail: it gives full marks, zero, partial marks and the right reasons.

Every target is graded once (module fixture, three child processes at a time):
the solutions, freshly generated stubs, and the planted broken solutions in
tests/fixtures/broken_ex01/ (one per failure kind). Each planted bug must
cost points with a one-line reason naming the kind, and the checks that do
not touch the bug (retrieval_accuracy is correct in every planted file) must
still run and pass: a crash or a hang never ends the grading.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tiny_mm import grading, stubs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BROKEN = ROOT / "tests" / "fixtures" / "broken_ex01"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check
LOOP_TIMEOUT = 2.0  # for the files that hang: short, so they cost little
HANGS = ("loops_forever", "ignores_interrupt")
EXERCISE = "ex01_clip_loss"

# planted file -> what every reason of a failing check must say
KINDS = {
    "raises": "raised ZeroDivisionError",
    "exits": "called sys.exit(3)",
    "os_exit": "called os._exit(7)",
    "crashes": "killed the grading process: it was killed by SIGKILL",
    "loops_forever": f"timed out after {LOOP_TIMEOUT:g} s",
    "ignores_interrupt": "ignored the interrupt",
    "wrong_shape": "loss has shape (",
    "nan": "NaN",
    "temperature_ignored": "temperature=",
}


def _grade(target: str, timeout: float = TIMEOUT) -> tuple[grading.ExerciseResult, float]:
    started = time.monotonic()
    result = grading.grade_exercise(EXERCISE, target, timeout=timeout)
    return result, time.monotonic() - started


def _grade_solutions_via_main() -> tuple[int, str, str]:
    """`tinymm grade ex01 --solutions --json`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    # Safe from the pool's threads: the other jobs call grade_exercise, which prints nothing.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = grading.main(["ex01", "--solutions", "--json", "--timeout", f"{TIMEOUT:g}"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("grader")
    stub = tmp / f"{EXERCISE}.py"
    # The stubs graded are generated afresh: test_stubs.py checks that they equal the
    # committed ones, and a learner's edits to exercises/ do not break this test.
    stub.write_text(stubs.generate()[ROOT / "exercises" / f"{EXERCISE}.py"])
    slowest_first = sorted(KINDS, key=lambda name: name not in (*HANGS, "crashes"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = {name: pool.submit(_grade, str(BROKEN / f"{name}.py"), LOOP_TIMEOUT if name in HANGS else TIMEOUT)
                for name in slowest_first}
        jobs["stubs"] = pool.submit(_grade, str(stub))
        jobs["solutions"] = pool.submit(_grade_solutions_via_main)
        return {name: job.result() for name, job in jobs.items()}


def _is_retrieval(check: grading.Check) -> bool:
    return "retrieval" in check.name or "non-square" in check.name


def test_solutions_score_full_marks(graded):
    code, stdout, stderr = graded["solutions"]
    report = json.loads(stdout)  # --json alone: stdout holds only the JSON
    failed = [t["name"] + ": " + t["output"] for t in report["tests"] if t["status"] != "passed"]
    assert not failed, f"the solution fails: {failed}"
    assert report["score"] == sum(t["max_score"] for t in report["tests"]) > 0
    assert code == 0
    assert "total" in stderr and "(100%)" in stderr  # the scorecard went to stderr


def test_untouched_stubs_score_zero(graded):
    result, _ = graded["stubs"]
    assert result.max_score > 0 and result.score == 0
    assert not result.error
    for check in result.checks:
        assert check.outcome == "failed"
        assert "NotImplementedError" in check.reason, check


@pytest.mark.parametrize("name", sorted(KINDS))
def test_planted_bug_is_reported(graded, name):
    result, seconds = graded[name]
    assert not result.error, result.error
    failed = [c for c in result.checks if c.outcome == "failed"]
    assert failed, f"{name}.py passed every check"
    assert 0 < result.max_score and result.score < result.max_score
    for check in failed:
        assert KINDS[name] in check.reason, f"{name}.py: {check.name}: {check.reason!r}"
        assert "\n" not in check.reason and len(check.reason) <= 200
    # The grader went on after the bug: the (correct) retrieval checks ran and passed.
    retrieval = [c for c in result.checks if _is_retrieval(c)]
    assert retrieval and all(c.outcome == "passed" for c in retrieval), [(c.name, c.reason) for c in retrieval]
    # A hang costs one time limit, not one per check: later checks skip the hanging function.
    if name in (*HANGS, "crashes"):
        assert sum("not run again" in c.reason for c in failed) == len(failed) - 1
    assert seconds < 45, f"grading {name}.py took {seconds:.0f} s"


def test_partly_right_solution_gets_partial_marks(graded):
    result, _ = graded["temperature_ignored"]
    passed = {c.name for c in result.checks if c.outcome == "passed"}
    assert 0 < result.score < result.max_score
    assert any(name.startswith("loss matches the reference") for name in passed)
    assert not any("temperature=0.5" in name for name in passed)


def test_json_has_gradescope_keys(graded, tmp_path):
    result, _ = graded["nan"]
    path = tmp_path / "results.json"
    grading.write_json(grading.gradescope([result], 1.0), str(path))
    report = json.loads(path.read_text())
    assert set(report) >= {"score", "tests"}
    assert report["tests"] and all(set(t) >= {"name", "score", "max_score", "output"} for t in report["tests"])
    assert report["score"] == sum(t["score"] for t in report["tests"])
    assert 0 < report["score"] < sum(t["max_score"] for t in report["tests"])
    assert any("NaN" in t["output"] for t in report["tests"] if t["score"] == 0)


def test_unknown_exercise_is_a_usage_error(capsys):
    assert grading.main(["ex99"]) == 2
    assert "unknown exercise" in capsys.readouterr().err
