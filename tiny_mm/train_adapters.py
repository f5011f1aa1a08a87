"""Teach a frozen language model to caption images, training only an adapter: `tinymm train adapters`.

The experiment of chapter 8, every piece small enough for a CPU:

    image encoder  a tiny ViT (32 px images, 8 px patches: 16 patches + the class token,
                   width 64, 2 layers) trained for a few seconds to classify the shape,
                   colour, size and position of shapes images, then frozen. Its 17 output
                   tokens (after ln_post) are the image features, computed once per image.
    language model `TinyLM` pretrained on canonical shapes captions (text only), most of them
                   after their own attribute words so that it learns to read its context
                   (`--lm-stream captions`: captions alone), then frozen.
    adapters       each trained alone, on the same images and captions, with the same
                   steps, batch and learning rate:
                     flamingo  Perceiver Resampler (8 latents, 2 layers) + gated
                               xattn-dense layers before LM blocks 0 and 2
                     llava     a linear projection of the 17 tokens into the LM's input space
                     llava-mlp LLaVA-1.5's two-layer MLP instead
                     qformer   BLIP-2's Q-Former + a linear map, as a prefix (only when
                               `tiny_mm.adapters.qformer` exists)
    loss           next-word cross-entropy on the caption words (padding left out)
    evaluation     greedy captions of held-out images (a fresh seed): exact match with
                   the canonical caption, and the accuracy of each attribute read back
                   from the generated caption

Only the adapter's parameters reach the optimiser; the tests check that the frozen
parts do not move.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.adapters.flamingo import FlamingoLM
from tiny_mm.adapters.llava import LlavaProjector, PrefixLM
from tiny_mm.data.shapes import POSITIONS, SHAPES, SIZES, WHERE_WORDS, ShapesConfig, ShapesDataset, normalize
from tiny_mm.data.words import BOS, EOS, PAD, shapes_vocab
from tiny_mm.language_model import STREAMS, LMConfig, TinyLM, count_parameters, freeze, next_word_loss, pretrain_lm
from tiny_mm.vit import VisionConfig, VisionTransformer

__all__ = [
    "ADAPTERS",
    "ATTRIBUTES",
    "AdapterConfig",
    "AdapterResult",
    "ImageEncoder",
    "train_image_encoder",
    "label_tokens",
    "build_captioner",
    "qformer_available",
    "parse_caption",
    "greedy_captions",
    "caption_scores",
    "train_adapter",
    "Experiment",
    "run_experiment",
    "format_table",
    "main",
]

ATTRIBUTES = ("size", "colour", "shape", "position")
ADAPTERS = ("flamingo", "llava", "llava-mlp", "qformer")
MAX_CAPTION = 11  # <bos> a small red circle in the top left corner <eos>


# ANCHOR: AdapterConfig
@dataclass(frozen=True)
class AdapterConfig:
    """The experiment's sizes; the defaults take a few minutes on two CPU cores.

    adapters: which adapters to train (from ADAPTERS; "qformer" is skipped with a
        note when its module is missing).
    steps, batch_size, lr: of each adapter's training (AdamW, cosine decay).
    encoder_steps, lm_steps: pretraining of the frozen image encoder and language model.
    lm_stream: the language model's pretraining text (`tiny_mm.language_model.text_stream`):
        "context" (most captions follow their attribute words, so the model learns
        to read its context) or "captions" (captions alone).
    train_images, eval_images: training pool and held-out images (a different seed).
    features: "vit" (the frozen image encoder's 17 tokens) or "labels" (a perfect image
        encoder: one one-hot token per attribute, `label_tokens`), to tell an adapter
        that cannot read the image from a language model that cannot be steered.
    seed: of everything. threads: torch CPU threads (None: leave as is).
    gate_every: record Flamingo's gates every this many steps.
    """

    adapters: tuple[str, ...] = ("flamingo", "llava", "llava-mlp", "qformer")
    steps: int = 400
    batch_size: int = 64
    lr: float = 5e-3
    encoder_steps: int = 300
    lm_steps: int = 1500  # reading the context is learned late: 300 steps leave the model blind to it
    lm_stream: str = "context"
    train_images: int = 2000
    eval_images: int = 200
    features: str = "vit"
    seed: int = 0
    threads: int | None = None
    gate_every: int = 10

    def __post_init__(self) -> None:
        check_ints(self, positive=("steps", "batch_size", "encoder_steps", "lm_steps", "train_images", "eval_images", "gate_every"))
        if self.features not in ("vit", "labels"):
            raise ValueError(f"features must be 'vit' or 'labels', got {self.features!r}")
        if self.lm_stream not in STREAMS:
            raise ValueError(f"lm_stream must be one of {STREAMS}, got {self.lm_stream!r}")
        unknown = [a for a in self.adapters if a not in ADAPTERS]
        if unknown or not self.adapters:
            raise ValueError(f"adapters must be a non-empty tuple from {ADAPTERS}, got {self.adapters!r}")
        check_optimiser(self.lr)
        check_threads(self.threads)
# ANCHOR_END: AdapterConfig


@dataclass
class AdapterResult:
    """One adapter's run.

    trainable: parameters the optimiser updated; total: every parameter the captioner
    runs (image encoder + language model + adapter); fraction = trainable / total.
    exact: held-out captions equal to the canonical caption; attributes: accuracy of
    each of size, colour, shape, position read from the generated captions.
    gates: for flamingo, [(step, {block: (tanh(attn_gate), tanh(ff_gate))})].
    """

    name: str
    trainable: int
    total: int
    exact: float
    attributes: dict[str, float]
    seconds: float
    losses: list[float]
    samples: list[tuple[str, str]] = field(default_factory=list)  # (generated, true) for a few images
    gates: list[tuple[int, dict[int, tuple[float, float]]]] = field(default_factory=list)
    model: nn.Module | None = None  # the trained captioner, in eval mode

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


# --------------------------------------------------------------------------- the frozen image encoder


# ANCHOR: ImageEncoder
class ImageEncoder(nn.Module):
    """A tiny ViT whose output tokens are the image features; linear heads train it.

    Shapes: forward(images (B, 3, 32, 32) in [0, 1]) -> features (B, 17, 64):
        the class token and 16 patch tokens after ln_post.
        classify(images) -> {attribute: logits (B, classes)}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=64, quick_gelu=False)
        )
        sizes = {"size": len(SIZES), "colour": len(ShapesConfig().colours), "shape": len(SHAPES), "position": len(POSITIONS)}
        self.heads = nn.ModuleDict({name: nn.Linear(64, n) for name, n in sizes.items()})

    def forward(self, images: Tensor) -> Tensor:
        _, tokens = self.vit(normalize(images), return_tokens=True)  # (B, 17, 64)
        return tokens

    def classify(self, images: Tensor) -> dict[str, Tensor]:
        embedding = self.vit(normalize(images))  # (B, 64)
        return {name: head(embedding) for name, head in self.heads.items()}  # (B, classes) each
