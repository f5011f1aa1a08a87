"""`tinymm bench attention`: scaled dot-product attention (chapter 2) on each rung.

    tinymm bench attention [--shapes book|long|NAME|L|LqxLk,...] [--head-dim D,...]
                           [--batch-heads BH] [--causal] [--dtype float16] [--sdpa-backend flash] ...

The rungs, each timed forward and forward+backward:

    numpy    chapters/ch02_attention/reference.py, float64, gradients by hand
    pytorch  tiny_mm.attention.scaled_dot_product_attention: the (Lq, Lk) matrix in memory
    sdpa     torch.nn.functional.scaled_dot_product_attention (the baseline of the ratios)
    triton   kernels.attention: the flash-attention kernel of the chapter

A point of the sweep is an `AttentionShape`: B*H heads, Lq queries attending to
Lk keys of head dim D, causal or not. Attention has a shape, not one size N,
so the sweep is over named shapes: the book's (`--shapes book`) and long
self-attention (`--shapes long`). The harness (sweep, table, plot, options)
is `tiny_mm.bench`.

FLOPs, for the TFLOP/s columns on a GPU: the forward does two matmuls,
S = Q K^T and O = P V, 2 * D multiply-adds each per visible (query, key) pair:
4 * B*H * D * pairs, where pairs = Lq * Lk, about half of it when causal (exactly
the pairs j <= i). The backward counts 2.5 times the forward: five matmuls
(recompute S, dV = P^T dO, dP = dO V^T, dQ, dK) to the forward's two, the usual
convention for flash attention; our deterministic kernel does seven, but the
rate is quoted on the same count for every rung. Forward+backward is 3.5 times
the forward.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any, Callable

from tiny_mm.bench import Benchmark, Config, Rung, element_bytes, positive, register

__all__ = ["ATTENTION", "AttentionBenchmark", "AttentionShape", "BOOK_SHAPES", "LONG_LENGTHS", "parse_shapes"]

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
BACKWARD_FLOPS_FACTOR = 2.5  # backward work over forward work


@dataclass(frozen=True)
class AttentionShape:
    """One point of the sweep: (B*H, Lq, D) queries attending to (B*H, Lk, D) keys and values."""

    name: str  # where the shape comes from ("whisper-enc", "self", ...)
    batch_heads: int  # B * H: the tensors are laid out as B = 1, H = batch_heads
    lq: int
    lk: int
    d: int
    causal: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} {self.lq}x{self.lk} d{self.d}" + (" causal" if self.causal else "")

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs a query may attend to: all Lq*Lk, or j <= i when causal (top-left)."""
        if not self.causal:
            return self.lq * self.lk
        # query i sees keys 0..i, capped at Lk: sum over i < Lq of min(i + 1, Lk)
        full = min(self.lq, self.lk)  # rows 0..full-1 see i + 1 keys
        return full * (full + 1) // 2 + (self.lq - full) * self.lk

    def forward_flops(self) -> int:
        return 4 * self.batch_heads * self.d * self.visible_pairs

    def grad_elements(self) -> int:
        """Elements of dq, dk and dv together: B*H * (Lq + 2 Lk) * D."""
        return self.batch_heads * (self.lq + 2 * self.lk) * self.d

    def io_elements(self) -> int:
        """Elements of q, k, v and out together: B*H * (2 Lq + 2 Lk) * D."""
        return self.batch_heads * 2 * (self.lq + self.lk) * self.d

    def matrix_elements(self) -> int:
        """Elements of one (B*H, Lq, Lk) score matrix: what the naive rungs build several of."""
        return self.batch_heads * self.lq * self.lk


# The book's shapes (name, Lq, Lk, D, what it is). D = 64 throughout: the head
# width of ViT-B, CLIP's towers and every Whisper size.
BOOK_SHAPES: dict[str, tuple[int, int, int, str]] = {
    "text>image": (128, 196, 64, "128 text tokens attend to the 196 patches of a 224 px image; chapter 1's example"),
    "perceiver": (64, 256, 64, "64 Perceiver latents attend to 256 patches"),
    "whisper-enc": (1500, 1500, 64, "Whisper's audio encoder, self-attention over 1500 frames, 30 s"),
    "whisper-cross": (448, 1500, 64, "Whisper's decoder, 448 text positions attend to 1500 audio frames"),
}
LONG_LENGTHS = (1024, 2048, 4096, 8192, 16384)
LONG_HEAD_DIMS = (64, 128)


