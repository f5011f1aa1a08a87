"""`tinymm bench NAME`: time the rungs of a chapter side by side.

    tinymm bench contrastive [--sizes N,N,...] [--dim 512] ...     (chapter 4)
    tinymm bench attention [--shapes book|long|LqxLk,...] ...      (chapter 2)
    tinymm bench NAME --help                                       (every option)

This module is the harness every benchmark shares: the sweep, the table, the
plot and the command line. Each chapter's benchmark is a `Benchmark` subclass
in its own module (`tiny_mm.bench_contrastive`, `tiny_mm.bench_attention`),
registered in `BENCHMARKS`: a list of `Rung`s (NumPy reference, PyTorch,
Triton, ...) that each know how to build their forward and forward+backward
calls for one point of the sweep (a batch size N, an attention shape, ...) and
how many bytes that will take. A new chapter adds a module and one line to
`CHAPTER_MODULES`.

How each (rung, point) is measured:
- time: `tiny_mm.timing.time_it`, median of `repeats` calls after `warmup`;
- memory, of forward+backward (forward alone with --no-backward), measured on
  the call after one warm-up call, before the timed ones: on a GPU, peak
  `torch.cuda.max_memory_allocated` minus the memory held before the call; on
  a CPU (and for the NumPy rung everywhere), each point runs in a fresh child
  process and reports the growth of its peak RSS over its RSS once the inputs
  exist;
- a point whose estimated memory does not fit, or that would take minutes (the
  Triton interpreter, the NumPy rung beside a GPU), is skipped with a note; a
  point that fails (out of memory, a bug) becomes a note: the sweep goes on.
"""
from __future__ import annotations

import argparse
import importlib
import math
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
    "benchmarks",
    "plan",
    "run_sweep",
    "format_table",
    "save_plot",
    "main",
]

DTYPES = ("float32", "float16", "bfloat16")
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GiB = 1024**3

# The modules that register a benchmark, imported on first need (see `benchmarks()`).
CHAPTER_MODULES = ("tiny_mm.bench_contrastive", "tiny_mm.bench_attention")


@dataclass(frozen=True)
class Config:
    """One sweep's settings (picklable: it travels to the measuring child processes)."""

    points: tuple[Any, ...]  # the sweep: batch sizes N (contrastive), AttentionShapes (attention)
    dtype: str  # one of DTYPES; the NumPy rung always computes in float64
    device: str  # "cpu" or "cuda"
    repeats: int
    warmup: int
    backward: bool = True
    min_time_ms: float = 300.0  # time fast calls until they add up to this (more samples, steadier median)
    threads: int | None = None  # cap torch's and OpenBLAS's threads (None: their defaults)
    tf32: bool = False  # float32 on a GPU: let matmuls round inputs to TF32 (both rungs alike)
    seed: int = 0
    dim: int = 0  # contrastive: the embedding width d (attention shapes carry their own head dim)
    sdpa_backend: str = "auto"  # attention: the backend torch's SDPA rung is held to


# prepare(point, config) -> (forward, forward_and_backward or None)
Prepare = Callable[[Any, Config], "tuple[Callable[[], Any], Callable[[], Any] | None]"]


@dataclass(frozen=True)
class Rung:
    """One implementation of the benchmarked piece."""

    name: str  # short, used in --rungs and the table
    label: str  # what the table prints
    prepare: Prepare  # a module-level function: child processes look it up by name
    bytes_needed: Callable[[Any, Config], int]  # estimate of the peak memory of forward+backward
    # bytes of what forward+backward must hand back (the gradients): any implementation
    # needs them, so the table also shows the peak without them, the true workspace
    result_bytes: Callable[[Any, Config], int]
    triton: bool = False  # runs under the Triton interpreter when there is no GPU
    host: bool = False  # computes on the CPU whatever the device (NumPy): memory is its RSS growth


