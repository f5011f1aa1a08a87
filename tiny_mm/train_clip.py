"""Train a tiny CLIP on coloured shapes, on a CPU, in about two minutes: `tinymm train clip`.

The recipe, step by step:

    data       render a pool of training images once (`ShapesDataset.materialize`), from the
               colour-shape combinations `split_by_combinations` keeps for training, and
               tokenize their captions once
    batches    draw B pool images whose captions all describe different scenes (colour,
               shape, size, position): two images of the same scene in one batch would be
               a positive pair labelled as a negative
    model      `tiny_clip_config`: a 32 px ViT with 8 px patches (16 patches + CLS), 3 layers,
               and a 20-token text transformer, 2 layers, both 64 wide, meeting in a 64-d space
    captions   half of the rows get a short caption without the size or the position (the
               zero-shot prompts name only colour and shape; see `short_caption`)
    loss       CLIP's symmetric cross-entropy (`tiny_mm.contrastive.ClipLoss`) with the
               model's own learnable temperature; the Triton kernel on CUDA
    optimiser  AdamW (fused: one pass over all 3.2M rows of the token table costs ~1 ms),
               linear warm-up then cosine decay, weight decay on matrices only
    eval       zero-shot top-1 / top-5 on images of the held-out combinations, classified
               among all 30 colour-shape classes with the `ZERO_SHOT_TEMPLATES` ensemble

Under ``torchrun --nproc_per_node W`` every rank draws the same global batch, encodes
its own slice, and the loss contrasts its rows against the whole global batch
(`gather_with_grad`); the gradients are averaged with one all_reduce, so the update
is the single-process update of the global batch. Rank 0 alone prints, evaluates and
saves.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.attention import MultiHeadAttention
from tiny_mm.clip import CLIP, CLIPConfig, TextConfig
from tiny_mm.contrastive import ClipLoss
from tiny_mm.data import shapes as shapes_data
from tiny_mm.data.shapes import (
    POSITIONS,
    SIZES,
    ZERO_SHOT_TEMPLATES,
    ShapesConfig,
    ShapesDataset,
    class_names,
    normalize,
    split_by_combinations,
)
from tiny_mm.tokenizer import tokenize
from tiny_mm.vit import VisionConfig
from tiny_mm.zeroshot import accuracy, build_classifier, predict
from tiny_mm.training import warmup_cosine

__all__ = [
    "tiny_clip_config",
    "TrainConfig",
    "TrainResult",
    "train_clip",
    "shapes_zero_shot",
    "short_caption",
    "save_model",
    "BatchSampler",
    "lr_at",
    "main",
]

# Longest "varied" caption of the shapes data: 16 tokens with start and end (checked by the
# tests over every phrasing); 20 positions leave room and never truncate a colour or shape.
CONTEXT_LENGTH = 20


# ANCHOR: tiny_clip_config
def tiny_clip_config(image_size: int = 32) -> CLIPConfig:
    """A CLIP small enough to train on a CPU in a minute or two (about 3.4M parameters, 3.2M of
    them the token table).

    Image tower: ViT, patch 8 (image_size 32 -> 16 patches + CLS), width 64, 3 layers
    (with 2, held-out accuracy stayed near 85%: telling a star from a triangle in a colour
    never seen with it needs the depth).
    Text tower: context 20, width 64, 2 layers. One head of 64 in each (CLIP's head
    width, so `load_clip` infers the same heads). QuickGELU, as OpenAI's models, so
    ``load_clip(path)`` with its default ``quick_gelu=True`` rebuilds it exactly.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of the patch size 8, got {image_size!r}")
    width, embed_dim = 64, 64
    vision = VisionConfig(
        image_size=image_size, patch_size=8, width=width, layers=3, heads=1, output_dim=embed_dim
    )
    text = TextConfig(context_length=CONTEXT_LENGTH, width=width, heads=1, layers=2)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)
# ANCHOR_END: tiny_clip_config


