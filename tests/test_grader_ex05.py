"""The ex05 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex05_cls_token"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    "reads_a_patch": Planted("return x[:, 0]  # (B, width)", "return x[:, 1]",
                             "forward() returns the CLS token", "forward(images) differs from the reference"),
    "cls_last": Planted("x = torch.cat([cls, x], dim=1)", "x = torch.cat([x, cls], dim=1)",
                        "embed() equals the chapter", "embed(images) differs from the reference"),
    "cls_detached": Planted("self.class_embedding.expand(", "self.class_embedding.detach().expand(",
                            "gradients reach", "no (finite, nonzero) gradient reached class_embedding"),
}