class Benchmark:
    """One chapter's benchmark: its rungs and how its points are named, counted and chosen.

    Subclasses set the class attributes and override the methods that differ;
    the defaults suit a sweep over one whole number N.
    """

    name: str
    title: str
    rungs: tuple[Rung, ...]
    baseline: str  # the rung the ratios divide by
    point_header: str = "N"  # the table's first column
    grads_what: str = "the gradients"  # what "excl. grads" subtracts, for the footnote
    # Beyond this much `work` one call under the Triton interpreter takes minutes.
    interpreter_max_work: float = math.inf
    # Beyond this much `work` the NumPy rung is skipped when a GPU is measured (seconds a call).
    host_max_work: float = math.inf
    cpu_defaults_why: str = ""  # printed in --help and the header: why the CPU defaults are smaller

    def rung(self, name: str) -> Rung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise KeyError(name)

    def label(self, point: Any) -> str:
        """A point as the table prints it."""
        return f"{point:,}"

    def work(self, point: Any, cfg: Config) -> float:
        """Forward work of a point (FLOPs, or a number proportional to them): what limits are set in."""
        return float(point)

    def flops(self, point: Any, cfg: Config, backward: bool) -> float | None:
        """Exact floating-point operations of one call, when the benchmark counts them (TFLOP/s on a GPU)."""
        return None

    def default_dtype(self, device: str) -> str:
        return "float32"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The benchmark's own options (what the sweep is over)."""

    def configure(self, args: argparse.Namespace, device: str) -> tuple[dict[str, Any], bool]:
        """Config fields from the options (ValueError names a bad one), and whether the defaults were used."""
        raise NotImplementedError

    def epilog(self) -> str:
        return ""

    def describe(self, cfg: Config) -> list[str]:
        """Header lines saying what was swept."""
        return [f"points: {', '.join(self.label(p) for p in cfg.points)}"]

    def footnotes(self, cfg: Config) -> list[str]:
        return []

    def plot_axis(self, points: list[Any]) -> tuple[list[float], list[str], bool, str]:
        """x positions, tick labels, whether the axis is logarithmic, and its title."""
        return [float(p) for p in points], [self.label(p) for p in points], True, self.point_header


@dataclass
class Measurement:
    """What one (rung, point) gave. `note` says why a figure is missing."""

    rung: str
    point: Any
    forward: timing.Timing | None = None
    forward_backward: timing.Timing | None = None
    peak_extra_bytes: int | None = None
    result_bytes: int = 0  # of which the gradients the call returns
    note: str | None = None

    @property
    def workspace_bytes(self) -> int | None:
        if self.peak_extra_bytes is None:
            return None
        return max(0, self.peak_extra_bytes - self.result_bytes)

    @property
    def ok(self) -> bool:
        return self.forward is not None


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def benchmarks() -> dict[str, Benchmark]:
    """Every registered benchmark (importing the chapters' benchmark modules the first time)."""
    for module in CHAPTER_MODULES:
        importlib.import_module(module)
    return BENCHMARKS


def element_bytes(cfg: Config) -> int:
    return ELEMENT_BYTES[cfg.dtype]


# ---------------------------------------------------------------------------
# The sweep


def _measure_point(bench_name: str, rung_name: str, point: Any, cfg: Config) -> Measurement:
    """Build the inputs of one (rung, point), measure its peak extra memory, then time it.

    On a CPU (and for the NumPy rung anywhere) this runs in a fresh child
    process, so the memory figure is not polluted by earlier points. Memory is
    measured on the second call (the first warms up code paths), before the
    timed calls.
    """
    rung = benchmarks()[bench_name].rung(rung_name)
    forward, forward_backward = rung.prepare(point, cfg)
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
    return Measurement(rung_name, point, fwd, fb, peak, rung.result_bytes(point, cfg))


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


def plan(bench: Benchmark, cfg: Config, rungs: tuple[str, ...]) -> tuple[list[tuple[str, Any]], list[Measurement]]:
    """Which (rung, point) pairs to run, and the ones skipped (as measurements with a note)."""
    free_device, free_host = available_bytes(cfg.device), available_bytes("cpu")
    todo: list[tuple[str, Any]] = []
    skipped: list[Measurement] = []
    smallest = min(cfg.points, key=lambda p: bench.work(p, cfg))
    for point in cfg.points:
        work = bench.work(point, cfg)
        for name in rungs:
            rung = bench.rung(name)
            skip = lambda why: skipped.append(Measurement(name, point, note=f"skipped: {why}"))  # noqa: E731
            if rung.triton and cfg.device != "cuda":
                if point != smallest:
                    continue  # the interpreter: one small point shows it runs; see the footnote
                if work > bench.interpreter_max_work:
                    skip(
                        f"under the interpreter {bench.label(point)} would take minutes (it runs when the "
                        f"work is at most {bench.interpreter_max_work:,.0f}, here {work:,.0f}): pick a smaller point"
                    )
                    continue
            if rung.host and cfg.device == "cuda" and work > bench.host_max_work:
                skip(f"the NumPy rung would take many seconds a call here (work {work:.2g}); it runs up to "
                     f"{bench.host_max_work:.2g}")
                continue
            need = rung.bytes_needed(point, cfg)
            free = free_host if rung.host else free_device
            if free is not None and need > 0.8 * free:
                skip(f"needs about {timing.format_bytes(need)}, {timing.format_bytes(free)} free")
                continue
            todo.append((name, point))
    return todo, skipped


