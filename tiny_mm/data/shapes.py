"""Synthetic image-caption pairs: coloured shapes on a plain background.

A tiny CLIP needs pairs of (image, caption) whose content it can learn in a
minute or two on a laptop CPU. Here every image shows one coloured shape (or,
optionally, two) and its caption states the four factors that made it:

    shape     circle, square, triangle, star, cross
    colour    red, green, blue, yellow, purple, orange
    size      small, large
    position  a cell of a 3x3 grid: top left, top, top right, left, centre, ...

    image    : (S, S, 3) float32 in [0, 1] from `render`; (3, S, S) from the dataset
    caption  : str, e.g. "a small red circle on the left"
    labels   : dict of int ids, {"shape", "colour", "size", "position", "combo"}

Everything is a pure function of ``(seed, index)``: sample ``i`` is drawn from
its own ``numpy`` generator seeded with ``[seed, i]``, so any index can be
rendered on its own and the same seed gives byte-identical images.

Rendering is NumPy only: each shape is an analytic inside/outside test on a
grid of pixel centres, averaged over ``antialias**2`` sub-pixel samples so
edges are smooth.

For zero-shot evaluation, `split_by_combinations` keeps some colour-shape pairs
out of training (every colour and every shape still appears there), so a model
must compose "purple" and "star" to recognise a purple star it never saw.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "SIZE_WORDS",
    "WHERE_WORDS",
    "CAPTION_FRAMES",
    "ZERO_SHOT_TEMPLATES",
    "CLIP_MEAN",
    "CLIP_STD",
    "ShapesConfig",
    "ShapeObject",
    "ShapeSample",
    "sample",
    "render",
    "caption",
    "split_by_combinations",
    "class_names",
    "class_prompts",
    "normalize",
    "ShapesDataset",
]

# ANCHOR: factors
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated colours far apart in RGB, so a 32x32 image leaves no doubt.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.00),
}

# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.19}

# Cell (row, col) of a 3x3 grid; row 0 is the top, col 0 the left.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "centre": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
# ANCHOR_END: factors

# Prompts for zero-shot classification over colour-shape classes ("red circle").
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a {}",
    "a photo of a {}",
    "there is a {}",
    "a picture of a {}",
)

# CLIP's normalisation constants (the mean and std of its training images, per RGB channel).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Shape centres sit at 1/4, 1/2, 3/4 of the side: a large shape (half-extent
# 0.19) at 1/4 plus the jitter still fits inside the image, and the centre
# stays inside its third of the image, which is what "on the left" means.
_CELL_CENTRES = (0.25, 0.5, 0.75)

# Caption wording. Canonical words first; "varied" captions draw among all.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
WHERE_WORDS = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "to the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "to the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
_OBJECT_PHRASES = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}, {size}, {where}",
    "a {size} {colour} {shape} that sits {where}",
)
CAPTION_FRAMES = ("{}", "there is {}", "a picture of {}", "an image with {}")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ShapesConfig:
    """What the images and captions may contain.

    Args:
        image_size: side S of the square images, in pixels (>= 8).
        shapes, colours, sizes, positions: the factor values to draw from;
            each a non-empty tuple of names from `SHAPES`, `COLOURS`, `SIZES`,
            `POSITIONS`. The order fixes the label ids.
        max_objects: 1, or 2 to let half of the images hold a second shape in
            the opposite part of the image (two cells apart, so they never touch).
        captions: "canonical" (always "a small red circle on the left") or
            "varied" (phrasings, synonyms and frames drawn per sample).
        background: largest grey level of the background, drawn per image in
            [0, background]; 0 gives black.
        noise: standard deviation of Gaussian pixel noise (0 for none).
        jitter: largest shift of a shape's centre from its cell centre, as a
            fraction of S (at most 0.05 so the centre stays inside its third).
        antialias: sub-pixel samples per axis (1 = hard edges).
    """

    image_size: int = 32
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    max_objects: int = 1
    captions: str = "varied"
    background: float = 0.25
    noise: float = 0.02
    jitter: float = 0.03
    antialias: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {self.image_size!r}")
        for name, known in (
            ("shapes", SHAPES),
            ("colours", tuple(COLOURS)),
            ("sizes", tuple(SIZES)),
            ("positions", tuple(POSITIONS)),
        ):
            values = getattr(self, name)
            if isinstance(values, str) or not isinstance(values, (tuple, list)) or len(values) == 0:
                raise ValueError(f"{name} must be a non-empty tuple of names from {known}, got {values!r}")
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {known}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values!r}")
            object.__setattr__(self, name, tuple(values))  # lists become hashable tuples
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects!r}")
        if self.max_objects == 2 and not _far_pairs(self.positions):
            raise ValueError(
                f"max_objects=2 needs two positions two cells apart (e.g. 'left' and 'right'), "
                f"got {self.positions}"
            )
        if self.captions not in ("canonical", "varied"):
            raise ValueError(f"captions must be 'canonical' or 'varied', got {self.captions!r}")
        if not 0.0 <= self.background <= 1.0:
            raise ValueError(f"background must be in [0, 1], got {self.background}")
        if not 0.0 <= self.noise <= 0.2:
            raise ValueError(f"noise must be in [0, 0.2], got {self.noise}")
        if not 0.0 <= self.jitter <= 0.05:
            raise ValueError(f"jitter must be in [0, 0.05], got {self.jitter}")
        if not isinstance(self.antialias, int) or not 1 <= self.antialias <= 8:
            raise ValueError(f"antialias must be an int in [1, 8], got {self.antialias!r}")

    @property
    def combinations(self) -> list[tuple[str, str]]:
        """Every (colour, shape) pair, colour-major: the zero-shot classes."""
        return [(c, s) for c in self.colours for s in self.shapes]


def _far_pairs(positions: tuple[str, ...]) -> list[tuple[str, str]]:
    """Ordered pairs of positions at least two grid cells apart along a row or column."""
    pairs = []
    for a in positions:
        for b in positions:
            (ra, ca), (rb, cb) = POSITIONS[a], POSITIONS[b]
            if max(abs(ra - rb), abs(ca - cb)) == 2:
                pairs.append((a, b))
    return pairs


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class ShapeObject:
    """One shape in an image. cx, cy: centre as fractions of the side (x right, y down)."""

    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float


@dataclass(frozen=True)
class ShapeSample:
    """Everything needed to draw one image and write its caption.

    objects: one or two `ShapeObject`s, drawn in order.
    background: grey level of the plain background.
    noise: standard deviation of the pixel noise; noise_seed seeds it.
    caption: the text that describes the image.
    """

    objects: tuple[ShapeObject, ...]
    background: float
    noise: float
    noise_seed: int
    caption: str = field(default="")

    @property
    def main(self) -> ShapeObject:
        """The first (for single-object images, the only) shape."""
        return self.objects[0]


def sample(
    config: ShapesConfig,
    seed: int,
    index: int,
    combinations: list[tuple[str, str]] | None = None,
) -> ShapeSample:
    """Draw sample ``index`` of the stream ``seed``: a pure function of its arguments.

    combinations: the (colour, shape) pairs allowed (default: all of them);
    a training split passes its own list here.
    """
    combos = config.combinations if combinations is None else list(combinations)
    rng = np.random.default_rng([seed, index])  # one independent stream per index
    n_objects = 2 if config.max_objects == 2 and rng.random() < 0.5 else 1

    if n_objects == 1:
        where = [config.positions[rng.integers(len(config.positions))]]
    else:
        pairs = _far_pairs(config.positions)
        where = list(pairs[rng.integers(len(pairs))])

    objects = []
    for pos in where:
        colour, shape = combos[rng.integers(len(combos))]
        size = config.sizes[rng.integers(len(config.sizes))]
        row, col = POSITIONS[pos]
        dx, dy = rng.uniform(-config.jitter, config.jitter, size=2)
        cx, cy = float(_CELL_CENTRES[col] + dx), float(_CELL_CENTRES[row] + dy)
        objects.append(ShapeObject(shape, colour, size, pos, cx, cy))

    background = float(rng.uniform(0.0, config.background))
    noise_seed = int(rng.integers(2**31))
    text = caption(objects, rng if config.captions == "varied" else None)
    return ShapeSample(tuple(objects), background, config.noise, noise_seed, text)


# ANCHOR: captions
def caption(objects: Sequence[ShapeObject], rng: np.random.Generator | None = None) -> str:
    """The caption of an image: canonical when rng is None, else a drawn phrasing.

    Canonical: "a small red circle on the left" (objects joined with " and ").
    Varied: the phrase pattern, the size and position words and the framing
    ("there is ...") are drawn from rng, e.g. "there is a red star, big, to the right".
    """

    def pick(options: tuple[str, ...]) -> str:
        return options[0] if rng is None else options[rng.integers(len(options))]

    phrase = pick(_OBJECT_PHRASES)
    parts = [
        phrase.format(size=pick(SIZE_WORDS[o.size]), colour=o.colour, shape=o.shape, where=pick(WHERE_WORDS[o.position]))
        for o in objects
    ]
    text = pick(CAPTION_FRAMES).format(" and ".join(parts))
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange star" -> "an orange star"
# ANCHOR_END: captions


# --------------------------------------------------------------------------- rendering


# ANCHOR: masks
def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask: is the point (x, y), relative to the shape's centre, inside it?

    x, y: arrays of any shape (x right, y down, in pixels); r: half-extent in pixels.
    """
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        h = 0.85 * r  # a square of side 2r looks bigger than the circle; shrink it
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "cross":
        w = r / 3  # arm half-width
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= r) & (ay <= w)) | ((ax <= w) & (ay <= r))
    if shape == "triangle":
        # Upward equilateral triangle with its centroid at the origin: inside
        # when on the inner side of all three edges (each edge's outward normal
        # points at angle 90, 210, 330 degrees in y-down coordinates).
        d = 0.5 * r * 1.15  # distance from centroid to each edge (inradius)
        inside = np.ones(np.broadcast(x, y).shape, dtype=bool)
        for angle in (90.0, 210.0, 330.0):
            nx, ny = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            inside &= x * nx + y * ny <= d
        return inside
    if shape == "star":
        return _inside_polygon(x, y, _star_vertices(r))
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _star_vertices(r: float) -> np.ndarray:
    """(10, 2) vertices of a five-pointed star, one point straight up, inner radius 0.45 r."""
    k = np.arange(10)
    radius = np.where(k % 2 == 0, r, 0.45 * r)
    angle = -np.pi / 2 + k * np.pi / 5  # y points down, so -pi/2 is up
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside when a ray to the right crosses the edges an odd number of times."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        straddles = (ay > y) != (by > y)  # the edge spans the ray's height
        x_cross = ax + (y - ay) * (bx - ax) / (by - ay + 1e-12)
        inside ^= straddles & (x < x_cross)
    return inside
