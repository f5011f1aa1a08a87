"""Train a tiny Whisper to transcribe spoken digit strings, on a CPU: `tinymm train whisper-digits`.

The recipe, step by step:

    data       digit strings of 3 to 6 digits, spoken by espeak-ng (`tiny_mm.data.spoken_digits`):
               training strings in 35 voices (5 accents x 7 speakers) at 160-240 words per
               minute, each voice at its own pitch (--pitches varies it); evaluation strings never heard in training, spoken by the same voices
               and by 2 voices training never heard (another accent, other speakers)
    features   Whisper's log-mel (80 bins, 100 frames per second) of 3 s, not 30 s:
               300 frames, 150 encoder positions after the stride-2 convolution
    model      `tiny_digits_dims`: a `tiny_mm.whisper.Whisper`, width 64, 4 heads, 2 encoder and
               2 decoder blocks, 13 tokens (10 digits + end, start, pad), 10 decoder positions
    loss       teacher forcing: the decoder reads [SOT, d1 ... dn] and predicts [d1 ... dn, EOT];
               padding is left out of the cross-entropy
    optimiser  AdamW, linear warm-up then cosine decay, weight decay on matrices only
    eval       greedy decoding with the key/value cache (`tiny_mm.whisper.greedy_decode`), prompt
               [SOT], until EOT; word error rate and exact-string accuracy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.data.spoken_digits import (
    EOT, HELDOUT_VOICES, PAD, SOT, TRAIN_VOICES, DigitTokenizer, SpokenDigits, draw_speakers,
    make_clips, require_espeak, split_strings, word_error_rate,
)
from tiny_mm.whisper import Whisper, WhisperDims, greedy_decode
from tiny_mm.training import warmup_cosine

__all__ = [
    "tiny_digits_dims", "new_model", "DigitsConfig", "DigitsResult", "teacher_forcing_loss", "transcribe", "evaluate",
    "make_data", "train_whisper_digits", "lr_at", "save_model", "load_model", "main",
]

MAX_DIGITS = 6


# ANCHOR: tiny_digits_dims
def tiny_digits_dims(seconds: float = 3.0, n_mels: int = 80) -> WhisperDims:
    """A Whisper small enough to train on two CPU cores in a couple of minutes (262,592 parameters).

    n_audio_ctx = 50 positions per second (100 mel frames, halved by conv2);
    n_vocab = 13 digit tokens; n_text_ctx = 10 holds SOT, up to 8 digits and EOT.
    """
    frames = round(seconds * 100)
    if frames < 2 or frames % 2 or abs(frames - seconds * 100) > 1e-6:
        raise ValueError(f"seconds must be a positive multiple of 0.02, got {seconds!r}")
    return WhisperDims(
        n_mels=n_mels, n_audio_ctx=frames // 2, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
        n_vocab=len(DigitTokenizer()), n_text_ctx=10, n_text_state=64, n_text_head=4, n_text_layer=2,
    )
# ANCHOR_END: tiny_digits_dims


def new_model(dims: WhisperDims) -> Whisper:
    """A Whisper to train from scratch, its token table drawn with std d^-1/2.

    The output layer is the token table itself. nn.Embedding's default rows are
    N(0, 1), so a LayerNormed state (entries ~1) gives logits of std sqrt(d) = 8
    and a first loss near 30 instead of ln 13 = 2.6: the first ~50 steps would go
    into shrinking the table. Rows of std d^-1/2 start the logits near 1.
    """
    model = Whisper(dims)
    nn.init.normal_(model.decoder.token_embedding.weight, std=dims.n_text_state**-0.5)
    return model


# ANCHOR: DigitsConfig
@dataclass(frozen=True)
class DigitsConfig:
    """What to train and how; the defaults are the two-minute recipe.

    steps, batch_size: optimiser steps and clips per step.
    lr: peak learning rate, reached after ``warmup`` steps, then cosine-decayed to 0.
    weight_decay: AdamW's decay, on weight matrices only.
    seed: seeds the strings, voices, speeds, the model's initialisation and the batches.
    train_clips: clips synthesised for training (one per training string).
    eval_clips: held-out strings per evaluation set (training voices; held-out voices).
    seconds: every clip is padded to this length (a multiple of 0.02 s).
    pitches: (low, high) range of espeak-ng's pitch (0-99) the clips are drawn from; 50 is each
        voice's own (drawing from 30-70 did not help the held-out voices: docs/training.md).
    threads: torch CPU threads (None: the CPUs this process may use).
    """

    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.05
    seed: int = 0
    train_clips: int = 2000
    eval_clips: int = 200
    seconds: float = 3.0
    pitches: tuple[int, int] = (50, 50)
    threads: int | None = None

    def __post_init__(self) -> None:
        check_ints(self, positive=("steps", "batch_size", "train_clips", "eval_clips"), non_negative=("seed", "warmup"))
        check_optimiser(self.lr, self.weight_decay)
        if self.batch_size > self.train_clips:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {self.train_clips} train_clips")
        check_threads(self.threads)
        tiny_digits_dims(self.seconds)  # checks seconds
        if (len(self.pitches) != 2 or not all(isinstance(p, int) for p in self.pitches)
                or not 0 <= self.pitches[0] <= self.pitches[1] <= 99):
            raise ValueError(f"pitches must be (low, high) ints with 0 <= low <= high <= 99, got {self.pitches!r}")
# ANCHOR_END: DigitsConfig


@dataclass
class DigitsResult:
    """What `train_whisper_digits` returns.

    model: the trained Whisper, in eval mode. losses: the loss of every step.
    heldout: {"wer", "accuracy"} on strings never heard in training, training voices.
    heldout_voices: the same on strings never heard, spoken by voices never heard.
    examples: (reference, hypothesis) pairs from the held-out strings.
    seconds: wall time of the whole run; data_seconds: of the synthesis alone (~0 when data was given).
    steps_per_second: training steps per second (the loop only).
    """

    model: Whisper
    losses: list[float]
    heldout: dict[str, float] = field(default_factory=dict)
    heldout_voices: dict[str, float] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    data_seconds: float = 0.0
    steps_per_second: float = 0.0


# --------------------------------------------------------------------------- loss and decoding


# ANCHOR: teacher_forcing_loss
def teacher_forcing_loss(model: Whisper, mel: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of every next token given the true ones before it.

    mel: (B, n_mels, 2 T); tokens: (B, L) = [SOT, d1 ... dn, EOT, PAD ...].
    The decoder reads tokens[:, :-1] and is scored on tokens[:, 1:]; targets
    that are PAD (after EOT) are ignored, so the loss never teaches what follows
    the end.
    """
    logits = model(mel, tokens[:, :-1])  # (B, L - 1, V)
    targets = tokens[:, 1:]  # (B, L - 1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)
