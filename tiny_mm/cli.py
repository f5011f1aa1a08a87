"""The `tinymm` command line: `tinymm grade`, `tinymm bench`, `tinymm tour`.

Each subcommand lives in its own module with a `main(argv) -> int`; this file
only dispatches, so `tinymm --help` stays fast (nothing heavy is imported).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "grade": ("tiny_mm.grading", "grade the exercises and print a scorecard"),
    "bench": ("tiny_mm.bench", "time the NumPy, PyTorch and Triton rungs of a chapter"),
    "tour": ("tiny_mm.tour", "every chapter's core result in a few minutes on CPU"),
    "zeroshot": ("tiny_mm.zeroshot", "zero-shot classification of CIFAR-10 with a CLIP checkpoint"),
}


def usage() -> str:
    lines = ["usage: tinymm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'tinymm COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tinymm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
