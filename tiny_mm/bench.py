"""`tinymm bench NAME`: time the rungs of a chapter side by side.

    tinymm bench contrastive [--sizes N,N,...] [--dim 512] [--dtype float32]
                             [--repeats R] [--warmup W] [--plot FILE] [--no-backward]

Each benchmark is a `Benchmark` in the `BENCHMARKS` registry: a list of
`Rung`s (NumPy reference, PyTorch, Triton, ...) that each know how to build
their forward and forward+backward calls for a problem size N, and how many
bytes that will take. The sweep, the table and the plot are shared, so a new
chapter adds its benchmark by registering one more entry.

How each (rung, N) point is measured:
- time: `tiny_mm.timing.time_it`, median of `repeats` calls after `warmup`;
- memory, of forward+backward (forward alone with --no-backward), measured on
  the call after one warm-up call, before the timed ones: on a GPU, peak
  `torch.cuda.max_memory_allocated` minus the memory held before the call; on
  a CPU (and for the NumPy rung everywhere), each point runs in a fresh child
  process and reports the growth of its peak RSS over its RSS once the inputs
  exist;
- a point whose estimated memory does not fit is skipped with a note, and a
  point that fails (out of memory, a bug) becomes a note: the sweep goes on.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from tiny_mm import timing

__all__ = [
    "Config",
    "Rung",
    "Benchmark",
    "Measurement",
    "BENCHMARKS",
    "run_sweep",
    "format_table",
    "save_plot",
    "main",
]

DTYPES = ("float32", "float16", "bfloat16")
GiB = 1024**3


@dataclass(frozen=True)
class Config:
    """One sweep's settings (picklable: it travels to the measuring child processes)."""

    sizes: tuple[int, ...]
    dim: int
    dtype: str  # one of DTYPES; the NumPy rung always computes in float64
    device: str  # "cpu" or "cuda"
    repeats: int
    warmup: int
    backward: bool = True
    min_time_ms: float = 300.0  # time fast calls until they add up to this (more samples, steadier median)
    threads: int | None = None  # cap torch's and OpenBLAS's threads (None: their defaults)
    tf32: bool = False  # float32 on a GPU: let matmuls round inputs to TF32 (both rungs alike)
    seed: int = 0


# prepare(n, config) -> (forward, forward_and_backward or None)
Prepare = Callable[[int, Config], "tuple[Callable[[], Any], Callable[[], Any] | None]"]


@dataclass(frozen=True)
class Rung:
    """One implementation of the benchmarked piece."""

    name: str  # short, used in --rungs and the table
    label: str  # what the table prints
    prepare: Prepare  # a module-level function: child processes look it up by name
    bytes_needed: Callable[[int, Config], int]  # estimate of the peak memory of forward+backward
    # bytes of what forward+backward must hand back (the gradients): any implementation
    # needs them, so the table also shows the peak without them, the true workspace
    result_bytes: Callable[[int, Config], int]
    triton: bool = False  # runs under the Triton interpreter when there is no GPU
    host: bool = False  # computes on the CPU whatever the device (NumPy): memory is its RSS growth


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    rungs: tuple[Rung, ...]
    baseline: str  # the rung the ratios divide by
    gpu_sizes: tuple[int, ...]
    gpu_dim: int
    cpu_sizes: tuple[int, ...]
    cpu_dim: int
    cpu_defaults_why: str  # printed in --help and the header: why the CPU defaults are smaller

    def rung(self, name: str) -> Rung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise KeyError(name)


@dataclass
class Measurement:
    """What one (rung, N) point gave. `note` says why a figure is missing."""

    rung: str
    n: int
    forward: timing.Timing | None = None
    forward_backward: timing.Timing | None = None
    peak_extra_bytes: int | None = None
    result_bytes: int = 0  # of which the gradients the call returns

    @property
    def workspace_bytes(self) -> int | None:
        if self.peak_extra_bytes is None:
            return None
        return max(0, self.peak_extra_bytes - self.result_bytes)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.forward is not None


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


# ---------------------------------------------------------------------------
# The contrastive loss (chapter 4)

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


def _elt(cfg: Config) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.dtype]


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
    return matrices * 4 * n * n + 6 * _elt(cfg) * n * cfg.dim


def _grads_numpy(n: int, cfg: Config) -> int:
    return 2 * 8 * n * cfg.dim if cfg.backward else 0  # d_image, d_text in float64


def _grads_torch(n: int, cfg: Config) -> int:
    return 2 * _elt(cfg) * n * cfg.dim + 4 if cfg.backward else 0  # image.grad, text.grad, scale.grad