# ANCHOR_END: masks


# ANCHOR: render
def render(sample: ShapeSample, size: int = 32, antialias: int = 2) -> np.ndarray:
    """Draw a sample: returns a float32 array of shape (size, size, 3) in [0, 1].

    Each pixel's coverage by a shape is the fraction of its antialias x antialias
    sub-pixel points inside the shape; the shape's colour is blended over the
    background with that coverage, then noise is added and the result clipped.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if not isinstance(antialias, int) or not 1 <= antialias <= 8:
        raise ValueError(f"antialias must be an int in [1, 8], got {antialias!r}")
    a = antialias
    # Sub-pixel sample points: pixel p covers [p, p+1), its samples sit at p + (k + 0.5) / a.
    t = (np.arange(size * a, dtype=np.float32) + 0.5) / a  # (S*a,)
    image = np.full((size, size, 3), sample.background, dtype=np.float32)  # (S, S, 3)
    for obj in sample.objects:
        r = SIZES[obj.size] * size
        inside = _inside(obj.shape, t[None, :] - obj.cx * size, t[:, None] - obj.cy * size, r)  # (S*a, S*a)
        coverage = inside.reshape(size, a, size, a).mean(axis=(1, 3), dtype=np.float32)  # (S, S)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)  # (3,)
        image += coverage[..., None] * (colour - image)  # alpha-blend the shape over what is there
    if sample.noise > 0:
        noise_rng = np.random.default_rng(sample.noise_seed)
        image += noise_rng.normal(0.0, sample.noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0, out=image)
# ANCHOR_END: render


# --------------------------------------------------------------------------- splits


# ANCHOR: split
def split_by_combinations(
    config: ShapesConfig, per_shape: int = 1, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hold out colour-shape pairs: returns (train_combinations, heldout_combinations).

    The rule: shuffle the colours and the shapes with `seed`; shape number i
    (in shuffled order) loses the colours i, i+1, ..., i+per_shape-1 (mod the
    number of colours, in shuffled order). So every shape loses exactly
    `per_shape` colours and every colour loses at most `per_shape` shapes;
    requiring per_shape < min(#colours, #shapes) leaves every colour and every
    shape in training. With the default config, per_shape=1 and seed=0 the
    held-out pairs are (5 of 30):

        red star, blue square, yellow cross, purple circle, orange triangle

    Both lists are (colour, shape) pairs in the config's colour-major order.
    """
    n_colours, n_shapes = len(config.colours), len(config.shapes)
    if not isinstance(per_shape, int) or not 1 <= per_shape < min(n_colours, n_shapes):
        raise ValueError(
            f"per_shape must be an int in [1, {min(n_colours, n_shapes) - 1}] so every colour and "
            f"shape keeps a training example, got {per_shape!r} ({n_colours} colours, {n_shapes} shapes)"
        )
    rng = np.random.default_rng(seed)
    colours = [config.colours[i] for i in rng.permutation(n_colours)]
    shapes = [config.shapes[i] for i in rng.permutation(n_shapes)]
    held = {(colours[(i + k) % n_colours], shape) for i, shape in enumerate(shapes) for k in range(per_shape)}
    train = [c for c in config.combinations if c not in held]
    heldout = [c for c in config.combinations if c in held]
    return train, heldout