# ANCHOR: TrainConfig
@dataclass(frozen=True)
class TrainConfig:
    """What to train and how; the defaults are the two-minute recipe.

    steps: optimiser steps. batch_size: the global batch B (over all ranks).
    lr: peak learning rate, reached after ``warmup`` steps, then cosine-decayed to 0.
    seed: seeds the model's initialisation, the data and the batches.
    weight_decay: AdamW's decay, on weight matrices only (not on gains, biases,
        embeddings or the temperature).
    train_images: size of the pre-rendered training pool.
    eval_images: images per evaluation (held-out and seen combinations).
    image_size: side of the images (a multiple of 8).
    distinct_scenes: draw batches whose captions all describe different scenes.
    short_captions: fraction of batch rows whose caption leaves out the size, the
        position or both (`short_caption`).
    threads: torch CPU threads per process (None: the CPUs this process may use / ranks).
    """

    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    warmup: int = 50
    weight_decay: float = 0.1
    train_images: int = 4096
    eval_images: int = 300
    image_size: int = 32
    distinct_scenes: bool = True
    short_captions: float = 0.5
    threads: int | None = None

    def __post_init__(self) -> None:
        check_ints(self, positive=("steps", "batch_size", "train_images", "eval_images"), non_negative=("seed", "warmup"))
        check_optimiser(self.lr, self.weight_decay)
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if self.batch_size > self.train_images:
            raise ValueError(f"batch_size {self.batch_size} is larger than the pool of {self.train_images} train_images")
        if not (isinstance(self.short_captions, (int, float)) and 0 <= self.short_captions <= 1):
            raise ValueError(f"short_captions must be in [0, 1], got {self.short_captions!r}")
        check_threads(self.threads)
        tiny_clip_config(self.image_size)  # raises for a bad image_size
# ANCHOR_END: TrainConfig


@dataclass
class TrainResult:
    """What `train_clip` returns (on every rank; only rank 0 evaluates).

    model: the trained CLIP, in eval mode, on the CPU.
    losses: the global-batch loss of every step.
    seconds: wall time of the whole run (data, training, evaluation).
    train_combinations, heldout_combinations: (colour, shape) pairs seen / never seen in training.
    heldout, seen: zero-shot {"top1", "top5"} on images of those combinations, classified
        among all 30 colour-shape classes (empty dicts on ranks other than 0).
    steps_per_second: training steps per second (the loop only, without data and evaluation).
    """

    model: CLIP
    losses: list[float]
    seconds: float
    train_combinations: list[tuple[str, str]]
    heldout_combinations: list[tuple[str, str]]
    heldout: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    steps_per_second: float = 0.0


# --------------------------------------------------------------------------- pieces


