"""Zero-shot classification with a CLIP-like model: prompts, the template ensemble, accuracy.

The model is anything with CLIP's interface:

    encode_image(images: (B, 3, H, W)) -> (B, E)
    encode_text(tokens: (P, L) LongTensor) -> (P, E)

Zero-shot classification turns class names into a classifier with no training:

    W[:, c] = normalise( mean_t normalise(encode_text(template_t.format(class_c))) )   # (E, C)
    logits  = normalise(encode_image(x)) @ W                                           # (B, C)

and predicts argmax over the C classes (cosine similarity; CLIP's logit scale would
not change the argmax, so it is left out).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tiny_mm.data.cifar import CIFAR10_CLASSES

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TEMPLATES",
    "SINGLE_TEMPLATE",
    "CLIP_MEAN",
    "CLIP_STD",
    "build_classifier",
    "predict",
    "accuracy",
    "confusion_matrix",
    "evaluate",
    "clip_preprocess",
    "main",
]

# The 18 CIFAR-10 prompt templates of the CLIP paper (Radford et al., 2021), as listed
# for CIFAR10 in data/prompts.md of github.com/openai/CLIP and used by open_clip's
# zero-shot CIFAR-10 results.
CIFAR10_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
# The one-template baseline: the paper's default prompt.
SINGLE_TEMPLATE = ("a photo of a {}.",)

# CLIP's preprocessing statistics (per RGB channel), from OpenAI's clip.py.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def build_classifier(
    model,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], Tensor],
) -> Tensor:
    """Zero-shot weights (E, C): per class, the normalised mean of normalised prompt embeddings.

    classnames: C names; templates: T strings with one ``{}`` each; tokenize: list of
    str -> (T, L) LongTensor. With T = 1 this is the single prompt's unit embedding.
    """
    if len(classnames) == 0:
        raise ValueError("classnames is empty")
    if len(templates) == 0:
        raise ValueError("templates is empty")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}'; bad: {bad!r}")
    device = _model_device(model)
    columns = []
    for name in classnames:
        tokens = tokenize([t.format(name) for t in templates]).to(device)  # (T, L)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (T, E)
        # Normalise before averaging so every prompt votes with equal weight,
        # then again so the class vector is a unit vector (cosine similarity).
        columns.append(F.normalize(emb.mean(dim=0), dim=-1))  # (E,)
    return torch.stack(columns, dim=1)  # (E, C)


@torch.no_grad()
def predict(model, images: Tensor, classifier: Tensor) -> Tensor:
    """Cosine-similarity logits (B, C) of images (B, 3, H, W) against a classifier (E, C)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if classifier.dim() != 2:
        raise ValueError(f"classifier must be (E, C), got shape {tuple(classifier.shape)}")
    feats = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, E)
    if feats.shape[-1] != classifier.shape[0]:
        raise ValueError(f"image embedding size {feats.shape[-1]} != classifier rows {classifier.shape[0]}")
    return feats @ classifier.to(feats.device)  # (B, C)


def _topk_correct(logits: Tensor, labels: Tensor, topk: Iterable[int]) -> dict[int, int]:
    """Number of rows whose label is among the k largest logits, for each k."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    ks = list(topk)
    if any(k < 1 or k > logits.shape[1] for k in ks):
        raise ValueError(f"every k must be in 1..{logits.shape[1]} (the number of classes), got {ks}")
    # A stable sort, not topk: on tied logits topk's order is unspecified, and top-1 must
    # agree with argmax (the first of the tied classes), which the confusion matrix uses.
    top = logits.argsort(dim=1, descending=True, stable=True)[:, : max(ks)]  # (B, kmax), best first
    hit = top == labels.to(top.device)[:, None]  # (B, kmax)
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def accuracy(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies {"top1": ..., "top5": ...} in [0, 1] of logits (B, C) against labels (B,).

    A k larger than C is capped at C (every label is then in the top k).
    """
    ks = [min(k, logits.shape[-1]) for k in topk]
    correct = _topk_correct(logits, labels, ks)
    return {f"top{k}": correct[min(k, logits.shape[-1])] / len(labels) for k in topk}