# ANCHOR_END: teacher_forcing_loss


# ANCHOR: transcribe
@torch.no_grad()
def transcribe(model: Whisper, mel: Tensor, *, use_cache: bool = True, batch_size: int = 100) -> list[str]:
    """Greedy transcripts of clips: mel (N, n_mels, 2 T) -> N strings such as "3 1 4".

    The prompt is [SOT] alone (no language or task tokens: this model knows one
    task); decoding stops at EOT or when the decoder's positions are full.
    """
    model.eval()
    tokenizer, texts = DigitTokenizer(), []
    for chunk in mel.split(batch_size):
        features = model.embed_audio(chunk)  # (b, T, d), once per clip
        out = greedy_decode(model, features, [SOT], eot=EOT, max_new_tokens=model.dims.n_text_ctx,
                            use_cache=use_cache)
        texts += [tokenizer.decode(row) for row in out.tokens]  # (b, 1 + S) each
    return texts
# ANCHOR_END: transcribe


def evaluate(model: Whisper, data: SpokenDigits) -> dict:
    """{"wer", "accuracy" (whole string right), "hypotheses"} of greedy transcripts."""
    hypotheses = transcribe(model, data.mel)
    exact = sum(h == r for h, r in zip(hypotheses, data.texts)) / len(data)
    return {"wer": word_error_rate(data.texts, hypotheses), "accuracy": exact, "hypotheses": hypotheses}


