"""The measuring tools (tiny_mm.timing), `tinymm bench` and `tinymm tour`.

Timing is checked against a fake clock whose every reading we chose, so the
expected median, minimum and spread are known without running the code under
test; memory against allocations of a known size.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tiny_mm import bench, bench_attention, timing, tour
from tiny_mm.bench_attention import ATTENTION, AttentionShape
from tiny_mm.bench_contrastive import CONTRASTIVE


def flat(text: str) -> str:
    """The text with every run of whitespace made one space (footnotes are wrapped)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- time_it


class FakeClock:
    """A clock that only moves when the timed function says so."""

    def __init__(self, costs_ms):
        self.now = 0.0
        self.costs = list(costs_ms)
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def work(self):
        self.now += self.costs[self.calls] / 1e3
        self.calls += 1


def test_time_it_median_min_iqr_from_a_fake_clock():
    # two warm-up calls (1000 ms each, must not count), then five timed calls
    clock = FakeClock([1000, 1000, 5, 1, 3, 100, 2])
    t = timing.time_it(clock.work, warmup=2, repeats=5, sync=False, clock=clock)
    assert clock.calls == 7
    # sorted timed costs: 1, 2, 3, 5, 100 -> median 3, min 1, quartiles 2 and 5
    assert t.median_ms == pytest.approx(3)
    assert t.min_ms == pytest.approx(1)
    assert t.iqr_ms == pytest.approx(3)
    assert t.repeats == 5


def test_time_it_keeps_going_until_min_time():
    clock = FakeClock([10] * 50)
    t = timing.time_it(clock.work, warmup=0, repeats=2, min_time_ms=55, sync=False, clock=clock)
    assert t.repeats == 6 and clock.calls == 6  # 6 x 10 ms is the first total >= 55 ms
    assert t.median_ms == pytest.approx(10)
    capped = FakeClock([10] * 50)
    t = timing.time_it(capped.work, warmup=0, repeats=2, min_time_ms=10_000, max_repeats=7, sync=False, clock=capped)
    assert t.repeats == 7


def test_time_it_measures_a_real_cost():
    # a busy loop of at least 20 ms on the real clock; the machine may be slow, never faster
    import time

    def cost():
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass

    t = timing.time_it(cost, warmup=0, repeats=3, sync=False)
    assert 20 <= t.median_ms < 2000


def test_time_it_synchronises_cuda_when_asked(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(1))
    timing.time_it(lambda: None, warmup=1, repeats=4, sync=True)
    assert len(calls) == 1 + 4  # once after the warm-up, once after each timed call
    calls.clear()
    timing.time_it(lambda: None, warmup=1, repeats=4, sync=False)
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"repeats": 5, "max_repeats": 2}])
def test_time_it_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="repeats|warmup"):
        timing.time_it(lambda: None, **kwargs)


# --------------------------------------------------------------------------- memory

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")


