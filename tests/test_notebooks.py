"""Every chapter notebook runs top to bottom, and no notebook outputs are committed.

Notebooks are found by glob, so a new chapter's notebook.py is tested as soon
as it exists. Each runs in a fresh kernel with a per-cell time limit and a
wall-clock budget for the whole notebook.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tiny_mm import notebooks

# Whole-notebook budget on the 2-core CPU. Chapters aim for well under a
# minute; the slack absorbs kernel start-up and a busy machine.
NOTEBOOK_BUDGET_S = 90.0
CELL_TIMEOUT_S = 60.0

CHAPTER_NOTEBOOKS = notebooks.find_notebooks()


def test_every_chapter_notebook_is_found():
    assert CHAPTER_NOTEBOOKS, "no chapters/*/notebook.py found"
    assert notebooks.REPO_ROOT / "chapters/ch04_contrastive/notebook.py" in CHAPTER_NOTEBOOKS


@pytest.mark.timeout(int(NOTEBOOK_BUDGET_S * 2))
@pytest.mark.parametrize(
    "path", CHAPTER_NOTEBOOKS, ids=[p.parent.name for p in CHAPTER_NOTEBOOKS]
)
def test_notebook_executes(path: Path):
    start = time.perf_counter()
    nb = notebooks.execute_notebook(path, timeout=CELL_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert elapsed < NOTEBOOK_BUDGET_S, f"{path} took {elapsed:.0f} s (budget {NOTEBOOK_BUDGET_S:.0f} s)"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path} has no code cells"
    assert all(c.execution_count is not None for c in code_cells), "some cells did not run"


def test_failing_cell_is_named(tmp_path: Path):
    """The runner can fail, and when it does it says which cell and why."""
    source = tmp_path / "notebook.py"
    source.write_text(
        "# %% [markdown]\n# A notebook that breaks in its second code cell.\n\n"
        "# %%\nx = 1\n\n"
        "# %%\nraise ValueError('planted failure')\n\n"
        "# %%\ny = 2\n"
    )
    with pytest.raises(notebooks.NotebookError) as info:
        notebooks.execute_notebook(source, timeout=CELL_TIMEOUT_S)
    assert info.value.cell_index == 2
    assert "ValueError: planted failure" in str(info.value)
    assert "raise ValueError" in str(info.value)


def test_convert_writes_ipynb_without_outputs(tmp_path: Path):
    source = tmp_path / "notebook.py"
    source.write_text("# %% [markdown]\n# Title\n\n# %%\nprint('hi')\n\n# %%\n1 + 1\n")
    target = notebooks.convert(source)
    assert target == tmp_path / "notebook.ipynb"
    nb = json.loads(target.read_text())
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code", "code"]
    assert notebooks.cells_with_outputs(nb) == []
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_cells_with_outputs_detects_outputs():
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": "x"},
            {"cell_type": "code", "outputs": [], "execution_count": None},
            {"cell_type": "code", "outputs": [{"output_type": "stream", "text": "1"}], "execution_count": None},
            {"cell_type": "code", "outputs": [], "execution_count": 3},
        ]
    }
    assert notebooks.cells_with_outputs(nb) == [2, 3]


def test_no_tracked_notebook_has_outputs():
    if shutil.which("git") is None or not (notebooks.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", "*.ipynb"],
        cwd=notebooks.REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    dirty = {}
    for name in filter(None, listed):
        cells = notebooks.cells_with_outputs(json.loads((notebooks.REPO_ROOT / name).read_text()))
        if cells:
            dirty[name] = cells
    assert not dirty, f"committed notebooks with outputs (cell indices): {dirty}; commit notebook.py instead"


def test_command_line_converts_and_reports_failures(tmp_path: Path, capsys):
    good = tmp_path / "good" / "notebook.py"
    bad = tmp_path / "bad" / "notebook.py"
    for path, body in ((good, "x = 1\n"), (bad, "1 / 0\n")):
        path.parent.mkdir()
        path.write_text(f"# %%\n{body}")
    assert notebooks.main([str(good)]) == 0
    assert (good.parent / "notebook.ipynb").is_file()
    assert notebooks.main(["--execute", str(good), str(bad)]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
