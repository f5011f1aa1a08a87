"""The ex02 grader can fail: full marks for the solution, zero for the stub, partial for a planted bug.

Each target is graded once in a child process (as `tinymm grade` does), three
at a time: solutions/ex02_zero_shot.py, the stub generated afresh from it, and
copies of the solution with one planted mistake each, made by replacing one
line of its text (the test checks that the replacement happened).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tiny_mm import grading, stubs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXERCISE = "ex02_zero_shot"
SOLUTION = ROOT / "solutions" / f"{EXERCISE}.py"
TIMEOUT = 20.0  # seconds per check: the baseline trains a CNN, and three graders share the machine

# planted bug -> (line of the solution, its replacement, a check that must fail, words its reason says)
PLANTED = {
    "mean_of_raw_prompts": ("votes = F.normalize(emb, dim=-1)  # (T, E)", "votes = emb",
                            "zero_shot_classifier equals the reference template ensemble [templates=ensemble]",
                            "zero_shot_classifier(...) differs from the reference"),
    "images_not_normalised": ("features = F.normalize(model.encode_image(images).float(), dim=-1)",
                              "features = model.encode_image(images).float()",
                              "zero_shot_logits equals", "zero_shot_logits(...) differs from the reference"),
    "topk_ties": ("torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k]  # (B, k)",
                  "logits.topk(k, dim=1).indices  # (B, k)", "topk_accuracy: ties", "on logits with ties"),
    "no_optimiser_step": ("        optimiser.step()\n", "        pass\n",
                          "train_baseline: >= 80%", "held-out 16-px shape images"),
}


def _planted(tmp: Path, name: str) -> Path:
    old, new, _, _ = PLANTED[name]
    text = SOLUTION.read_text()
    assert text.count(old) == 1, f"the solution no longer has the line {old!r} to plant {name}"
    path = tmp / f"{name}.py"
    path.write_text(text.replace(old, new))
    return path


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict[str, grading.ExerciseResult]:
    tmp = tmp_path_factory.mktemp("grader_ex02")
    stub = tmp / f"{EXERCISE}.py"
    stub.write_text(stubs.generate()[ROOT / "exercises" / f"{EXERCISE}.py"])
    targets = {"solutions": "solutions", "stubs": str(stub)}
    targets.update({name: str(_planted(tmp, name)) for name in PLANTED})
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = {name: pool.submit(grading.grade_exercise, EXERCISE, target, TIMEOUT)
                for name, target in targets.items()}
        return {name: job.result() for name, job in jobs.items()}


def test_solutions_score_full_marks(graded):
    result = graded["solutions"]
    assert not result.error, result.error
    failed = [(c.name, c.reason) for c in result.checks if c.outcome != "passed"]
    assert not failed, f"the solution fails: {failed}"
    assert result.score == result.max_score > 0


def test_untouched_stubs_score_zero(graded):
    result = graded["stubs"]
    assert not result.error, result.error
    assert result.max_score > 0 and result.score == 0
    for check in result.checks:
        assert check.outcome == "failed"
        assert "NotImplementedError" in check.reason, check


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_bug_costs_points(graded, name):
    _, _, check_name, words = PLANTED[name]
    result = graded[name]
    assert not result.error, result.error
    assert 0 < result.score < result.max_score
    failing = [c for c in result.checks if c.name.startswith(check_name)]
    assert failing and all(c.outcome == "failed" for c in failing), [(c.name, c.outcome) for c in failing]
    for check in failing:
        assert words in check.reason, check.reason
        assert "\n" not in check.reason and len(check.reason) <= 200
