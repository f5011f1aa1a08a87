"""The ex02 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex02_zero_shot"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    "mean_of_raw_prompts": Planted("votes = F.normalize(emb, dim=-1)  # (T, E)", "votes = emb",
                                   "zero_shot_classifier equals the reference template ensemble [templates=ensemble]",
                                   "zero_shot_classifier(...) differs from the reference"),
    "images_not_normalised": Planted("features = F.normalize(model.encode_image(images).float(), dim=-1)",
                                     "features = model.encode_image(images).float()",
                                     "zero_shot_logits equals", "zero_shot_logits(...) differs from the reference"),
    "topk_ties": Planted("torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k]  # (B, k)",
                         "logits.topk(k, dim=1).indices  # (B, k)", "topk_accuracy: ties", "on logits with ties"),
    "no_optimiser_step": Planted("        optimiser.step()\n", "        pass\n",
                                 "train_baseline: >= 80%", "held-out 16-px shape images"),
}
