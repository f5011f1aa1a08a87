"""The ex06 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex06_perceiver_scaling"
TIMEOUT = 60.0  # seconds per check: generous, so a loaded machine never fails a correct check

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    # Keys and values projected from the latent width instead of the input's C features.
    "kv_from_width": Planted("2 * linear(M, C, D)", "2 * linear(M, D, D)",
                             "perceiver_io_flops equals", "FlopCounterMode counts"),
    # The classic slip: the latents attend over the inputs in every block (a plain encoder's M^2).
    "latents_attend_inputs": Planted("attention(N, N, D)", "attention(N, M, D)",
                                     "perceiver_io_flops", "FlopCounterMode counts"),
    # Forgetting the decoder's MLP.
    "no_decoder_mlp": Planted("attention(O, N, E) + mlp(O, E)", "attention(O, N, E)",
                              "perceiver_io_flops", "FlopCounterMode counts"),
    # "Linear scaling, so twice the work": the latent part does not grow.
    "doubling_is_two": Planted("return doubled / perceiver_io_flops(input_len, output_len, *sizes)",
                               "return 2.0", "doubling_factor equals", "really multiplies"),
}
