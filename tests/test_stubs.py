"""The committed stubs in exercises/ are what `python -m tiny_mm.stubs` makes of solutions/."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from tiny_mm import stubs

ROOT = Path(__file__).resolve().parent.parent
GENERATED = stubs.generate(ROOT)
SOLUTION_WITH_TWO_REGIONS = '''"""doc"""


def f(x):
    """f's spec"""
    # BEGIN SOLUTION hint: double it
    return 2 * x
    # END SOLUTION


class C:
    def g(self):
        # BEGIN SOLUTION
        # hint: a hint that runs
        # hint: over two lines
        return 1
        # END SOLUTION
'''


def test_every_solution_has_a_stub():
    assert GENERATED, "no solutions/exNN_*.py found"
    for path in GENERATED:
        assert (ROOT / "solutions" / path.name).exists()


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: p.name)
def test_committed_stub_is_generated(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `python -m tiny_mm.stubs`"
    assert path.read_text() == GENERATED[path], (
        f"{path.relative_to(ROOT)} is not what `python -m tiny_mm.stubs` generates from "
        f"solutions/{path.name}: regenerate it (a learner who has started the exercise will see this fail)"
    )


def _raises_not_implemented(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and getattr(node.exc.func, "id", None) == "NotImplementedError")


@pytest.mark.parametrize("path", sorted(GENERATED), ids=lambda p: p.name)
def test_each_stub_raises_not_implemented(path):
    """Every solution region became a raise, and calling a stubbed function raises NotImplementedError."""
    solution = (ROOT / "solutions" / path.name).read_text()
    tree = ast.parse(path.read_text())
    raises = [node for node in ast.walk(tree) if _raises_not_implemented(node)]
    assert len(raises) == solution.count("# BEGIN SOLUTION") > 0
    spec = importlib.util.spec_from_file_location(f"_stub_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as a real import does: @dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    # Functions whose body is docstring + raise: call them with placeholder arguments.
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            if len(body) == 1 and _raises_not_implemented(body[0]):
                with pytest.raises(NotImplementedError, match=path.stem.split("_")[0]):
                    getattr(module, node.name)(*[None] * len(node.args.args))


def test_stub_keeps_api_and_hints():
    stub = stubs.make_stub(SOLUTION_WITH_TWO_REGIONS, "ex99_demo.py")
    assert "return 2 * x" not in stub and "return 1" not in stub
    assert '"""f\'s spec"""' in stub and "def g(self):" in stub
    assert 'raise NotImplementedError("ex99 (f): double it")' in stub
    assert 'raise NotImplementedError("ex99 (g): a hint that runs over two lines")' in stub
    namespace: dict = {}
    exec(compile(stub, "ex99_demo.py", "exec"), namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    with pytest.raises(NotImplementedError):
        namespace["C"]().g()


@pytest.mark.parametrize("bad", ["# BEGIN SOLUTION\nx = 1\n", "x = 1\n# END SOLUTION\n",
                                 "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n"])
def test_unmatched_markers_are_errors(bad):
    with pytest.raises(ValueError, match="SOLUTION"):
        stubs.make_stub(bad, "ex99_demo.py")


def test_check_mode_exit_codes(tmp_path):
    (tmp_path / "solutions").mkdir()
    (tmp_path / "exercises").mkdir()
    (tmp_path / "solutions" / "ex99_demo.py").write_text(SOLUTION_WITH_TWO_REGIONS)
    assert stubs.main(["--check", "--root", str(tmp_path)]) == 1  # stub missing
    assert stubs.main(["--root", str(tmp_path)]) == 0  # writes it
    assert stubs.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "exercises" / "ex99_demo.py").write_text("edited\n")
    assert stubs.main(["--check", "--root", str(tmp_path)]) == 1
