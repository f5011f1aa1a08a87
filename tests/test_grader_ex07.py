"""The ex07 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex07_photo_search"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    "worst_first": Planted("torch.argsort(scores, descending=True, stable=True)[:k]  # (k,)",
                           "torch.argsort(scores, stable=True)[:k]  # (k,)",
                           "search_by_text: the k best", "returned scores"),
    "raw_embeddings": Planted("chunks.append(F.normalize(model.encode_image(batch).float(), dim=-1))",
                              "chunks.append(model.encode_image(batch).float())",
                              "build_index: unit embeddings", "index.embeddings differs from the reference"),
    "pickled_index": Planted('save_file({"embeddings": index.embeddings.detach().float().contiguous()}, str(path), '
                             'metadata=metadata)', 'torch.save({"embeddings": index.embeddings, **metadata}, str(path))',
                             "save_index / load_index", "without pickle"),
}
