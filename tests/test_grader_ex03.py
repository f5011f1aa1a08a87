"""The ex03 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex03_whisper_params"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    "key_has_bias": Planted("attention = 4 * d * d + 3 * d  # query, key, value, out",
                            "attention = 4 * d * d + 4 * d  # query, key, value, out",
                            "encoder_params counts", "AudioEncoder has"),
    "counts_encoder_positions": Planted("return stem + n_layers * block + 2 * d",
                                        "return stem + n_layers * block + 2 * d + n_audio_ctx * d",
                                        "encoder_params counts", "AudioEncoder has"),
    "tied_head_twice": Planted("embeddings = n_vocab * d + n_text_ctx * d",
                               "embeddings = 2 * n_vocab * d + n_text_ctx * d",
                               "decoder_params counts", "TextDecoder"),
    "forgets_cross_cache": Planted("per_layer = 2 * n_tokens * d_model + 2 * n_audio_ctx * d_model",
                                   "per_layer = 2 * n_tokens * d_model",
                                   "kv_cache_bytes equals", "KVCache filled by a decoder"),
}