def parse_shapes(
    text: str, head_dims: tuple[int, ...] | None, batch_heads: int, causal: bool
) -> tuple[AttentionShape, ...]:
    """`--shapes` to shapes. Items, comma-separated: `book`, `long`, a book shape's name,
    `L` (self-attention L x L) or `LqxLk`. head_dims, when given, replaces every shape's D
    (one shape per D); otherwise book shapes keep D = 64, long ones take 64 and 128, and
    `L` / `LqxLk` take 64. ValueError names a bad item.
    """
    shapes: list[AttentionShape] = []

    def add(name: str, lq: int, lk: int, dims: tuple[int, ...]) -> None:
        for d in head_dims or dims:
            shape = AttentionShape(name, batch_heads, lq, lk, d, causal)
            if shape not in shapes:
                shapes.append(shape)

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("--shapes: give at least one shape (book, long, a name, L or LqxLk)")
    for item in items:
        if item == "book":
            for name, (lq, lk, d, _) in BOOK_SHAPES.items():
                add(name, lq, lk, (d,))
        elif item == "long":
            for d in head_dims or LONG_HEAD_DIMS:  # D outer, L inner: each D's lengths in a row
                for length in LONG_LENGTHS:
                    add("self", length, length, (d,))
        elif item in BOOK_SHAPES:
            lq, lk, d, _ = BOOK_SHAPES[item]
            add(item, lq, lk, (d,))
        else:
            parts = item.lower().split("x")
            if len(parts) > 2 or not all(p.isdigit() for p in parts):
                raise ValueError(
                    f"--shapes: {item!r} is not a shape; use book, long, one of {', '.join(BOOK_SHAPES)}, "
                    "L (self-attention, e.g. 4096) or LqxLk (e.g. 448x1500)"
                )
            lq, lk = int(parts[0]), int(parts[-1])
            if lq < 1 or lk < 1:
                raise ValueError(f"--shapes: {item!r}: lengths must be >= 1")
            add("self" if len(parts) == 1 else "cross", lq, lk, (64,))
    return tuple(shapes)


def _head_dims(text: str) -> tuple[int, ...]:
    dims = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r} is not a whole number (give head dims as D,D,... e.g. 64,128)")
        if int(part) < 1:
            raise argparse.ArgumentTypeError(f"head dims must be >= 1, got {part}")
        dims.append(int(part))
    return tuple(dict.fromkeys(dims))


# ---------------------------------------------------------------------------
# The rungs


