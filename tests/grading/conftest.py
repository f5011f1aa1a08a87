"""What every grader shares: which code is graded, points, and one-line failure reasons.

The graded module is chosen by the environment variable TINYMM_GRADE_TARGET:

    solutions (default)   solutions.<exercise>  -> plain `pytest` / `make test` grade the solutions
    exercises             exercises.<exercise>  -> the learner's copy
    a.dotted.module       that module           (grades one exercise)
    path/to/file.py       that file             (grades one exercise)

A grader module sets `EXERCISE = "ex01_clip_loss"` and reaches the learner's
functions through the `learner` fixture, never by importing them itself: the
import then happens inside a test, so a module that fails to import (or loops,
or exits) costs points instead of breaking collection.

`learner.call(name, *args)` turns whatever the learner's code does wrong into
a one-line `pytest.fail` message: an exception (with file:line), sys.exit,
os._exit, NotImplementedError, or a pytest-timeout interrupt. `tinymm grade`
(tiny_mm/grading.py) runs these tests in a child process and reads the
messages back; see that module for the protocol (TINYMM_GRADE_RECORD,
TINYMM_GRADE_BROKEN).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

TARGET_ENV = "TINYMM_GRADE_TARGET"
RECORD_ENV = "TINYMM_GRADE_RECORD"  # JSON-lines file written by tinymm grade's recorder
BROKEN_ENV = "TINYMM_GRADE_BROKEN"  # {"function": "reason"} of functions that killed an earlier run

# Functions that hung or killed the process earlier: calling them again would
# only cost another time limit each, so later tests fail at once with the reason.
_BROKEN: dict[str, str] = json.loads(os.environ.get(BROKEN_ENV) or "{}")
_IMPORT_ERRORS: dict[str, str] = {}
_TIMEOUT = re.compile(r"^Timeout \(>(?P<seconds>[0-9.]+)s\) from pytest-timeout")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "points(n): what a grading test is worth (default 1)")


def one_line(text: str, limit: int = 200) -> str:
    """Collapse whitespace so a reason fits on one scorecard line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(reason: str) -> None:
    """Fail the current test with a one-line reason and no traceback."""
    pytest.fail(one_line(reason), pytrace=False)


class _OsExit(BaseException):
    """Raised in place of os._exit while learner code runs."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _os_exit_raises():
    """os._exit would end the test process without a word: turn it into an exception.

    (A hard crash still kills the process; tinymm grade notices and carries on.)
    """
    real = os._exit

    def fake_exit(code: int = 0) -> None:
        raise _OsExit(code)

    os._exit = fake_exit
    try:
        yield
    finally:
        os._exit = real


def _note_call(function: str) -> None:
    """Tell tinymm grade which learner function is running, in case it kills the process."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": "call", "function": function}) + "\n")


def _where(exc: BaseException, learner_file: str | None) -> str:
    """' (at file.py:LINE)' for the deepest frame in the learner's file, else the deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    mine = [f for f in frames if learner_file and Path(f.filename).resolve() == Path(learner_file).resolve()]
    frame = (mine or frames)[-1]
    if frame.filename.startswith("<"):  # e.g. <frozen importlib._bootstrap>: says nothing to a learner
        return ""
    return f" (at {Path(frame.filename).name}:{frame.lineno})"


def describe(function: str, exc: BaseException, learner_file: str | None) -> str:
    """One line saying what a learner's function did instead of returning."""
    if isinstance(exc, NotImplementedError):
        return f"{function} raised NotImplementedError: it is not written yet"
    if isinstance(exc, SystemExit):
        return f"{function} called sys.exit({exc.code!r}): return a value instead of exiting"
    if isinstance(exc, _OsExit):
        return f"{function} called os._exit({exc.code}): return a value instead of exiting"
    message = one_line(str(exc), 120)
    return f"{function} raised {type(exc).__name__}{': ' + message if message else ''}{_where(exc, learner_file)}"


def _load(exercise: str) -> tuple[ModuleType, str]:
    """(module, label) of the code graded for `exercise`, per TINYMM_GRADE_TARGET."""
    target = os.environ.get(TARGET_ENV, "").strip() or "solutions"
    if target in ("solutions", "exercises"):
        name, label = f"{target}.{exercise}", f"{target}/{exercise}.py"
        return importlib.import_module(name), label
    if target.endswith(".py") or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{TARGET_ENV}={target}: no such file")
        name = f"_tinymm_graded_{exercise}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module, path.name
    return importlib.import_module(target), target