def run_sweep(
    bench: Benchmark,
    cfg: Config,
    rungs: tuple[str, ...] | None = None,
    *,
    isolate: bool | None = None,
    progress: bool = True,
) -> list[Measurement]:
    """Measure every (rung, point) of `cfg`; a point that fails becomes a note, never a crash.

    isolate: measure each point in a fresh child process (the default on a CPU,
    where it is how peak memory is measured).
    """
    from tqdm import tqdm

    rungs = rungs or tuple(r.name for r in bench.rungs)
    isolate = cfg.device != "cuda" if isolate is None else isolate
    todo, results = plan(bench, cfg, rungs)
    bar = tqdm(todo, desc=f"bench {bench.name}", unit="point", file=sys.stderr, disable=not progress, leave=False)
    for name, point in bar:
        bar.set_postfix_str(f"{name} {bench.label(point)}")
        try:
            if isolate or bench.rung(name).host:  # host memory is measured in a fresh child
                m = timing.run_in_child(_measure_point, bench.name, name, point, cfg)
            else:
                m = _measure_point(bench.name, name, point, cfg)
        except Exception as err:  # report and go on: one broken rung must not hide the others
            msg = str(err).strip().splitlines()
            m = Measurement(name, point, note=f"failed: {type(err).__name__}: {msg[0] if msg else ''}")
        results.append(m)
    order = {name: i for i, name in enumerate(rungs)}
    where = {point: i for i, point in enumerate(cfg.points)}
    results.sort(key=lambda m: (where[m.point], order[m.rung]))
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


def _tflops(flops: float | None, t: timing.Timing | None) -> str:
    if flops is None or t is None or t.median_ms <= 0:
        return "-"
    return f"{flops / (t.median_ms * 1e-3) / 1e12:.3g}"


def shows_tflops(bench: Benchmark, cfg: Config) -> bool:
    """TFLOP/s columns: on a GPU, for a benchmark that counts its FLOPs (a CPU's figure is not the point)."""
    return cfg.device == "cuda" and bool(cfg.points) and bench.flops(cfg.points[0], cfg, False) is not None