@needs_proc
def test_rss_growth_sees_a_known_allocation():
    size = 64 * 2**20

    def allocate():
        a = np.ones(size // 8)  # 64 MiB, every page touched
        return float(a[-1])

    grown = timing.rss_peak_growth_bytes(allocate)
    assert 0.9 * size < grown < 3 * size
    assert timing.rss_peak_growth_bytes(lambda: None) < 8 * 2**20


def test_run_in_child_returns_raises_and_reports_a_dead_child():
    assert timing.run_in_child(math.factorial, 10) == math.factorial(10)
    with pytest.raises(ValueError):
        timing.run_in_child(math.factorial, -1)
    with pytest.raises(timing.ChildDied, match="died"):
        timing.run_in_child(os._exit, 3)


@pytest.mark.requires_cuda
def test_cuda_peak_extra_bytes_sees_a_known_allocation():
    import torch

    size = 64 * 2**20
    grown = timing.cuda_peak_extra_bytes(lambda: torch.ones(size // 4, device="cuda"))
    assert size <= grown < 1.1 * size


def test_format_bytes():
    assert timing.format_bytes(512) == "512 B"
    assert timing.format_bytes(1536) == "1.5 KiB"
    assert timing.format_bytes(3 * 2**30) == "3.0 GiB"
    assert timing.format_bytes(None) == "n/a"


# --------------------------------------------------------------------------- the table


def _t(ms: float) -> timing.Timing:
    return timing.Timing(ms, ms, 0.0, 1)


def test_table_ratios_divide_by_pytorch_and_leave_interpreted_triton_out():
    cfg = bench.Config(points=(64,), dim=8, dtype="float32", device="cpu", repeats=1, warmup=0)
    results = [
        bench.Measurement("numpy", 64, _t(10), _t(30), 2**20, 2**18),
        bench.Measurement("pytorch", 64, _t(4), _t(10), 2**20, 2**20 + 2**19),  # slack: never below 0
        bench.Measurement("triton", 64, _t(500), _t(900), 2**12, 2**10),
    ]
    table = bench.format_table(CONTRASTIVE, cfg, results)
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.strip().startswith("64")]
    cells = {row[1]: row[2:] for row in rows}  # label -> fwd ms, fwd x, fwd+bwd ms, fwd+bwd x, peak, excl.
    assert cells["numpy (float64)"] == ["10", "2.5x", "30", "3x", "1.0 MiB", "768.0 KiB"]
    assert cells["pytorch"] == ["4", "1x", "10", "1x", "1.0 MiB", "0 B"]
    assert cells["triton *"][4:] == ["4.0 KiB", "3.0 KiB"]
    assert cells["triton *"][1] == "-" and cells["triton *"][3] == "-"  # no ratio for the interpreter
    assert "NOT speed figures" in flat(table) and "left out of the ratios" in flat(table)
    assert timing.CPU_MEMORY_NOTE in flat(table)


def test_points_that_cannot_fit_are_skipped_with_a_note():
    cfg = bench.Config(points=(32, 2_000_000), dim=512, dtype="float32", device="cpu", repeats=1, warmup=0)
    todo, skipped = bench.plan(CONTRASTIVE, cfg, ("numpy", "pytorch", "triton"))
    assert ("numpy", 32) in todo and ("pytorch", 32) in todo and ("triton", 32) in todo
    assert {m.rung for m in skipped} == {"numpy", "pytorch"}  # (N, N) matrices of 2e6^2 floats
    assert all(m.point == 2_000_000 and m.note.startswith("skipped: needs about") for m in skipped)
    assert ("triton", 2_000_000) not in todo  # interpreter: smallest N only
    big = bench.Config(points=(4096,), dim=512, dtype="float32", device="cpu", repeats=1, warmup=0)
    todo, skipped = bench.plan(CONTRASTIVE, big, ("triton",))
    assert todo == [] and "under the interpreter" in skipped[0].note  # would take minutes


def test_a_failing_rung_becomes_a_note(monkeypatch):
    def broken(n, cfg):
        raise RuntimeError("kernel exploded")

    class Fake(bench.Benchmark):
        name = "fake"
        title = "fake"
        rungs = (
            CONTRASTIVE.rung("pytorch"),
            bench.Rung("broken", "broken", broken, lambda n, cfg: 0, lambda n, cfg: 0),
        )
        baseline = "pytorch"

    fake = Fake()
    monkeypatch.setitem(bench.BENCHMARKS, "fake", fake)
    cfg = bench.Config(points=(8,), dim=8, dtype="float32", device="cpu", repeats=1, warmup=0, min_time_ms=0)
    results = bench.run_sweep(fake, cfg, isolate=False, progress=False)
    by_rung = {m.rung: m for m in results}
    assert by_rung["pytorch"].ok and by_rung["pytorch"].forward.median_ms > 0
    assert not by_rung["broken"].ok and "RuntimeError: kernel exploded" in by_rung["broken"].note
    assert "kernel exploded" in bench.format_table(fake, cfg, results)


# --------------------------------------------------------------------------- tinymm bench


def test_bench_contrastive_end_to_end(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    argv = ["contrastive", "--sizes", "32,48", "--dim", "24", "--repeats", "1", "--warmup", "0"]
    assert bench.main(argv + ["--min-time", "0", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "point" in captured.err  # the progress bar went to stderr
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if re.match(r"\s*(32|48)\s{2}", line)]
    assert [(row[0], row[1]) for row in rows] == [
        ("32", "numpy (float64)"),
        ("32", "pytorch"),
        ("32", "triton *"),  # the interpreter: smallest N only
        ("48", "numpy (float64)"),
        ("48", "pytorch"),
    ]
    for row in rows:  # N, rung, fwd ms, fwd x, fwd+bwd ms, fwd+bwd x, peak extra, excl. grads
        assert len(row) == 8
        for ms in (row[2], row[4]):
            assert math.isfinite(float(ms)) and float(ms) > 0
        assert row[6].endswith("B")  # a memory figure, not "failed"
        assert row[3] == ("-" if row[1] == "triton *" else "1x" if row[1] == "pytorch" else row[3])
    assert "NOT speed figures" in flat(out) and "peak RSS growth of a child process" in flat(out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_forward_only(capsys):
    argv = ["contrastive", "--sizes", "16", "--dim", "8", "--repeats", "1", "--warmup", "0", "--min-time", "0"]
    assert bench.main(argv + ["--no-backward", "--rungs", "pytorch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fwd ms" in out and "fwd+bwd ms" not in out and "peak extra (fwd)" in out
    assert "numpy" not in out.split("fwd ms")[1]  # --rungs kept only pytorch


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_on_a_gpu_reports_device_memory(dtype, capsys):
    argv = ["contrastive", "--sizes", "256,1024", "--dim", "64", "--dtype", dtype, "--repeats", "2"]
    assert bench.main(argv + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "GPU" in out and "max_memory_allocated" in flat(out) and "NOT speed figures" not in flat(out)
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if re.match(r"\s*1,024\s{2}", line)]
    assert [row[1] for row in rows] == ["numpy (float64)", "pytorch", "triton"]
    assert all(row[6].endswith("B") and row[7].endswith("B") for row in rows)
    assert rows[2][3].endswith("x")  # on a GPU the kernel is in the ratios


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention-ish"], "unknown benchmark 'attention-ish'"),
        (["contrastive", "--sizes", "32,abc"], "'abc' is not a whole number"),
        (["contrastive", "--sizes", "0"], "sizes must be >= 1"),
        (["contrastive", "--dim", "-3"], "must be >= 1"),
        (["contrastive", "--dtype", "float8"], "invalid choice"),
        (["contrastive", "--rungs", "numpy,jax"], "unknown rung"),
        (["contrastive", "--bogus"], "unrecognized arguments"),
        (["contrastive", "--plot", "/no/such/folder/b.png"], "does not exist"),
    ],
)
def test_bench_bad_arguments_are_named(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize(
    "argv, message",
    [
        (["contrastive", "--dtype", "bfloat16"], "bfloat16 needs a CUDA GPU"),
        (["contrastive", "--tf32"], "--tf32 applies to float32 on a CUDA GPU only"),
        (["contrastive", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_bench_gpu_only_options_fail_clearly_on_cpu(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_help(capsys):
    assert bench.main(["contrastive", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sizes" in out and "8.6 GB" in flat(out)


# --------------------------------------------------------------------------- tinymm bench attention


def _rows(out: str, first: str) -> list[list[str]]:
    """The table rows whose first cell starts with `first`, split into cells."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith(first)]


def test_bench_attention_end_to_end(tmp_path, capsys):
    plot = tmp_path / "attention.png"
    argv = ["attention", "--shapes", "12x20,16", "--head-dim", "16", "--batch-heads", "2", "--causal"]
    argv += ["--repeats", "1", "--warmup", "0", "--min-time", "0", "--plot", str(plot), "--no-progress"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "cross 12x20 d16 causal") + _rows(out, "self 16x16 d16 causal")
    # every rung at every shape, but the interpreted kernel only at the smallest (12 * 20 < 16 * 16)
    assert [(row[0].split()[0], row[1]) for row in rows] == [
        ("cross", "numpy (float64)"),
        ("cross", "pytorch (matrix)"),
        ("cross", "torch sdpa"),
        ("cross", "triton *"),
        ("self", "numpy (float64)"),
        ("self", "pytorch (matrix)"),
        ("self", "torch sdpa"),
    ]
    for row in rows:  # shape, rung, fwd ms, fwd x, fwd+bwd ms, fwd+bwd x, peak extra, excl. grads
        assert len(row) == 8
        for ms in (row[2], row[4]):
            assert math.isfinite(float(ms)) and float(ms) > 0
        assert row[6].endswith("B") and row[7].endswith("B")
        expected = {"torch sdpa": "1x", "triton *": "-"}.get(row[1])  # ratios divide by SDPA's time
        assert row[3] == expected if expected else row[3].endswith("x")
    assert "TFLOP/s" not in out  # a CPU's rate is not the point of this table
    assert "B*H = 2" in out and "torch sdpa rung's" in flat(out) and "NOT speed figures" in flat(out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_shapes_are_the_books_and_long_ones():
    book = bench_attention.parse_shapes("book", None, 4, False)
    # the shapes: 196 x 128 image-text, 64 x 256 Perceiver, Whisper's 1500 and 448 x 1500
    assert {(s.lq, s.lk, s.d) for s in book} == {(128, 196, 64), (64, 256, 64), (1500, 1500, 64), (448, 1500, 64)}
    assert all(s.batch_heads == 4 and not s.causal for s in book)
    long = bench_attention.parse_shapes("long", None, 32, True)
    assert [(s.lq, s.d) for s in long] == [(n, d) for d in (64, 128) for n in (1024, 2048, 4096, 8192, 16384)]
    assert all(s.lq == s.lk and s.causal for s in long)
    mixed = bench_attention.parse_shapes("perceiver, 448x1500 ,4096,4096", (32, 48), 1, False)
    assert [(s.lq, s.lk, s.d) for s in mixed] == [
        (64, 256, 32), (64, 256, 48), (448, 1500, 32), (448, 1500, 48), (4096, 4096, 32), (4096, 4096, 48)
    ]  # --head-dim replaces each shape's D; a repeated shape runs once


def test_attention_flops_count_the_visible_pairs(rng):
    from chapters.ch02_attention import reference as ref

    for _ in range(5):
        lq, lk, d, bh = (int(x) for x in rng.integers(1, 40, size=4))
        for causal in (False, True):
            shape = AttentionShape("x", bh, lq, lk, d, causal)
            pairs = int(ref.visible_mask(1, lq, lk, causal=causal).sum())  # the reference's own mask
            assert shape.forward_flops() == 4 * bh * d * pairs  # QK^T and PV: 2 D flops per pair each
    square = AttentionShape("self", 32, 4096, 4096, 64, True)
    assert square.forward_flops() == pytest.approx(4 * 32 * 4096 * 4096 * 64 / 2, rel=1e-3)  # "halved"


def test_attention_table_on_a_gpu_shows_tflops_against_counted_flops():
    # The GPU layout, from measurements we made up: TFLOP/s must be FLOPs / time.
    shape = AttentionShape("self", 32, 4096, 4096, 64, False)
    cfg = bench.Config(points=(shape,), dtype="float16", device="cuda", repeats=1, warmup=0)
    flops = 4 * 32 * 4096 * 4096 * 64
    results = [
        bench.Measurement("pytorch", shape, _t(40), _t(150), 2**31, 2**26),
        bench.Measurement("sdpa", shape, _t(2), _t(8), 2**26, 2**26),
        bench.Measurement("triton", shape, _t(2.5), _t(10), 2**26, 2**26),
    ]
    table = bench.format_table(ATTENTION, cfg, results)
    header = re.split(r"\s{2,}", table.splitlines()[0].strip())
    assert header[:8] == [
        "shape", "rung", "fwd ms", "fwd x", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd x", "fwd+bwd TFLOP/s"
    ]
    cells = {row[1]: row for row in _rows(table, "self 4096x4096 d64")}
    assert float(cells["torch sdpa"][4]) == pytest.approx(flops / 2e-3 / 1e12, rel=1e-2)
    assert float(cells["triton"][7]) == pytest.approx(3.5 * flops / 10e-3 / 1e12, rel=1e-2)
    assert cells["triton"][3] == "1.25x" and cells["triton"][6] == "1.25x"  # on a GPU the kernel is in the ratios
    assert "backward 2.5 times the forward" in flat(table)


def test_attention_points_that_cannot_fit_are_skipped_with_a_note():
    huge = AttentionShape("self", 1, 200_000, 200_000, 16, False)  # a 320 GB float64 score matrix
    small = AttentionShape("self", 1, 32, 32, 16, False)
    cfg = bench.Config(points=(small, huge), dtype="float32", device="cpu", repeats=1, warmup=0)
    todo, skipped = bench.plan(ATTENTION, cfg, ("numpy", "pytorch", "sdpa", "triton"))
    assert set(todo) == {(r, small) for r in ("numpy", "pytorch", "sdpa", "triton")} | {("sdpa", huge)}
    assert {m.rung for m in skipped} == {"numpy", "pytorch"}
    assert all(m.note.startswith("skipped: needs about") for m in skipped)
    alone = bench.Config(points=(AttentionShape("self", 2, 1500, 1500, 64, False),), dtype="float32", device="cpu",
                         repeats=1, warmup=0)
    todo, skipped = bench.plan(ATTENTION, alone, ("triton",))
    assert todo == [] and "under the interpreter" in skipped[0].note  # would take minutes


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bench_attention_on_a_gpu(dtype, capsys):
    argv = ["attention", "--shapes", "1024", "--head-dim", "64", "--batch-heads", "8", "--dtype", dtype]
    assert bench.main(argv + ["--repeats", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out, "self 1024x1024 d64")
    assert [row[1] for row in rows] == ["numpy (float64)", "pytorch (matrix)", "torch sdpa", "triton"]
    assert all(float(row[4]) > 0 for row in rows[1:])  # a TFLOP/s figure for each GPU rung
    assert rows[3][3].endswith("x") and "NOT speed figures" not in flat(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "--shapes", "12xfoo"], "'12xfoo' is not a shape"),
        (["attention", "--shapes", "0x12"], "lengths must be >= 1"),
        (["attention", "--shapes", ","], "at least one shape"),
        (["attention", "--head-dim", "64,abc"], "'abc' is not a whole number"),
        (["attention", "--batch-heads", "0"], "must be >= 1"),
        (["attention", "--rungs", "numpy,xformers"], "unknown rung"),
        (["attention", "--sdpa-backend", "fast"], "invalid choice"),
        (["attention", "--plot", "/no/such/folder/a.png"], "does not exist"),
    ],
)
def test_bench_attention_bad_arguments_are_named(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only errors")
@pytest.mark.parametrize(
    "argv, message",
    [
        (["attention", "--dtype", "bfloat16"], "bfloat16 needs a CUDA GPU"),
        (["attention", "--tf32"], "--tf32 applies to float32 on a CUDA GPU only"),
        (["attention", "--sdpa-backend", "efficient"], "needs a CUDA GPU"),
    ],
)
def test_bench_attention_gpu_only_options_fail_clearly_on_cpu(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_attention_help_names_the_shapes(capsys):
    assert bench.main(["attention", "--help"]) == 0
    out = flat(capsys.readouterr().out)
    assert "--shapes" in out and "--causal" in out and "whisper-enc: 1500 x 1500" in out


# --------------------------------------------------------------------------- tinymm tour


def test_tour_quick_runs_and_every_check_holds():
    # In a fresh process, as `make demo` runs it: FlopCounterMode (chapter 1's stop) makes torch
    # import Triton, and the kernels of the next stops need it in interpreter mode on a CPU. In
    # this test process conftest imported `kernels` first, so only a fresh one shows the tour
    # arranges that itself.
    import subprocess
    import sys

    code = "import sys; from tiny_mm import tour; sys.exit(tour.main(['--quick']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    from tiny_mm.tour import STOPS

    every = f"{len(STOPS)} of {len(STOPS)} stop(s) checked out"  # each registered stop ran and held
    assert "FAIL" not in out and every in out, out[-3000:]
    # chapter 1: three strategies against FlopCounterMode and the 196 x 128 claim; chapter 2: two rungs
    # under four masks and the gradient check; chapter 3: two patch embeddings, the tower and its
    # parameter count; chapter 4: two rungs and the gradient check; chapter 5: the tokenizer, two
    # towers, the loss going down and the zero-shot bar; chapter 8: the media mask, closed gates,
    # three Q-Former masks; chapter 9: two spectrograms, two model outputs and six parameter counts
    assert out.count(" ok") >= 4 + 8 + 1 + 4 + 3 + 5 + 3 + 10
    chapters = [line.split("Read: ")[1].split()[0] for line in out.splitlines() if "Read: " in line]
    assert len(chapters) == len(STOPS)
    for path in chapters:
        assert (Path(__file__).parents[1] / path).is_file(), f"the tour points to {path}, which does not exist"
    numbers = [int(path.split("/ch")[1][:2]) for path in chapters]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), f"not in book order: {chapters}"
    assert "NOT speed figures" in flat(out)


def test_tour_stops_fail_loudly(monkeypatch, capsys):
    # A stop whose check does not hold must turn the tour's exit code, and say so.
    from tiny_mm import attention

    monkeypatch.setattr(attention, "scaled_dot_product_attention", lambda q, k, v, **kw: q)
    assert tour.main(["--quick", "--only", "attention"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_vit_stop_fails_when_the_tower_differs(monkeypatch, capsys):
    # A wrong activation changes every embedding: the comparison with open_clip must catch it.
    from tiny_mm import vit

    import torch

    monkeypatch.setattr(vit, "QuickGELU", torch.nn.GELU)
    assert tour.main(["--quick", "--only", "vit"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_clip_stop_fails_when_zero_shot_is_at_chance(monkeypatch, capsys):
    # A model that learned nothing scores near chance (1/30) on the held-out pairs: the bar catches it.
    import dataclasses

    import tiny_mm.train_clip as training
    from tiny_mm.tour import clip as clip_stop

    real = training.train_clip

    def untrained(config, **kw):
        return real(dataclasses.replace(config, steps=2, warmup=1, lr=1e-9), **kw)

    monkeypatch.setattr(training, "train_clip", untrained)
    assert clip_stop.run(quick=True) is False
    assert "FAIL" in capsys.readouterr().out


def test_whisper_stop_fails_when_a_count_is_off(monkeypatch, capsys):
    # A formula that forgets one parameter must show up against the models openai-whisper builds.
    from tiny_mm import counting_whisper

    real = counting_whisper.whisper_params
    monkeypatch.setattr(counting_whisper, "whisper_params",
                        lambda dims: {**real(dims), "total": real(dims)["total"] - 1})
    assert tour.main(["--quick", "--only", "whisper"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_tour_list_and_unknown_stop(capsys):
    assert tour.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert [line.split()[0] for line in listed.splitlines()] == [stop.name for stop in tour.STOPS]
    for name in ("fusion", "attention", "vit", "contrastive", "clip", "captioning", "perceiver", "adapters", "whisper"):
        assert name in listed
    assert tour.main(["--only", "nowhere"]) == 2
    assert "unknown stop" in capsys.readouterr().err


def test_tour_relative_error_never_passes_nan():
    assert tour.relative_error([1.0, float("nan")], [1.0, 2.0]) == math.inf
    assert tour.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert tour.relative_error([3.0, 4.0], [0.0, 0.0]) > 1  # a zero reference is not an excuse


@pytest.mark.slow
def test_full_tour(capsys):
    assert tour.main([]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_cli_dispatches_to_bench(capsys):
    from tiny_mm import cli

    assert cli.main(["bench", "nothing"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
