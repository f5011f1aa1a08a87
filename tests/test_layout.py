"""The one-way import rule of DESIGN.md, checked on the source (no imports run).

    chapters/*/reference*.py: NumPy and the standard library only
    kernels/                : torch + triton, nothing of the project
    tiny_mm/                : may use kernels (and the chapters' references), never exercises/solutions
    exercises/, solutions/  : imported by nobody but the graders
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"chapters", "kernels", "tiny_mm", "exercises", "solutions", "tests"}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(pattern: str):
    return sorted(ROOT.glob(pattern))


@pytest.mark.parametrize("path", files("chapters/*/reference*.py"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_references_use_numpy_and_the_standard_library_only(path):
    allowed = {"numpy", "__future__"} | set(sys.stdlib_module_names)
    assert imported_top_levels(path) <= allowed, imported_top_levels(path) - allowed


@pytest.mark.parametrize("path", files("kernels/**/*.py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_are_a_leaf(path):
    assert not imported_top_levels(path) & PROJECT - {"kernels"}


@pytest.mark.parametrize("path", files("tiny_mm/**/*.py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_learner_code(path):
    assert not imported_top_levels(path) & {"exercises", "solutions", "tests"}


@pytest.mark.parametrize("path", files("chapters/**/*.py") + files("kernels/**/*.py"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_the_graders_imports_exercises_or_solutions(path):
    assert not imported_top_levels(path) & {"exercises", "solutions"}


def test_no_other_installed_distribution_claims_the_kernels_name():
    # Our Triton kernels live in a top-level package named `kernels`. Hugging Face ships a
    # distribution of that import name too (transformers >= 5.25 requires it); installed beside
    # ours, one shadows the other, and transformers fails on import (see pyproject.toml).
    import importlib.metadata

    owners = set(importlib.metadata.packages_distributions().get("kernels", []))
    assert owners <= {"tiny-mm"}, (
        f"the import name 'kernels' is also installed by {sorted(owners - {'tiny-mm'})}; "
        "keep transformers below 5.25 (pyproject.toml) and `pip uninstall kernels`"
    )
