"""The `tinymm` command line: `tinymm grade`, `tinymm bench`, `tinymm tour`, `tinymm train clip`, ...

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
    "train": ("tiny_mm.cli", "train a tiny model on generated data: clip, captioner, adapters, whisper-digits"),
}

# `tinymm train MODEL [ARGS...]`: the module whose main(argv) trains MODEL.
TRAINERS = {
    "clip": "tiny_mm.train_clip",
    "captioner": "tiny_mm.train_captioner",
    "adapters": "tiny_mm.train_adapters",
    "whisper-digits": "tiny_mm.train_whisper_digits",
    "video-fusion": "tiny_mm.train_video_fusion",
    "text-to-image": "tiny_mm.train_text_to_image",
}


def usage() -> str:
    lines = ["usage: tinymm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'tinymm COMMAND --help' for a command's options."]
    return "\n".join(lines)


def train(argv: list[str]) -> int:
    """`tinymm train MODEL [ARGS...]`: hand ARGS to the trainer of MODEL."""
    models = ", ".join(TRAINERS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: tinymm train MODEL [ARGS...]\n\nmodels: {models}\n\n"
              "Run 'tinymm train MODEL --help' for its options.")
        return 0
    if argv[0] not in TRAINERS:
        print(f"tinymm train: unknown model {argv[0]!r}; choose from {models}", file=sys.stderr)
        return 2
    module = importlib.import_module(TRAINERS[argv[0]])
    return int(module.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tinymm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name == "train":
        return train(rest)
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
