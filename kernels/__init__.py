"""Fused Triton kernels of the book, each with its autograd wrapper.

`kernels` is a leaf of the project: it imports torch and Triton only, never
`tiny_mm` or a chapter, so `tiny_mm` may use it without an import cycle.

On a machine without CUDA the kernels still run, on CPU tensors, through
Triton's interpreter (slowly: it is for tests and for reading, not for speed).
"""
from __future__ import annotations

import os
import sys

import torch

# Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, not
# when the kernel is launched: by the time `kernels.contrastive` has been
# imported, each kernel is already either compiled-for-GPU or interpreted.
# So the variable has to be set here, before triton or any kernel module is
# imported. A user who set it themselves (to 0 or 1) keeps their choice.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        # Too late: Triton's own helpers (tl.max, tl.sum, ...) were decorated
        # for a GPU when it was imported, and interpreted kernels cannot call
        # them. PyTorch imports Triton behind the scenes (creating an
        # optimiser or calling torch.compile does), so say what to do.
        raise ImportError(
            "Triton was imported before `kernels` on a machine without CUDA, so it is not in "
            "interpreter mode and the kernels cannot run on CPU tensors. Import `kernels` "
            "before creating an optimiser or calling torch.compile, or set "
            "TRITON_INTERPRET=1 in the environment before starting Python."
        )
    os.environ["TRITON_INTERPRET"] = "1"

from kernels.attention import attention  # noqa: E402  (hides the module kernels.attention; see its docstring)
from kernels.contrastive import clip_loss  # noqa: E402  (must follow the line above)

__all__ = ["attention", "clip_loss"]