def confusion_matrix(pred: Tensor, labels: Tensor, n: int) -> Tensor:
    """(n, n) int64 counts; entry [i, j] is how many samples of true class i were predicted j."""
    if pred.shape != labels.shape or pred.dim() != 1:
        raise ValueError(f"pred and labels must be equal-length 1-D, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    if len(pred) and (min(pred.min(), labels.min()) < 0 or max(pred.max(), labels.max()) >= n):
        raise ValueError(f"class indices must lie in 0..{n - 1}")
    flat = labels.long() * n + pred.long()  # (N,) index of cell [label, pred]
    return torch.bincount(flat, minlength=n * n).reshape(n, n)


@torch.no_grad()
def evaluate(model, loader, classifier: Tensor, progress: bool = True) -> dict:
    """Run the zero-shot classifier over a loader of (images, labels) batches.

    Returns {"top1", "top5", "n", "confusion": (C, C) Tensor}; top5 is capped at C classes.
    """
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    n_classes = classifier.shape[1]
    ks = (1, min(5, n_classes))
    correct = {k: 0 for k in ks}
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    total = 0
    device = _model_device(model)
    for images, labels in tqdm(loader, desc="zero-shot", unit="batch", disable=not progress):
        logits = predict(model, images.to(device), classifier)  # (B, C)
        labels = labels.to(logits.device)
        for k, c in _topk_correct(logits, labels, ks).items():
            correct[k] += c
        confusion += confusion_matrix(logits.argmax(dim=1).cpu(), labels.cpu(), n_classes)
        total += len(labels)
    if total == 0:
        raise ValueError("the loader yielded no samples")
    return {"top1": correct[ks[0]] / total, "top5": correct[ks[1]] / total, "n": total, "confusion": confusion}


def clip_preprocess(image_size: int = 224):
    """CLIP's image transform: PIL image -> (3, image_size, image_size) float tensor.

    Resize the shorter side to image_size (bicubic), centre crop, scale to [0, 1],
    then normalise with CLIP's mean and std (not ImageNet's).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _image_size(model) -> int:
    """The input side a CLIP model expects (its vision config), 224 if it does not say."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision", None)
    return int(getattr(vision, "image_size", 224))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinymm zeroshot", description="Zero-shot accuracy of a CLIP checkpoint.")
    p.add_argument("--checkpoint", required=True, help="CLIP checkpoint (OpenAI, open_clip or tiny_mm)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10"])
    p.add_argument("--data-dir", required=True, help="folder that contains cifar-10-batches-py")
    p.add_argument("--templates", default="ensemble", choices=["single", "ensemble"],
                   help="ensemble: the 18 CIFAR templates of the CLIP paper; single: 'a photo of a {}.'")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--gelu", action="store_true", help="exact GELU (open_clip LAION models) instead of QuickGELU")
    p.add_argument("--no-verify-md5", action="store_true", help=argparse.SUPPRESS)  # for test copies
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm zeroshot``: print top-1/top-5 zero-shot accuracy on CIFAR-10. Returns the exit code."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        print("error: --batch-size and --limit must be positive", file=sys.stderr)
        return 2
    from tiny_mm.checkpoints import load_clip
    from tiny_mm.data.cifar import load_cifar10
    from tiny_mm.tokenizer import tokenize

    try:
        model = load_clip(args.checkpoint, quick_gelu=not args.gelu).eval()
        dataset = load_cifar10(args.data_dir, train=False, transform=clip_preprocess(_image_size(model)),
                               verify_md5=not args.no_verify_md5)
    except (FileNotFoundError, ValueError) as err:  # no file, or not a CLIP state dict: say which
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    templates = CIFAR10_TEMPLATES if args.templates == "ensemble" else SINGLE_TEMPLATE
    context = model.config.text.context_length if hasattr(model, "config") else 77
    classifier = build_classifier(model, CIFAR10_CLASSES, templates, lambda t: tokenize(t, context))
    result = evaluate(model, loader, classifier, progress=True)
    print(f"cifar10 test ({result['n']} images, {len(templates)} template(s)): "
          f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
