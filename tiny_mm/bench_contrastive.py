"""`tinymm bench contrastive`: CLIP's contrastive loss (chapter 4) on each rung.

    tinymm bench contrastive [--sizes N,N,...] [--dim 512] [--dtype float32]
                             [--repeats R] [--warmup W] [--plot FILE] [--no-backward] [--tf32]

A point of the sweep is a batch size N (N image/text pairs of width d). The
rungs: the NumPy reference (float64, gradient by hand), the PyTorch loss
(autograd, builds the N x N logits) and the fused Triton kernel (never does).
The harness (sweep, table, plot, options) is `tiny_mm.bench`.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from tiny_mm.bench import Benchmark, Config, Rung, element_bytes, positive, register

__all__ = ["CONTRASTIVE", "ContrastiveBenchmark"]

DEFAULT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial scale


def _unit_rows(n: int, d: int, seed: int) -> tuple[Any, Any]:
    """Fresh random L2-normalised image and text rows, (N, d) float64 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, d))
    text = image + 0.5 * rng.standard_normal((n, d))  # matched pairs point roughly the same way
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text


def _prepare_numpy(n: int, cfg: Config):
    from chapters.ch04_contrastive import reference as ref

    image, text = _unit_rows(n, cfg.dim, cfg.seed)
    s = DEFAULT_LOGIT_SCALE

    def forward():
        return ref.clip_loss(image, text, s)

    def forward_backward():
        # The reference's gradient recomputes the logits itself, as autograd would not:
        # a fair "what a NumPy user runs" figure, not a minimal one.
        return ref.clip_loss(image, text, s), ref.clip_loss_grad(image, text, s)

    return forward, (forward_backward if cfg.backward else None)


