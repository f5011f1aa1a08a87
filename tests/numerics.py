"""The one comparison most tests make: relative error of a result against a reference."""
from __future__ import annotations

import numpy as np
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor | np.ndarray) -> float:
    """||out - ref|| / ||ref||, computed in float64; a shape mismatch or a NaN/inf in out fails.

    ref may be a NumPy array (the chapters' float64 references).
    """
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float64)) if not isinstance(ref, torch.Tensor) else ref
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())