def _bytes_triton(n: int, cfg: Config) -> int:
    # never an (N, N) matrix: inputs, gradients, and a few floats per row
    return 6 * _elt(cfg) * n * cfg.dim + 16 * 4 * n


CONTRASTIVE = register(
    Benchmark(
        name="contrastive",
        title="CLIP contrastive loss (chapter 4)",
        rungs=(
            Rung("numpy", "numpy (float64)", _prepare_numpy, _bytes_numpy, _grads_numpy, host=True),
            Rung("pytorch", "pytorch", _prepare_pytorch, _bytes_pytorch, _grads_torch),
            Rung("triton", "triton", _prepare_triton, _bytes_triton, _grads_torch, triton=True),
        ),
        baseline="pytorch",
        gpu_sizes=tuple(2**k for k in range(10, 16)),  # 1,024 .. 32,768
        gpu_dim=512,
        cpu_sizes=(256, 512, 1024, 2048),
        cpu_dim=512,
        cpu_defaults_why=(
            "on a CPU the defaults stop at N = 2,048: the NumPy rung at N = 32,768 would "
            "build 8.6 GB float64 (N, N) matrices, several at once, and each point would take minutes"
        ),
    )
)


# ---------------------------------------------------------------------------
# The sweep


def _measure_point(bench_name: str, rung_name: str, n: int, cfg: Config) -> Measurement:
    """Build the inputs of one (rung, N) point, measure its peak extra memory, then time it.

    On a CPU (and for the NumPy rung anywhere) this runs in a fresh child
    process, so the memory figure is not polluted by earlier points. Memory is
    measured on the second call (the first warms up code paths), before the
    timed calls.
    """
    rung = BENCHMARKS[bench_name].rung(rung_name)
    forward, forward_backward = rung.prepare(n, cfg)
    if cfg.threads:
        timing.limit_threads(cfg.threads)
    biggest = forward_backward or forward
    if cfg.device == "cuda" and not rung.host:
        peak = timing.cuda_peak_extra_bytes(biggest)
    else:
        peak = timing.rss_peak_growth_bytes(biggest)
    sync = cfg.device == "cuda" and not rung.host  # NumPy never queues GPU work: no CUDA in its child
    warmup, repeats, min_time = cfg.warmup, cfg.repeats, cfg.min_time_ms
    if rung.triton and cfg.device != "cuda":
        # the interpreter is slow and its time means nothing: one call shows it runs
        warmup, repeats, min_time = 0, 1, 0.0
    fwd = timing.time_it(forward, warmup=warmup, repeats=repeats, min_time_ms=min_time, sync=sync)
    fb = None
    if forward_backward is not None:
        fb = timing.time_it(forward_backward, warmup=warmup, repeats=repeats, min_time_ms=min_time, sync=sync)
    del forward, forward_backward, biggest  # the inputs go with them
    if cfg.device == "cuda" and not rung.host:
        import torch

        torch.cuda.empty_cache()  # hand cached blocks back, so the next point starts from the same place
    return Measurement(rung_name, n, fwd, fb, peak, rung.result_bytes(n, cfg))


# The interpreter needs a few seconds at N = 256, d = 512 and grows as N^2 * d:
# beyond this much work one call takes minutes.
INTERPRETER_MAX_WORK = 512 * 512 * 512


