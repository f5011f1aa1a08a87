"""Which way of fusing video, audio and caption works, and at what cost: `tinymm train video-fusion`.

The experiment of chapter 10, small enough for a 2-core CPU:

    data        `tiny_mm.data.video`: clips of a moving disc (video), a tone (audio) and a
                caption ("a red cat"), rendered once per split; the training and test clips
                come from different seeds (2 seed and 2 seed + 1). The action label needs
                all three: each modality alone is capped at 12.5% (video, audio) or 6.25%
                (caption), and fusing all three can reach 100% (`CEILINGS`).
    models      `tiny_mm.video_model.VideoFusionModel` for every name of `MODEL_NAMES`: the
                three single-modality baselines, then early, late, cross-modal and
                bottleneck fusion (width 32, 2 layers, 4 heads).
    training    the same recipe, batches and initial seed for every model: AdamW, linear
                warm-up then cosine decay, gradients clipped at norm 1. The loss is the
                action cross-entropy, plus for the fusion models any auxiliary objectives
                asked for (`--objectives`: pairwise contrastive, masked modality, temporal
                order, with the textbook's weights 0.1, 0.05, 0.05).
    dropout     each fusion strategy is trained a second time with modality dropout: every
                modality of every training clip is replaced by the model's learned "missing"
                vector with probability p (`--dropout`, 0.3), never all three at once.
    evaluation  accuracy on the test clips; for the fusion models also with each modality
                missing at test time (all its tokens replaced by the "missing" vector), to
                compare with the ceiling of the two modalities left.
    cost        parameters (sum of numel) and forward FLOPs per clip, counted by
                `torch.utils.flop_counter.FlopCounterMode` on one clip, embedders included.

Nothing here asserts an accuracy: the command reports what it measured
(docs/training.md records a run), and the tests check the machinery.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.data.video import CEILINGS, NUM_CLASSES, VideoClipsDataset, VideoConfig, video_vocab
from tiny_mm.video_fusion import MODALITIES
from tiny_mm.video_model import MODEL_NAMES, VideoFusionModel, VideoModelConfig
from tiny_mm.video_objectives import (
    ObjectiveWeights,
    action_loss,
    masked_modality_loss,
    modality_dropout,
    pairwise_contrastive_loss,
    shuffle_frames,
    temporal_order_loss,
    total_objective,
)
from tiny_mm.training import comma_names, import_kernels_first, out_folder_problem, warmup_cosine

__all__ = [
    "OBJECTIVES",
    "STRATEGY_NAMES",
    "FusionSettings",
    "ClipData",
    "make_data",
    "ceiling",
    "count_params",
    "count_flops",
    "predict_logits",
    "predict",
    "accuracy",
    "missing_accuracies",
    "training_loss",
    "lr_at",
    "new_model",
    "train_model",
    "ModelResult",
    "ExperimentResult",
    "run_experiment",
    "format_table",
    "format_missing_table",
    "main",
]

OBJECTIVES = ("action", "contrastive", "masked", "temporal")
STRATEGY_NAMES = tuple(n for n in MODEL_NAMES if n not in MODALITIES)  # early, late, cross, bottleneck
_CEILING_NAME = {"video": "video", "audio": "audio", "text": "caption"}  # CEILINGS says "caption"


# --------------------------------------------------------------------------- settings


# ANCHOR: FusionSettings
@dataclass(frozen=True)
class FusionSettings:
    """What to train and how; the defaults take about 2.5 minutes on one CPU thread.

    models: names from `MODEL_NAMES` to train (single modalities and fusion strategies).
    dropout: modality dropout p of each fusion strategy's second run, in [0, 1);
        0 skips the second run.
    objectives: the fusion models' loss terms, from OBJECTIVES; "action" is always one.
        The single-modality baselines train on "action" alone (the other terms need
        two modalities, or a video and something else to fuse it with).
    weights: the auxiliary terms' weights (the textbook's 0.1, 0.05, 0.05).
    steps, batch_size, lr, warmup, weight_decay: of every model's training (AdamW,
        linear warm-up to lr over ``warmup`` steps, then cosine decay to 0).
    train_clips, test_clips: clips rendered for training and for testing.
    seed: seeds the data (train 2 seed, test 2 seed + 1), every model's initial
        weights (the same for all) and the batches (the same for all).
    threads: torch CPU threads during the run (None: leave torch's setting).
    model: the models' sizes (`VideoModelConfig`; 32 classes).
    """

    models: tuple[str, ...] = MODEL_NAMES
    dropout: float = 0.3
    objectives: tuple[str, ...] = ("action",)
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    steps: int = 300  # every fusion model is at 100% by then (docs/training.md)
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    train_clips: int = 3000
    test_clips: int = 1000
    seed: int = 0
    threads: int | None = 1  # 2 threads gained nothing, and lose badly on a busy machine (docs/training.md)
    model: VideoModelConfig = field(default_factory=VideoModelConfig)

    def __post_init__(self) -> None:
        check_ints(self, positive=("steps", "batch_size", "train_clips", "test_clips"), non_negative=("seed", "warmup"))
        check_optimiser(self.lr, self.weight_decay)
        check_threads(self.threads)
        models = self.models
        if not isinstance(models, tuple) or not models or any(m not in MODEL_NAMES for m in models):
            raise ValueError(f"models must be a non-empty tuple of names from {MODEL_NAMES}, got {models!r}")
        if len(set(models)) != len(models):
            raise ValueError(f"models must not repeat a name, got {models!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
        objectives = self.objectives
        if not isinstance(objectives, tuple) or any(o not in OBJECTIVES for o in objectives):
            raise ValueError(f"objectives must be a tuple of names from {OBJECTIVES}, got {objectives!r}")
        if "action" not in objectives or len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives must hold 'action' (the task) and no name twice, got {objectives!r}")
        if not isinstance(self.weights, ObjectiveWeights):
            raise ValueError(f"weights must be an ObjectiveWeights, got {type(self.weights).__name__}")
        if not isinstance(self.model, VideoModelConfig):
            raise ValueError(f"model must be a VideoModelConfig, got {type(self.model).__name__}")
        if self.model.fusion.num_classes != NUM_CLASSES:
            raise ValueError(f"model.fusion.num_classes must be the {NUM_CLASSES} action classes, "
                             f"got {self.model.fusion.num_classes}")
        if self.batch_size > self.train_clips:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {self.train_clips} train_clips")

    @classmethod
    def quick(cls, **changes: object) -> "FusionSettings":
        """A run of seconds (tests, `--quick`): 30 steps of 32 clips, 256 training and 128 test clips."""
        return replace(cls(steps=30, batch_size=32, warmup=5, train_clips=256, test_clips=128), **changes)
# ANCHOR_END: FusionSettings


# --------------------------------------------------------------------------- data


class ClipData(NamedTuple):
    """One split, rendered once: frames (N, T, 3, H, W), audio (N, S), text_ids (N, Lt),
    text_lengths (N,), labels (N,)."""

    frames: Tensor
    audio: Tensor
    text_ids: Tensor
    text_lengths: Tensor
    labels: Tensor

    @property
    def clips(self) -> int:
        """N. (len() of a NamedTuple is its number of fields, 5.)"""
        return self.labels.shape[0]

    def take(self, index: Tensor) -> "ClipData":
        """The clips at ``index`` (k,): every field indexed alike."""
        return ClipData(*(x[index] for x in self))


def make_data(clips: int, seed: int, config: VideoConfig | None = None) -> ClipData:
    """Render ``clips`` clips of `VideoClipsDataset(clips, config, seed)` and encode their captions."""
    frames, audio, captions, labels, _ = VideoClipsDataset(clips, config, seed).materialize()
    ids, lengths = video_vocab().encode(captions)  # (N, Lt) with BOS and EOS, (N,)
    return ClipData(frames, audio, ids, lengths, labels)


def ceiling(modalities: Sequence[str]) -> float:
    """The best accuracy any model can reach seeing only ``modalities`` (`tiny_mm.data.video.CEILINGS`)."""
    if not modalities or any(m not in MODALITIES for m in modalities):
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities!r}")
    return CEILINGS["+".join(_CEILING_NAME[m] for m in MODALITIES if m in modalities)]


# --------------------------------------------------------------------------- cost


def count_params(model: nn.Module) -> int:
    """Every parameter of the model: embedders, fusion, head and the objectives' extra heads."""
    return sum(p.numel() for p in model.parameters())


# ANCHOR: count_flops
def count_flops(model: VideoFusionModel, data: ClipData) -> int:
    """Forward FLOPs of ``model`` on one clip (data's first), as FlopCounterMode counts them.

    Embedders included (the tubelet and spectrum projections; the FFT and the
    token lookup count nothing), nothing missing, the extra heads of the
    auxiliary objectives not run (forward does not run them).
    """
    import_kernels_first()
    from torch.utils.flop_counter import FlopCounterMode

    clip = data.take(torch.arange(1))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(clip.frames, clip.audio, clip.text_ids, clip.text_lengths)
    return int(counter.get_total_flops())
# ANCHOR_END: count_flops


# --------------------------------------------------------------------------- evaluation


# ANCHOR: evaluation
@torch.no_grad()
def predict_logits(
    model: VideoFusionModel, data: ClipData, present: Tensor | None = None, batch_size: int = 500
) -> Tensor:
    """Action logits (N, C) of every clip, in eval mode; present (3,) or (N, 3) bool says which
    modalities the model gets (None: all three)."""
    was_training = model.training
    model.eval()
    n = data.clips
    if present is not None and present.dim() == 1:
        present = present.expand(n, -1)  # (N, 3): the same modalities for every clip
    out = []
    for start in range(0, n, batch_size):
        part = data.take(torch.arange(start, min(start + batch_size, n)))
        mask = None if present is None else present[start : start + batch_size]  # (b, 3)
        out.append(model(part.frames, part.audio, part.text_ids, part.text_lengths, mask).logits)  # (b, C)
    model.train(was_training)
    return torch.cat(out)  # (N, C)


def predict(model: VideoFusionModel, data: ClipData, present: Tensor | None = None) -> Tensor:
    """Predicted action classes (N,): the argmax of `predict_logits`."""
    return predict_logits(model, data, present).argmax(dim=-1)


def accuracy(model: VideoFusionModel, data: ClipData, present: Tensor | None = None) -> float:
    """Fraction of clips whose predicted class is the label."""
    return float((predict(model, data, present) == data.labels).float().mean())


def missing_accuracies(model: VideoFusionModel, data: ClipData) -> dict[str, float]:
    """{m: accuracy with modality m missing from every test clip} for m in video, audio, text."""
    found = {}
    for i, m in enumerate(MODALITIES):
        present = torch.ones(len(MODALITIES), dtype=torch.bool)
        present[i] = False  # all of m's tokens become the learned "missing" vector
        found[m] = accuracy(model, data, present)
    return found
# ANCHOR_END: evaluation


# --------------------------------------------------------------------------- training


# ANCHOR: training_loss
def training_loss(
    model: VideoFusionModel, batch: ClipData, objectives: Sequence[str], weights: ObjectiveWeights,
    dropout: float, generator: torch.Generator, log_scale: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one batch: (total, {term: value}).

    action       cross-entropy of the clips as they are, or with modality dropout
                 (each modality of each clip dropped with probability ``dropout``).
    contrastive  chapter 4's CLIP loss between every pair of pooled streams, on the
                 clips that kept all three modalities; scale exp(log_scale), capped at 100.
    masked       a second pass in which each clip loses one modality, chosen uniformly;
                 `model.reconstruct[m]` predicts the lost modality's mean token from
                 what is left (squared error).
    temporal     a third pass in which half the clips have their frames shuffled;
                 `model.order_head` says whether the frames are in order.
    Each auxiliary term gets its own pass so that no term is asked to read an input
    that another term has taken away (the order of missing frames, say).
    """
    B = batch.clips
    present = modality_dropout(B, dropout, generator) if dropout > 0 else None
    out = model(batch.frames, batch.audio, batch.text_ids, batch.text_lengths, present)
    terms = {"action": action_loss(out.logits, batch.labels)}
    if "contrastive" in objectives:
        whole = torch.ones(B, dtype=torch.bool) if present is None else present.all(dim=1)  # (B,)
        if int(whole.sum()) >= 2:  # a batch of one has no negatives
            scale = log_scale.exp().clamp(max=100.0)
            terms["contrastive"], _ = pairwise_contrastive_loss({m: s[whole] for m, s in out.streams.items()}, scale)
    if "masked" in objectives:
        hidden = torch.randint(len(MODALITIES), (B,), generator=generator)  # (B,): the modality each clip loses
        keep = torch.ones(B, len(MODALITIES), dtype=torch.bool)
        keep[torch.arange(B), hidden] = False  # (B, 3)
        masked = model(batch.frames, batch.audio, batch.text_ids, batch.text_lengths, keep)
        guesses = torch.stack([model.reconstruct[m](masked.fused) for m in MODALITIES], dim=1)  # (B, 3, d)
        truths = torch.stack([masked.targets[m] for m in MODALITIES], dim=1)  # (B, 3, d)
        rows = torch.arange(B)
        terms["masked"] = masked_modality_loss(guesses[rows, hidden], truths[rows, hidden])  # (B, d) each
    if "temporal" in objectives:
        frames, ordered = shuffle_frames(batch.frames, generator, fraction=0.5)  # (B, T, 3, H, W), (B,)
        shuffled = model(frames, batch.audio, batch.text_ids, batch.text_lengths)
        terms["temporal"] = temporal_order_loss(model.order_head(shuffled.fused)[:, 0], ordered)
    return total_objective(terms, weights), {k: float(v.detach()) for k, v in terms.items()}
# ANCHOR_END: training_loss


def lr_at(step: int, settings: FusionSettings) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to settings.lr, then cosine to 0."""
    return warmup_cosine(step, settings.steps, settings.lr, settings.warmup)


def new_model(name: str, settings: FusionSettings) -> VideoFusionModel:
    """The model ``name`` as every run starts it: initial weights from ``settings.seed``."""
    torch.manual_seed(settings.seed)
    return VideoFusionModel(name, settings.model)


# ANCHOR: train_model
def train_model(
    name: str, data: ClipData, settings: FusionSettings, dropout: float = 0.0, *, progress: bool = False,
) -> tuple[VideoFusionModel, list[float], float]:
    """Train model ``name`` on ``data``: (the model in eval mode, the loss of every step, seconds).

    Every model gets the same initial seed and the same batches (a generator seeded
    with settings.seed), so two runs differ only in what is being compared.
    """
    start = time.perf_counter()
    import_kernels_first()
    model = new_model(name, settings)
    single = name in MODALITIES
    objectives = ("action",) if single else settings.objectives
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    params = list(model.parameters()) + ([log_scale] if "contrastive" in objectives else [])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(settings.seed)  # which clips each batch holds
    draws = torch.Generator().manual_seed(settings.seed + 1)  # dropout masks, hidden modalities, shuffles

    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    label = name + (f" + dropout {dropout:g}" if dropout else "")
    losses: list[float] = []
    model.train()
    bar = tqdm(range(settings.steps), desc=label, unit="step", disable=not progress, file=sys.stderr, leave=False)
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            batch = data.take(torch.randint(data.clips, (settings.batch_size,), generator=order))
            loss, _ = training_loss(model, batch, objectives, settings.weights, dropout, draws, log_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == settings.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
    model.eval()
    return model, losses, time.perf_counter() - start
# ANCHOR_END: train_model


# --------------------------------------------------------------------------- the experiment


@dataclass
class ModelResult:
    """One trained model.

    label: the table's name ("late", "late + dropout"); name: its `MODEL_NAMES` entry.
    dropout: the modality dropout p it trained with (0: none); objectives: its loss terms.
    params: sum of numel; flops: forward FLOPs for one clip; seconds: its training time.
    accuracy: on the test clips; ceiling: the best possible for the modalities it sees.
    missing: fusion models only, {m: test accuracy with modality m missing}; the ceiling
        of the other two is `ceiling(...)` of them.
    losses: the training loss of every step.
    """

    label: str
    name: str
    dropout: float
    objectives: list[str]
    params: int
    flops: int
    seconds: float
    accuracy: float
    ceiling: float
    missing: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


@dataclass
class ExperimentResult:
    """What `run_experiment` returns and `--out DIR` writes (results.json).

    settings: `asdict(FusionSettings)`; rows: one `ModelResult` per trained model, in the
    order trained; threads: torch threads used; data_seconds: rendering the clips;
    seconds: the whole run. models: the trained models by label (not written to JSON).
    """

    settings: dict
    rows: list[ModelResult]
    threads: int
    data_seconds: float
    seconds: float
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    def row(self, label: str) -> ModelResult:
        """The row of the model called ``label`` ("late", "late + dropout")."""
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no model {label!r}; trained: {[r.label for r in self.rows]}")

    def to_dict(self) -> dict:
        """Plain numbers, strings, lists and dicts: what json.dumps writes."""
        return {"settings": self.settings, "threads": self.threads, "data_seconds": self.data_seconds,
                "seconds": self.seconds, "missing_ceilings": _missing_ceilings(),
                "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, found: dict) -> "ExperimentResult":
        """The inverse of `to_dict` (without the models)."""
        return cls(found["settings"], [ModelResult(**r) for r in found["rows"]], found["threads"],
                   found["data_seconds"], found["seconds"])

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/results.json`` (the folder is made if needed); return its path."""
        path = Path(folder) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentResult":
        """Read a results.json that `save` wrote (a folder is read as folder/results.json)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "results.json" if path.is_dir() else path).read_text()))


def _missing_ceilings() -> dict[str, float]:
    """{m: the ceiling of the two modalities left when m is missing}."""
    return {m: ceiling([o for o in MODALITIES if o != m]) for m in MODALITIES}


# ANCHOR: run_experiment
def run_experiment(settings: FusionSettings = FusionSettings(), *, progress: bool = True) -> ExperimentResult:
    """Train every model of ``settings.models`` (and each fusion strategy again with modality
    dropout when settings.dropout > 0); measure parameters, FLOPs, time and test accuracy."""
    if not isinstance(settings, FusionSettings):
        raise ValueError(f"settings must be a FusionSettings, got {type(settings).__name__}")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()  # restored at the end: a notebook goes on
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
        train = make_data(settings.train_clips, 2 * settings.seed, settings.model.data)
        test = make_data(settings.test_clips, 2 * settings.seed + 1, settings.model.data)
        data_seconds = time.perf_counter() - start
        say(f"rendered {train.clips} training and {test.clips} test clips in {data_seconds:.1f} s")
        runs = [(name, 0.0) for name in settings.models]
        if settings.dropout > 0:
            runs += [(name, settings.dropout) for name in settings.models if name in STRATEGY_NAMES]
        rows, models = [], {}
        for name, dropout in runs:
            model, losses, seconds = train_model(name, train, settings, dropout, progress=progress)
            single = name in MODALITIES
            row = ModelResult(
                label=name + (" + dropout" if dropout else ""), name=name, dropout=dropout,
                objectives=["action"] if single else list(settings.objectives),
                params=count_params(model), flops=count_flops(model, test), seconds=seconds,
                accuracy=accuracy(model, test), ceiling=ceiling(model.modalities),
                missing={} if single else missing_accuracies(model, test), losses=losses,
            )
            say(f"{row.label}: {seconds:.1f} s, test accuracy {100 * row.accuracy:.1f}%")
            rows.append(row)
            models[row.label] = model
        plain = json.loads(json.dumps(asdict(settings)))  # as results.json holds it: tuples become lists
        return ExperimentResult(plain, rows, torch.get_num_threads(), data_seconds,
                                time.perf_counter() - start, models)
    finally:
        torch.set_num_threads(threads_before)
# ANCHOR_END: run_experiment


# --------------------------------------------------------------------------- the report


def format_table(result: ExperimentResult) -> str:
    """Every trained model: parameters, MFLOPs per clip, training time, test accuracy, ceiling."""
    lines = [f"{'model':<22} {'params':>8} {'MFLOPs/clip':>11} {'train s':>8} {'test acc':>8} {'ceiling':>8}"]
    for r in result.rows:
        lines.append(f"{r.label:<22} {r.params:>8,} {r.flops / 1e6:>11.2f} {r.seconds:>8.1f} "
                     f"{100 * r.accuracy:>7.1f}% {100 * r.ceiling:>7.1f}%")
    return "\n".join(lines)


def format_missing_table(result: ExperimentResult) -> str:
    """Each fusion model's test accuracy with every modality there, then with one missing."""
    rows = [r for r in result.rows if r.missing]
    if not rows:
        return "(no fusion model trained: no missing-modality table)"
    head = f"{'strategy':<12} {'dropout':>7} {'all three':>9} " + " ".join(f"{'no ' + m:>8}" for m in MODALITIES)
    lines = [head]
    for r in rows:
        lines.append(f"{r.name:<12} {r.dropout:>7g} {100 * r.accuracy:>8.1f}% "
                     + " ".join(f"{100 * r.missing[m]:>7.1f}%" for m in MODALITIES))
    limits = _missing_ceilings()
    lines.append(f"{'ceiling':<12} {'':>7} {100 * ceiling(MODALITIES):>8.1f}% "
                 + " ".join(f"{100 * limits[m]:>7.1f}%" for m in MODALITIES))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d, q = FusionSettings(), FusionSettings.quick()
    p = argparse.ArgumentParser(
        prog="tinymm train video-fusion",
        description="Train the single-modality baselines and four fusion strategies (early, late, "
        "cross-modal attention, bottleneck) on synthetic video + audio + caption clips whose label "
        "needs all three; print parameters, FLOPs per clip, training time and test accuracy, then "
        "accuracy with each modality missing at test time, without and with modality dropout.",
    )
    p.add_argument("--models", default=",".join(d.models),
                   help=f"comma-separated, from {','.join(MODEL_NAMES)} (default: all)")
    p.add_argument("--dropout", type=float, default=d.dropout,
                   help=f"modality dropout p of each strategy's second run; 0: no second run (default {d.dropout})")
    p.add_argument("--objectives", default=",".join(d.objectives),
                   help=f"the fusion models' loss terms, comma-separated from {','.join(OBJECTIVES)}; "
                   "weights 0.1, 0.05, 0.05 (default: action)")
    # None: the default of the run (the full one, or --quick's)
    p.add_argument("--steps", type=int, help=f"optimiser steps per model (default {d.steps}; quick {q.steps})")
    p.add_argument("--batch-size", type=int, help=f"clips per step (default {d.batch_size}; quick {q.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--train-clips", type=int, help=f"(default {d.train_clips}; quick {q.train_clips})")
    p.add_argument("--test-clips", type=int, help=f"(default {d.test_clips}; quick {q.test_clips})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, weights and batches (default 0)")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--quick", action="store_true",
                   help=f"a run of seconds ({q.steps} steps, {q.train_clips} training clips) to check the machinery")
    p.add_argument("--out", type=Path, default=None, help="write DIR/results.json (everything in the tables)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train video-fusion``: run the experiment, print the two tables. Returns the exit code."""
    args = _parser().parse_args(argv)
    sizes = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "train_clips", "test_clips")}
    try:
        base = FusionSettings.quick() if args.quick else FusionSettings()
        settings = replace(base, models=comma_names(args.models), dropout=args.dropout,
                           objectives=comma_names(args.objectives), seed=args.seed, threads=args.threads,
                           **{k: v for k, v in sizes.items() if v is not None})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if problem := out_folder_problem(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    result = run_experiment(settings, progress=not args.quiet)
    s = settings
    print(f"{s.train_clips} training clips, {s.test_clips} test clips; {s.steps} steps of batch {s.batch_size} "
          f"per model, lr {s.lr:g}; fusion loss: {' + '.join(s.objectives)}; {result.seconds:.1f} s in all "
          f"({result.data_seconds:.1f} s rendering) on {result.threads} thread(s)")
    print(format_table(result))
    print()
    print("test accuracy with one modality missing at test time (dropout: the p it trained with):")
    print(format_missing_table(result))
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