# --------------------------------------------------------------------------- training


def lr_at(step: int, config: DigitsConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to config.lr, then cosine to 0."""
    return warmup_cosine(step, config.steps, config.lr, config.warmup)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and convolution kernels; not gains, biases or embedding tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ANCHOR: make_data
def make_data(config: DigitsConfig, cache: str | Path | None = None) -> dict[str, SpokenDigits]:
    """The three sets: "train", "heldout" (new strings, training voices) and "heldout_voices"
    (other new strings, voices never heard). No string is in two sets.

    cache: a folder to keep the synthesised clips in (``{name}.pt``), reused when the
    settings match; None keeps everything in memory.
    """
    require_espeak()
    train, test = split_strings(config.train_clips, 2 * config.eval_clips, config.seed, max_digits=MAX_DIGITS)
    sets = {
        "train": (train, draw_speakers(len(train), config.seed, TRAIN_VOICES, pitches=config.pitches)),
        "heldout": (test[: config.eval_clips],
                    draw_speakers(config.eval_clips, config.seed + 1, TRAIN_VOICES, pitches=config.pitches)),
        "heldout_voices": (test[config.eval_clips :],
                           draw_speakers(config.eval_clips, config.seed + 2, HELDOUT_VOICES, pitches=config.pitches)),
    }
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
    workers = max(2, _cpus())
    return {
        name: make_clips(texts, voices, speeds, pitches, seconds=config.seconds, workers=workers,
                         cache=None if cache is None else Path(cache) / f"{name}.pt")
        for name, (texts, (voices, speeds, pitches)) in sets.items()
    }
# ANCHOR_END: make_data


# ANCHOR: train_whisper_digits
def train_whisper_digits(
    config: DigitsConfig = DigitsConfig(),
    *,
    data: dict[str, SpokenDigits] | None = None,
    progress: bool = True,
    log_path: str | Path | None = None,
    evaluate_sets: bool = True,
) -> DigitsResult:
    """Synthesise the clips (unless ``data`` is given, as `make_data` returns it), train, evaluate.

    log_path: JSON-lines loss log, one {"step", "loss", "lr", "seconds"} per step.
    evaluate_sets: False skips the held-out evaluation (tests of the loop).
    """
    if not isinstance(config, DigitsConfig):
        raise ValueError(f"config must be a DigitsConfig, got {type(config).__name__}")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads or _cpus())
    data = make_data(config) if data is None else data
    needed = {"train", "heldout", "heldout_voices"} if evaluate_sets else {"train"}
    if not isinstance(data, dict) or not needed <= set(data):
        raise ValueError(f"data must be a dict with the sets {sorted(needed)} (see make_data)")
    train = data["train"]
    data_seconds = time.perf_counter() - start
    if train.mel.shape[-1] != round(config.seconds * 100):
        raise ValueError(f"the clips last {train.mel.shape[-1] / 100} s but config.seconds is {config.seconds}")

    torch.manual_seed(config.seed)
    model = new_model(tiny_digits_dims(config.seconds, train.mel.shape[1]))
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    order = torch.Generator().manual_seed(config.seed + 3)  # the batches

    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    log = open(log_path, "w") if log_path is not None else None
    losses: list[float] = []
    model.train()
    loop_start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train whisper-digits", unit="step", disable=not progress,
               file=sys.stderr)
    try:
        for step in bar:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randperm(len(train), generator=order)[: config.batch_size]  # (B,)
            tokens = train.tokens[index]  # (B, L)
            tokens = tokens[:, : int((tokens != PAD).sum(1).max())]  # (B, L'): no all-PAD columns
            loss = teacher_forcing_loss(model, train.mel[index], tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if log is not None:
                log.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr,
                                      "seconds": round(time.perf_counter() - start, 4)}) + "\n")
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        if log is not None:
            log.close()
    steps_per_second = config.steps / (time.perf_counter() - loop_start)

    model.eval()
    result = DigitsResult(model, losses, data_seconds=data_seconds, steps_per_second=steps_per_second)
    if evaluate_sets:
        held = evaluate(model, data["heldout"])
        result.heldout = {"wer": held["wer"], "accuracy": held["accuracy"]}
        result.examples = list(zip(data["heldout"].texts, held["hypotheses"]))
        voices = evaluate(model, data["heldout_voices"])
        result.heldout_voices = {"wer": voices["wer"], "accuracy": voices["accuracy"]}
    result.seconds = time.perf_counter() - start
    torch.set_num_threads(threads_before)
    return result
# ANCHOR_END: train_whisper_digits


# --------------------------------------------------------------------------- saving


def save_model(model: Whisper, path: str | Path) -> None:
    """torch.save of openai-whisper's checkpoint layout plus the vocabulary: tensors, ints and
    strings only, so `load_model` (and `tiny_mm.load_whisper`) read it with weights_only=True."""
    torch.save({"dims": asdict(model.dims),
                "model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "vocab": DigitTokenizer().itos}, path)


def load_model(path: str | Path) -> Whisper:
    """A model `save_model` wrote, in eval mode; ValueError if its vocabulary is not the digits'."""
    from tiny_mm.checkpoints import load_whisper

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("vocab") != DigitTokenizer().itos:
        raise ValueError(f"{path} is not a spoken-digits model: its vocabulary is {checkpoint.get('vocab')!r}")
    return load_whisper(checkpoint)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    d = DigitsConfig()
    p = argparse.ArgumentParser(
        prog="tinymm train whisper-digits",
        description="Train a tiny Whisper on digit strings spoken by espeak-ng and report the word error "
        "rate on strings (and voices) it never heard. Needs espeak-ng (apt-get install espeak-ng).",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"clips per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, weights and batches (default 0)")
    p.add_argument("--train-clips", type=int, default=d.train_clips,
                   help=f"clips synthesised for training (default {d.train_clips})")
    p.add_argument("--eval-clips", type=int, default=d.eval_clips,
                   help=f"clips per held-out set (default {d.eval_clips})")
    p.add_argument("--pitches", type=int, nargs=2, default=list(d.pitches), metavar=("LOW", "HIGH"),
                   help=f"espeak-ng pitch range, 0-99 (default {d.pitches[0]} {d.pitches[1]})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--cache", type=Path, default=None, help="keep the synthesised clips in this folder")
    p.add_argument("--out", type=Path, default=None, help="save the model here (torch.save, weights only)")
    p.add_argument("--log", type=Path, default=None, help="write a JSON-lines loss log here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train whisper-digits``: train, print WER and accuracy, optionally save. Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        config = DigitsConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              train_clips=args.train_clips, eval_clips=args.eval_clips, threads=args.threads,
                              pitches=tuple(args.pitches))
        require_espeak()
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.parent.is_dir():
        print(f"error: --out: no folder {args.out.parent}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    data = make_data(config, cache=args.cache)
    data_seconds = time.perf_counter() - start
    result = train_whisper_digits(config, data=data, progress=not args.quiet, log_path=args.log)
    print(f"synthesised {sum(len(s) for s in data.values())} clips in {data_seconds:.1f} s; trained "
          f"{config.steps} steps of batch {config.batch_size} on {config.threads or _cpus()} thread(s): "
          f"{result.steps_per_second:.2f} steps/s; {time.perf_counter() - start:.1f} s in all; "
          f"final loss {result.losses[-1]:.4f}")
    for name, scores in (("held-out strings, training voices", result.heldout),
                         (f"held-out strings, held-out voices ({', '.join(HELDOUT_VOICES)})", result.heldout_voices)):
        print(f"  {name}: WER {100 * scores['wer']:.1f}%  exact strings {100 * scores['accuracy']:.1f}%")
    for ref, hyp in result.examples[:5]:
        print(f"    {ref!r:>16} -> {hyp!r}")
    if args.out is not None:
        save_model(result.model, args.out)
        print(f"saved {args.out} (reload with tiny_mm.train_whisper_digits.load_model(path))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
