"""Train an image captioner on coloured shapes, on a CPU, in about a minute: `tinymm train captioner`.

The recipe, step by step:

    data       render a pool of training images once, with their canonical captions
               ("a small red circle on the left": one object, one phrasing), and turn the
               captions into word ids once (`shapes_vocab`: <bos> words <eos> <pad>...)
    model      `CaptionerConfig()`: 8 px patches of a 32 px image (16 patch tokens), a
               2-block encoder and a 2-layer decoder, all 64 wide with 4 heads (254K parameters)
    loss       teacher forcing, padding masked out (`caption_loss`)
    optimiser  AdamW, linear warm-up then cosine decay, gradients clipped at norm 1; one
               CPU thread (these matrices are too small to gain from two)
    eval       greedy captions (with the key/value cache) for images never seen in training:
               exact caption match, and each attribute (colour, shape, size, position) parsed
               back from the generated words and compared with the image's labels

Exact match is meaningful only because the captions are canonical: with varied
phrasings ("a big red star, to the right") a correct caption need not be the
reference one, and the per-attribute scores would be the measure to use.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.captioning import (
    Captioner,
    CaptionerConfig,
    caption_loss,
    generate,
    save_captioner,
    teacher_forcing,
)
from tiny_mm.data.shapes import SIZE_WORDS, WHERE_WORDS, ShapesConfig, ShapesDataset, normalize
from tiny_mm.data.words import WordVocab, shapes_vocab
from tiny_mm.training import warmup_cosine

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ATTRIBUTES",
    "parse_caption",
    "caption_scores",
    "evaluate",
    "train_captioner",
    "main",
]

ATTRIBUTES = ("colour", "shape", "size", "position")


# ANCHOR: TrainConfig
@dataclass(frozen=True)
class TrainConfig:
    """What to train and how; the defaults are the one-minute recipe.

    steps, batch_size, lr, warmup: optimiser steps, images per step, peak learning
        rate (reached after ``warmup`` steps, then cosine-decayed to 0).
    weight_decay: AdamW's decay, on weight matrices only.
    train_images: size of the pre-rendered training pool.
    eval_images: fresh images (another seed) the captions are scored on.
    seed: seeds the weights, the data and the batches.
    threads: torch CPU threads (None: leave torch's setting alone).
    model: the captioner's sizes.
    """

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 60
    weight_decay: float = 0.05
    train_images: int = 4000
    eval_images: int = 500
    seed: int = 0
    threads: int | None = 1
    model: CaptionerConfig = field(default_factory=CaptionerConfig)

    def __post_init__(self) -> None:
        check_ints(self, positive=("steps", "batch_size", "train_images", "eval_images"), non_negative=("seed", "warmup"))
        check_optimiser(self.lr, self.weight_decay)
        if self.batch_size > self.train_images:
            raise ValueError(f"batch_size {self.batch_size} is larger than the pool of {self.train_images} images")
        check_threads(self.threads)
        if not isinstance(self.model, CaptionerConfig):
            raise ValueError(f"model must be a CaptionerConfig, got {type(self.model).__name__}")
        if self.model.vocab_size != len(shapes_vocab()):
            raise ValueError(f"model.vocab_size must be the shapes vocabulary's {len(shapes_vocab())}")
# ANCHOR_END: TrainConfig


@dataclass
class TrainResult:
    """What `train_captioner` returns.

    model: the trained captioner, in eval mode. losses: the loss of every step.
    seconds: wall time of the whole run; steps_per_second: the training loop alone.
    scores: `caption_scores` on the held-out images ({"exact", "colour", ...}).
    """

    model: Captioner
    losses: list[float]
    seconds: float
    steps_per_second: float
    scores: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading captions back


def _phrases() -> dict[str, dict[str, str]]:
    """Canonical words of each attribute value: {"size": {"small": "small", ...}, "position": {...}}."""
    return {
        "size": {name: words[0] for name, words in SIZE_WORDS.items()},
        "position": {name: words[0] for name, words in WHERE_WORDS.items()},
    }


# ANCHOR: parse_caption
def parse_caption(text: str, config: ShapesConfig = ShapesConfig()) -> dict[str, str] | None:
    """Read a canonical one-object caption back into its attributes, or None if it is not one.

    "a small red circle on the left" -> {"size": "small", "colour": "red",
    "shape": "circle", "position": "left"}. A caption that says anything else
    (a missing word, a word too many, a colour that is no colour) gives None:
    every attribute then counts as wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    words = text.split()
    if len(words) < 5 or words[0] not in ("a", "an"):
        return None
    size, colour, shape, where = words[1], words[2], words[3], " ".join(words[4:])
    sizes = {w: name for name, w in _phrases()["size"].items() if name in config.sizes}
    places = {w: name for name, w in _phrases()["position"].items() if name in config.positions}
    if size not in sizes or colour not in config.colours or shape not in config.shapes or where not in places:
        return None
    if words[0] != ("an" if size[0] in "aeiou" else "a"):
        return None  # the article must agree, as the captions write it
    return {"colour": colour, "shape": shape, "size": sizes[size], "position": places[where]}
# ANCHOR_END: parse_caption


# ANCHOR: caption_scores
def caption_scores(
    generated: Sequence[str], references: Sequence[str], labels: dict[str, Tensor], config: ShapesConfig
) -> dict[str, float]:
    """Exact match and per-attribute accuracy of generated captions.

    generated, references: N captions each. labels: the dataset's {"colour",
    "shape", "size", "position"} (N,) ids into the config's tuples.
    Returns {"exact", "colour", "shape", "size", "position", "parsed"}: fractions in
    [0, 1]; "parsed" is the fraction that `parse_caption` could read at all.
    """
    n = len(generated)
    if n == 0 or len(references) != n or any(len(labels[a]) != n for a in ATTRIBUTES):
        raise ValueError(f"need N >= 1 generated captions, N references and (N,) labels, got {n} and {len(references)}")
    names = {a: getattr(config, {"colour": "colours", "shape": "shapes", "size": "sizes",
                                 "position": "positions"}[a]) for a in ATTRIBUTES}
    hits = {a: 0 for a in ATTRIBUTES}
    parsed = 0
    for i, text in enumerate(generated):
        read = parse_caption(text, config)
        if read is None:
            continue
        parsed += 1
        for a in ATTRIBUTES:
            hits[a] += read[a] == names[a][int(labels[a][i])]
    exact = sum(g == r for g, r in zip(generated, references))
    return {"exact": exact / n, **{a: hits[a] / n for a in ATTRIBUTES}, "parsed": parsed / n}
# ANCHOR_END: caption_scores


# --------------------------------------------------------------------------- evaluation


def _shapes_config(model: CaptionerConfig) -> ShapesConfig:
    return ShapesConfig(image_size=model.image_size, captions="canonical")


@torch.no_grad()
def evaluate(
    model: Captioner, n_images: int = 500, seed: int = 1, vocab: WordVocab | None = None, batch_size: int = 250
) -> dict:
    """Caption ``n_images`` fresh images (ShapesDataset with ``seed``) greedily and score them.

    Returns `caption_scores`' numbers plus "generated", "references" (N str each) and
    "images" (N, 3, S, S) in [0, 1].
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    vocab = shapes_vocab() if vocab is None else vocab
    shapes = _shapes_config(model.config)
    images, references, labels = ShapesDataset(n_images, shapes, seed=seed).materialize()
    model.eval()
    generated = []
    for start in range(0, n_images, batch_size):
        tokens = generate(model, normalize(images[start : start + batch_size])).tokens  # (b, 1 + S)
        generated += [vocab.decode(row) for row in tokens]
    scores = caption_scores(generated, references, labels, shapes)
    return {**scores, "generated": generated, "references": references, "images": images}


# --------------------------------------------------------------------------- training


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to config.lr, then cosine to 0."""
    return warmup_cosine(step, config.steps, config.lr, config.warmup)


def _param_groups(model: Captioner, weight_decay: float) -> list[dict]:
    """Decay weight matrices only; not gains, biases, embeddings or positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ANCHOR: train_captioner
def train_captioner(
    config: TrainConfig = TrainConfig(), *, progress: bool = True, log_path: str | Path | None = None,
    evaluate_after: bool = True,
) -> TrainResult:
    """Train a captioner on shapes images with canonical captions; score it on fresh images.

    log_path: JSON-lines loss log, one {"step", "loss", "lr", "seconds"} per step.
    evaluate_after: False skips the evaluation (scores stay empty).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()  # restored at the end: a notebook goes on
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    vocab = shapes_vocab()
    shapes = _shapes_config(config.model)
    images, captions, _ = ShapesDataset(config.train_images, shapes, seed=config.seed).materialize()
    images = normalize(images)  # (N, 3, S, S)
    ids, _ = vocab.encode(captions)  # (N, T): <bos> words <eos> <pad>...
    if ids.shape[1] > config.model.max_len + 1:
        raise ValueError(f"captions of {ids.shape[1]} ids do not fit the decoder's {config.model.max_len} positions")

    torch.manual_seed(config.seed)
    model = Captioner(config.model)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed + 1)  # which images each batch holds

    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    log = open(log_path, "w") if log_path is not None else None
    losses: list[float] = []
    model.train()
    loop_start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train captioner", unit="step", disable=not progress, file=sys.stderr)
    try:
        for step in bar:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(len(ids), (config.batch_size,), generator=order)  # (B,)
            inputs, targets = teacher_forcing(ids[index])  # (B, T-1) each
            loss = caption_loss(model(images[index], inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if log is not None:
                log.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr,
                                      "seconds": round(time.perf_counter() - start, 4)}) + "\n")
            if step % 20 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
    steps_per_second = config.steps / (time.perf_counter() - loop_start)
    model.eval()
    result = TrainResult(model, losses, 0.0, steps_per_second)
    if evaluate_after:
        found = evaluate(model, config.eval_images, seed=config.seed + 1, vocab=vocab)
        result.scores = {k: found[k] for k in ("exact", *ATTRIBUTES, "parsed")}
    result.seconds = time.perf_counter() - start
    torch.set_num_threads(threads_before)
    return result
