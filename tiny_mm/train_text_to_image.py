"""Two text-to-image generators trained on a CPU and judged by a CLIP: `tinymm train text-to-image`.

The experiment of chapter 11, on the shapes images (32 x 32, one shape; the captions
say its colour, shape, size and position):

    data        `train_images` images of the 25 colour-shape pairs CLIP trains on, with
                varied captions; the 5 held-out pairs (`split_by_combinations`: red star,
                blue square, yellow cross, purple circle, orange triangle) are never shown
                to any model
    tokenizer   `tiny_mm.vqvae.VQVAE`: 64 codes of 64 per image, shared by both generators
    dalle       `tiny_mm.dalle.TinyDalle`: [caption words, 64 codes], next-token
                cross-entropy; sampled with temperature and top-k
    diffusion   `tiny_mm.unet.TextUNet` on the pixels (or the transformer
                `tiny_mm.denoiser.TextDenoiser` on 4 x 4 pixel patches, or on the VQ-VAE's
                latents before quantisation with --space latents, as Stable Diffusion does
                on its VAE's); a cosine schedule of 1000 steps, v-prediction with the error
                weighted as the x0 it implies, the caption dropped for 10% of the examples;
                sampled with DDIM and classifier-free guidance
    judge       a tiny CLIP (`tiny_mm.train_clip`, chapter 5; trained here or loaded with
                --clip), zero-shot among all 30 colour-shape classes with its prompt
                ensemble: a sample *matches* when the class it sees is the prompt's colour
                and shape. The same judge on real images of the same prompts is the
                ceiling of the score: CLIP errs too.
    prompts     canonical captions ("a small red star on the left") of fresh images, for
                the seen pairs and for the held-out ones; one sample per prompt per setting

Nothing here asserts a score: the command reports what it measured (the chapter records
a run), and the tests check the machinery.
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

import numpy as np
import torch
from torch import Tensor, nn

from tiny_mm.checks import check_ints, check_optimiser, check_threads
from tiny_mm.dalle import DalleConfig, TinyDalle, dalle_loss, generate
from tiny_mm.data.shapes import (
    ZERO_SHOT_TEMPLATES,
    ShapesConfig,
    ShapesDataset,
    class_names,
    normalize,
    split_by_combinations,
)
from tiny_mm.data.words import shapes_vocab
from tiny_mm.diffusion import NoiseSchedule, sample
from tiny_mm.denoiser import Caption, DenoiserConfig, TextDenoiser, caption_dropout, patchify, unpatchify
from tiny_mm.unet import TextUNet, UNetConfig
from tiny_mm.training import comma_names, import_kernels_first, out_folder_problem, warmup_cosine
from tiny_mm.vqvae import VQVAE, VQVAEConfig, train_vqvae

__all__ = [
    "GENERATORS",
    "TextToImageSettings",
    "Captioned",
    "token_shape",
    "transformer_denoiser",
    "make_images",
    "encode_images",
    "ClipJudge",
    "train_dalle",
    "train_denoiser",
    "sample_dalle",
    "sample_diffusion",
    "Score",
    "ScoreRow",
    "TextToImageResult",
    "run_experiment",
    "format_table",
    "main",
]

GENERATORS = ("dalle", "diffusion")
PATCH = 4  # pixels per side of one diffusion token, when the diffusion runs on pixels
LOSS_WEIGHTINGS = ("x0", "v")


# --------------------------------------------------------------------------- settings


# ANCHOR: TextToImageSettings
@dataclass(frozen=True)
class TextToImageSettings:
    """What to train and how to judge it; the defaults are the chapter's run.

    generators: which of GENERATORS to train (the VQ-VAE is trained for either).
    train_images: images (of the 25 seen colour-shape pairs) every model trains on.
    sizes: the shape sizes of every image, training and prompts. Large only by default: a
        small shape is 7 pixels across, and the 64-code tokenizer trained for a minute turns a
        quarter of the small stars and crosses into blobs (the chapter has the figures).
    batch_size, lr, warmup: every model's AdamW (weight decay 0.01), linear warm-up,
        cosine decay to 0, gradients clipped at norm 1 (the VQ-VAE: Adam, constant lr,
        its own recipe in `train_vqvae`).
    vqvae_steps, dalle_steps, diffusion_steps: optimiser steps of each model.
    vqvae, dalle: the models' sizes.
    denoiser: the diffusion's network, by the kind of its sizes: a `UNetConfig` (the U-Net,
        pixels only) or a `DenoiserConfig` (the transformer, pixels or latents).
    space: what the diffusion denoises: "pixels" (4 x 4 patches, 64 tokens of 48 numbers in
        [-1, 1]) or "latents" (the VQ-VAE's 64 vectors before quantisation, standardised per
        channel, snapped to the codebook at the end).
    schedule, schedule_steps: the diffusion's noise schedule ("cosine" or "linear") and T.
    loss_weighting: how the diffusion's squared error of v counts at step t: "x0" weighs it by
        1 - abar_t, which makes it the squared error of the x0 the prediction implies (the
        noisy steps, where the caption decides the picture, count fully; the last few, whose
        target is mostly the images' own pixel noise, hardly at all); "v" counts every step
        alike (Salimans & Ho's loss).
    caption_dropout: probability that a diffusion training caption becomes the empty one.
    sample_steps: DDIM steps per diffusion sample (deterministic, eta = 0).
    guidance: the classifier-free guidance scales to judge (0: unconditional, 1: no guidance).
    temperature, top_k: the DALL·E sampler's settings to judge, one row per pair.
    prompts: prompts per split (seen pairs, held-out pairs); one sample each per setting.
    clip_steps, clip_batch, clip_images: steps, batch and training pool of the judge
        (`tiny_mm.train_clip`, chapter 5's recipe otherwise), when no --clip is given.
    seed: seeds the data (training images 10 seed + 1, prompts 10 seed + 2), the weights,
        the batches and the samples.
    threads: torch CPU threads during the run (None: leave torch's setting).
    """

    generators: tuple[str, ...] = GENERATORS
    train_images: int = 6000
    sizes: tuple[str, ...] = ("large",)
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    vqvae_steps: int = 1200
    dalle_steps: int = 1500
    diffusion_steps: int = 2000
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    dalle: DalleConfig = field(default_factory=lambda: DalleConfig(width=96, layers=3))
    denoiser: UNetConfig | DenoiserConfig = field(default_factory=UNetConfig)
    space: str = "pixels"
    schedule: str = "cosine"
    schedule_steps: int = 1000
    loss_weighting: str = "x0"
    caption_dropout: float = 0.1
    sample_steps: int = 25
    guidance: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    temperature: tuple[float, ...] = (1.0, 0.7, 0.3)
    top_k: int | None = None
    prompts: int = 100
    clip_steps: int = 600
    clip_batch: int = 256
    clip_images: int = 4096
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check_ints(self, positive=("train_images", "batch_size", "vqvae_steps", "dalle_steps", "diffusion_steps",
                                   "schedule_steps", "sample_steps", "prompts", "clip_steps",
                                   "clip_batch", "clip_images"),
                   non_negative=("warmup", "seed"))
        check_optimiser(self.lr)
        check_threads(self.threads)
        g = self.generators
        if not isinstance(g, tuple) or not g or any(x not in GENERATORS for x in g) or len(set(g)) != len(g):
            raise ValueError(f"generators must be a non-empty tuple of names from {GENERATORS}, got {g!r}")
        if self.batch_size > self.train_images:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {self.train_images} train_images")
        for name, kind in (("vqvae", VQVAEConfig), ("dalle", DalleConfig), ("denoiser", (UNetConfig, DenoiserConfig))):
            if not isinstance(getattr(self, name), kind):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ValueError(f"{name} must be a {names}, got {type(getattr(self, name)).__name__}")
        v, d, n = self.vqvae, self.dalle, self.denoiser
        if v.image_size != 32:
            raise ValueError(f"vqvae.image_size must be 32, the judge's image size, got {v.image_size}")
        if (d.num_codes, d.image_tokens) != (v.num_codes, v.num_tokens):
            raise ValueError(f"dalle needs num_codes = {v.num_codes} and image_tokens = {v.num_tokens} "
                             f"(the VQ-VAE's), got {d.num_codes} and {d.image_tokens}")
        if self.space not in ("pixels", "latents"):
            raise ValueError(f"space must be 'pixels' or 'latents', got {self.space!r}")
        if isinstance(n, UNetConfig) and (self.space != "pixels" or (n.image_size, n.patch) != (v.image_size, PATCH)):
            raise ValueError(f"the U-Net denoises pixels: it needs space 'pixels', image_size {v.image_size} and "
                             f"patch {PATCH}, got {self.space!r}, {n.image_size} and {n.patch}")
        want = token_shape(v, self.space)
        if (n.token_dim, n.num_tokens) != want:
            raise ValueError(f"denoiser needs token_dim = {want[0]} and num_tokens = {want[1]} for space "
                             f"{self.space!r}, got {n.token_dim} and {n.num_tokens}")
        words = len(shapes_vocab())
        if d.text_vocab != words or n.text_vocab != words:
            raise ValueError(f"text_vocab must be the {words} words of shapes_vocab()")
        if not isinstance(self.sizes, tuple) or not self.sizes or any(x not in ("small", "large") for x in self.sizes):
            raise ValueError(f"sizes must be a non-empty tuple of 'small' and 'large', got {self.sizes!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.loss_weighting == "x0" and n.prediction != "v":
            raise ValueError("loss_weighting 'x0' weighs a v-prediction's error; with prediction 'eps' "
                             "use loss_weighting 'v' (every step alike, Ho et al.'s loss)")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        for name in ("guidance", "temperature"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values or any(
                    isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0
                    for x in values):
                raise ValueError(f"{name} must be a non-empty tuple of finite numbers >= 0, got {values!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and 1 <= self.top_k <= v.num_codes):
            raise ValueError(f"top_k must be None or an int in [1, {v.num_codes}], got {self.top_k!r}")

    @classmethod
    def quick(cls, **changes: object) -> "TextToImageSettings":
        """A run of seconds (tests, `--quick`): tiny models, a few steps, 8 prompts per split."""
        small = cls(
            train_images=128, batch_size=16, warmup=2, vqvae_steps=6, dalle_steps=6, diffusion_steps=6,
            vqvae=VQVAEConfig(hidden=16, code_dim=8, num_codes=16),
            dalle=DalleConfig(num_codes=16, width=32, layers=1, heads=2),
            denoiser=UNetConfig(channels=8, groups=4, heads=2, text_width=16),
            schedule_steps=50, sample_steps=3, prompts=8, clip_steps=4, clip_batch=32, clip_images=128,
        )
        return replace(small, **changes)
# ANCHOR_END: TextToImageSettings


def token_shape(vqvae: VQVAEConfig, space: str) -> tuple[int, int]:
    """(C numbers per token, N tokens) of what the diffusion denoises: PATCH x PATCH pixel
    patches, or the VQ-VAE's latents."""
    if space == "pixels":
        return 3 * PATCH**2, (vqvae.image_size // PATCH) ** 2
    return vqvae.code_dim, vqvae.num_tokens


def transformer_denoiser(vqvae: VQVAEConfig, space: str, *, quick: bool = False) -> DenoiserConfig:
    """The transformer denoiser's sizes for ``space``: width 96 and 4 layers, or the quick run's 32 and 1."""
    token_dim, num_tokens = token_shape(vqvae, space)
    sizes = dict(width=32, layers=1, heads=2, text_width=16) if quick else dict(width=96, layers=4)
    return DenoiserConfig(token_dim=token_dim, num_tokens=num_tokens, **sizes)


# --------------------------------------------------------------------------- data


class Captioned(NamedTuple):
    """Images with their captions: images (N, 3, 32, 32) in [0, 1], ids (N, T) long, lengths (N,),
    classes (N,) the (colour, shape) class among all 30 (`ShapesConfig().combinations`), captions."""

    images: Tensor
    ids: Tensor
    lengths: Tensor
    classes: Tensor
    captions: list[str]


def make_images(n: int, combinations: Sequence[tuple[str, str]], seed: int, *, captions: str = "varied",
                sizes: Sequence[str] = ("small", "large"), text_len: int = 16) -> Captioned:
    """Render n shapes images of ``combinations`` and ``sizes`` (stream ``seed``) and encode their captions."""
    config = ShapesConfig(captions=captions, sizes=tuple(sizes))
    images, texts, labels = ShapesDataset(n, config, seed=seed, combinations=list(combinations)).materialize()
    ids, lengths = shapes_vocab().encode(texts, max_len=text_len)  # (N, T), (N,)
    return Captioned(images, ids, lengths, labels["combo"], texts)


def _one_prompt_each(pairs: Sequence[tuple[str, str]], seed: int, sizes: Sequence[str], text_len: int) -> Captioned:
    """One image with a canonical caption for each (colour, shape) pair, in order."""
    parts = [make_images(1, [pair], seed + i, captions="canonical", sizes=sizes, text_len=text_len)
             for i, pair in enumerate(pairs)]
    return Captioned(*(torch.cat([getattr(x, f) for x in parts]) for f in ("images", "ids", "lengths", "classes")),
                     [c for x in parts for c in x.captions])


@torch.no_grad()
def encode_images(vqvae: VQVAE, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    """(codes (N, 64) long, latents before quantisation (N, 64, code_dim)) of images (N, 3, 32, 32)."""
    vqvae.eval()
    latents = torch.cat([vqvae.encode_latents(images[i : i + batch]) for i in range(0, len(images), batch)])
    return vqvae.quantizer.nearest(latents), latents


# --------------------------------------------------------------------------- the judge


# ANCHOR: ClipJudge
class ClipJudge:
    """A CLIP that says which of the 30 colour-shape classes an image shows.

    The zero-shot classifier of chapter 5: each class name ("red star") in every
    template of ZERO_SHOT_TEMPLATES, the normalised mean of their text embeddings.
    """

    def __init__(self, clip: nn.Module) -> None:
        from tiny_mm.tokenizer import tokenize
        from tiny_mm.zeroshot import build_classifier

        self.clip = clip.eval()
        self.classes = ShapesConfig().combinations  # (colour, shape), colour-major
        context = clip.config.text.context_length
        with torch.no_grad():
            self.classifier = build_classifier(clip, class_names(self.classes), list(ZERO_SHOT_TEMPLATES),
                                               lambda texts: tokenize(texts, context))  # (E, 30)

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Images (N, 3, 32, 32) in [0, 1] -> the class each shows (N,) long."""
        from tiny_mm.zeroshot import predict

        return predict(self.clip, normalize(images.clamp(0, 1)), self.classifier).argmax(dim=1)

    def score(self, images: Tensor, classes: Tensor) -> "Score":
        """How often the class seen is the prompt's class, colour and shape: images (N, ...), classes (N,)."""
        seen = self.classify(images)  # (N,)
        pairs = [self.classes[i] for i in seen.tolist()], [self.classes[i] for i in classes.tolist()]
        n = len(classes)
        return Score(
            match=sum(a == b for a, b in zip(*pairs)) / n,
            colour=sum(a[0] == b[0] for a, b in zip(*pairs)) / n,
            shape=sum(a[1] == b[1] for a, b in zip(*pairs)) / n,
        )
# ANCHOR_END: ClipJudge


def _judge(clip_path: str | Path | None, settings: TextToImageSettings, say) -> tuple[ClipJudge, str]:
    """The judge: the CLIP at clip_path, or one trained now with train_clip's recipe."""
    if clip_path is not None:
        from tiny_mm.checkpoints import load_clip

        path = Path(clip_path)
        if not path.is_file():
            raise FileNotFoundError(f"no CLIP checkpoint at {path}: make one with "
                                    f"`tinymm train clip --out {path}`, or leave --clip out to train one here")
        return ClipJudge(load_clip(path)), str(path)
    from tiny_mm.train_clip import TrainConfig, train_clip

    config = TrainConfig(steps=settings.clip_steps, batch_size=settings.clip_batch, train_images=settings.clip_images,
                         seed=settings.seed, threads=settings.threads)
    say(f"training the judge: a tiny CLIP, {config.steps} steps of {config.batch_size} (chapter 5's recipe)")
    result = train_clip(config, progress=False)
    return ClipJudge(result.model), f"trained here ({config.steps} steps)"


# --------------------------------------------------------------------------- training


def _optimise(model: nn.Module, steps: int, settings: TextToImageSettings, loss_of_step, label: str,
              progress: bool) -> list[float]:
    """The loop both generators share: AdamW, warm-up + cosine, clipping at 1; returns the losses."""
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in a notebook without ipywidgets

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=label, unit="step", disable=not progress, file=sys.stderr, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, steps, settings.lr, settings.warmup)
        loss = loss_of_step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


# ANCHOR: train_dalle
def train_dalle(codes: Tensor, data: Captioned, settings: TextToImageSettings, *,
                progress: bool = False) -> tuple[TinyDalle, list[float]]:
    """Teach a TinyDalle to continue each caption (N, T) with its image's codes (N, 64)."""
    torch.manual_seed(settings.seed)
    model = TinyDalle(settings.dalle)
    batches = torch.Generator().manual_seed(settings.seed)

    def loss_of_step() -> Tensor:
        rows = torch.randint(len(codes), (settings.batch_size,), generator=batches)  # (b,)
        return dalle_loss(model, data.ids[rows], codes[rows])

    return model, _optimise(model, settings.dalle_steps, settings, loss_of_step, "dalle", progress)
# ANCHOR_END: train_dalle


# ANCHOR: train_denoiser
def train_denoiser(tokens: Tensor, data: Captioned, settings: TextToImageSettings, *,
                   progress: bool = False) -> tuple[TextUNet | TextDenoiser, NoiseSchedule, list[float]]:
    """Teach a denoiser (settings.denoiser: the U-Net or the transformer) to denoise noised
    image tokens (N, 64, C), reading the captions.

    tokens: pixel patches in [0, 1] (`patchify`) or VQ-VAE latents, as settings.space says.
    Each step: the scaled tokens x0 of a batch, a uniform step t and noise eps
    per example, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the squared
    error of the predicted v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (or of eps,
    with denoiser.prediction = "eps"), per example weighted as settings.loss_weighting
    says; each caption becomes the empty one with probability caption_dropout, so
    the same network also learns the unconditional model that guidance needs.
    """
    torch.manual_seed(settings.seed)
    network = TextUNet if isinstance(settings.denoiser, UNetConfig) else TextDenoiser
    model = network(settings.denoiser)
    if settings.space == "pixels":
        model.scaler.set(0.5, 0.5)  # [0, 1] -> [-1, 1]
    else:
        model.scaler.fit(tokens)  # unit variance per channel, as the schedule assumes
    x0_all = model.scaler.scale(tokens).float()  # (N, 64, C)
    schedule = NoiseSchedule(settings.schedule_steps, settings.schedule)
    draws = torch.Generator().manual_seed(settings.seed)
    noise_share = (1.0 - schedule.alphas_cumprod).float()  # (T,): 1 - abar_t

    def loss_of_step() -> Tensor:
        rows = torch.randint(len(x0_all), (settings.batch_size,), generator=draws)  # (b,)
        t, eps, x_t = schedule.training_example(x0_all[rows], draws)  # (b,), (b, 64, C), (b, 64, C)
        caption = caption_dropout(Caption(data.ids[rows], data.lengths[rows]), settings.caption_dropout, draws)
        error = (model(x_t, t, caption) - model.target(schedule, x0_all[rows], t, eps)).square().mean(dim=(1, 2))
        if settings.loss_weighting == "x0":
            # ||x0 - x0_hat||^2 = (1 - abar_t) ||v - v_hat||^2, since x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat
            error = noise_share[t] * error
        return error.mean()

    return model, schedule, _optimise(model, settings.diffusion_steps, settings, loss_of_step, "diffusion", progress)
# ANCHOR_END: train_denoiser


# --------------------------------------------------------------------------- sampling


# ANCHOR: sampling
@torch.no_grad()
def sample_dalle(model: TinyDalle, vqvae: VQVAE, ids: Tensor, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Images (N, 3, 32, 32) for caption ids (N, T): write 64 codes each, decode them."""
    codes = generate(model, ids, temperature=temperature, top_k=top_k, generator=generator).codes  # (N, 64)
    return vqvae.decode_codes(codes)


@torch.no_grad()
def sample_diffusion(model: TextUNet | TextDenoiser, schedule: NoiseSchedule, caption: Caption, *,
                     vqvae: VQVAE | None = None, guidance: float = 1.0, steps: int = 25,
                     generator: torch.Generator | None = None) -> Tensor:
    """Images (N, 3, 32, 32) for captions: DDIM from noise with classifier-free guidance.

    vqvae None: the tokens are pixel patches; each step's predicted x0 is clipped to
    [-1, 1], the pixels' range. With a vqvae: the tokens are its latents; the final
    ones are snapped to their nearest codes and decoded (the VQ-regularised decoder).
    """
    c = model.config
    shape = (len(caption.ids), c.num_tokens, c.token_dim)
    x = sample(model.eps(schedule), shape, schedule, steps=steps, method="ddim", cond=caption, uncond=None,
               guidance=guidance, clip_x0=1.0 if vqvae is None else None, generator=generator)  # (N, 64, C)
    tokens = model.scaler.unscale(x)
    if vqvae is None:
        return unpatchify(tokens, PATCH).clamp(0, 1)  # (N, 3, 32, 32)
    return vqvae.decode_codes(vqvae.quantizer.nearest(tokens))
# ANCHOR_END: sampling


# --------------------------------------------------------------------------- the experiment


@dataclass
class Score:
    """Fractions of samples whose judged class is the prompt's class, colour, shape."""

    match: float
    colour: float
    shape: float


@dataclass
class ScoreRow:
    """One generator and setting (or the real images): its scores on the seen and held-out prompts."""

    generator: str  # "real", "dalle" or "diffusion"
    setting: str  # "T=1", "w=3", ...
    seen: Score
    heldout: Score
    seconds: float  # sampling both splits


@dataclass
class TextToImageResult:
    """What `run_experiment` returns and `--out DIR` writes (results.json, samples.npz).

    settings: `asdict(TextToImageSettings)`; rows: `ScoreRow`s, the real images first;
    models: {name: {"params", "seconds", "final_loss"}}; judge: where the CLIP came from;
    seconds: the whole run. samples: {row label: uint8 (P, K, 32, 32, 3)} images for the
    grid prompts, and grid_prompts their captions (P,). trained: the models (not saved).
    """

    settings: dict
    rows: list[ScoreRow]
    models: dict[str, dict]
    judge: str
    seconds: float
    threads: int
    grid_prompts: list[str] = field(default_factory=list)
    samples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    losses: dict[str, list[float]] = field(default_factory=dict, repr=False)
    trained: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "judge": self.judge, "seconds": self.seconds, "threads": self.threads,
                "models": self.models, "rows": [asdict(r) for r in self.rows], "grid_prompts": self.grid_prompts,
                "losses": self.losses}

    def save(self, folder: str | Path) -> Path:
        """Write folder/results.json and folder/samples.npz; return the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(self.to_dict(), indent=1))
        np.savez_compressed(folder / "samples.npz", prompts=np.array(self.grid_prompts),
                            **{label: grid for label, grid in self.samples.items()})
        return folder


def _to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> (N, S, S, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


GRID_SAMPLES = 4  # samples per grid prompt in samples.npz


# ANCHOR: run_experiment
def run_experiment(settings: TextToImageSettings = TextToImageSettings(), *, clip_path: str | Path | None = None,
                   progress: bool = True) -> TextToImageResult:
    """Train the tokenizer and the generators, then judge every sampler setting on both splits."""
    if not isinstance(settings, TextToImageSettings):
        raise ValueError(f"settings must be a TextToImageSettings, got {type(settings).__name__}")
    import_kernels_first()
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    say = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    try:
        seen_pairs, heldout_pairs = split_by_combinations(ShapesConfig())
        s = settings
        judge, judge_from = _judge(clip_path, s, say)
        train = make_images(s.train_images, seen_pairs, 10 * s.seed + 1, sizes=s.sizes, text_len=s.dalle.text_len)
        prompts = {split: make_images(s.prompts, pairs, 10 * s.seed + 2 + i, captions="canonical", sizes=s.sizes,
                                      text_len=s.dalle.text_len)
                   for i, (split, pairs) in enumerate((("seen", seen_pairs), ("heldout", heldout_pairs)))}
        # The grid: one prompt per held-out pair and as many seen ones, GRID_SAMPLES samples each.
        grid = _one_prompt_each([*heldout_pairs, *seen_pairs[:: len(seen_pairs) // len(heldout_pairs)]],
                                10 * s.seed + 4, s.sizes, s.dalle.text_len)
        grid_ids = grid.ids.repeat_interleave(GRID_SAMPLES, dim=0)
        grid_lengths = grid.lengths.repeat_interleave(GRID_SAMPLES, dim=0)
        models: dict[str, dict] = {}
        losses: dict[str, list[float]] = {}
        trained: dict[str, object] = {}

        def timed(name: str, fn):
            t0 = time.perf_counter()
            out = fn()
            models[name] = {"seconds": time.perf_counter() - t0}
            return out

        torch.manual_seed(s.seed)
        vqvae = VQVAE(s.vqvae)
        history = timed("vqvae", lambda: train_vqvae(vqvae, train.images, steps=s.vqvae_steps,
                                                     batch_size=s.batch_size, seed=s.seed, progress=progress))
        vqvae.eval()
        codes, latents = encode_images(vqvae, train.images)
        losses["vqvae"] = history["recon"]
        models["vqvae"].update(params=sum(p.numel() for p in vqvae.parameters()),
                               final_loss=float(np.mean(history["recon"][-20:])))
        trained["vqvae"] = vqvae
        say(f"vqvae: {models['vqvae']['seconds']:.1f} s, reconstruction MSE {models['vqvae']['final_loss']:.4f}")

        rows = []
        samples: dict[str, np.ndarray] = {}

        def judge_row(generator: str, setting: str, make) -> None:
            t0 = time.perf_counter()
            scores = {split: judge.score(make(p.ids, p.lengths), p.classes) for split, p in prompts.items()}
            grid_images = make(grid_ids, grid_lengths)
            samples[f"{generator} {setting}"] = _to_uint8(grid_images).reshape(len(grid.ids), GRID_SAMPLES, 32, 32, 3)
            rows.append(ScoreRow(generator, setting, scores["seen"], scores["heldout"], time.perf_counter() - t0))
            say(f"{generator} {setting}: match {100 * scores['seen'].match:.0f}% seen, "
                f"{100 * scores['heldout'].match:.0f}% held out")

        rows.append(ScoreRow("real", "images", *(judge.score(p.images, p.classes) for p in prompts.values()), 0.0))
        with torch.no_grad():  # the tokenizer's round trip: the ceiling of what the token generator can draw
            rows.append(ScoreRow("vqvae", "reconstructed", *(
                judge.score(vqvae.decode_codes(encode_images(vqvae, p.images)[0]), p.classes)
                for p in prompts.values()), 0.0))
        samples["real images"] = _to_uint8(grid.images)[:, None]

        if "dalle" in s.generators:
            dalle, losses["dalle"] = timed("dalle", lambda: train_dalle(codes, train, s, progress=progress))
            models["dalle"].update(params=sum(p.numel() for p in dalle.parameters()),
                                   final_loss=float(np.mean(losses["dalle"][-20:])))
            trained["dalle"] = dalle
            say(f"dalle: {models['dalle']['seconds']:.1f} s, loss {models['dalle']['final_loss']:.3f}")
            for temperature in s.temperature:
                draws = torch.Generator().manual_seed(s.seed + 5)
                judge_row("dalle", f"T={temperature:g}" + ("" if s.top_k is None else f" top-{s.top_k}"),
                          lambda ids, lengths: sample_dalle(dalle, vqvae, ids, temperature=temperature,
                                                            top_k=s.top_k, generator=draws))

        if "diffusion" in s.generators:
            tokens = patchify(train.images, PATCH) if s.space == "pixels" else latents
            denoiser, schedule, losses["diffusion"] = timed(
                "diffusion", lambda: train_denoiser(tokens, train, s, progress=progress))
            models["diffusion"].update(params=sum(p.numel() for p in denoiser.parameters()),
                                       final_loss=float(np.mean(losses["diffusion"][-20:])))
            trained["diffusion"], trained["schedule"] = denoiser, schedule
            say(f"diffusion: {models['diffusion']['seconds']:.1f} s, loss {models['diffusion']['final_loss']:.4f}")
            for w in s.guidance:
                draws = torch.Generator().manual_seed(s.seed + 6)
                judge_row("diffusion", f"w={w:g}",
                          lambda ids, lengths: sample_diffusion(
                              denoiser, schedule, Caption(ids, lengths), vqvae=vqvae if s.space == "latents" else None,
                              guidance=w, steps=s.sample_steps, generator=draws))
        plain = json.loads(json.dumps(asdict(settings)))
        return TextToImageResult(plain, rows, models, judge_from, time.perf_counter() - start,
                                 torch.get_num_threads(), grid.captions, samples, losses, trained)
    finally:
        torch.set_num_threads(threads_before)
# ANCHOR_END: run_experiment


# --------------------------------------------------------------------------- the report


def format_table(result: TextToImageResult) -> str:
    """One row per generator and setting: prompt match (colour and shape both right), colour, shape."""
    head = (f"{'generator':<10} {'setting':<14} {'seen: match':>11} {'colour':>7} {'shape':>6}   "
            f"{'held out: match':>15} {'colour':>7} {'shape':>6}")
    lines = [head]
    for r in result.rows:
        a, b = r.seen, r.heldout
        lines.append(f"{r.generator:<10} {r.setting:<14} {100 * a.match:>10.1f}% {100 * a.colour:>6.1f}% "
                     f"{100 * a.shape:>5.1f}%   {100 * b.match:>14.1f}% {100 * b.colour:>6.1f}% {100 * b.shape:>5.1f}%")
    return "\n".join(lines)


def format_models(result: TextToImageResult) -> str:
    """Parameters, training time and final training loss of each model."""
    lines = [f"{'model':<10} {'params':>9} {'train s':>8} {'final loss':>10}"]
    for name, m in result.models.items():
        lines.append(f"{name:<10} {m['params']:>9,} {m['seconds']:>8.1f} {m['final_loss']:>10.4f}")
    return "\n".join(lines)


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in comma_names(text))


def _parser() -> argparse.ArgumentParser:
    d, q = TextToImageSettings(), TextToImageSettings.quick()
    p = argparse.ArgumentParser(
        prog="tinymm train text-to-image",
        description="Train a VQ-VAE, a DALL·E-style transformer over its codes and a latent diffusion model "
        "with cross-attention to the caption, on the shapes images; judge their samples with a tiny CLIP "
        "(prompt match: the colour and shape CLIP sees are the prompt's) for colour-shape pairs seen in "
        "training and held out of it, at several temperatures and guidance scales.",
    )
    p.add_argument("--generators", default=",".join(d.generators), help=f"from {','.join(GENERATORS)} (default: both)")
    p.add_argument("--denoiser", choices=("unet", "transformer"), default=None,
                   help="the diffusion's network (default: unet on pixels; the latents need the transformer)")
    p.add_argument("--space", choices=("pixels", "latents"), default=d.space,
                   help="what the diffusion denoises: 4 x 4 pixel patches, or the VQ-VAE's latents "
                   "(default %(default)s)")
    p.add_argument("--guidance", default=",".join(f"{w:g}" for w in d.guidance),
                   help="classifier-free guidance scales to judge (default %(default)s)")
    p.add_argument("--temperature", default=",".join(f"{t:g}" for t in d.temperature),
                   help="DALL·E sampling temperatures to judge (default %(default)s)")
    p.add_argument("--sizes", default=",".join(d.sizes),
                   help="shape sizes of the images, from small,large (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="DALL·E sampling: keep the k likeliest codes")
    p.add_argument("--steps", type=int, help=f"steps of both generators (default {d.dalle_steps} and "
                   f"{d.diffusion_steps}; quick {q.dalle_steps})")
    p.add_argument("--vqvae-steps", type=int, help=f"(default {d.vqvae_steps})")
    p.add_argument("--sample-steps", type=int, help=f"DDIM steps (default {d.sample_steps})")
    p.add_argument("--prompts", type=int, help=f"prompts per split (default {d.prompts}; quick {q.prompts})")
    p.add_argument("--train-images", type=int, help=f"(default {d.train_images}; quick {q.train_images})")
    p.add_argument("--clip", type=Path, default=None,
                   help="the judge: a tiny CLIP saved by `tinymm train clip --out PATH` (default: train one here)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, weights, batches and samples (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a run of seconds with tiny models, to check the machinery")
    p.add_argument("--out", type=Path, default=None, help="write DIR/results.json and DIR/samples.npz")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tinymm train text-to-image``: train, judge, print the tables. Returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        base = TextToImageSettings.quick() if args.quick else TextToImageSettings()
        changes = {"generators": comma_names(args.generators),
                   "guidance": _numbers(args.guidance), "temperature": _numbers(args.temperature),
                   "top_k": args.top_k, "seed": args.seed, "threads": args.threads, "space": args.space,
                   "sizes": comma_names(args.sizes)}
        if args.denoiser == "transformer" or args.space == "latents":
            if args.denoiser == "unet":
                raise ValueError("the U-Net denoises pixels: use --space pixels, or --denoiser transformer")
            changes["denoiser"] = transformer_denoiser(base.vqvae, args.space, quick=args.quick)
        if args.steps is not None:
            changes.update(dalle_steps=args.steps, diffusion_steps=args.steps)
        for name in ("vqvae_steps", "sample_steps", "prompts", "train_images"):
            if getattr(args, name) is not None:
                changes[name] = getattr(args, name)
        settings = replace(base, **changes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if problem := out_folder_problem(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = run_experiment(settings, clip_path=args.clip, progress=not args.quiet)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    s = settings
    seen_pairs = len(split_by_combinations(ShapesConfig())[0])
    print(f"{s.train_images} training images of {seen_pairs} colour-shape pairs; {s.prompts} prompts per split; "
          f"judge: tiny CLIP {result.judge}; {result.seconds:.1f} s in all on {result.threads} thread(s)")
    print(format_models(result))
    print()
    print("prompt match: the share of samples in which the judge sees the prompt's colour and shape")
    print(format_table(result))
    if args.out is not None:
        print(f"wrote {result.save(args.out)}/results.json and samples.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
