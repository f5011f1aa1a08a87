# Generated from solutions/ex02_zero_shot.py by `python -m tiny_mm.stubs`: fill in every NotImplementedError.
"""Exercise 2 (chapter 5): zero-shot classification with CLIP, and a supervised baseline.

CLIP classifies images it was never trained to classify: write each class
name into a few sentences ("a photo of a {}."), embed the sentences with the
text tower, and call the image's nearest class vector its label. No training,
no labelled examples. A supervised model needs labelled images, but on a
narrow task it can be very good with few of them: the small CNN at the end is
the baseline zero-shot accuracy is measured against.

What to do:
  1. Fill in every function marked below: replace each
     `raise NotImplementedError(...)` with your code. The docstrings are the
     specification (shapes, which errors to raise).
  2. Grade your work:

         tinymm grade ex02

     The checks build a tiny random CLIP (small towers, a short context) and
     compare your classifier, logits and accuracy with the chapter's NumPy
     reference (chapters/ch05_clip_zero_shot/reference.py), on coloured-shape
     images from tiny_mm.data.shapes; then they train your CNN for a few
     seconds and test it on images it has not seen.

The reference solution lives in solutions/ex02_zero_shot.py
(`tinymm grade ex02 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """The prompts of every class: C lists of T strings, prompts[c][t] = templates[t].format(classnames[c]).

    Raise ValueError when classnames or templates is empty, or when a template
    does not hold exactly one "{}".
    """
    raise NotImplementedError(
        "ex02 (build_prompts): check the inputs (ValueError), then one list per class: "
        "[t.format(name) for t in templates]"
    )


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], Tensor],
) -> Tensor:
    """The template ensemble: a classifier W of shape (E, C), one unit column per class.

    model: a CLIP-like module with encode_text(tokens (P, L)) -> (P, E).
    tokenize: list of P str -> (P, L) LongTensor of token ids.

    Column c: embed the T prompts of class c, normalise each embedding to unit
    length, average the T unit vectors, and normalise the average.
    Raise ValueError on bad classnames or templates (as build_prompts).
    """
    raise NotImplementedError(
        "ex02 (zero_shot_classifier): prompts = build_prompts(...); per class: "
        "F.normalize(model.encode_text(tokenize(prompts[c])), dim=-1), .mean(dim=0), F.normalize "
        "again; torch.stack the C columns along dim=1."
    )


@torch.no_grad()
def zero_shot_logits(model: nn.Module, images: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarity of every image with every class: images (B, 3, H, W), classifier (E, C) -> (B, C).

    Embed the images with model.encode_image ((B, E)), normalise each row to
    unit length, and multiply by the classifier (whose columns are unit
    vectors already). No logit scale: it would not change the argmax.
    Raise ValueError when the image embedding size differs from the classifier's E.
    """
    raise NotImplementedError(
        "ex02 (zero_shot_logits): F.normalize(model.encode_image(images), dim=-1) @ classifier, "
        "after checking the sizes agree"
    )


def predict(logits: Tensor) -> Tensor:
    """The predicted class of each row: logits (B, C) -> (B,) int64, the lower index on ties.

    Raise ValueError unless logits is 2-D.
    """
    raise NotImplementedError(
        "ex02 (predict): torch.argmax returns the first maximum, which is the tie rule asked for"
    )


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits: logits (B, C), labels (B,) -> float.

    Rank each row from the highest logit down; on ties the lower class index
    ranks first (as torch.argmax and a stable sort do; torch.topk promises no
    order). Raise ValueError unless 1 <= k <= C, or when labels is not (B,).
    """
    raise NotImplementedError(
        "ex02 (topk_accuracy): order = torch.argsort(logits, dim=1, descending=True, "
        "stable=True)[:, :k]; a row is correct when (order == labels[:, None]).any(dim=1)."
    )


class SmallCNN(nn.Module):
    """A small supervised image classifier: images (B, in_channels, S, S) -> logits (B, num_classes).

    Layers (keep this architecture; any S that is a multiple of 4 works):
        conv1: Conv2d(in_channels, width, 3, padding=1), ReLU, 2x2 max pool    -> (B, width, S/2, S/2)
        conv2: Conv2d(width, 2 * width, 3, padding=1), ReLU, 2x2 max pool      -> (B, 2w, S/4, S/4)
        conv3: Conv2d(2 * width, 2 * width, 3, padding=1), ReLU                -> (B, 2w, S/4, S/4)
        global max pool over the two spatial axes                              -> (B, 2w)
        head: Linear(2 * width, num_classes)                                   -> (B, num_classes)
    The global max pool asks "is this feature anywhere in the image?", which
    is what a shape detector needs, wherever the shape sits.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        raise NotImplementedError(
            "ex02 (__init__): self.conv1, self.conv2, self.conv3 (nn.Conv2d) and self.head "
            "(nn.Linear) as in the docstring"
        )

    def forward(self, images: Tensor) -> Tensor:
        """images (B, in_channels, S, S) -> logits (B, num_classes)."""
        raise NotImplementedError(
            "ex02 (forward): F.max_pool2d(F.relu(self.conv1(x)), 2), the same with conv2, "
            "F.relu(self.conv3(x)), x.amax(dim=(2, 3)), then self.head"
        )


def train_baseline(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 5e-3,
    width: int = 16,
    seed: int = 0,
) -> SmallCNN:
    """Train a SmallCNN on labelled images; return it in eval mode.

    images: (N, C, S, S) float; labels: (N,) int64 in 0..num_classes-1.
    Each of the `steps` Adam steps (learning rate lr) uses batch_size images
    drawn at random with a torch.Generator seeded with `seed`; the weights are
    initialised after torch.manual_seed(seed), so a run is repeatable.
    Raise ValueError, before training, when images is not a 4-D float
    tensor, labels is not (N,), a label is out of range, or steps < 1.
    """
    raise NotImplementedError(
        "ex02 (train_baseline): check the inputs; torch.manual_seed(seed); model = "
        "SmallCNN(num_classes, images.shape[1], width); Adam; each step: idx = torch.randint(0, "
        "N, (batch_size,), generator=gen); loss = F.cross_entropy(model(images[idx]), "
        "labels[idx]); zero_grad, backward, step; model.eval()"
    )