# ANCHOR_END: train_captioner


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="tinymm train captioner",
        description="Train an image captioner (patch encoder + cross-attention decoder) on coloured "
        "shapes and report exact-caption and per-attribute accuracy on images it never saw.",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, data and batches (default 0)")
    p.add_argument("--train-images", type=int, default=d.train_images,
                   help=f"images rendered for training (default {d.train_images})")
    p.add_argument("--eval-images", type=int, default=d.eval_images,
                   help=f"fresh images the captions are scored on (default {d.eval_images})")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: small matrices gain little from more)")
    p.add_argument("--out", type=Path, default=None, help="save the model here (load_captioner reads it)")
    p.add_argument("--log", type=Path, default=None, help="write a JSON-lines loss log here")
    p.add_argument("--examples", type=int, default=5, help="generated captions to print (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train captioner``: train, print the scores, optionally save. Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            train_images=args.train_images, eval_images=args.eval_images, threads=args.threads,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.parent.is_dir():
        print(f"error: --out: no folder {args.out.parent}", file=sys.stderr)
        return 2
    if args.examples < 0:
        print(f"error: --examples must be >= 0, got {args.examples}", file=sys.stderr)
        return 2
    result = train_captioner(config, progress=not args.quiet, log_path=args.log)
    s = result.scores
    threads = config.threads or torch.get_num_threads()
    print(f"trained {config.steps} steps of batch {config.batch_size} on {threads} thread(s): "
          f"{result.steps_per_second:.1f} steps/s, {result.seconds:.1f} s in all; final loss {result.losses[-1]:.4f}")
    print(f"greedy captions of {config.eval_images} images never seen in training:")
    print(f"  exact caption match {100 * s['exact']:.1f}%   (readable as a caption: {100 * s['parsed']:.1f}%)")
    print("  per attribute: " + "  ".join(f"{a} {100 * s[a]:.1f}%" for a in ATTRIBUTES))
    if args.examples:
        found = evaluate(result.model, args.examples, seed=config.seed + 2)
        for g, r in zip(found["generated"], found["references"]):
            print(f"  {'ok  ' if g == r else 'MISS'} {g!r}" + ("" if g == r else f"  (true: {r!r})"))
    if args.out is not None:
        save_captioner(result.model, args.out)
        print(f"saved to {args.out} (tiny_mm.captioning.load_captioner reads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