def _numpy_inputs(shape: AttentionShape, seed: int):
    """q, k, v and d_out as float64 NumPy arrays, (1, B*H, L, D)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bh, d = shape.batch_heads, shape.d
    q = rng.standard_normal((1, bh, shape.lq, d))  # (B, H, Lq, D)
    k = rng.standard_normal((1, bh, shape.lk, d))  # (B, H, Lk, D)
    v = rng.standard_normal((1, bh, shape.lk, d))  # (B, H, Lk, D)
    d_out = rng.standard_normal((1, bh, shape.lq, d))  # (B, H, Lq, D)
    return q, k, v, d_out


def _prepare_numpy(shape: AttentionShape, cfg: Config):
    from chapters.ch02_attention import reference as ref

    q, k, v, d_out = _numpy_inputs(shape, cfg.seed)

    def forward():
        return ref.attention(q, k, v, causal=shape.causal)

    def forward_backward():
        # attention_grad recomputes the probabilities itself (it is given q, k, v, not
        # what the forward saved): what a NumPy user runs, not a minimal count.
        return ref.attention(q, k, v, causal=shape.causal), ref.attention_grad(q, k, v, d_out, causal=shape.causal)

    return forward, (forward_backward if cfg.backward else None)


def _prepare_autograd(attend: Callable, shape: AttentionShape, cfg: Config):
    """forward (no grad) and forward+backward (out.backward(d_out)) calls of a torch rung."""
    import torch

    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    # drawn on the device in float32, then cast: fast for the long shapes too
    draw = lambda length: torch.randn(  # noqa: E731
        (1, shape.batch_heads, length, shape.d), generator=g, device=cfg.device
    ).to(dtype)
    plain = (draw(shape.lq), draw(shape.lk), draw(shape.lk))  # q (B, H, Lq, D), k, v (B, H, Lk, D)
    d_out = draw(shape.lq)  # (B, H, Lq, D)
    leaves = tuple(t.clone().requires_grad_(True) for t in plain)  # separate copies for fwd+bwd

    def forward():
        with torch.no_grad():
            return attend(*plain)

    def forward_backward():
        for t in leaves:
            t.grad = None  # no accumulation across repeats
        out = attend(*leaves)
        out.backward(d_out)
        return out

    return forward, (forward_backward if cfg.backward else None)


def _prepare_pytorch(shape: AttentionShape, cfg: Config):
    import torch

    from tiny_mm.attention import scaled_dot_product_attention

    if cfg.device == "cuda":  # a process-wide switch; set it either way so earlier runs do not leak in
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    attend = functools.partial(scaled_dot_product_attention, causal=shape.causal)
    return _prepare_autograd(attend, shape, cfg)


def _sdpa_call(q, k, v, *, causal: bool, backends: list | None):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Lq, D)
    with sdpa_kernel(backends):  # only these backends may run: an unsupported case raises
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Lq, D)


def _prepare_sdpa(shape: AttentionShape, cfg: Config):
    import torch
    from torch.nn.attention import SDPBackend

    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    backends = None if cfg.sdpa_backend == "auto" else [names[cfg.sdpa_backend]]
    return _prepare_autograd(functools.partial(_sdpa_call, causal=shape.causal, backends=backends), shape, cfg)


def _prepare_triton(shape: AttentionShape, cfg: Config):
    import kernels

    attend = functools.partial(kernels.attention, causal=shape.causal, allow_tf32=cfg.tf32)
    return _prepare_autograd(attend, shape, cfg)


# Memory estimates, used only to skip points that would not fit (80% of what is free).


def _bytes_numpy(shape: AttentionShape, cfg: Config) -> int:
    # the scores, their masked copy, the exponentials, P (and the mask when causal);
    # attention_grad adds dP, dP - delta and dS: about 5 (forward) or 8 (forward+backward)
    # float64 (B*H, Lq, Lk) matrices at the peak, plus the inputs and gradients.
    matrices = 8 if cfg.backward else 5
    return matrices * 8 * shape.matrix_elements() + 3 * 8 * shape.io_elements()


def _bytes_pytorch(shape: AttentionShape, cfg: Config) -> int:
    # scores, scaled scores, the float32 softmax and P in the input dtype; autograd keeps
    # them for the backward, which adds dP and dS: counted at 4 bytes each to stay safe.
    matrices = 7 if cfg.backward else 4
    return matrices * 4 * shape.matrix_elements() + 3 * element_bytes(cfg) * shape.io_elements()


def _bytes_fused(shape: AttentionShape, cfg: Config) -> int:
    # never a (Lq, Lk) matrix: inputs, output, gradients and a float per query row
    return 3 * element_bytes(cfg) * shape.io_elements() + 8 * shape.batch_heads * shape.lq


def _bytes_sdpa(shape: AttentionShape, cfg: Config) -> int:
    if cfg.sdpa_backend == "math":  # torch's own unfused path: the matrix, like the pytorch rung
        return _bytes_pytorch(shape, cfg)
    return _bytes_fused(shape, cfg)


def _grads_numpy(shape: AttentionShape, cfg: Config) -> int:
    return 8 * shape.grad_elements() if cfg.backward else 0  # dq, dk, dv in float64


def _grads_torch(shape: AttentionShape, cfg: Config) -> int:
    return element_bytes(cfg) * shape.grad_elements() if cfg.backward else 0  # q.grad, k.grad, v.grad


# ---------------------------------------------------------------------------
# The benchmark


class AttentionBenchmark(Benchmark):
    name = "attention"
    title = "scaled dot-product attention (chapter 2)"
    rungs = (
        Rung("numpy", "numpy (float64)", _prepare_numpy, _bytes_numpy, _grads_numpy, host=True),
        Rung("pytorch", "pytorch (matrix)", _prepare_pytorch, _bytes_pytorch, _grads_torch),
        Rung("sdpa", "torch sdpa", _prepare_sdpa, _bytes_sdpa, _grads_torch),
        Rung("triton", "triton", _prepare_triton, _bytes_fused, _grads_torch, triton=True),
    )
    baseline = "sdpa"
    point_header = "shape"  # labels read NAME LqxLk dD
    grads_what = "dq, dk, dv"
    # Forward FLOPs beyond which the interpreted kernel takes minutes a point. Measured on a
    # 2-core CPU: text>image at B*H = 2 (1.3e7 FLOPs) takes 0.3 s forward and 1.6 s backward;
    # the time grows about as the work, so whisper-enc (90 times more) would take minutes a call.
    interpreter_max_work = 5e7
    # Forward FLOPs beyond which the float64 NumPy rung takes many seconds a call (beside a GPU).
    host_max_work = 4 * 32 * 64 * 1500 * 1500
    gpu_batch_heads = 32
    cpu_batch_heads = 2
    cpu_defaults_why = (
        "on a CPU the defaults are the book's shapes at B*H = 2 (about a minute): at L = 16,384 one "
        "float64 score matrix of the NumPy rung is 2 GiB per head, and a point takes minutes; pass "
        "--shapes long (or e.g. --shapes 1024,2048) and --batch-heads to choose others"
    )

    def label(self, shape: AttentionShape) -> str:
        return shape.label

    def work(self, shape: AttentionShape, cfg: Config) -> float:
        return float(shape.forward_flops())

    def flops(self, shape: AttentionShape, cfg: Config, backward: bool) -> float:
        return shape.forward_flops() * ((1 + BACKWARD_FLOPS_FACTOR) if backward else 1.0)

    def default_dtype(self, device: str) -> str:
        # SDPA's flash backend on a GPU takes 16-bit inputs only; on a CPU float32 is what runs fast
        return "float16" if device == "cuda" else "float32"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--shapes",
            metavar="LIST",
            help="comma-separated: book (the book's shapes), long (self-attention L = 1,024 .. 16,384, "
            f"D = 64 and 128), a book shape ({', '.join(BOOK_SHAPES)}), L (self-attention L x L) or LqxLk "
            "(default: book and long on a GPU, book on a CPU)",
        )
        parser.add_argument(
            "--head-dim",
            type=_head_dims,
            metavar="D[,D]",
            help="head dim(s) D for every shape (default: each shape's own)",
        )
        parser.add_argument(
            "--batch-heads",
            type=positive(1),
            metavar="BH",
            help=f"B*H, the batch size times the heads (default {self.gpu_batch_heads} on a GPU, "
            f"{self.cpu_batch_heads} on a CPU)",
        )
        parser.add_argument("--causal", action="store_true", help="causal mask (query i sees keys j <= i)")
        parser.add_argument(
            "--sdpa-backend",
            choices=SDPA_BACKENDS,
            default="auto",
            help="hold torch's SDPA rung to one backend (default auto: torch picks; flash is the GPU targets' "
            "baseline; a CPU has auto, flash and math)",
        )
        parser.add_argument(
            "--tf32",
            action="store_true",
            help="GPU, float32: let the PyTorch, SDPA and Triton matmuls use TF32 tensor cores",
        )

    def configure(self, args: argparse.Namespace, device: str) -> tuple[dict[str, Any], bool]:
        on_gpu = device == "cuda"
        if args.tf32 and (not on_gpu or args.dtype != "float32"):
            raise ValueError("--tf32 applies to float32 on a CUDA GPU only")
        if args.sdpa_backend in ("efficient", "cudnn") and not on_gpu:
            raise ValueError(
                f"--sdpa-backend {args.sdpa_backend} needs a CUDA GPU; a CPU has auto, flash and math"
            )
        if args.sdpa_backend == "flash" and on_gpu and args.dtype == "float32":
            raise ValueError("--sdpa-backend flash takes float16 or bfloat16 inputs only (--dtype float16)")
        batch_heads = args.batch_heads or (self.gpu_batch_heads if on_gpu else self.cpu_batch_heads)
        text = args.shapes or ("book,long" if on_gpu else "book")
        points = parse_shapes(text, args.head_dim, batch_heads, args.causal)
        fields = dict(points=points, tf32=args.tf32, sdpa_backend=args.sdpa_backend)
        return fields, args.shapes is None and args.batch_heads is None

    def epilog(self) -> str:
        book = "; ".join(f"{name}: {lq} x {lk}, D = {d} ({why})" for name, (lq, lk, d, why) in BOOK_SHAPES.items())
        return (
            f"Book shapes (Lq x Lk): {book}. Long: self-attention L = "
            f"{', '.join(f'{n:,}' for n in LONG_LENGTHS)}, D = 64 and 128. "
            f"Defaults: on a GPU book and long, B*H = {self.gpu_batch_heads}, float16; {self.cpu_defaults_why}."
        )

    def describe(self, cfg: Config) -> list[str]:
        shape = cfg.points[0]
        lines = [
            f"B*H = {shape.batch_heads} (laid out as B = 1, H = B*H) | "
            f"{'causal' if shape.causal else 'no mask'} | torch sdpa backend: {cfg.sdpa_backend}",
            "shapes: " + ", ".join(s.label for s in cfg.points),
        ]
        return lines

    def footnotes(self, cfg: Config) -> list[str]:
        notes = []
        if cfg.device == "cuda":
            notes.append(
                "TFLOP/s: counted FLOPs / median time; forward 4 * B*H * D * (visible query-key pairs: Lq*Lk, "
                f"about half when causal), backward {BACKWARD_FLOPS_FACTOR} times the forward."
            )
        return notes

    def plot_axis(self, points: list[AttentionShape]) -> tuple[list[float], list[str], bool, str]:
        return [float(i) for i in range(len(points))], [s.label for s in points], False, "shape"


ATTENTION = register(AttentionBenchmark())