def _torch_inputs(n: int, cfg: Config):
    import torch

    image, text = _unit_rows(n, cfg.dim, cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    as_tensor = lambda a: torch.from_numpy(a).to(device=cfg.device, dtype=dtype).contiguous()  # noqa: E731
    plain = (as_tensor(image), as_tensor(text), torch.tensor(DEFAULT_LOGIT_SCALE, device=cfg.device))
    leaves = tuple(t.clone().requires_grad_(True) for t in plain)  # separate copies for fwd+bwd
    return plain, leaves


def _prepare_autograd(loss_fn: Callable, n: int, cfg: Config):
    import torch

    plain, leaves = _torch_inputs(n, cfg)

    def forward():
        with torch.no_grad():
            return loss_fn(*plain)

    def forward_backward():
        for t in leaves:
            t.grad = None  # no accumulation across repeats
        loss = loss_fn(*leaves)
        loss.backward()
        return loss

    return forward, (forward_backward if cfg.backward else None)


def _prepare_pytorch(n: int, cfg: Config):
    import torch

    from tiny_mm.contrastive import clip_loss

    if cfg.device == "cuda":  # a process-wide switch; set it either way so earlier runs do not leak in
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    return _prepare_autograd(clip_loss, n, cfg)


def _prepare_triton(n: int, cfg: Config):
    import functools

    import kernels

    loss = functools.partial(kernels.clip_loss, allow_tf32=cfg.tf32) if cfg.tf32 else kernels.clip_loss
    return _prepare_autograd(loss, n, cfg)


def _bytes_numpy(n: int, cfg: Config) -> int:
    # clip_loss_grad holds about six (N, N) float64 arrays at its peak
    # (cosine, logits, two softmaxes with their temporaries, the identity, G).
    matrices = 6 if cfg.backward else 3
    return matrices * 8 * n * n + 4 * 8 * n * cfg.dim


def _bytes_pytorch(n: int, cfg: Config) -> int:
    # logits, the transposed copy, two log-softmaxes and their gradients: about
    # eight (N, N) matrices (measured on CPU), counted at 4 bytes even for
    # 16-bit inputs to stay on the safe side.
    matrices = 8 if cfg.backward else 4
    return matrices * 4 * n * n + 6 * element_bytes(cfg) * n * cfg.dim


def _grads_numpy(n: int, cfg: Config) -> int:
    return 2 * 8 * n * cfg.dim if cfg.backward else 0  # d_image, d_text in float64


def _grads_torch(n: int, cfg: Config) -> int:
    return 2 * element_bytes(cfg) * n * cfg.dim + 4 if cfg.backward else 0  # image.grad, text.grad, scale.grad


def _bytes_triton(n: int, cfg: Config) -> int:
    # never an (N, N) matrix: inputs, gradients, and a few floats per row
    return 6 * element_bytes(cfg) * n * cfg.dim + 16 * 4 * n


def _sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a whole number (give sizes as N,N,... e.g. 1024,2048)"
            ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {n}")
        sizes.append(n)
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return tuple(sorted(set(sizes)))


class ContrastiveBenchmark(Benchmark):
    name = "contrastive"
    title = "CLIP contrastive loss (chapter 4)"
    rungs = (
        Rung("numpy", "numpy (float64)", _prepare_numpy, _bytes_numpy, _grads_numpy, host=True),
        Rung("pytorch", "pytorch", _prepare_pytorch, _bytes_pytorch, _grads_torch),
        Rung("triton", "triton", _prepare_triton, _bytes_triton, _grads_torch, triton=True),
    )
    baseline = "pytorch"
    point_header = "N"
    grads_what = "d_image, d_text: 2*N*d values"
    # The interpreter needs a few seconds at N = 256, d = 512 and grows as N^2 * d:
    # beyond this much work one call takes minutes.
    interpreter_max_work = 512 * 512 * 512
    gpu_sizes = tuple(2**k for k in range(10, 16))  # 1,024 .. 32,768
    gpu_dim = 512
    cpu_sizes = (256, 512, 1024, 2048)
    cpu_dim = 512
    cpu_defaults_why = (
        "on a CPU the defaults stop at N = 2,048: the NumPy rung at N = 32,768 would "
        "build 8.6 GB float64 (N, N) matrices, several at once, and each point would take minutes; "
        "pass --sizes to choose others"
    )

    def work(self, n: int, cfg: Config) -> float:
        return float(n * n * cfg.dim)  # the logits' N^2 d multiply-adds set every rung's pace

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sizes", type=_sizes, help="comma-separated batch sizes N")
        parser.add_argument("--dim", type=positive(1), help="embedding width d")
        parser.add_argument(
            "--tf32",
            action="store_true",
            help="GPU, float32: let the PyTorch and Triton matmuls use TF32 tensor cores (default: exact float32)",
        )

    def configure(self, args: argparse.Namespace, device: str) -> tuple[dict[str, Any], bool]:
        on_gpu = device == "cuda"
        if args.tf32 and (not on_gpu or args.dtype != "float32"):
            raise ValueError("--tf32 applies to float32 on a CUDA GPU only")
        fields = dict(
            points=args.sizes or (self.gpu_sizes if on_gpu else self.cpu_sizes),
            dim=args.dim or (self.gpu_dim if on_gpu else self.cpu_dim),
            tf32=args.tf32,
        )
        return fields, args.sizes is None

    def epilog(self) -> str:
        return (
            f"Defaults: on a GPU N = {', '.join(map(str, self.gpu_sizes))} and d = {self.gpu_dim}; "
            f"on a CPU N = {', '.join(map(str, self.cpu_sizes))} and d = {self.cpu_dim} ({self.cpu_defaults_why})."
        )

    def describe(self, cfg: Config) -> list[str]:
        return [f"d = {cfg.dim} | sizes: N = {', '.join(f'{n:,}' for n in cfg.points)}"]

    def plot_axis(self, points: list[int]) -> tuple[list[float], list[str], bool, str]:
        return [float(n) for n in points], [f"{n:,}" for n in points], True, "N (batch size)"


CONTRASTIVE = register(ContrastiveBenchmark())
