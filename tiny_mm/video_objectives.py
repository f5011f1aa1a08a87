"""The training objectives of chapter 10: what a video fusion model is asked to learn.

The textbook's exercise 4 (source 000, part (c)) trains its fusion model on

    L = L_action + l1 L_contrast + l2 L_mask + l3 L_temporal,   l1 = 0.1, l2 = 0.05, l3 = 0.05

and recommends modality dropout for robustness. Each piece is a small function here:

- `action_loss`: the task itself, mean cross-entropy over the action classes.
- `pairwise_contrastive_loss`: L_VA + L_VT + L_AT, chapter 4's CLIP loss
  (`tiny_mm.contrastive.clip_loss`) between every pair of modalities' pooled
  vectors: a clip's video, audio and caption should find each other in a batch.
- `masked_modality_loss`: hide a modality, predict its features from the other
  two (squared error).
- `shuffle_frames` + `temporal_order_loss`: shuffle the frames of some clips and
  ask the model whether a clip plays in order (binary cross-entropy).
- `modality_dropout`: which modalities each example keeps this step, so the
  model learns not to lean on one stream (and still works when one is missing).
- `ObjectiveWeights` + `total_objective`: the weighted sum.

Every loss is checked against the NumPy float64 reference of
``chapters/ch10_video_fusion/reference.py`` (values and gradients) in
tests/test_video_objectives.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tiny_mm.contrastive import clip_loss
from tiny_mm.video_fusion import MODALITIES

__all__ = [
    "PAIRS",
    "action_loss",
    "pairwise_contrastive_loss",
    "masked_modality_loss",
    "shuffle_frames",
    "temporal_order_loss",
    "modality_dropout",
    "ObjectiveWeights",
    "total_objective",
]

PAIRS = (("video", "audio"), ("video", "text"), ("audio", "text"))  # L_VA, L_VT, L_AT


def _check_float(name: str, x: Tensor, shape: str, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows: the loss needs at least one example")


def _check_generator(generator) -> torch.device:
    """The device random numbers are drawn on: the generator's, or the CPU for the global one (None)."""
    if generator is None:
        return torch.device("cpu")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device


# --------------------------------------------------------------------------- the task


# ANCHOR: action_loss
def action_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_action: mean cross-entropy of the action logits.

    The task itself: which of the C action classes is the clip? In the
    chapter's data no single modality can tell all 32 apart (direction is in
    the video, pitch and rhythm in the audio, the kind of action in the caption).

    Args:
        logits: (B, C) the fusion model's scores.
        labels: (B,) integer classes in [0, C).

    Returns:
        0-dim tensor: mean over B of -log softmax(logits_b)[labels_b].
    """
    _check_float("logits", logits, "(B, C)", 2)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({logits.shape[0]},) tensor, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer classes, got dtype {labels.dtype}")
    if bool((labels < 0).any()) or bool((labels >= logits.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, C = {logits.shape[1]}), got {labels.tolist()}")
    return F.cross_entropy(logits, labels.long())
# ANCHOR_END: action_loss


# --------------------------------------------------------------------------- alignment


# ANCHOR: pairwise_contrastive_loss
def pairwise_contrastive_loss(
    streams: dict[str, Tensor], logit_scale: float | Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_contrast = L_VA + L_VT + L_AT: chapter 4's CLIP loss between every pair of modalities.

    Row b of each stream comes from clip b, so in a batch of B clips the video
    vector of clip b should pick out the audio (and the caption) of clip b among
    the B candidates, and the other way round. This pulls the three streams'
    pooled vectors into one shared space. Each term is the symmetric loss of
    `tiny_mm.contrastive.clip_loss` (the textbook writes the one-directional
    half, video -> audio, but calls it "CLIP-style": CLIP averages both
    directions, and so do we).

    Args:
        streams: {m: (B, d)} pooled vectors of the modalities present (keys among
            "video", "audio", "text"), NOT normalised: rows are L2-normalised here.
            A pair whose two modalities are not both present is skipped.
        logit_scale: s = 1 / temperature, a positive float or a 0-dim tensor (a
            learnable scale is the caller's: pass exp(log_scale), it gets a gradient).

    Returns:
        (total 0-dim tensor, {"video-audio": ..., "video-text": ..., "audio-text": ...}),
        the total being the sum of the terms computed.
    """
    if not isinstance(streams, dict) or not set(streams) <= set(MODALITIES):
        keys = list(streams) if isinstance(streams, dict) else type(streams).__name__
        raise ValueError(f"streams must be a dict with keys among {MODALITIES}, got {keys}")
    for m, x in streams.items():
        _check_float(f"streams[{m!r}]", x, "(B, d)", 2)
    shapes = {m: tuple(x.shape) for m, x in streams.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"every stream must have the same shape (B, d), got {shapes}")
    pairs = [(a, b) for a, b in PAIRS if a in streams and b in streams]
    if not pairs:
        raise ValueError(f"the contrastive loss needs at least two modalities, got {sorted(streams)}")
    unit = {m: F.normalize(x, dim=-1) for m, x in streams.items()}  # (B, d): rows of length one
    parts = {f"{a}-{b}": clip_loss(unit[a], unit[b], logit_scale) for a, b in pairs}
    return sum(parts.values()), parts