# ANCHOR_END: ImageEncoder


def train_image_encoder(images: Tensor, labels: dict[str, Tensor], steps: int, seed: int = 0,
                        batch_size: int = 64, lr: float = 3e-3) -> ImageEncoder:
    """Train `ImageEncoder` to classify the four attributes (summed cross-entropy); return it frozen."""
    torch.manual_seed(seed)
    encoder = ImageEncoder()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    encoder.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(images), (batch_size,), generator=generator)  # (b,)
        logits = encoder.classify(images[index])
        loss = sum(F.cross_entropy(logits[k], labels[k][index]) for k in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return freeze(encoder)


def label_tokens(labels: dict[str, Tensor]) -> Tensor:
    """A perfect image encoder: the true attributes as 4 one-hot tokens (B, 4, 22).

    Token k is the one-hot of attribute ATTRIBUTES[k] in its own slice of the 22
    features (2 sizes, 6 colours, 5 shapes, 9 positions), so a linear map can turn
    each token into any vector at all, the attribute's word embedding included.
    """
    counts = {"size": len(SIZES), "colour": len(ShapesConfig().colours), "shape": len(SHAPES), "position": len(POSITIONS)}
    blocks = [F.one_hot(labels[a], counts[a]).float() for a in ATTRIBUTES]  # (B, n_a) each
    width = sum(counts.values())
    tokens = torch.zeros(len(blocks[0]), len(ATTRIBUTES), width)  # (B, 4, 22)
    start = 0
    for k, block in enumerate(blocks):
        tokens[:, k, start:start + block.shape[1]] = block
        start += block.shape[1]
    return tokens


# --------------------------------------------------------------------------- the captioners


class _FlamingoOneImage(nn.Module):
    """`FlamingoLM` on the captioning sequence ``<image> <bos> w1 ... <eos>``.

    The vocabulary has no <image> word, so the marker is the <bos> position: every
    word reads the one image. Shapes: forward(ids (B, L), features (B, N, d_img)) -> (B, L, V).
    """

    def __init__(self, flamingo: FlamingoLM) -> None:
        super().__init__()
        self.flamingo = flamingo

    def forward(self, ids: Tensor, features: Tensor) -> Tensor:
        marks = torch.zeros_like(ids, dtype=torch.bool)  # (B, L)
        marks[:, 0] = True
        return self.flamingo(ids, features[:, None], marks)  # (B, L, V)


def qformer_available() -> bool:
    """Whether BLIP-2's Q-Former (`tiny_mm.adapters.qformer.QFormer`) is there to train."""
    try:
        from tiny_mm.adapters.qformer import QFormer  # noqa: F401
    except ImportError:
        return False
    return True


# ANCHOR: qformer_adapter
def _qformer_adapter(media_width: int, width: int) -> nn.Module:
    """BLIP-2's bridge: a Q-Former reads the image features, a linear map puts its queries in the LM's space.

    Shapes: features (B, N, media_width) -> (B, num_queries, width).
    """
    from tiny_mm.adapters.qformer import QFormer

    # No text side: only the queries run (BLIP-2's second stage). Trained here from scratch through
    # the frozen LM alone, without BLIP-2's first stage (ITC, ITM, ITG on image-text pairs).
    qformer = QFormer(num_queries=8, width=64, heads=2, depth=2, image_width=media_width, cross_attention_every=1)
    to_lm = nn.Linear(64, width)
    nn.init.zeros_(to_lm.weight)  # a blank prefix at the start, as `LlavaProjector` does
    nn.init.zeros_(to_lm.bias)
    return nn.Sequential(qformer, to_lm)  # (B, 8, d): 8 query outputs as the prefix
# ANCHOR_END: qformer_adapter


# ANCHOR: build_captioner
def build_captioner(name: str, lm: TinyLM, media_width: int) -> nn.Module:
    """The frozen lm with adapter `name` around it: forward(ids (B, L), features (B, N, d_img)) -> (B, L, V)."""
    width = lm.config.width
    if name == "flamingo":
        return _FlamingoOneImage(FlamingoLM(lm, media_width, num_latents=8, resampler_layers=2, every=2))
    if name == "llava":
        return PrefixLM(lm, LlavaProjector(media_width, width, "linear"))
    if name == "llava-mlp":
        return PrefixLM(lm, LlavaProjector(media_width, width, "mlp"))
    if name == "qformer":
        return PrefixLM(lm, _qformer_adapter(media_width, width))
    raise ValueError(f"unknown adapter {name!r}; choose from {ADAPTERS}")
# ANCHOR_END: build_captioner


# --------------------------------------------------------------------------- evaluation


_WHERE = {phrases[0]: position for position, phrases in WHERE_WORDS.items()}  # canonical phrase -> position


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the four attributes back from a canonical caption; None for any part that is not there.

    "an orange star in the centre" -> {"size": None, ...} (no size word), and
    "a small red circle on the left" -> {"size": "small", "colour": "red", "shape": "circle", "position": "left"}.
    """
    match = re.fullmatch(r"an? (\w+) (\w+) (\w+) (.+)", text)
    if match is None:
        return dict.fromkeys(ATTRIBUTES)
    size, colour, shape, where = match.groups()
    return {
        "size": size if size in SIZES else None,
        "colour": colour if colour in ShapesConfig().colours else None,
        "shape": shape if shape in SHAPES else None,
        "position": _WHERE.get(where),
    }


# ANCHOR: greedy_captions
@torch.no_grad()
def greedy_captions(model: nn.Module, features: Tensor, max_len: int = MAX_CAPTION) -> Tensor:
    """Greedy decoding: ids (B, <= max_len), starting at <bos>, <pad> after each row's <eos>.

    No key/value cache: a caption is at most 11 words, so re-running the short
    sequence each step costs little (chapter 6's decoder shows the cache).
    """
    ids = torch.full((features.shape[0], 1), BOS, dtype=torch.long)  # (B, 1)
    done = torch.zeros(features.shape[0], dtype=torch.bool)  # (B,)
    for _ in range(max_len - 1):
        next_id = model(ids, features)[:, -1].argmax(dim=-1)  # (B,)
        next_id = torch.where(done, PAD, next_id)  # (B,)
        ids = torch.cat([ids, next_id[:, None]], dim=1)  # (B, t + 1)
        done |= next_id == EOS
        if bool(done.all()):
            break
    return ids
# ANCHOR_END: greedy_captions


def caption_scores(generated: Sequence[str], truth: Sequence[str]) -> tuple[float, dict[str, float]]:
    """(exact-match rate, {attribute: accuracy}) of generated captions against the true ones."""
    if len(generated) != len(truth) or not truth:
        raise ValueError(f"need as many generated captions as true ones (at least 1), got {len(generated)} and {len(truth)}")
    exact = sum(g == t for g, t in zip(generated, truth)) / len(truth)
    parsed = [(parse_caption(g), parse_caption(t)) for g, t in zip(generated, truth)]
    attributes = {a: sum(g[a] is not None and g[a] == t[a] for g, t in parsed) / len(truth) for a in ATTRIBUTES}
    return exact, attributes


# --------------------------------------------------------------------------- training


# ANCHOR: train_adapter
def train_adapter(
    name: str, lm: TinyLM, encoder: nn.Module, features: Tensor, ids: Tensor, config: AdapterConfig,
    eval_features: Tensor | None = None, eval_captions: Sequence[str] | None = None,
) -> AdapterResult:
    """Train only adapter `name` on (features (N, T, d_img), caption ids (N, L)); evaluate on held-out images.

    The language model and the image encoder stay frozen: only parameters with
    requires_grad reach AdamW, and those all belong to the adapter.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_captioner(name, lm, features.shape[-1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    flamingo = model.flamingo if isinstance(model, _FlamingoOneImage) else None
    gates = [(0, flamingo.gates())] if flamingo is not None else []
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        index = torch.randint(len(ids), (config.batch_size,), generator=generator)  # (b,)
        loss = next_word_loss(model(ids[index], features[index]), ids[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if flamingo is not None and ((step + 1) % config.gate_every == 0 or step + 1 == config.steps):
            gates.append((step + 1, flamingo.gates()))
    model.eval()
    exact, attributes, samples = float("nan"), dict.fromkeys(ATTRIBUTES, float("nan")), []
    if eval_features is not None and eval_captions is not None:
        vocab = shapes_vocab()
        generated = [vocab.decode(row) for row in greedy_captions(model, eval_features)]
        exact, attributes = caption_scores(generated, eval_captions)
        samples = list(zip(generated[:8], eval_captions[:8]))
    total = count_parameters(model) + count_parameters(encoder)
    return AdapterResult(name, sum(p.numel() for p in trainable), total, exact, attributes,
                         time.perf_counter() - start, losses, samples, gates, model)
# ANCHOR_END: train_adapter


# ANCHOR: run_experiment
@dataclass
class Experiment:
    """What `run_experiment` returns: the frozen parts, the data and one result per adapter."""

    encoder: ImageEncoder
    lm: TinyLM
    lm_losses: list[float]
    results: list[AdapterResult]
    skipped: list[str]
    eval_images: Tensor
    eval_captions: list[str]
    seconds: float


def run_experiment(config: AdapterConfig = AdapterConfig(), *, progress: bool = True) -> Experiment:
    """Pretrain and freeze the image encoder and the LM, then train each adapter alone."""
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        say = print if progress else (lambda *a, **k: None)
        shapes = ShapesConfig(captions="canonical")
        images, captions, labels = ShapesDataset(config.train_images, shapes, seed=config.seed).materialize()
        eval_images, eval_captions, eval_labels = ShapesDataset(config.eval_images, shapes, seed=config.seed + 1).materialize()
        encoder = train_image_encoder(images, labels, config.encoder_steps, config.seed)
        lm, lm_losses = pretrain_lm(LMConfig(), steps=config.lm_steps, seed=config.seed, stream=config.lm_stream)
        say(f"frozen parts ready in {time.perf_counter() - start:.1f} s: image encoder "
            f"{count_parameters(encoder):,} parameters, language model {count_parameters(lm):,} "
            f"(text loss {lm_losses[-1]:.3f})", file=sys.stderr)
        with torch.no_grad():  # the encoder is frozen: its features are computed once per image
            features, eval_features = encoder(images), encoder(eval_images)  # (N, 17, 64) each
        if config.features == "labels":  # the perfect encoder instead: (N, 4, 22) each
            features, eval_features = label_tokens(labels), label_tokens(eval_labels)
        ids, _ = shapes_vocab().encode(captions)  # (N, L)
        results, skipped = [], []
        for name in config.adapters:
            if name == "qformer" and not qformer_available():
                skipped.append(name)
                say("qformer: tiny_mm.adapters.qformer is not there yet; skipped", file=sys.stderr)
                continue
            result = train_adapter(name, lm, encoder, features, ids, config, eval_features, eval_captions)
            say(f"{name}: {result.seconds:.1f} s, exact {100 * result.exact:.1f}%", file=sys.stderr)
            results.append(result)
        return Experiment(encoder, lm, lm_losses, results, skipped, eval_images, eval_captions,
                          time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
# ANCHOR_END: run_experiment


# --------------------------------------------------------------------------- command line


def format_table(results: Sequence[AdapterResult]) -> str:
    """The report: one row per adapter."""
    head = f"{'adapter':<10} {'trainable':>10} {'total':>9} {'fraction':>8} {'exact':>6} " + " ".join(
        f"{a:>8}" for a in ATTRIBUTES) + f" {'seconds':>7}"
    rows = [head]
    for r in results:
        rows.append(f"{r.name:<10} {r.trainable:>10,} {r.total:>9,} {100 * r.fraction:>7.1f}% "
                    f"{100 * r.exact:>5.1f}% " + " ".join(f"{100 * r.attributes[a]:>7.1f}%" for a in ATTRIBUTES)
                    + f" {r.seconds:>7.1f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train adapters``: run the experiment and print the table. Returns the exit code."""
    defaults = AdapterConfig()
    p = argparse.ArgumentParser(
        prog="tinymm train adapters",
        description="Caption shapes images with a frozen tiny language model, training only an adapter "
        "(Flamingo, LLaVA, LLaVA-1.5's MLP, BLIP-2's Q-Former); report trainable fraction and accuracy.",
    )
    p.add_argument("--adapters", default=",".join(defaults.adapters),
                   help=f"comma-separated, from {','.join(ADAPTERS)} (default: all)")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"steps per adapter (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"(default {defaults.batch_size})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"adapter learning rate (default {defaults.lr})")
    p.add_argument("--encoder-steps", type=int, default=defaults.encoder_steps,
                   help=f"image encoder pretraining steps (default {defaults.encoder_steps})")
    p.add_argument("--lm-steps", type=int, default=defaults.lm_steps,
                   help=f"language model pretraining steps (default {defaults.lm_steps})")
    p.add_argument("--lm-stream", choices=STREAMS, default=defaults.lm_stream,
                   help="the language model's pretraining text: 'context' (most captions follow their "
                   f"attribute words) or 'captions' alone (default {defaults.lm_stream})")
    p.add_argument("--features", choices=("vit", "labels"), default=defaults.features,
                   help="image features: the frozen ViT's tokens, or the true labels as one-hot tokens "
                   f"(a perfect encoder) (default {defaults.features})")
    p.add_argument("--train-images", type=int, default=defaults.train_images, help=f"(default {defaults.train_images})")
    p.add_argument("--eval-images", type=int, default=defaults.eval_images, help=f"(default {defaults.eval_images})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="(default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    try:
        config = AdapterConfig(
            adapters=tuple(a.strip() for a in args.adapters.split(",") if a.strip()), steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, encoder_steps=args.encoder_steps, lm_steps=args.lm_steps,
            lm_stream=args.lm_stream, features=args.features,
            train_images=args.train_images, eval_images=args.eval_images, seed=args.seed, threads=args.threads,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    experiment = run_experiment(config, progress=not args.quiet)
    print(f"held-out images: {config.eval_images}; {config.steps} steps of batch {config.batch_size} per adapter; "
          f"{experiment.seconds:.1f} s in all on {config.threads or torch.get_num_threads()} thread(s); "
          f"language model pretrained on the {config.lm_stream!r} stream; {config.features} features")
    print(format_table(experiment.results))
    for name in experiment.skipped:
        print(f"{name}: skipped (its module is not in this tree)")
    for r in experiment.results:
        if r.gates:
            step, gates = r.gates[-1]
            opened = ", ".join(f"block {i}: attn {a:+.2f} ff {f:+.2f}" for i, (a, f) in gates.items())
            print(f"flamingo gates tanh(alpha) after {step} steps: {opened}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