def available_bytes(device: str) -> int | None:
    """Free memory on the device: CUDA's free bytes, or the kernel's MemAvailable on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan(bench: Benchmark, cfg: Config, rungs: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[Measurement]]:
    """Which (rung, N) points to run, and the ones skipped (as measurements with a note)."""
    free_device, free_host = available_bytes(cfg.device), available_bytes("cpu")
    todo: list[tuple[str, int]] = []
    skipped: list[Measurement] = []
    smallest = min(cfg.sizes)
    for n in cfg.sizes:
        for name in rungs:
            rung = bench.rung(name)
            if rung.triton and cfg.device != "cuda":
                if n != smallest:
                    continue  # the interpreter: one small point shows it runs; see the footnote
                if n * n * cfg.dim > INTERPRETER_MAX_WORK:
                    skipped.append(
                        Measurement(
                            name,
                            n,
                            note=f"skipped: under the interpreter N = {n:,}, d = {cfg.dim} would take minutes "
                            f"(it runs when N^2 * d <= {INTERPRETER_MAX_WORK:,}, e.g. --sizes 256)",
                        )
                    )
                    continue
            need = rung.bytes_needed(n, cfg)
            free = free_host if rung.host else free_device
            if free is not None and need > 0.8 * free:
                skipped.append(
                    Measurement(
                        name,
                        n,
                        note=f"skipped: needs about {timing.format_bytes(need)}, "
                        f"{timing.format_bytes(free)} free",
                    )
                )
                continue
            todo.append((name, n))
    return todo, skipped


def run_sweep(
    bench: Benchmark,
    cfg: Config,
    rungs: tuple[str, ...] | None = None,
    *,
    isolate: bool | None = None,
    progress: bool = True,
) -> list[Measurement]:
    """Measure every (rung, N) point of `cfg`; a point that fails becomes a note, never a crash.

    isolate: measure each point in a fresh child process (the default on a CPU,
    where it is how peak memory is measured).
    """
    from tqdm import tqdm

    rungs = rungs or tuple(r.name for r in bench.rungs)
    isolate = cfg.device != "cuda" if isolate is None else isolate
    todo, results = plan(bench, cfg, rungs)
    bar = tqdm(todo, desc=f"bench {bench.name}", unit="point", file=sys.stderr, disable=not progress, leave=False)
    for name, n in bar:
        bar.set_postfix_str(f"{name} N={n}")
        try:
            if isolate or bench.rung(name).host:  # host memory is measured in a fresh child
                m = timing.run_in_child(_measure_point, bench.name, name, n, cfg)
            else:
                m = _measure_point(bench.name, name, n, cfg)
        except Exception as err:  # report and go on: one broken rung must not hide the others
            msg = str(err).strip().splitlines()
            m = Measurement(name, n, note=f"failed: {type(err).__name__}: {msg[0] if msg else ''}")
        results.append(m)
    order = {name: i for i, name in enumerate(rungs)}
    results.sort(key=lambda m: (m.n, order[m.rung]))
    return results


# ---------------------------------------------------------------------------
# Output


def device_description(device: str) -> str:
    if device == "cuda":
        import torch

        return f"GPU {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def _ms(t: timing.Timing | None) -> str:
    if t is None:
        return "-"
    return f"{t.median_ms:.3g}" if t.median_ms < 100 else f"{t.median_ms:.0f}"


def format_table(bench: Benchmark, cfg: Config, results: list[Measurement]) -> str:
    """The results as a fixed-width table with footnotes."""
    interpreted = cfg.device != "cuda"
    base = {m.n: m for m in results if m.rung == bench.baseline and m.ok}

    def ratio(m: Measurement, attr: str) -> str:
        rung = bench.rung(m.rung)
        b = base.get(m.n)
        mine, theirs = getattr(m, attr), getattr(b, attr) if b else None
        if (rung.triton and interpreted) or mine is None or theirs is None or theirs.median_ms == 0:
            return "-"
        return f"{mine.median_ms / theirs.median_ms:.3g}x"

    headers = ["N", "rung", "fwd ms", "fwd x"]
    if cfg.backward:
        headers += ["fwd+bwd ms", "fwd+bwd x"]
    headers += ["peak extra"] + (["excl. grads"] if cfg.backward else [])
    rows, notes = [], []
    for m in results:
        rung = bench.rung(m.rung)
        label = rung.label + (" *" if rung.triton and interpreted else "")
        if not m.ok:
            notes.append(f"  {rung.label} at N = {m.n:,}: {m.note}")
        row = [f"{m.n:,}", label, _ms(m.forward), ratio(m, "forward")]
        if cfg.backward:
            row += [_ms(m.forward_backward), ratio(m, "forward_backward")]
        if m.ok:
            row += [timing.format_bytes(m.peak_extra_bytes)]
            row += [timing.format_bytes(m.workspace_bytes)] if cfg.backward else []
        else:
            row += [(m.note or "").split(":")[0]] + (["-"] if cfg.backward else [])
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    align = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    lines = [align(headers), align(["-" * w for w in widths])]
    previous_n = None
    for m, row in zip(results, rows):
        if previous_n is not None and m.n != previous_n:
            lines.append("")
        previous_n = m.n
        lines.append(align(row))
    table = lines
    lines = []  # the footnotes, wrapped below
    lines.append(f"x: time divided by the {bench.baseline} rung's at the same N (lower is faster).")
    memory_note = timing.GPU_MEMORY_NOTE if cfg.device == "cuda" else timing.CPU_MEMORY_NOTE
    lines.append(f"peak extra ({'fwd+bwd' if cfg.backward else 'fwd'}): {memory_note}.")
    if cfg.backward:
        lines.append(
            "excl. grads: peak extra minus the gradients the call hands back (d_image, d_text: 2*N*d values), "
            "which every implementation must produce: the workspace it needs on top."
        )
    if cfg.device == "cuda" and any(bench.rung(m.rung).host for m in results):
        lines.append(f"  the NumPy rung runs on the host: its figure is the {timing.RSS_MEMORY_WHAT}.")
    if interpreted and any(bench.rung(m.rung).triton for m in results):
        smallest = min(cfg.sizes)
        lines.append(
            "* Triton ran under its interpreter (TRITON_INTERPRET=1, no CUDA GPU): it executes the "
            "kernel in NumPy, one program after another, so its timings are NOT speed figures; it is "
            f"left out of the ratios, and run once, only at the smallest N ({smallest:,}), to show it works."
        )
    if notes:
        lines.append("notes:")
        lines += notes
    wrapped = [
        textwrap.fill(line, width=100, break_on_hyphens=False, subsequent_indent="    " if line[0] == " " else "  ")
        for line in lines
    ]
    return "\n".join(table + [""] + wrapped)


def header(bench: Benchmark, cfg: Config, defaults_used: bool) -> str:
    import torch

    lines = [
        f"tinymm bench {bench.name}: {bench.title}",
        f"device: {device_description(cfg.device)} | torch {torch.__version__} | d = {cfg.dim} | "
        f"dtype {cfg.dtype}{' (TF32 matmuls)' if cfg.tf32 else ''} (NumPy rung: float64)",
        f"timing: median of at least {cfg.repeats} call(s), and of at least {cfg.min_time_ms:.0f} ms "
        f"of calls, after {cfg.warmup} warm-up call(s)"
        + (f"; {cfg.threads} CPU thread(s)" if cfg.threads else ""),
        f"sizes: N = {', '.join(f'{n:,}' for n in cfg.sizes)}",
    ]
    if defaults_used and cfg.device != "cuda":
        lines.append(f"note: {bench.cpu_defaults_why}; pass --sizes to choose others.")
    if cfg.device != "cuda" and not cfg.threads:
        lines.append("note: if the figures jump around, another program is busy: --threads 1 steadies them.")
    return "\n".join(lines)


def save_plot(bench: Benchmark, cfg: Config, results: list[Measurement], path: str) -> None:
    """Time and peak extra memory against N, log-log, one line per rung (Agg backend, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_time, ax_mem = fig.subplots(1, 2)
    attr = "forward_backward" if cfg.backward else "forward"
    for rung in bench.rungs:
        points = [m for m in results if m.rung == rung.name and m.ok]
        if not points:
            continue
        label = rung.label
        if rung.triton and cfg.device != "cuda":
            label += " (interpreter: not a speed figure)"
        if rung.host and cfg.device == "cuda":
            label += " (on the host; memory: RSS)"
        ns = [m.n for m in points]
        ax_time.plot(ns, [getattr(m, attr).median_ms for m in points], marker="o", label=label)
        mem = [(m.n, m.peak_extra_bytes / 2**20) for m in points if m.peak_extra_bytes]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", label=label)
    what = "forward+backward" if cfg.backward else "forward"
    ax_time.set(xscale="log", yscale="log", xlabel="N (batch size)", ylabel=f"{what} time, ms (median)")
    ax_mem.set(xscale="log", yscale="log", xlabel="N (batch size)", ylabel="peak extra memory, MiB")
    ax_time.set_title(f"{bench.title}: time, d = {cfg.dim}, {cfg.dtype}", fontsize=10)
    ax_mem.set_title(
        "memory: " + ("max_memory_allocated growth" if cfg.device == "cuda" else "peak RSS growth (child process)"),
        fontsize=10,
    )
    measured = sorted({m.n for m in results if m.ok})
    for ax in (ax_time, ax_mem):
        if measured:  # label the sizes that were run, not powers of ten
            ax.set_xticks(measured, [f"{n:,}" for n in measured])
            ax.set_xticks([], minor=True)
        ax.yaxis.set_minor_formatter(NullFormatter())  # decades only: the minor labels crowd the axis
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Command line


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() can return an exit code."""

    def error(self, message: str):
        raise _ArgumentError(f"{self.prog}: error: {message}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise SystemExit(status)


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


def _positive(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> _Parser:
    parser = _Parser(
        prog="tinymm bench",
        description="Time the NumPy, PyTorch and Triton rungs of a chapter side by side.",
    )
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=_Parser)
    for bench in BENCHMARKS.values():
        p = sub.add_parser(
            bench.name,
            help=bench.title,
            description=f"{bench.title}. Rungs: {', '.join(r.name for r in bench.rungs)}.",
            epilog=f"Defaults: on a GPU N = {', '.join(map(str, bench.gpu_sizes))} and d = {bench.gpu_dim}; "
            f"on a CPU N = {', '.join(map(str, bench.cpu_sizes))} and d = {bench.cpu_dim} "
            f"({bench.cpu_defaults_why}).",
        )
        p.add_argument("--sizes", type=_sizes, help="comma-separated batch sizes N")
        p.add_argument("--dim", type=_positive(1), help="embedding width d")
        p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the PyTorch and Triton rungs")
        p.add_argument("--repeats", type=_positive(1), help="timed calls per point (median reported)")
        p.add_argument("--warmup", type=_positive(0), help="untimed calls before timing")
        p.add_argument(
            "--min-time",
            type=_positive(0),
            default=300,
            metavar="MS",
            help="keep timing a fast call until its calls add up to MS milliseconds (default 300)",
        )
        p.add_argument("--plot", metavar="FILE", help="save a figure (time and memory vs N) to FILE, e.g. bench.png")
        p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
        p.add_argument(
            "--tf32",
            action="store_true",
            help="GPU, float32: let the PyTorch and Triton matmuls use TF32 tensor cores (default: exact float32)",
        )
        p.add_argument("--rungs", help=f"comma-separated subset of: {', '.join(r.name for r in bench.rungs)}")
        p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
        p.add_argument(
            "--threads",
            type=_positive(1),
            help="CPU threads for torch and NumPy (default: theirs); 1 gives steadier figures on a busy machine",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def config_from_args(bench: Benchmark, args: argparse.Namespace) -> tuple[Config, tuple[str, ...], bool]:
    """Validate the options against this machine; ValueError names what is wrong."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available on this machine")
    if args.dtype == "bfloat16" and device != "cuda":
        raise ValueError(
            "--dtype bfloat16 needs a CUDA GPU: the Triton interpreter that runs the kernel "
            "on a CPU does not support bfloat16 (use float32 or float16 here)"
        )
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise ValueError(f"--plot {args.plot}: the folder {os.path.dirname(os.path.abspath(args.plot))} does not exist")
    if args.tf32 and (device != "cuda" or args.dtype != "float32"):
        raise ValueError("--tf32 applies to float32 on a CUDA GPU only")
    on_gpu = device == "cuda"
    defaults_used = args.sizes is None
    rungs = tuple(r.name for r in bench.rungs)
    if args.rungs:
        chosen = tuple(r.strip() for r in args.rungs.split(",") if r.strip())
        unknown = [r for r in chosen if r not in rungs]
        if unknown or not chosen:
            raise ValueError(f"--rungs: unknown rung(s) {unknown or chosen}; choose from {', '.join(rungs)}")
        rungs = tuple(r for r in rungs if r in chosen)
    cfg = Config(
        sizes=args.sizes or (bench.gpu_sizes if on_gpu else bench.cpu_sizes),
        dim=args.dim or (bench.gpu_dim if on_gpu else bench.cpu_dim),
        dtype=args.dtype,
        device=device,
        repeats=args.repeats or (20 if on_gpu else 3),
        warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
        backward=not args.no_backward,
        min_time_ms=float(args.min_time),
        threads=args.threads,
        tf32=args.tf32,
    )
    return cfg, rungs, defaults_used


def main(argv: list[str] | None = None) -> int:
    """`tinymm bench NAME [options]`; returns the exit code (2 for a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if not argv[0].startswith("-") and argv[0] not in BENCHMARKS:
        print(
            f"tinymm bench: unknown benchmark {argv[0]!r}; available: {', '.join(sorted(BENCHMARKS))}",
            file=sys.stderr,
        )
        return 2
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as err:
        print(err, file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    if args.benchmark is None:
        parser.print_help()
        return 2
    bench = BENCHMARKS[args.benchmark]
    try:
        cfg, rungs, defaults_used = config_from_args(bench, args)
    except ValueError as err:
        print(f"tinymm bench {bench.name}: error: {err}", file=sys.stderr)
        return 2

    print(header(bench, cfg, defaults_used), flush=True)
    results = run_sweep(bench, cfg, rungs, progress=not args.no_progress)
    print()
    print(format_table(bench, cfg, results))
    if args.plot:
        save_plot(bench, cfg, results, args.plot)
        print(f"plot saved to {args.plot}")
    return 0 if all(m.ok or (m.note or "").startswith("skipped") for m in results) else 1
