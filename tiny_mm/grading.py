"""`tinymm grade`: run the exercise graders and print a scorecard.

    tinymm grade                 grade every exercise in exercises/ (the learner's copy)
    tinymm grade ex01            grade one exercise (ex01, ex1, 1 or ex01_clip_loss)
    tinymm grade --solutions     grade solutions/ instead (they should score full marks)
    tinymm grade ex01 --target my_ex01.py      grade a file (or a dotted module name)
    tinymm grade --json          Gradescope's results.json on stdout (scorecard on stderr)
    tinymm grade --json results.json --timeout 10

The graders are pytest files, tests/grading/test_exNN_*.py. Each exercise's
grader runs in a child `python -m pytest`-like process, so the learner's code
can raise, call sys.exit or os._exit, loop forever or crash without taking the
grader down:

- pytest-timeout (signal method) interrupts a check after --timeout seconds;
- a small plugin (`Recorder`, below) appends one JSON line per event to a
  record file: the collected checks with their points, each check's start,
  and each check's outcome with a one-line reason (tests/grading/conftest.py
  also notes which learner function is running);
- this process watches the record file. If a check runs past a hard limit
  (timeout + 3 s: the learner's code ignored the interrupt) the child is
  killed; if the child dies, the check it was in fails with the reason, the
  function it was calling is marked broken (later checks that need it fail at
  once instead of hanging again), and a fresh child runs the checks left.

Exit code: 0 when every check of every graded exercise passed (full marks),
1 when some check failed, 2 when the grader itself could not run (unknown
exercise, bad arguments, a grader that does not collect).

The repository is located from this package (an editable install of the
checkout), not from the current directory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TARGET_ENV = "TINYMM_GRADE_TARGET"
RECORD_ENV = "TINYMM_GRADE_RECORD"
BROKEN_ENV = "TINYMM_GRADE_BROKEN"
DEFAULT_TIMEOUT = 5.0
COLLECT_LIMIT = 180.0  # seconds for a child to import torch and collect the checks
_TIMEOUT = re.compile(r"^Timeout \(>(?P<seconds>[0-9.]+)s\) from pytest-timeout")

# Run inside the child: pytest with the Recorder plugin (argv: record file, pytest args...).
_CHILD = (
    "import sys, pytest\n"
    "from tiny_mm.grading import Recorder\n"
    "sys.exit(pytest.main(sys.argv[2:], plugins=[Recorder(sys.argv[1])]))"
)


class GradingError(RuntimeError):
    """The grader itself could not run (not the learner's fault)."""


def repo_root() -> Path:
    """The checkout holding tests/grading/ (tiny_mm is installed editable from it)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "grading").is_dir():
        raise GradingError(
            f"no tests/grading/ next to the tiny_mm package ({root}): "
            "tinymm grade needs the repository checkout installed with `pip install -e .`"
        )
    return root


def _check_tools() -> None:
    """The graders are pytest files with per-check time limits: both tools must be installed."""
    import importlib.util

    missing = [name for name in ("pytest", "pytest_timeout") if importlib.util.find_spec(name) is None]
    if missing:
        raise GradingError(f"tinymm grade needs {' and '.join(missing)}: pip install -e '.[dev]'")


def available_exercises(root: Path) -> dict[str, Path]:
    """{"ex01_clip_loss": grader file} for every tests/grading/test_exNN_*.py."""
    graders = sorted((root / "tests" / "grading").glob("test_ex[0-9]*.py"))
    return {path.stem.removeprefix("test_"): path for path in graders}


def resolve_exercise(name: str, known: dict[str, Path]) -> str:
    """Accept ex01_clip_loss, ex01, ex1 or 1."""
    if name in known:
        return name
    digits = name.lower().removeprefix("ex")
    if digits.isdigit():
        for full in known:
            if int(full[2:4]) == int(digits):
                return full
    raise GradingError(f"unknown exercise {name!r}; known: {', '.join(known) or 'none'}")


# ---------------------------------------------------------------- the child's side


def _title(item) -> str:
    """A check's name on the scorecard: its docstring's first line, plus its parameters."""
    doc = (getattr(item, "function", None) and item.function.__doc__) or ""
    title = doc.strip().splitlines()[0].strip() if doc.strip() else item.name
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params:
        title += " [" + ", ".join(f"{key}={value}" for key, value in callspec.params.items()) + "]"
    return title


def _points(item) -> float:
    marker = item.get_closest_marker("points")
    return float(marker.args[0]) if marker and marker.args else 1.0


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """One line for a failed check (the graders' own messages are already one line)."""
    import pytest

    if isinstance(exc, pytest.fail.Exception):
        timeout = _TIMEOUT.match(str(exc.msg))
        if timeout:
            return f"timed out after {float(timeout['seconds']):g} s (an infinite loop?)"
        return _one_line(exc.msg)
    if isinstance(exc, AssertionError):
        return _one_line(f"check failed: {exc}" if str(exc) else "check failed")
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return _one_line(f"{type(exc).__name__}: {exc}")


class Recorder:
    """pytest plugin used in the child: appends the run's events to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failures: dict[str, str] = {}
        self.skips: dict[str, str] = {}
        os.environ[RECORD_ENV] = path  # the grading conftest notes learner calls here

    def _write(self, **event) -> None:
        # Opened per event and closed at once: whatever happens next, the line is on disk.
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def pytest_collection_finish(self, session) -> None:
        tests = [{"nodeid": item.nodeid, "name": _title(item), "points": _points(item)}
                 for item in session.items]
        self._write(event="collected", tests=tests)

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._write(event="start", nodeid=nodeid, time=time.time())

    def pytest_runtest_makereport(self, item, call) -> None:
        if call.excinfo is None:
            return
        import pytest

        exc = call.excinfo.value
        if isinstance(exc, pytest.skip.Exception):
            self.skips.setdefault(item.nodeid, _one_line(exc.msg))
        else:
            self.failures.setdefault(item.nodeid, _reason(exc))

    def pytest_runtest_logfinish(self, nodeid, location) -> None:
        if nodeid in self.failures:
            self._write(event="result", nodeid=nodeid, outcome="failed", reason=self.failures[nodeid])
        elif nodeid in self.skips:
            self._write(event="result", nodeid=nodeid, outcome="skipped", reason=self.skips[nodeid])
        else:
            self._write(event="result", nodeid=nodeid, outcome="passed", reason="")


# ---------------------------------------------------------------- the parent's side


@dataclass
class Check:
    nodeid: str
    name: str
    points: float
    outcome: str = "not run"  # passed | failed | skipped | not run
    reason: str = ""

    @property
    def score(self) -> float:
        return self.points if self.outcome == "passed" else 0.0


@dataclass
class ExerciseResult:
    exercise: str
    checks: list[Check] = field(default_factory=list)
    error: str = ""  # set when the grader itself could not run

    @property
    def score(self) -> float:
        return sum(c.score for c in self.checks)

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks if c.outcome != "skipped")

    @property
    def passed(self) -> bool:
        return not self.error and all(c.outcome in ("passed", "skipped") for c in self.checks)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete JSON lines of the record file from byte `offset` on."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


class ChildRun(NamedTuple):
    events: list[dict]  # what the child recorded, in order
    how: str  # "ok" (pytest finished), "killed" (by us: over a time limit) or "crashed"
    returncode: int
    output_tail: str  # the end of the child's stdout + stderr, for grader errors


def _run_child(root: Path, grader: Path, nodeids: list[str] | None, target: str, timeout: float,
               broken: dict[str, str], workdir: Path, attempt: int) -> ChildRun:
    """Run one child over `nodeids` (None: the whole grader file), watching for hangs."""
    record = workdir / f"record{attempt}.jsonl"
    log_path = workdir / f"log{attempt}.txt"
    env = dict(os.environ)
    env.update({TARGET_ENV: target, RECORD_ENV: str(record), BROKEN_ENV: json.dumps(broken)})
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # Graders run small tensors: one thread is as fast as two there, and on a busy machine
    # it keeps a correct solution inside the per-check time limits (threads fighting for
    # cores made the ex05 training check 6x slower).
    env.setdefault("OMP_NUM_THREADS", "1")
    args = nodeids if nodeids is not None else [str(grader.relative_to(root))]
    command = [sys.executable, "-c", _CHILD, str(record), *args,
               "-q", "--tb=no", "-p", "no:cacheprovider", "--rootdir", str(root),
               "--timeout", f"{timeout:g}", "--timeout-method", "signal"]
    hard_limit = _hard_limit(timeout)
    events: list[dict] = []
    offset = 0
    collected = False
    running: tuple[str, float] | None = None  # (nodeid, when this process saw it start)
    how = "ok"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                rc = child.poll()
                new, offset = _read_events(record, offset)
                for event in new:
                    events.append(event)
                    if event["event"] == "collected":
                        collected = True
                    elif event["event"] == "start":
                        running = (event["nodeid"], time.monotonic())
                    elif event["event"] == "result":
                        running = None
                if rc is not None:
                    break
                now = time.monotonic()
                hung = running is not None and now - running[1] > hard_limit
                if hung or (not collected and now - started > COLLECT_LIMIT):
                    how = "killed"
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                    break
                time.sleep(0.02)
        finally:
            if child.poll() is None:  # e.g. KeyboardInterrupt here: never leave the child behind
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    new, offset = _read_events(record, offset)
    events += new
    rc = child.returncode
    if how == "ok" and rc not in (0, 1, 5):  # 0 all passed, 1 some failed, 5 nothing collected
        how = "crashed"
    return ChildRun(events, how, rc, log_path.read_text(errors="replace")[-2000:])


def _hard_limit(timeout: float) -> float:
    """pytest-timeout interrupts a check at `timeout`; this limit is for code that ignores the interrupt."""
    return timeout + 3.0


def grade_exercise(exercise: str, target: str, timeout: float = DEFAULT_TIMEOUT,
                   root: Path | None = None) -> ExerciseResult:
    """Grade one exercise of `target` (solutions | exercises | dotted module | file path)."""
    root = repo_root() if root is None else root
    grader = available_exercises(root)[exercise]
    result = ExerciseResult(exercise)
    checks: dict[str, Check] = {}
    broken: dict[str, str] = {}
    remaining: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="tinymm-grade-") as tmp:
        for attempt in range(1000):
            run = _run_child(root, grader, remaining, target, timeout, broken, Path(tmp), attempt)
            in_flight, function = None, None  # the check that never finished, the learner function it ran
            for event in run.events:
                if event["event"] == "collected" and not checks:
                    for test in event["tests"]:
                        checks[test["nodeid"]] = Check(test["nodeid"], test["name"], test["points"])
                elif event["event"] == "start":
                    in_flight, function = event["nodeid"], None
                elif event["event"] == "call":
                    function = event["function"]
                elif event["event"] == "result":
                    check = checks.get(event["nodeid"])
                    if check is not None:
                        check.outcome, check.reason = event["outcome"], event["reason"]
                    in_flight = None
            tail = _one_line(run.output_tail, 400)
            if not checks:
                ended = "was stopped" if run.how == "killed" else _describe_exit(run.returncode)
                result.error = f"the grader collected no checks (its process {ended}): {tail}"
                return result
            if in_flight is not None and in_flight in checks:
                who = function or "the check"
                if run.how == "killed":
                    limit = _hard_limit(timeout)
                    reason = f"{who} timed out after {limit:g} s and ignored the interrupt (an infinite loop?)"
                else:
                    reason = f"{who} killed the grading process: it {_describe_exit(run.returncode)}"
                checks[in_flight].outcome, checks[in_flight].reason = "failed", reason
                if function:
                    broken[function] = reason  # the next child fails its other checks at once
            elif run.how != "ok" and any(check.outcome == "not run" for check in checks.values()):
                result.error = f"the grading process {_describe_exit(run.returncode)} between checks: {tail}"
                break
            remaining = [nodeid for nodeid, check in checks.items() if check.outcome == "not run"]
            if not remaining or (run.how == "ok" and in_flight is None):
                break
    for check in checks.values():
        if check.outcome == "not run":
            check.outcome, check.reason = "failed", "not run (the grading process stopped early)"
    result.checks = list(checks.values())
    return result


# ---------------------------------------------------------------- output


def _fmt_points(x: float) -> str:
    return f"{x:g}"


def scorecard(results: list[ExerciseResult], target_label: str, timeout: float) -> str:
    """The human scorecard: one block per exercise, one line per check, a total."""
    utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
    ok_mark, fail_mark, skip_mark = ("✓", "✗", "-") if utf8 else ("+", "x", "-")
    rows = [(r, c) for r in results for c in r.checks]
    width = max([len(c.name) for _, c in rows] + [len(r.exercise) for r in results] + [20])
    pts = max([len(f"{_fmt_points(r.score)} / {_fmt_points(r.max_score)}") for r in results] + [7])
    lines = [f"tinymm grade: {target_label} (time limit {timeout:g} s per check)", ""]
    total, total_max = 0.0, 0.0
    for r in results:
        total, total_max = total + r.score, total_max + r.max_score
        head = f"{_fmt_points(r.score)} / {_fmt_points(r.max_score)}"
        lines.append(f"{r.exercise:<{width + 3}} {head:>{pts}}")
        if r.error:
            lines.append(f"   {fail_mark} grader error: {r.error}")
        for c in r.checks:
            mark = {"passed": ok_mark, "skipped": skip_mark}.get(c.outcome, fail_mark)
            score = "skipped" if c.outcome == "skipped" else f"{_fmt_points(c.score)} / {_fmt_points(c.points)}"
            lines.append(f" {mark} {c.name:<{width}} {score:>{pts}}")
            if c.reason and c.outcome != "passed":
                lines.append(f"     {c.reason}")
        lines.append("")
    percent = f"  ({100 * total / total_max:.0f}%)" if total_max else ""
    head = f"{_fmt_points(total)} / {_fmt_points(total_max)}"
    lines.append(f"{'total':<{width + 3}} {head:>{pts}}{percent}")
    return "\n".join(lines)


def gradescope(results: list[ExerciseResult], seconds: float) -> dict:
    """Gradescope's results.json: {"score", "execution_time", "output", "tests": [...]}."""
    tests = []
    for r in results:
        if r.error:
            tests.append({"name": f"{r.exercise}: grader", "score": 0, "max_score": 0,
                          "status": "failed", "output": f"grader error: {r.error}"})
        for c in r.checks:
            tests.append({
                "name": f"{r.exercise}: {c.name}",
                "score": c.score,
                "max_score": c.points if c.outcome != "skipped" else 0,
                "status": "passed" if c.outcome in ("passed", "skipped") else "failed",
                "output": c.reason if c.outcome != "passed" else "",
            })
    summary = "; ".join(f"{r.exercise}: {_fmt_points(r.score)} / {_fmt_points(r.max_score)}" for r in results)
    return {"score": sum(r.score for r in results), "execution_time": round(seconds, 2),
            "output": summary, "tests": tests}


def write_json(report: dict, destination: str) -> None:
    """Write a report as JSON to a file, or to stdout when destination is "-"."""
    payload = json.dumps(report, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(payload)
    else:
        Path(destination).write_text(payload)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinymm grade", description="Grade exercises and print a scorecard.",
        epilog="Exit code: 0 = every check passed, 1 = some check failed, 2 = the grader could not run.")
    parser.add_argument("exercises", nargs="*", help="ex01, ex1, 1 or ex01_clip_loss (default: all)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--solutions", action="store_true", help="grade solutions/ instead of exercises/")
    which.add_argument("--target", metavar="MODULE_OR_FILE",
                       help="grade this module (dotted name) or .py file instead (one exercise)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write Gradescope's results.json to FILE (default: stdout; the scorecard goes to stderr)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"time limit per check (default {DEFAULT_TIMEOUT:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print("tinymm grade: --timeout must be positive", file=sys.stderr)
        return 2
    if args.target:
        target = args.target
        if target.endswith(".py") or os.sep in target:
            target = str(Path(target).resolve())  # the child runs in the repository root
    elif args.solutions:
        target = "solutions"
    else:
        target = os.environ.get(TARGET_ENV, "").strip() or "exercises"
    label = f"{target}/" if target in ("solutions", "exercises") else target
    try:
        _check_tools()
        root = repo_root()
        known = available_exercises(root)
        names = [resolve_exercise(n, known) for n in args.exercises] or list(known)
    except GradingError as exc:
        print(f"tinymm grade: {exc}", file=sys.stderr)
        return 2
    if not names:
        print("tinymm grade: no graders in tests/grading/", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = [grade_exercise(name, target, args.timeout, root) for name in names]
    card = scorecard(results, label, args.timeout)
    if args.json is None:
        print(card)
    else:
        # JSON on stdout: the scorecard moves to stderr so stdout stays parseable.
        print(card, file=sys.stderr if args.json == "-" else sys.stdout)
        write_json(gradescope(results, time.monotonic() - started), args.json)
    if any(r.error for r in results):
        return 2
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
