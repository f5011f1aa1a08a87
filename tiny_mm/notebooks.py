"""The chapters' notebooks: convert them to .ipynb, and execute them.

Each chapter keeps its notebook as ``chapters/<chapter>/notebook.py`` in
jupytext's percent format (``# %%`` cells), so diffs stay readable and no
outputs are ever committed. This module turns those files into notebooks:

    python -m tiny_mm.notebooks              # write notebook.ipynb beside each notebook.py
    python -m tiny_mm.notebooks --execute    # also run each one, top to bottom, and report

``make notebooks`` runs the first form; ``make lab`` then opens the results.
The tests call :func:`execute_notebook` on every chapter notebook.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# The kernel every notebook runs on: "python3" resolves to the interpreter
# running this module (jupyter_client swaps a bare "python" in the kernel spec
# for sys.executable), so notebooks see this venv's packages.
KERNEL_NAME = "python3"
KERNELSPEC = {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)", "language": "python"}


class NotebookError(RuntimeError):
    """A notebook failed to run: names the file, the cell and the error."""

    def __init__(self, path: Path, cell_index: int | None, cell_source: str, reason: str):
        self.path = Path(path)
        self.cell_index = cell_index
        self.cell_source = cell_source
        self.reason = reason
        self.notebook: Any = None
        where = "before any cell ran" if cell_index is None else f"cell {cell_index}"
        excerpt = "\n".join("    " + line for line in cell_source.strip().splitlines()[:12])
        super().__init__(f"{self.path}: {where} failed: {reason}\n  cell source:\n{excerpt}")


def find_notebooks(root: Path = REPO_ROOT) -> list[Path]:
    """Every chapter notebook source, ``chapters/*/notebook.py``, in book order (by folder name)."""
    return sorted(Path(root).glob("chapters/*/notebook.py"))


def read_notebook(path: Path) -> Any:
    """Parse a jupytext percent-format file into an nbformat notebook with empty outputs."""
    import jupytext

    nb = jupytext.read(str(path), fmt="py:percent")
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def convert(path: Path) -> Path:
    """Write ``notebook.ipynb`` beside ``notebook.py`` (no outputs); return its path."""
    import jupytext

    path = Path(path)
    target = path.with_suffix(".ipynb")
    jupytext.write(read_notebook(path), str(target), fmt="ipynb")
    return target


def cells_with_outputs(nb: Any) -> list[int]:
    """Indices of code cells that carry outputs or an execution count (what must never be committed).

    ``nb`` is a notebook as parsed JSON (a dict) or an nbformat node.
    """
    found = []
    for index, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            found.append(index)
    return found


def kernel_env(extra_path: Path = REPO_ROOT) -> dict[str, str]:
    """The environment a notebook kernel starts with: headless matplotlib, the repo importable."""
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"  # no display here; plt.show() becomes a no-op
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def execute_notebook(path: Path, timeout: float = 120.0, cwd: Path | None = None) -> Any:
    """Run a jupytext notebook top to bottom in a fresh kernel; return the executed notebook.

    path: a ``notebook.py`` in percent format (converted in memory, nothing written).
    timeout: the longest any single cell may run, in seconds.
    cwd: the kernel's working directory (default: the repository root).
    Raises NotebookError naming the failing cell when a cell raises or times out.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    nb = read_notebook(path)
    cwd = REPO_ROOT if cwd is None else Path(cwd)
    client = NotebookClient(
        nb,
        timeout=int(timeout),
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(cwd)}},
    )
    current: dict[str, int] = {}

    def on_cell_start(cell: Any, cell_index: int) -> None:
        current["index"] = cell_index

    client.on_cell_start = on_cell_start
    try:
        client.execute(env=kernel_env())
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        index = current.get("index")
        source = nb.cells[index].source if index is not None else ""
        failure = NotebookError(path, index, source, _reason(error, nb, index))
        failure.notebook = nb  # the partly executed notebook, outputs included, for inspection
        raise failure from error
    return nb


def _reason(error: Exception, nb: Any, index: int | None) -> str:
    """One line: the exception the cell raised (from its error output), or the timeout."""
    if index is not None:
        for output in nb.cells[index].get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename')}: {output.get('evalue')}"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tiny_mm.notebooks",
        description="Convert chapters/*/notebook.py (jupytext) to notebook.ipynb beside it.",
    )
    parser.add_argument("paths", nargs="*", type=Path, help="notebook.py files (default: every chapter's)")
    parser.add_argument("--execute", action="store_true", help="also run each notebook and report")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    paths = args.paths or find_notebooks()
    if not paths:
        print("no chapters/*/notebook.py found", file=sys.stderr)
        return 1
    failures = 0
    for path in paths:
        target = convert(path)
        print(f"wrote {target.relative_to(REPO_ROOT) if target.is_relative_to(REPO_ROOT) else target}")
        if args.execute:
            start = time.perf_counter()
            try:
                execute_notebook(path, timeout=args.timeout)
            except NotebookError as error:
                failures += 1
                print(f"FAILED {error}", file=sys.stderr)
            else:
                print(f"  ran in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