class Learner:
    """The graded module, seen through `call`, which reports misbehaviour in one line."""

    def __init__(self, module: ModuleType, label: str) -> None:
        self.module = module
        self.label = label
        self.file = getattr(module, "__file__", None)

    def function(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.module, name, None)
        if not callable(fn):
            fail(f"{self.label} has no function {name}(): keep the names and signatures of the stub")
        return fn

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the learner's `name(*args, **kwargs)`; any misbehaviour fails the test in one line."""
        fn = self.function(name)
        if name in _BROKEN:
            fail(f"{_BROKEN[name]} (in an earlier check; not run again)")
        _note_call(name)
        # The reason is built inside `except` but failed outside it, so that
        # pytest shows one line, not the learner's exception chained to ours.
        try:
            with _os_exit_raises():
                return fn(*args, **kwargs)
        except pytest.fail.Exception as exc:
            timeout = _TIMEOUT.match(str(exc))
            if timeout is None:
                raise
            reason = f"{name} timed out after {float(timeout['seconds']):g} s (an infinite loop?)"
            _BROKEN[name] = reason
        except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception):
            raise
        except BaseException as exc:  # noqa: BLE001 - anything the learner's code does is graded
            reason = describe(name, exc, self.file)
        fail(reason)

    def raises(self, expected: type[BaseException], name: str, *args: Any, **kwargs: Any) -> BaseException:
        """Call `name(*args)` expecting it to raise `expected`; fail in one line otherwise."""
        fn = self.function(name)
        if name in _BROKEN:
            fail(f"{_BROKEN[name]} (in an earlier check; not run again)")
        _note_call(name)
        try:
            with _os_exit_raises():
                fn(*args, **kwargs)
        except expected as exc:
            if not isinstance(exc, NotImplementedError) or expected is NotImplementedError:
                return exc
            reason = describe(name, exc, self.file)
        except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
            raise
        except BaseException as exc:  # noqa: BLE001
            reason = f"{describe(name, exc, self.file)}; expected {expected.__name__}"
        else:
            reason = f"{name} returned instead of raising {expected.__name__}"
        fail(reason)
        raise AssertionError("unreachable")


@pytest.fixture
def learner(request: pytest.FixtureRequest) -> Learner:
    """The graded module for the requesting grader's EXERCISE, imported on first use."""
    exercise = request.module.EXERCISE
    if exercise in _IMPORT_ERRORS:
        fail(_IMPORT_ERRORS[exercise])
    target = os.environ.get(TARGET_ENV, "").strip() or "solutions"
    try:
        with _os_exit_raises():
            module, label = _load(exercise)
        return Learner(module, label)
    except pytest.fail.Exception as exc:
        if not _TIMEOUT.match(str(exc)):
            raise
        _IMPORT_ERRORS[exercise] = f"importing {target} ({exercise}) timed out (a loop at module level?)"
    except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception):
        raise
    except BaseException as exc:  # noqa: BLE001
        _IMPORT_ERRORS[exercise] = f"could not import {target} ({exercise}): " + describe("the module", exc, None)
    fail(_IMPORT_ERRORS[exercise])


def check_close(what: str, got: Any, expected, where: str, tol: float = 1e-5) -> None:
    """Fail unless ||got - expected|| / ||expected|| < tol (float32 against float64); NaN never passes.

    got: the learner's torch.Tensor; expected: the reference's float64 NumPy array.
    The one-line reason names the shape, the NaN, or the worst entry.
    """
    import numpy as np
    import torch

    if not isinstance(got, torch.Tensor):
        fail(f"{what} must be a torch.Tensor, got {type(got).__name__}")
    got_np = got.detach().to(torch.float64).numpy()
    if got_np.shape != expected.shape:
        fail(f"{what} has shape {tuple(got_np.shape)}, expected {tuple(expected.shape)} for {where}")
    if not np.all(np.isfinite(got_np)):
        fail(f"{what} contains NaN or inf for {where}")
    err = float(np.linalg.norm(got_np - expected) / np.linalg.norm(expected))
    if not err < tol:
        worst = np.unravel_index(np.argmax(np.abs(got_np - expected)), expected.shape)
        idx = ", ".join(str(int(i)) for i in worst)
        fail(f"{what} differs from the reference: rel err {err:.3g} (worst at [{idx}]: expected "
             f"{expected[worst]:.6g}, got {got_np[worst]:.6g}) for {where}")
