"""`tinymm tour` (what `make demo` runs): each chapter's core result, recomputed here, on CPU.

The tour is a list of `Stop`s, one per chapter that has something to show,
each in its own module of this package with a `run(quick) -> bool`. A stop
prints what it computed, checks it, and says which chapter explains it; it
returns True when every check held. A new chapter adds its module and its
entry in `STOPS`, in book order, and nothing else changes. The stops so far:

    fusion       chapter 1: the cost formulas against torch's FLOP counter; the 196 x 128 claim
    attention    chapter 2: NumPy, PyTorch and Triton attention agree under every mask; the
                 hand-derived backward against finite differences
    vit          chapter 3: patch embedding = strided convolution; our ViT equals open_clip's
    contrastive  chapter 4: the three rungs of CLIP's loss agree; their cost
    clip         chapter 5: our CLIP and tokenizer equal open_clip's; a tiny CLIP trained here
                 classifies colour-shape pairs it never saw
    captioning   chapter 6: the decoder layer against the NumPy reference; cached decoding equals
                 uncached; a captioner trained here captions held-out images
    perceiver    chapter 7: Fourier features and the Perceiver IO cost formula against the
                 reference and torch's FLOP counter; a Perceiver that reads raw pixels
    adapters     chapter 8: the media mask against its reference; Flamingo with closed gates is
                 the frozen model exactly; LLaVA's prefix and the Q-Former's three masks
                 against the NumPy reference
    whisper      chapter 9: the log-mel front end, the model and the parameter counts equal
                 openai-whisper's
    video_fusion chapter 10: the four fusion strategies' parameter formulas, bottleneck fusion and
                 the objective against the NumPy reference; the textbook's 155M estimate recounted
    text_to_image chapter 11: vector quantisation, the token sampler, DDIM and the denoiser against
                 the NumPy reference; the chapter's generation run, judged by a CLIP

    tinymm tour                 # every stop (about four minutes on a 2-core CPU)
    tinymm tour --quick         # the same checks at toy sizes (seconds)
    tinymm tour --only attention,contrastive
    tinymm tour --list
"""
from __future__ import annotations

import argparse
import sys
import time

from tiny_mm.tour import (
    adapters,
    attention,
    captioning,
    clip,
    contrastive,
    fusion,
    perceiver,
    text_to_image,
    video_fusion,
    vit,
    whisper,
)
from tiny_mm.tour.common import Stop, relative_error

__all__ = ["Stop", "STOPS", "relative_error", "main"]


STOPS: list[Stop] = [
    Stop(
        name="fusion",
        title="What each fusion strategy costs",
        chapter="chapters/ch01_fusion/README.md (notebook: chapters/ch01_fusion/notebook.py)",
        run=fusion.run,
    ),
    Stop(
        name="attention",
        title="Attention, three ways, under every mask",
        chapter="chapters/ch02_attention/README.md (notebook: chapters/ch02_attention/notebook.py)",
        run=attention.run,
    ),
    Stop(
        name="vit",
        title="Patches, convolutions and a vision transformer",
        chapter="chapters/ch03_vit/README.md (notebook: chapters/ch03_vit/notebook.py)",
        run=vit.run,
    ),
    Stop(
        name="contrastive",
        title="CLIP's contrastive loss, three ways",
        chapter="chapters/ch04_contrastive/README.md (notebook: chapters/ch04_contrastive/notebook.py)",
        run=contrastive.run,
    ),
    Stop(
        name="clip",
        title="CLIP: the real thing, and a tiny one trained here",
        chapter="chapters/ch05_clip_zero_shot/README.md (notebook: chapters/ch05_clip_zero_shot/notebook.py)",
        run=clip.run,
    ),
    Stop(
        name="captioning",
        title="Image captioning: words that read patches",
        chapter="chapters/ch06_captioning/README.md (notebook: chapters/ch06_captioning/notebook.py)",
        run=captioning.run,
    ),
    Stop(
        name="perceiver",
        title="Perceiver: latents that read raw pixels",
        chapter="chapters/ch07_perceiver/README.md (notebook: chapters/ch07_perceiver/notebook.py)",
        run=perceiver.run,
    ),
    Stop(
        name="adapters",
        title="Adapters: Flamingo's gates and media mask, LLaVA's prefix",
        chapter="chapters/ch08_vlm_adapters/README.md (notebook: chapters/ch08_vlm_adapters/notebook.py)",
        run=adapters.run,
    ),
    Stop(
        name="whisper",
        title="Whisper, checked against openai-whisper",
        chapter="chapters/ch09_whisper/README.md (notebook: chapters/ch09_whisper/notebook.py)",
        run=whisper.run,
    ),
    Stop(
        name="video_fusion",
        title="Video, audio and caption, fused four ways",
        chapter="chapters/ch10_video_fusion/README.md (notebook: chapters/ch10_video_fusion/notebook.py)",
        run=video_fusion.run,
    ),
    Stop(
        name="text_to_image",
        title="From a caption to an image: tokens and diffusion",
        chapter="chapters/ch11_text_to_image/README.md (notebook: chapters/ch11_text_to_image/notebook.py)",
        run=text_to_image.run,
    ),
]


# ---------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinymm tour", description="Each chapter's core result, recomputed here.")
    parser.add_argument("--quick", action="store_true", help="the same checks at toy sizes (a few seconds)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these stops (see --list)")
    parser.add_argument("--list", action="store_true", help="list the stops and exit")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)

    if args.list:
        for stop in STOPS:
            print(f"{stop.name:<14} {stop.title}  ({stop.chapter.split()[0]})")
        return 0
    stops = STOPS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in STOPS}]
        if unknown or not wanted:
            print(
                f"tinymm tour: unknown stop(s) {unknown or wanted}; choose from {', '.join(s.name for s in STOPS)}",
                file=sys.stderr,
            )
            return 2
        stops = [s for s in STOPS if s.name in wanted]

    # Before any stop: torch imports Triton behind the scenes (FlopCounterMode does), and on a
    # machine without CUDA the kernels need Triton imported in interpreter mode, which
    # `kernels` arranges only if it comes first (see kernels/__init__.py).
    import kernels  # noqa: F401

    print("tinymm tour: each stop recomputes a chapter's core result on this machine and checks it.")
    start = time.perf_counter()
    passed = 0
    for i, stop in enumerate(stops, 1):
        print()
        print(f"== Stop {i} of {len(stops)}: {stop.title} ==")
        stop_start = time.perf_counter()
        try:
            ok = stop.run(args.quick)
        except Exception as err:  # a broken stop is reported, and the tour goes on
            print(f"   this stop failed: {type(err).__name__}: {err}")
            ok = False
        passed += ok
        seconds = time.perf_counter() - stop_start
        print(f"-> {'all checks held' if ok else 'SOME CHECKS FAILED'} ({seconds:.0f} s). Read: {stop.chapter}")
    print()
    print(
        f"Tour done in {time.perf_counter() - start:.0f} s: {passed} of {len(stops)} stop(s) checked out. "
        "Next: `make test`, `tinymm grade ex01`, `tinymm train clip`, `tinymm bench attention`"
        f"{'' if _on_path('tinymm') else ' (tinymm lives in .venv/bin: run `source .venv/bin/activate` first)'}."
    )
    return 0 if passed == len(stops) else 1


def _on_path(command: str) -> bool:
    """Whether a shell would find `command`, i.e. the venv is active or installed globally."""
    import shutil

    return shutil.which(command) is not None
