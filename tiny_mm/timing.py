"""Small measuring tools shared by every chapter's benchmark.

- `time_it(fn, warmup=, repeats=)`: wall-clock time of a call, as the median
  (plus min and interquartile range) over several repeats after warm-up calls.
  When CUDA is in use it synchronises before starting and before stopping the
  clock, because kernel launches return before the GPU has finished.
- `cuda_peak_extra_bytes(fn)`: GPU memory a call needs on top of what was
  already allocated (`torch.cuda.max_memory_allocated` minus the memory held
  before the call).
- `rss_peak_growth_bytes(fn)`: the CPU stand-in, the growth of the process's
  peak resident set size over its RSS just before the call. Meant to run in a
  fresh child process (`run_in_child`) so earlier work does not pollute it. It
  counts everything the process touches, allocator slack included, so read it
  as an upper bound on what the computation itself needs.

Nothing here imports torch at module level: the NumPy rung of a benchmark can
be timed without it.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "Timing",
    "time_it",
    "cuda_in_use",
    "cuda_peak_extra_bytes",
    "rss_peak_growth_bytes",
    "release_free_heap",
    "limit_threads",
    "run_in_child",
    "ChildDied",
    "CPU_MEMORY_NOTE",
    "RSS_MEMORY_WHAT",
    "GPU_MEMORY_NOTE",
    "format_bytes",
]

RSS_MEMORY_WHAT = (
    "peak RSS growth of a child process over its RSS after the inputs are "
    "allocated and one warm-up call; includes allocator slack"
)
CPU_MEMORY_NOTE = "CPU: " + RSS_MEMORY_WHAT
GPU_MEMORY_NOTE = (
    "GPU: torch.cuda.max_memory_allocated during the call minus the memory "
    "allocated before it, after one warm-up call"
)


@dataclass(frozen=True)
class Timing:
    """Summary of `repeats` timed calls, in milliseconds."""

    median_ms: float
    min_ms: float
    iqr_ms: float  # 75th minus 25th percentile: how noisy the repeats were
    repeats: int

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (min {self.min_ms:.3f}, IQR {self.iqr_ms:.3f}, n={self.repeats})"


def cuda_in_use() -> bool:
    """True when torch is loaded and has already initialised CUDA (so GPU work may be queued)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def _quartiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


def time_it(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_time_ms: float = 0.0,
    max_repeats: int = 1000,
    sync: bool | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Call `fn()` `warmup` times untimed, then at least `repeats` times timed; return the summary.

    min_time_ms: keep timing (up to `max_repeats` calls) until the timed calls add
        up to this much, so a fast call gets enough samples for its median to
        shrug off the odd interruption by another process.
    sync: synchronise CUDA around each timed call; None decides by `cuda_in_use()`.
    clock: a function returning seconds (tests pass a fake one).
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if max_repeats < repeats:
        raise ValueError(f"max_repeats ({max_repeats}) must be >= repeats ({repeats})")
    if sync is None:
        sync = cuda_in_use()
    barrier: Callable[[], None] = lambda: None  # noqa: E731
    if sync:
        import torch

        barrier = torch.cuda.synchronize

    for _ in range(warmup):
        fn()
    barrier()
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_time_ms and len(samples) < max_repeats):
        start = clock()
        fn()
        barrier()  # the GPU must have finished before we read the clock
        samples.append((clock() - start) * 1e3)
    q1, q3 = _quartiles(samples)
    return Timing(
        median_ms=statistics.median(samples),
        min_ms=min(samples),
        iqr_ms=q3 - q1,
        repeats=len(samples),
    )


def cuda_peak_extra_bytes(fn: Callable[[], Any], *, warmup: int = 1) -> int:
    """Peak GPU memory allocated while `fn()` runs, minus what was allocated before it.

    warmup: untimed calls first, so one-time allocations (cuBLAS workspaces,
    compiled kernels) are not charged to the call. Whatever `fn` returns is
    dropped only after the measurement, so it counts too (gradients written
    into `.grad` are part of the cost of a backward pass).
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - before)


# ---------------------------------------------------------------------------
# CPU memory: peak resident set size (Linux /proc, with a getrusage fallback)


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark to the current RSS (Linux >= 4.0). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def release_free_heap() -> None:
    """Ask glibc to hand freed heap memory back to the OS (no-op elsewhere).

    Without it, memory freed by a warm-up call stays in the process and the
    measured call reuses it without the RSS growing: the figure would read low.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak_growth_bytes(fn: Callable[[], Any], *, warmup: int = 1) -> int | None:
    """Growth of this process's peak RSS while `fn()` runs, over its RSS just before.

    warmup: calls made first, so that pages of library code touched for the
    first time and one-time set-up are not charged to the call; the freed heap
    is then returned to the OS before measuring.
    Run it in a fresh child process (see `run_in_child`). Where the peak mark
    cannot be reset (not Linux), the peak is the process's lifetime peak, so an
    earlier spike (imports, making the inputs) can hide a smaller one in `fn`.
    Returns None where the platform gives no RSS figures.
    """
    for _ in range(warmup):
        fn()
    release_free_heap()
    before = _current_rss_bytes()
    _reset_peak_rss()
    out = fn()
    peak = _peak_rss_bytes()
    del out
    if before is None or peak is None:
        return None
    return max(0, peak - before)


# ---------------------------------------------------------------------------
# Threads


def limit_threads(threads: int) -> None:
    """Use at most `threads` threads in torch and in NumPy's OpenBLAS, from now on in this process.

    On a machine shared with other busy programs, a parallel region waits for
    its slowest thread, and a thread that lost its core stalls every call: one
    thread gives steadier figures there. OpenBLAS has no Python switch, so it is
    found among the loaded libraries (best effort: skipped if absent).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        import ctypes

        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in (
            "openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads64_",  # the OpenBLAS NumPy wheels ship
        ):
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter(threads)
                break


# ---------------------------------------------------------------------------
# Child processes


class ChildDied(RuntimeError):
    """The measuring child process ended without an answer (most often: killed for memory)."""


_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported numpy and torch once, so each child starts in milliseconds.

    Forking from a clean server (rather than from this process, whose OpenMP
    threads may be running) is safe; spawning would re-import torch every time.
    """
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["numpy", "torch"])
        else:  # Windows, some macOS setups
            ctx = multiprocessing.get_context("spawn")
        _CONTEXT = ctx
    return _CONTEXT


def run_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in a fresh child process and return its result.

    fn must be importable by name (a module-level function) and its result
    picklable. As with any multiprocessing code, a script that calls this
    needs the `if __name__ == "__main__":` guard: the child re-imports it.
    An exception in the child is re-raised here; a child that dies (out of
    memory, a crash) raises `ChildDied`.
    """
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=_context()) as pool:
        future = pool.submit(fn, *args)
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool as err:
            raise ChildDied(
                f"the child process measuring {getattr(fn, '__name__', fn)} died "
                "(most likely killed for using too much memory)"
            ) from err


def format_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