# ANCHOR_END: split


# --------------------------------------------------------------------------- zero-shot helpers


def class_names(combinations: list[tuple[str, str]]) -> list[str]:
    """Class names for zero-shot prompts: [("red", "circle")] -> ["red circle"]."""
    return [f"{colour} {shape}" for colour, shape in combinations]


def class_prompts(combinations: list[tuple[str, str]], template: str = "a photo of a {}") -> list[str]:
    """One prompt per class: class_prompts([("red", "circle")]) -> ["a photo of a red circle"]."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
    return [template.format(name) for name in class_names(combinations)]


def normalize(
    images: Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Tensor:
    """Per-channel (x - mean) / std for images of shape (3, S, S) or (B, 3, S, S)."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must have shape (3, S, S) or (B, 3, S, S), got {tuple(images.shape)}")
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    return (images - m) / s


# --------------------------------------------------------------------------- dataset


class ShapesDataset(Dataset):
    """``length`` image-caption pairs, item ``i`` rendered on demand from ``(seed, i)``.

    ``dataset[i]`` returns ``(image, caption, labels)``:
        image: float32 tensor (3, S, S) in [0, 1]
        caption: str
        labels: dict of ints for the first object, {"shape", "colour", "size",
            "position"} (indices into the config's tuples) and "combo" (index of
            its (colour, shape) pair in ``config.combinations``).

    The default DataLoader collation turns a batch into ((B, 3, S, S), list of
    B str, dict of (B,) LongTensors).

    combinations: the (colour, shape) pairs to draw from; pass the lists of
    `split_by_combinations` to build a training set and a held-out set (give
    them different seeds so no image repeats).
    """

    def __init__(
        self,
        length: int,
        config: ShapesConfig | None = None,
        seed: int = 0,
        combinations: list[tuple[str, str]] | None = None,
    ) -> None:
        self.config = ShapesConfig() if config is None else config
        if not isinstance(self.config, ShapesConfig):
            raise ValueError(f"config must be a ShapesConfig, got {type(self.config).__name__}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        all_combos = self.config.combinations
        if combinations is not None:
            combinations = [tuple(c) for c in combinations]
            if not combinations:
                raise ValueError("combinations must not be empty")
            unknown = [c for c in combinations if c not in all_combos]
            if unknown:
                raise ValueError(f"combinations not in the config's colours x shapes: {unknown}")
        self.length = length
        self.seed = seed
        self.combinations = all_combos if combinations is None else combinations
        self._combo_id = {c: i for i, c in enumerate(all_combos)}

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ShapeSample:
        """The attributes and caption of item ``index`` (nothing rendered)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return sample(self.config, self.seed, index % self.length, self.combinations)

    def labels(self, s: ShapeSample) -> dict[str, int]:
        """Integer ids of the first object's factors, and of its (colour, shape) pair."""
        o, c = s.main, self.config
        return {
            "shape": c.shapes.index(o.shape),
            "colour": c.colours.index(o.colour),
            "size": c.sizes.index(o.size),
            "position": c.positions.index(o.position),
            "combo": self._combo_id[(o.colour, o.shape)],
        }

    def __getitem__(self, index: int) -> tuple[Tensor, str, dict[str, int]]:
        s = self.sample(index)
        image = render(s, self.config.image_size, self.config.antialias)  # (S, S, 3)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), s.caption, self.labels(s)  # (3, S, S)

    def materialize(self) -> tuple[Tensor, list[str], dict[str, Tensor]]:
        """Render everything at once: images (N, 3, S, S), N captions, labels {name: (N,) LongTensor}.

        For small sets this is faster to train on than a DataLoader.
        """
        S = self.config.image_size
        images = np.empty((self.length, S, S, 3), dtype=np.float32)  # (N, S, S, 3)
        captions: list[str] = []
        labels: dict[str, list[int]] = {k: [] for k in ("shape", "colour", "size", "position", "combo")}
        for i in range(self.length):
            s = self.sample(i)
            images[i] = render(s, S, self.config.antialias)
            captions.append(s.caption)
            for k, v in self.labels(s).items():
                labels[k].append(v)
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
        return tensor, captions, {k: torch.tensor(v, dtype=torch.long) for k, v in labels.items()}