# ANCHOR_END: pairwise_contrastive_loss


# --------------------------------------------------------------------------- masked modality


# ANCHOR: masked_modality_loss
def masked_modality_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """L_mask for one hidden modality: mean over B of ||predicted_b - target_b||^2.

    Hide a modality (replace its tokens), then predict what it held from what
    the model still sees: the fused features must carry information about
    each stream that the others imply. The textbook's L_mask-V is ||v_hat - v||^2;
    summing this over the hidden modalities gives its L_mask.

    Args:
        predicted: (B, d) the model's prediction of the hidden modality's features.
        target: (B, d) what they were (here: the mean of its embedded tokens).
            Detached inside: the target is a label, not something to move
            towards the prediction (else both could collapse to a constant).

    Returns:
        0-dim tensor: the squared L2 distance summed over d, averaged over B.
    """
    _check_float("predicted", predicted, "(B, d)", 2)
    _check_float("target", target, "(B, d)", 2)
    if predicted.shape != target.shape:
        raise ValueError(
            f"predicted and target must have the same shape (B, d), got {tuple(predicted.shape)} "
            f"and {tuple(target.shape)}"
        )
    return ((predicted - target.detach()) ** 2).sum(dim=-1).mean()
# ANCHOR_END: masked_modality_loss


# --------------------------------------------------------------------------- temporal order


