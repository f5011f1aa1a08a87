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
    # BEGIN SOLUTION
    # hint: check the inputs (ValueError), then one list per class: [t.format(name) for t in templates]
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError(f"need at least one class and one template, got {len(classnames)} and {len(templates)}")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name; bad: {bad!r}")
    return [[template.format(name) for template in templates] for name in classnames]
    # END SOLUTION


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
    # BEGIN SOLUTION
    # hint: prompts = build_prompts(...); per class: F.normalize(model.encode_text(tokenize(prompts[c])), dim=-1),
    # hint: .mean(dim=0), F.normalize again; torch.stack the C columns along dim=1.
    prompts = build_prompts(classnames, templates)  # C lists of T
    columns = []
    for class_prompts in prompts:
        emb = model.encode_text(tokenize(class_prompts)).float()  # (T, E)
        # Normalise first so each template gets one equal vote, whatever its embedding's length.
        votes = F.normalize(emb, dim=-1)  # (T, E)
        columns.append(F.normalize(votes.mean(dim=0), dim=-1))  # (E,)
    return torch.stack(columns, dim=1)  # (E, C)
    # END SOLUTION


@torch.no_grad()
def zero_shot_logits(model: nn.Module, images: Tensor, classifier: Tensor) -> Tensor:
    """Cosine similarity of every image with every class: images (B, 3, H, W), classifier (E, C) -> (B, C).

    Embed the images with model.encode_image ((B, E)), normalise each row to
    unit length, and multiply by the classifier (whose columns are unit
    vectors already). No logit scale: it would not change the argmax.
    Raise ValueError when the image embedding size differs from the classifier's E.
    """
    # BEGIN SOLUTION
    # hint: F.normalize(model.encode_image(images), dim=-1) @ classifier, after checking the sizes agree
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (E, C), got shape {tuple(classifier.shape)}")
    features = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, E)
    if features.shape[-1] != classifier.shape[0]:
        raise ValueError(f"image embeddings have size {features.shape[-1]}, but the classifier has shape "
                         f"{tuple(classifier.shape)} (expected (E, C) with E = {features.shape[-1]})")
    return features @ classifier  # (B, C)
    # END SOLUTION


def predict(logits: Tensor) -> Tensor:
    """The predicted class of each row: logits (B, C) -> (B,) int64, the lower index on ties.

    Raise ValueError unless logits is 2-D.
    """
    # BEGIN SOLUTION
    # hint: torch.argmax returns the first maximum, which is the tie rule asked for
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    return logits.argmax(dim=1)  # (B,)
    # END SOLUTION


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits: logits (B, C), labels (B,) -> float.

    Rank each row from the highest logit down; on ties the lower class index
    ranks first (as torch.argmax and a stable sort do; torch.topk promises no
    order). Raise ValueError unless 1 <= k <= C, or when labels is not (B,).
    """
    # BEGIN SOLUTION
    # hint: order = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k];
    # hint: a row is correct when (order == labels[:, None]).any(dim=1).
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, C) and labels (B,), got shapes {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    n_classes = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_classes:
        raise ValueError(f"k must be an int in 1..{n_classes} (the number of classes), got {k!r}")
    order = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k]  # (B, k), best first
    hits = (order == labels[:, None]).any(dim=1)  # (B,)
    return float(hits.sum()) / hits.numel()
    # END SOLUTION


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
        # BEGIN SOLUTION
        # hint: self.conv1, self.conv2, self.conv3 (nn.Conv2d) and self.head (nn.Linear) as in the docstring
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)
        # END SOLUTION

    def forward(self, images: Tensor) -> Tensor:
        """images (B, in_channels, S, S) -> logits (B, num_classes)."""
        # BEGIN SOLUTION
        # hint: F.max_pool2d(F.relu(self.conv1(x)), 2), the same with conv2, F.relu(self.conv3(x)),
        # hint: x.amax(dim=(2, 3)), then self.head
        x = F.max_pool2d(F.relu(self.conv1(images)), 2)  # (B, w, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, S/4, S/4)
        x = F.relu(self.conv3(x))  # (B, 2w, S/4, S/4)
        return self.head(x.amax(dim=(2, 3)))  # (B, num_classes)
        # END SOLUTION


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
    # BEGIN SOLUTION
    # hint: check the inputs; torch.manual_seed(seed); model = SmallCNN(num_classes, images.shape[1], width);
    # hint: Adam; each step: idx = torch.randint(0, N, (batch_size,), generator=gen);
    # hint: loss = F.cross_entropy(model(images[idx]), labels[idx]); zero_grad, backward, step; model.eval()
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, S, S), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not isinstance(labels, Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), one per image, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (and there must be some)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, images.shape[1], width)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    labels = labels.long()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)  # (batch,)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()
    # END SOLUTION
