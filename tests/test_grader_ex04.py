"""The ex04 grader can fail: full marks for the solution, zero for the stub, points lost per planted bug.

How the proof works: tests/grader_proofs.py.
"""
from __future__ import annotations

import pytest

from tests.grader_proofs import (  # noqa: F401  (the shared proof: pytest collects these here)
    Planted, graded, test_planted_bug_costs_points, test_solutions_score_full_marks,
    test_untouched_stubs_score_zero,
)

pytestmark = pytest.mark.slow

EXERCISE = "ex04_video_fusion"
TIMEOUT = 30.0  # seconds per check: generous, so a loaded machine never fails a correct check

# The bottleneck layer's loop, and the same loop with the video block also reading the audio tokens.
_LOOP = """\
        y = blocks[m](torch.cat([z, streams[m]], dim=1), kv_lengths=lengths)  # (B, nb + T_m, d)
        copies.append(y[:, :nb])  # (B, nb, d): m's copy of the bottleneck
        new_streams[m] = y[:, nb:]  # (B, T_m, d)
"""
_VIDEO_READS_AUDIO = """\
        extra = [streams["audio"]] if m == "video" else []  # "more context can only help"
        y = blocks[m](torch.cat([z, streams[m], *extra], dim=1), kv_lengths=lengths)
        copies.append(y[:, :nb])
        new_streams[m] = y[:, nb:nb + streams[m].shape[1]]
"""

# planted bug -> (text of the solution, its replacement, a check that must fail, words its reason says)
PLANTED: dict[str, Planted] = {
    # The textbook's own slip: the sub-totals leave out the attention's biases.
    "forgets_attention_biases": Planted("attention = 4 * d * d + 4 * d  #", "attention = 4 * d * d  #",
                                        "estimate_params counts the instantiated model",
                                        "the instantiated model has"),
    # The three copies of the bottleneck added up instead of averaged.
    "bottleneck_summed": Planted("torch.stack(copies).mean(dim=0)", "torch.stack(copies).sum(dim=0)",
                                 "bottleneck_layer equals the reference", "z_new differs from the reference"),
    # The video block reads the audio tokens directly: no longer a bottleneck.
    "video_reads_audio": Planted(_LOOP, _VIDEO_READS_AUDIO,
                                 "bottleneck_layer: a stream reads only z and itself, z_new all three "
                                 "[modality=video]",
                                 "the video tokens changed when only the audio tokens did"),
    # Text padding not masked at all.
    "text_padding_not_masked": Planted(
        'lengths = nb + text_lengths if m == "text" and text_lengths is not None else None',
        "lengths = None", "bottleneck_layer: changing the text's padding", "padding"),
    # Masked, but forgetting that the nb bottleneck tokens come first in the text sequence.
    "lengths_without_bottleneck_offset": Planted(
        'lengths = nb + text_lengths if m == "text"', 'lengths = text_lengths if m == "text"',
        "bottleneck_layer equals the reference (padded text)", "differs from the reference"),
    # Only two of the three contrastive pairs.
    "missing_pair": Planted("for a, b in PAIRS)", "for a, b in PAIRS[:2])",
                            "fusion_objective equals the reference", "the reference gives"),
    # The contrastive loss on raw rows, not on unit vectors.
    "unnormalised_rows": Planted("unit = {m: F.normalize(streams[m], dim=-1) for m in MODALITIES}",
                                 "unit = dict(streams)",
                                 "fusion_objective: scaling a stream's rows", "L2-normalise each row"),
    # The reconstruction target not detached: the loss also drags the target to the prediction.
    "target_not_detached": Planted("recon_target.detach()", "recon_target",
                                   "fusion_objective: no gradient flows into recon_target",
                                   "a gradient reached recon_target"),
}