# ANCHOR: temporal_order
def shuffle_frames(
    frames: Tensor, generator: torch.Generator | None, fraction: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Shuffle the frames of a random round(fraction * B) clips: the temporal-order task's input.

    Each chosen clip gets its own random permutation of its T frames, never the
    identity (it is redrawn until it moves at least one frame), so "shuffled"
    always means out of order. A model can only tell such clips from the
    untouched ones by looking at how frames follow each other (e.g. which way
    a shape moves), not at any one frame.

    Args:
        frames: (B, T, ...) clips, frames along dim 1 (e.g. (B, T, 3, H, W)).
        generator: torch.Generator to draw from (the same seed gives the same
            shuffle), or None for torch's global generator.
        fraction: share of clips to shuffle, in [0, 1]; Python's round() of
            fraction * B clips are shuffled.

    Returns:
        (frames (B, T, ...) a new tensor, ordered (B,) bool on frames' device:
        True for the clips left in order).
    """
    if not isinstance(frames, Tensor) or frames.dim() < 2:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a tensor of shape (B, T, ...), got {shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    device = _check_generator(generator)
    batch, steps = frames.shape[:2]
    count = round(fraction * batch)
    if count and steps < 2:
        raise ValueError(f"shuffling needs at least 2 frames per clip, got T = {steps}")
    order = torch.arange(steps, device=device).repeat(batch, 1)  # (B, T): frame t stays at t
    chosen = torch.randperm(batch, generator=generator, device=device)[:count]  # (count,)
    for b in chosen.tolist():
        perm = torch.randperm(steps, generator=generator, device=device)  # (T,)
        while torch.equal(perm, order[b]):  # the identity is no shuffle: draw again (p = 1 / T!)
            perm = torch.randperm(steps, generator=generator, device=device)
        order[b] = perm
    order = order.to(frames.device)
    rows = torch.arange(batch, device=frames.device)[:, None]  # (B, 1)
    ordered = torch.ones(batch, dtype=torch.bool, device=frames.device)
    ordered[chosen.to(frames.device)] = False
    return frames[rows, order], ordered  # (B, T, ...), (B,)


def temporal_order_loss(logits: Tensor, ordered: Tensor) -> Tensor:
    """L_temporal: binary cross-entropy of "are these frames in order?".

    The textbook writes -log P(order | v, a, t) without saying which orders
    compete; we make it the binary question of Misra et al.'s "Shuffle and
    Learn" (2016): in order, or shuffled by `shuffle_frames`.

    Args:
        logits: (B,) (or the order head's (B, 1)) scores; sigmoid(logit) = P(in order).
        ordered: (B,) bool, True for the clips in order.

    Returns:
        0-dim tensor: mean over B of -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))].
    """
    if isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]  # (B,): the order head is a Linear(F, 1)
    _check_float("logits", logits, "(B,)", 1)
    if not isinstance(ordered, Tensor) or ordered.dtype != torch.bool or ordered.shape != logits.shape:
        got = (ordered.dtype, tuple(ordered.shape)) if isinstance(ordered, Tensor) else type(ordered).__name__
        raise ValueError(f"ordered must be a bool tensor of shape {tuple(logits.shape)}, got {got}")
    return F.binary_cross_entropy_with_logits(logits, ordered.to(logits.dtype))
# ANCHOR_END: temporal_order


# --------------------------------------------------------------------------- modality dropout


# ANCHOR: modality_dropout
def modality_dropout(
    batch: int, p: float, generator: torch.Generator | None, device: torch.device | str | None = None
) -> Tensor:
    """Which modalities each example keeps this step: the `present` mask of `VideoFusionModel`.

    Every modality of every example is dropped independently with probability
    p; a row that lost all three keeps one of them, chosen uniformly (an
    example with no input at all teaches nothing). A model trained this way
    cannot rely on any one stream being there, which is what keeps it useful
    when a modality is missing at test time. (So a modality ends up missing
    with probability p - p^3 / 3, slightly below p.)

    Args:
        batch: B, the number of examples.
        p: drop probability in [0, 1); 0 keeps everything.
        generator: torch.Generator (same seed, same masks) or None for the global one.
        device: where to put the mask (default: the CPU).

    Returns:
        present: (B, 3) bool, column i for MODALITIES[i] (video, audio, text);
        True = kept. No row is all False.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    draw_on = _check_generator(generator)
    dropped = torch.rand(batch, len(MODALITIES), generator=generator, device=draw_on) < p  # (B, 3)
    rescue = torch.randint(len(MODALITIES), (batch,), generator=generator, device=draw_on)  # (B,)
    present = ~dropped  # (B, 3)
    empty = dropped.all(dim=1)  # (B,): rows that lost everything
    present[empty, rescue[empty]] = True  # each keeps one modality
    return present if device is None else present.to(device)
# ANCHOR_END: modality_dropout


# --------------------------------------------------------------------------- the sum


# ANCHOR: total_objective
@dataclass(frozen=True)
class ObjectiveWeights:
    """The lambdas of L = L_action + l1 L_contrast + l2 L_mask + l3 L_temporal.

    Defaults are the textbook's "typical weights" (0.1, 0.05, 0.05): the
    auxiliary terms shape the features without outweighing the task.
    """

    contrastive: float = 0.1
    masked: float = 0.05
    temporal: float = 0.05

    def __post_init__(self) -> None:
        for name in ("contrastive", "masked", "temporal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"weight {name} must be a finite number >= 0, got {value!r}")


def total_objective(terms: dict[str, Tensor], weights: ObjectiveWeights = ObjectiveWeights()) -> Tensor:
    """L = action + contrastive weight * L_contrast + masked weight * L_mask + temporal weight * L_temporal.

    Args:
        terms: {"action": 0-dim tensor} plus any of "contrastive", "masked",
            "temporal" (the terms computed this step; absent ones count 0).
        weights: the lambdas (default: the textbook's 0.1, 0.05, 0.05).

    Returns:
        0-dim tensor.
    """
    if not isinstance(weights, ObjectiveWeights):
        raise ValueError(f"weights must be an ObjectiveWeights, got {type(weights).__name__}")
    known = ("action", "contrastive", "masked", "temporal")
    if not isinstance(terms, dict) or "action" not in terms or not set(terms) <= set(known):
        keys = list(terms) if isinstance(terms, dict) else type(terms).__name__
        raise ValueError(f"terms must be a dict with 'action' and any of {known[1:]}, got {keys}")
    for name, value in terms.items():
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"terms[{name!r}] must be a 0-dim tensor, got {shape}")
    total = terms["action"]
    for name in known[1:]:
        if name in terms:
            total = total + getattr(weights, name) * terms[name]
    return total
# ANCHOR_END: total_objective
