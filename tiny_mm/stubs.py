"""Generate the learner's stubs in exercises/ from the solutions in solutions/.

A solution marks the part the learner writes:

    def f(x):
        '''docstring: the learner's specification'''
        # BEGIN SOLUTION hint: what to do, in one line
        # hint: (optional) more lines of the hint
        ...the solution...
        # END SOLUTION

Each region becomes a `raise`, at the indentation of its BEGIN marker, whose
message names the exercise and function and carries the hint:

        raise NotImplementedError("ex01 (f): what to do, in one line (optional) more lines of the hint")

(split over several lines when longer than 100 characters).

Everything outside the regions (module docstring, imports, signatures,
docstrings) is copied unchanged, so a stub has exactly the solution's API.

    python -m tiny_mm.stubs           # (re)write exercises/exNN_*.py
    python -m tiny_mm.stubs --check   # exit 1 if a committed stub is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION\b(?:\s*hint:\s*(?P<hint>.*))?$")
END = re.compile(r"^[ \t]*# END SOLUTION\b")
HINT = re.compile(r"^[ \t]*# hint:\s*(?P<hint>.*)$")
DEF = re.compile(r"^[ \t]*(?:async\s+)?def\s+(?P<name>\w+)|^[ \t]*class\s+(?P<cls>\w+)")
LINE_WIDTH = 100

HEADER = "# Generated from solutions/{name} by `python -m tiny_mm.stubs`: fill in every NotImplementedError.\n"


def repo_root() -> Path:
    """The checkout this package was installed from (editable install), not the cwd."""
    return Path(__file__).resolve().parent.parent


def _enclosing_name(lines: list[str], index: int) -> str | None:
    """Name of the nearest `def`/`class` above line `index` (for the default hint)."""
    for line in reversed(lines[:index]):
        match = DEF.match(line)
        if match:
            return match.group("name") or match.group("cls")
    return None


def _raise_line(indent: str, message: str) -> list[str]:
    """`raise NotImplementedError("message")`, split over lines if it is too long."""
    one_line = f"{indent}raise NotImplementedError({_quote(message)})\n"
    if len(one_line) <= LINE_WIDTH + 1:
        return [one_line]
    # Implicit string concatenation, one chunk per line, cut at spaces.
    inner = indent + "    "
    room = LINE_WIDTH - len(inner) - 3  # the quotes and a little slack
    chunks: list[str] = []
    current = ""
    for word in message.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(candidate) + 1 > room:
            chunks.append(current + " ")
            current = word
        else:
            current = candidate
    chunks.append(current)
    body = [f"{inner}{_quote(chunk)}\n" for chunk in chunks]
    return [f"{indent}raise NotImplementedError(\n", *body, f"{indent})\n"]


def _quote(text: str) -> str:
    """A double-quoted Python string literal (the project's quote style)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_stub(source: str, name: str) -> str:
    """The stub text for one solution file's text. `name` is the file name, e.g. ex01_clip_loss.py.

    Raises ValueError (with the line number) on an unmatched or nested marker.
    """
    exercise = name.split("_", 1)[0]  # "ex01"
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        begin = BEGIN.match(lines[i].rstrip("\n"))
        if begin is None:
            if END.match(lines[i]):
                raise ValueError(f"{name}:{i + 1}: '# END SOLUTION' without a matching BEGIN")
            out.append(lines[i])
            i += 1
            continue
        hint_parts = [begin.group("hint")] if begin.group("hint") else []
        j = i + 1
        # The hint continues on the `# hint:` lines right after the BEGIN marker.
        while j < len(lines) and (hint := HINT.match(lines[j].rstrip("\n"))):
            hint_parts.append(hint.group("hint"))
            j += 1
        while j < len(lines) and not END.match(lines[j]):
            if BEGIN.match(lines[j].rstrip("\n")):
                raise ValueError(f"{name}:{j + 1}: nested '# BEGIN SOLUTION'")
            j += 1
        if j == len(lines):
            raise ValueError(f"{name}:{i + 1}: '# BEGIN SOLUTION' without a matching END")
        where = _enclosing_name(lines, i)
        label = f"{exercise} ({where})" if where else exercise
        hint = " ".join(part.strip() for part in hint_parts) or "write this part"
        out += _raise_line(begin.group("indent"), f"{label}: {hint}")
        i = j + 1
    return HEADER.format(name=name) + "".join(out)


def generate(root: Path | None = None) -> dict[Path, str]:
    """{exercise path: stub text} for every solutions/exNN_*.py."""
    root = repo_root() if root is None else root
    stubs = {}
    for solution in sorted((root / "solutions").glob("ex[0-9]*.py")):
        stubs[root / "exercises" / solution.name] = make_stub(solution.read_text(), solution.name)
    return stubs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiny_mm.stubs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a committed stub differs")
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = repo_root() if args.root is None else args.root
    stale = []
    for path, text in generate(root).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    if stale:
        for path in stale:
            print(f"{path.relative_to(root)} is not what `python -m tiny_mm.stubs` generates "
                  f"from solutions/{path.name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