def format_table(bench: Benchmark, cfg: Config, results: list[Measurement]) -> str:
    """The results as a fixed-width table with footnotes."""
    interpreted = cfg.device != "cuda"
    tflops = shows_tflops(bench, cfg)
    base = {m.point: m for m in results if m.rung == bench.baseline and m.ok}

    def ratio(m: Measurement, attr: str) -> str:
        rung = bench.rung(m.rung)
        b = base.get(m.point)
        mine, theirs = getattr(m, attr), getattr(b, attr) if b else None
        if (rung.triton and interpreted) or mine is None or theirs is None or theirs.median_ms == 0:
            return "-"
        return f"{mine.median_ms / theirs.median_ms:.3g}x"

    headers = [bench.point_header, "rung", "fwd ms", "fwd x"] + (["fwd TFLOP/s"] if tflops else [])
    if cfg.backward:
        headers += ["fwd+bwd ms", "fwd+bwd x"] + (["fwd+bwd TFLOP/s"] if tflops else [])
    headers += ["peak extra"] + (["excl. grads"] if cfg.backward else [])
    rows, notes = [], []
    for m in results:
        rung = bench.rung(m.rung)
        label = rung.label + (" *" if rung.triton and interpreted else "")
        host = rung.host  # the NumPy rung's TFLOP/s would be the host's, beside a GPU's: left out
        if not m.ok:
            notes.append(f"  {rung.label} at {bench.label(m.point)}: {m.note}")
        row = [bench.label(m.point), label, _ms(m.forward), ratio(m, "forward")]
        if tflops:
            row += [_tflops(None if host else bench.flops(m.point, cfg, False), m.forward)]
        if cfg.backward:
            row += [_ms(m.forward_backward), ratio(m, "forward_backward")]
            if tflops:
                row += [_tflops(None if host else bench.flops(m.point, cfg, True), m.forward_backward)]
        if m.ok:
            row += [timing.format_bytes(m.peak_extra_bytes)]
            row += [timing.format_bytes(m.workspace_bytes)] if cfg.backward else []
        else:
            row += [(m.note or "").split(":")[0]] + (["-"] if cfg.backward else [])
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    left = {1} if bench.point_header == "N" else {0, 1}  # names line up on the left, numbers on the right
    align = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    table = [align(headers), align(["-" * w for w in widths])]
    previous = None
    for m, row in zip(results, rows):
        if previous is not None and m.point != previous:
            table.append("")
        previous = m.point
        table.append(align(row))

    baseline = bench.rung(bench.baseline).label
    lines = [f"x: time divided by the {baseline} rung's at the same {bench.point_header} (lower is faster)."]
    memory_note = timing.GPU_MEMORY_NOTE if cfg.device == "cuda" else timing.CPU_MEMORY_NOTE
    lines.append(f"peak extra ({'fwd+bwd' if cfg.backward else 'fwd'}): {memory_note}.")
    if cfg.backward:
        lines.append(
            f"excl. grads: peak extra minus the gradients the call hands back ({bench.grads_what}), "
            "which every implementation must produce: the workspace it needs on top."
        )
    lines += bench.footnotes(cfg)
    if cfg.device == "cuda" and any(bench.rung(m.rung).host for m in results):
        lines.append(f"  the NumPy rung runs on the host: its figure is the {timing.RSS_MEMORY_WHAT}.")
    if interpreted and any(bench.rung(m.rung).triton for m in results):
        smallest = min(cfg.points, key=lambda p: bench.work(p, cfg))
        lines.append(
            "* Triton ran under its interpreter (TRITON_INTERPRET=1, no CUDA GPU): it executes the "
            "kernel in NumPy, one program after another, so its timings are NOT speed figures; it is "
            f"left out of the ratios, and run once, only at the smallest {bench.point_header} "
            f"({bench.label(smallest)}), to show it works."
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
        f"device: {device_description(cfg.device)} | torch {torch.__version__} | "
        f"dtype {cfg.dtype}{' (TF32 matmuls)' if cfg.tf32 else ''} (NumPy rung: float64)",
        f"timing: median of at least {cfg.repeats} call(s) and {cfg.min_time_ms:.0f} ms of calls, "
        f"after {cfg.warmup} warm-up call(s)"
        + (f"; {cfg.threads} CPU thread(s)" if cfg.threads else ""),
    ]
    lines += bench.describe(cfg)
    if defaults_used and cfg.device != "cuda" and bench.cpu_defaults_why:
        lines.append(f"note: {bench.cpu_defaults_why}.")
    if cfg.device != "cuda" and not cfg.threads:
        lines.append("note: if the figures jump around, another program is busy: --threads 1 steadies them.")
    return "\n".join(textwrap.fill(line, width=100, subsequent_indent="  ") for line in lines)