# ANCHOR: lr_at
def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to config.lr, then cosine to 0."""
    return warmup_cosine(step, config.steps, config.lr, config.warmup)
# ANCHOR_END: lr_at


# ANCHOR: param_groups
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices; leave gains, biases, embeddings and the temperature alone.

    Decaying a LayerNorm gain or a bias pulls it to 0 for no benefit; decaying the
    token or positional tables shrinks rows that are rarely used toward 0.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_table = "embedding" in name  # token_embedding, positional_embedding, class_embedding
        (no_decay if p.dim() < 2 or is_table else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# ANCHOR_END: param_groups


def _scene_keys(labels: dict[str, Tensor]) -> Tensor:
    """(N,) one integer per scene: (colour-shape combination, size, position)."""
    n_sizes, n_positions = len(SIZES), len(POSITIONS)
    return (labels["combo"] * n_sizes + labels["size"]) * n_positions + labels["position"]


# ANCHOR: batches
class BatchSampler:
    """Global batches of pool indices, the same on every rank (one seeded generator).

    distinct_scenes=True: each batch holds B different scenes (colour, shape, size,
    position), one random pool image of each, so no two captions in a batch say the
    same thing. With the default data there are 25 * 2 * 9 = 450 training scenes, so
    B may be up to 450; above that, or with distinct_scenes=False, batches are
    uniform draws without replacement from the pool.
    """

    def __init__(self, keys: Tensor, batch_size: int, seed: int, distinct_scenes: bool = True) -> None:
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        order = torch.argsort(keys, stable=True)  # (N,) pool indices grouped by scene
        unique, counts = torch.unique_consecutive(keys[order], return_counts=True)  # (K,), (K,)
        self.order, self.counts = order, counts
        self.starts = torch.cumsum(counts, 0) - counts  # (K,) where scene k's images start in `order`
        self.n_pool = len(keys)
        self.distinct = distinct_scenes and batch_size <= len(unique)

    def __call__(self) -> Tensor:
        """(B,) pool indices of the next global batch."""
        g = self.generator
        if not self.distinct:
            return torch.randperm(self.n_pool, generator=g)[: self.batch_size]  # (B,)
        scenes = torch.randperm(len(self.counts), generator=g)[: self.batch_size]  # (B,) distinct scenes
        pick = (torch.rand(self.batch_size, generator=g) * self.counts[scenes]).long()  # (B,) one image each
        return self.order[self.starts[scenes] + pick]  # (B,)
# ANCHOR_END: batches


def _world() -> tuple[int, int]:
    """(rank, world_size): (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _rank_slice(batch_size: int, rank: int, world: int) -> slice:
    """This rank's part of a global batch: consecutive slices, sizes differing by at most 1."""
    base, extra = divmod(batch_size, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _average_gradients(model: nn.Module, world: int) -> None:
    """Average every parameter's gradient over the ranks: one all_reduce of one flat buffer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------- evaluation


# ANCHOR: shapes_zero_shot
@torch.no_grad()
def shapes_zero_shot(
    model: CLIP,
    combinations: Sequence[tuple[str, str]],
    *,
    n_images: int = 300,
    seed: int = 1,
    classes: Sequence[tuple[str, str]] | None = None,
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
) -> dict:
    """Zero-shot classification of shapes images among colour-shape classes.

    Renders ``n_images`` images whose (first) shape is one of ``combinations``
    (ShapesDataset with ``seed``, at the model's image size), classifies each
    among ``classes`` (default: all 30 colour-shape pairs) with a classifier
    built from ``templates`` (the prompt ensemble), and scores it.

    Returns:
        {"top1", "top5": float accuracies (top5 capped at the number of classes),
         "pred": (N,) predicted class indices, "labels": (N,) true class indices,
         "images": (N, 3, S, S) the images in [0, 1] (before CLIP's normalisation),
         "classes": list of C class names such as "red star"}
    """
    config = ShapesConfig(image_size=model.config.vision.image_size)
    classes = config.combinations if classes is None else [tuple(c) for c in classes]
    combinations = [tuple(c) for c in combinations]
    missing = [c for c in combinations if c not in classes]
    if missing:
        raise ValueError(f"combinations {missing} are not among the classes")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    images, _, labels = ShapesDataset(n_images, config, seed=seed, combinations=combinations).materialize()
    # The dataset's "combo" id indexes config.combinations; translate it to an index into `classes`.
    to_class = torch.tensor([classes.index(c) if c in classes else -1 for c in config.combinations])
    targets = to_class[labels["combo"]]  # (N,)
    context = model.config.text.context_length
    names = class_names(classes)
    classifier = build_classifier(model, names, list(templates), lambda t: tokenize(t, context))  # (E, C)
    logits = predict(model, normalize(images), classifier)  # (N, C)
    scores = accuracy(logits, targets, topk=(1, 5))
    return {**scores, "pred": logits.argmax(dim=1), "labels": targets, "images": images, "classes": names}
# ANCHOR_END: shapes_zero_shot


# --------------------------------------------------------------------------- training


def _make_loss(model: CLIP) -> ClipLoss:
    """CLIP's loss, with the model's own temperature (so the saved checkpoint carries it)."""
    backend = "triton" if torch.cuda.is_available() else "torch"
    loss_fn = ClipLoss(backend=backend, max_logit_scale=100.0)
    loss_fn.log_logit_scale = model.logit_scale  # share the parameter: one temperature, in the model
    return loss_fn


# ANCHOR: short_caption
_SHORT_PHRASES = ("{colour} {shape}", "{size} {colour} {shape}", "{colour} {shape} {where}")


def short_caption(obj, rng: np.random.Generator) -> str:
    """A caption of one shape that leaves out its size, its position or both.

    The dataset's captions always name all four factors, so a prompt such as
    "a photo of a red star" ends where no training caption ends. Short captions
    (half of the rows, by default) teach the text tower to place such a text too;
    without them even the seen combinations stay near 85% zero-shot. Wording from the
    dataset's own tables: "there is a big red star", "a red star on the left".
    """
    def pick(options):
        return options[rng.integers(len(options))]

    phrase = "a " + pick(_SHORT_PHRASES).format(
        size=pick(shapes_data.SIZE_WORDS[obj.size]), colour=obj.colour, shape=obj.shape,
        where=pick(shapes_data.WHERE_WORDS[obj.position]),
    )
    text = pick(shapes_data.CAPTION_FRAMES).format(phrase)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange star" -> "an orange star"
# ANCHOR_END: short_caption


def _prepare_data(config: TrainConfig, train_combos: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pool: normalised images (N, 3, S, S), tokens of the full and of a short caption
    (N, 20) each, scene keys (N,)."""
    shapes = ShapesConfig(image_size=config.image_size)
    data = ShapesDataset(config.train_images, shapes, seed=config.seed, combinations=train_combos)
    images, captions, labels = data.materialize()  # (N, 3, S, S) in [0, 1]
    tokens = tokenize(captions, CONTEXT_LENGTH)  # (N, 20)
    if (tokens[:, -1] != 0).any():
        raise ValueError(f"a caption fills all {CONTEXT_LENGTH} positions and may be truncated")
    short = torch.zeros_like(tokens)  # (N, 20)
    if config.short_captions > 0:
        rng = np.random.default_rng([config.seed, 1])
        short = tokenize([short_caption(data.sample(i).main, rng) for i in range(len(data))], CONTEXT_LENGTH)
    return normalize(images), tokens, short, _scene_keys(labels)


# ANCHOR: train_clip
def train_clip(config: TrainConfig = TrainConfig(), *, progress: bool = True, log_path: str | Path | None = None) -> TrainResult:
    """Train a tiny CLIP on shapes and evaluate it zero-shot on held-out combinations.

    Runs in one process, or in each of W processes of an initialised process group
    (torchrun): then B is the global batch, every rank handles B / W rows of it, and
    rank 0 alone shows progress, writes the log and evaluates.

    log_path: JSON-lines loss log, one {"step", "loss", "lr", "seconds"} per step.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    start = time.perf_counter()
    rank, world = _world()
    if config.batch_size < 2 * world:
        raise ValueError(f"batch_size {config.batch_size} gives fewer than 2 rows to each of {world} ranks")
    threads_before = torch.get_num_threads()  # restored at the end: a notebook or the tour goes on
    torch.set_num_threads(config.threads or max(1, _cpus() // world))
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")

    train_combos, heldout_combos = split_by_combinations(ShapesConfig(image_size=config.image_size))
    images, tokens, short, keys = _prepare_data(config, train_combos)
    sampler = BatchSampler(keys, config.batch_size, config.seed, config.distinct_scenes)
    coin = torch.Generator().manual_seed(config.seed + 1)  # which rows get a short caption

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = CLIP(tiny_clip_config(config.image_size)).to(device)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if device.type == "cpu":  # PyTorch's fused attention: the fastest rung on a CPU (for training only)
        for attention in attentions:
            attention.backend = "sdpa"
    loss_fn = _make_loss(model)
    # fused=True: one kernel over all parameters. The token table has 49408 rows, of which the
    # captions use ~60; the for-each AdamW spends ~12 ms a step sweeping it, the fused one ~1.5 ms.
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, fused=True)

    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    log = open(log_path, "w") if (log_path is not None and rank == 0) else None
    mine = _rank_slice(config.batch_size, rank, world)
    losses: list[float] = []
    model.train()
    loop_start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train clip", unit="step", disable=not progress or rank != 0, file=sys.stderr)
    try:
        for step in bar:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = sampler()[mine]  # (B/W,) this rank's rows of the global batch
            use_short = (torch.rand(config.batch_size, generator=coin) < config.short_captions)[mine]  # (B/W,)
            text_tokens = torch.where(use_short[:, None], short[index], tokens[index])  # (B/W, 20)
            image = F.normalize(model.encode_image(images[index].to(device)), dim=-1)  # (B/W, E)
            text = F.normalize(model.encode_text(text_tokens.to(device)), dim=-1)  # (B/W, E)
            loss = loss_fn(image, text)  # this rank's share; the mean over ranks is the global loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            global_loss = loss.detach().clone()
            if world > 1:
                _average_gradients(model, world)
                dist.all_reduce(global_loss)
                global_loss /= world
            optimizer.step()
            losses.append(float(global_loss))
            if log is not None:
                log.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr,
                                      "seconds": round(time.perf_counter() - start, 4)}) + "\n")
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{float(loss_fn.logit_scale):.1f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
    steps_per_second = config.steps / (time.perf_counter() - loop_start)

    for attention in attentions:  # hand back a model that computes as a freshly loaded one does
        attention.backend = "auto"
    model = model.cpu().eval()
    result = TrainResult(model, losses, 0.0, train_combos, heldout_combos, steps_per_second=steps_per_second)
    if rank == 0:
        n, s = config.eval_images, config.seed
        result.heldout = _scores(shapes_zero_shot(model, heldout_combos, n_images=n, seed=s + 1))
        result.seen = _scores(shapes_zero_shot(model, train_combos, n_images=n, seed=s + 2))
    result.seconds = time.perf_counter() - start
    torch.set_num_threads(threads_before)
    return result
# ANCHOR_END: train_clip


def _scores(result: dict) -> dict[str, float]:
    return {"top1": result["top1"], "top5": result["top5"]}


def save_model(model: CLIP, path: str | Path) -> None:
    """Write the model's state dict as safetensors; `tiny_mm.load_clip(path)` reloads it."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="tinymm train clip",
        description="Train a tiny CLIP on coloured shapes and report zero-shot accuracy on "
        "colour-shape combinations it never saw. Also runs under torchrun (gloo on CPU).",
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"global batch size, over all ranks (default {defaults.batch_size})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, data and batches (default 0)")
    p.add_argument("--train-images", type=int, default=defaults.train_images,
                   help=f"images rendered for training (default {defaults.train_images})")
    p.add_argument("--eval-images", type=int, default=defaults.eval_images,
                   help=f"images per zero-shot evaluation (default {defaults.eval_images})")
    p.add_argument("--short-captions", type=float, default=defaults.short_captions,
                   help=f"fraction of captions without size and/or position (default {defaults.short_captions})")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: CPUs / ranks)")
    p.add_argument("--out", type=Path, default=None, help="save the model here (safetensors; load_clip reads it)")
    # torchrun's own parser takes "--log" for an abbreviation of its --log-dir / --logs-specs
    # and stops; under torchrun spell it --loss-log.
    p.add_argument("--log", "--loss-log", dest="log", type=Path, default=None,
                   help="write a JSON-lines loss log here: step, loss, lr, seconds (under torchrun: --loss-log)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1). Returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":  # talk over loopback only: no network needed on one machine
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group(backend)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train clip``: train, print zero-shot accuracy, optionally save. Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            train_images=args.train_images, eval_images=args.eval_images, threads=args.threads,
            short_captions=args.short_captions,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        import kernels  # noqa: F401  (before anything imports Triton)
    started = _init_distributed()
    try:
        rank, world = _world()
        if rank == 0 and args.out is not None and not args.out.parent.is_dir():
            print(f"error: --out: no folder {args.out.parent}", file=sys.stderr)
            return 2
        result = train_clip(config, progress=not args.quiet, log_path=args.log)
        if rank == 0:
            held = ", ".join(f"{c} {s}" for c, s in result.heldout_combinations)
            threads = torch.get_num_threads()
            print(f"trained {config.steps} steps of batch {config.batch_size} on {world} process(es) x "
                  f"{threads} thread(s): {result.steps_per_second:.2f} steps/s, {result.seconds:.1f} s in all; "
                  f"final loss {result.losses[-1]:.4f}")
            print(f"held-out combinations (never in training): {held}")
            print(f"zero-shot among all 30 colour-shape classes, {len(ZERO_SHOT_TEMPLATES)}-template ensemble:")
            print(f"  held-out combinations: top-1 {100 * result.heldout['top1']:.1f}%  "
                  f"top-5 {100 * result.heldout['top5']:.1f}%")
            print(f"  seen combinations:     top-1 {100 * result.seen['top1']:.1f}%  "
                  f"top-5 {100 * result.seen['top5']:.1f}%")
            if args.out is not None:
                save_model(result.model, args.out)
                print(f"saved {args.out} (reload with tiny_mm.load_clip(path, quick_gelu=True))")
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