def save_plot(bench: Benchmark, cfg: Config, results: list[Measurement], path: str) -> None:
    """Time and peak extra memory (and TFLOP/s on a GPU) per point, one line per rung (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    tflops = shows_tflops(bench, cfg)
    fig = Figure(figsize=(16 if tflops else 11, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if tflops else 2)
    ax_time, ax_mem = axes[0], axes[1]
    attr = "forward_backward" if cfg.backward else "forward"
    measured = [p for p in cfg.points if any(m.point == p and m.ok for m in results)]
    xs, ticks, log_x, xlabel = bench.plot_axis(measured)
    x_of = dict(zip(measured, xs))
    # points on a numeric axis (N) make a curve; named shapes do not: markers only
    style = dict(marker="o") if log_x else dict(marker="o", linestyle="none", markersize=7)
    for rung in bench.rungs:
        points = [m for m in results if m.rung == rung.name and m.ok]
        if not points:
            continue
        label = rung.label
        if rung.triton and cfg.device != "cuda":
            label += " (interpreter: not a speed figure)"
        if rung.host and cfg.device == "cuda":
            label += " (on the host; memory: RSS)"
        x = [x_of[m.point] for m in points]
        ax_time.plot(x, [getattr(m, attr).median_ms for m in points], label=label, **style)
        mem = [(x_of[m.point], m.peak_extra_bytes / 2**20) for m in points if m.peak_extra_bytes]
        if mem:
            ax_mem.plot(*zip(*mem), label=label, **style)
        if tflops and not rung.host:
            seconds = [getattr(m, attr).median_ms * 1e-3 for m in points]
            rate = [bench.flops(m.point, cfg, cfg.backward) / s / 1e12 for m, s in zip(points, seconds)]
            axes[2].plot(x, rate, label=label, **style)
    what = "forward+backward" if cfg.backward else "forward"
    ax_time.set(yscale="log", ylabel=f"{what} time, ms (median)")
    ax_mem.set(yscale="log", ylabel="peak extra memory, MiB")
    ax_time.set_title(f"{bench.title}: time, {cfg.dtype}", fontsize=10)
    ax_mem.set_title(
        "memory: " + ("max_memory_allocated growth" if cfg.device == "cuda" else "peak RSS growth (child process)"),
        fontsize=10,
    )
    if tflops:
        axes[2].set(ylabel=f"{what} TFLOP/s")
        axes[2].set_title("throughput (counted FLOPs / median time)", fontsize=10)
    for ax in axes:
        ax.set_xlabel(xlabel)
        if log_x:
            ax.set_xscale("log")
        elif xs:
            ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)  # room for the end labels
        if measured:  # label the points that were run, not powers of ten
            ax.set_xticks(xs, ticks, rotation=0 if log_x else 30, ha="center" if log_x else "right", fontsize=8)
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


def positive(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum."""

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
    for bench in benchmarks().values():
        p = sub.add_parser(
            bench.name,
            help=bench.title,
            description=f"{bench.title}. Rungs: {', '.join(r.name for r in bench.rungs)}.",
            epilog=bench.epilog(),
        )
        bench.add_arguments(p)
        p.add_argument(
            "--dtype",
            choices=DTYPES,
            help=f"dtype of the PyTorch and Triton rungs (default: {bench.default_dtype('cuda')} on a GPU, "
            f"{bench.default_dtype('cpu')} on a CPU)",
        )
        p.add_argument("--repeats", type=positive(1), help="timed calls per point (median reported)")
        p.add_argument("--warmup", type=positive(0), help="untimed calls before timing")
        p.add_argument(
            "--min-time",
            type=positive(0),
            default=300,
            metavar="MS",
            help="keep timing a fast call until its calls add up to MS milliseconds (default 300)",
        )
        p.add_argument(
            "--plot", metavar="FILE", help="save a figure (time and memory per point) to FILE, e.g. bench.png"
        )
        p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
        p.add_argument("--rungs", help=f"comma-separated subset of: {', '.join(r.name for r in bench.rungs)}")
        p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
        p.add_argument(
            "--threads",
            type=positive(1),
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
    dtype = args.dtype or bench.default_dtype(device)
    if dtype == "bfloat16" and device != "cuda":
        raise ValueError(
            "--dtype bfloat16 needs a CUDA GPU: the Triton interpreter that runs the kernel "
            "on a CPU does not support bfloat16 (use float32 or float16 here)"
        )
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise ValueError(f"--plot {args.plot}: the folder {os.path.dirname(os.path.abspath(args.plot))} does not exist")
    rungs = tuple(r.name for r in bench.rungs)
    if args.rungs:
        chosen = tuple(r.strip() for r in args.rungs.split(",") if r.strip())
        unknown = [r for r in chosen if r not in rungs]
        if unknown or not chosen:
            raise ValueError(f"--rungs: unknown rung(s) {unknown or chosen}; choose from {', '.join(rungs)}")
        rungs = tuple(r for r in rungs if r in chosen)
    args.dtype = dtype  # the benchmark's own checks see the dtype in force
    fields, defaults_used = bench.configure(args, device)
    on_gpu = device == "cuda"
    cfg = Config(
        dtype=dtype,
        device=device,
        repeats=args.repeats or (20 if on_gpu else 3),
        warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
        backward=not args.no_backward,
        min_time_ms=float(args.min_time),
        threads=args.threads,
        **fields,
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
