"""tiny_mm.data.shapes: determinism, pixels that match the attributes, captions that say exactly them, splits.

The checks read the images and captions back with their own rules (a plain
palette, the thirds of the image, a vocabulary written here) rather than the
module's tables, so a wrong table or a wrong renderer shows up as a failure.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tiny_mm.data.shapes import (
    ShapesConfig,
    ShapesDataset,
    class_names,
    class_prompts,
    normalize,
    render,
    sample,
    split_by_combinations,
)

# Nominal colours, written independently of the module's palette.
PLAIN_RGB = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "orange": (1.0, 0.5, 0.0),
}
SHAPE_WORDS = {"circle", "square", "triangle", "star", "cross"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
# (row, col) of each position name: row 0 top, col 0 left.
GRID = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
WHERE_PHRASES = {
    "in the top left corner": "top left", "at the top left": "top left",
    "in the top right corner": "top right", "at the top right": "top right",
    "in the bottom left corner": "bottom left", "at the bottom left": "bottom left",
    "in the bottom right corner": "bottom right", "at the bottom right": "bottom right",
    "at the top": "top", "near the top": "top", "at the bottom": "bottom", "near the bottom": "bottom",
    "on the left": "left", "to the left": "left", "on the right": "right", "to the right": "right",
    "in the centre": "centre", "in the middle": "centre",
}  # fmt: skip
FILLER = {"a", "an", "there", "is", "picture", "of", "image", "with", "that", "sits", "and"}

CLEAN = dict(noise=0.0, jitter=0.03)  # no noise: a pixel is background or shape


def parse(caption: str) -> list[dict[str, str]]:
    """Read a caption back into one attribute dict per object, in order; fail on any unknown word."""
    text = caption.replace(",", " ")
    found: list[tuple[int, str, str]] = []  # (offset, factor, value)
    for phrase in sorted(WHERE_PHRASES, key=len, reverse=True):  # longest first: "at the top left" before "at the top"
        for m in re.finditer(rf"\b{phrase}\b", text):
            found.append((m.start(), "position", WHERE_PHRASES[phrase]))
            text = text[: m.start()] + " " * len(phrase) + text[m.end() :]
    for m in re.finditer(r"[a-z]+", text):
        word = m.group()
        if word in PLAIN_RGB:
            found.append((m.start(), "colour", word))
        elif word in SHAPE_WORDS:
            found.append((m.start(), "shape", word))
        elif word in SIZE_WORDS:
            found.append((m.start(), "size", SIZE_WORDS[word]))
        else:
            assert word in FILLER, f"unexpected word {word!r} in caption {caption!r}"
    found.sort()
    # Each object's words run up to its position phrase or the next "a"/"an" after a complete object.
    objects: list[dict[str, str]] = [{}]
    for _, factor, value in found:
        if factor in objects[-1]:
            objects.append({})
        objects[-1][factor] = value
    return objects


def attributes(obj) -> dict[str, str]:
    return {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "position": obj.position}


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    cfg = ShapesConfig()
    a, cap_a, lab_a = ShapesDataset(40, cfg, seed=3).materialize()
    b, cap_b, lab_b = ShapesDataset(40, cfg, seed=3).materialize()
    c, cap_c, _ = ShapesDataset(40, cfg, seed=4).materialize()
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert cap_a == cap_b and all(torch.equal(lab_a[k], lab_b[k]) for k in lab_a)
    assert not torch.equal(a, c)
    assert cap_a != cap_c


def test_items_are_index_addressable():
    """Item i depends only on (seed, i): not on the length, nor on what was rendered before."""
    cfg = ShapesConfig()
    short, long = ShapesDataset(8, cfg, seed=1), ShapesDataset(1000, cfg, seed=1)
    for i in (7, 0, 5):
        img_s, cap_s, lab_s = short[i]
        img_l, cap_l, lab_l = long[i]
        assert torch.equal(img_s, img_l) and cap_s == cap_l and lab_s == lab_l
    assert torch.equal(long[-1][0], long[999][0])
    with pytest.raises(IndexError):
        short[8]


def test_materialize_matches_items():
    ds = ShapesDataset(12, ShapesConfig(image_size=16), seed=9)
    images, captions, labels = ds.materialize()
    assert images.shape == (12, 3, 16, 16) and images.dtype == torch.float32
    for i in (0, 11):
        img, cap, lab = ds[i]
        assert torch.equal(images[i], img) and captions[i] == cap
        assert {k: int(v[i]) for k, v in labels.items()} == lab


# --------------------------------------------------------------------------- coverage of the factors


def test_every_factor_value_appears():
    cfg = ShapesConfig()
    seen: dict[str, set[str]] = {"shape": set(), "colour": set(), "size": set(), "position": set()}
    for i in range(600):
        for factor, value in attributes(sample(cfg, 0, i).main).items():
            seen[factor].add(value)
    assert seen["shape"] == set(cfg.shapes) == SHAPE_WORDS
    assert seen["colour"] == set(cfg.colours) == set(PLAIN_RGB)
    assert seen["size"] == {"small", "large"}
    assert seen["position"] == set(GRID)


# --------------------------------------------------------------------------- pixels agree with attributes


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_agree_with_attributes(image_size):
    cfg = ShapesConfig(image_size=image_size, **CLEAN)
    areas: dict[tuple[str, str], list[float]] = {}
    for i in range(120):
        s = sample(cfg, 5, i)
        obj = s.main
        image = render(s, image_size, cfg.antialias)  # (S, S, 3)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.float32
        image = image.astype(np.float64)
        assert 0.0 <= image.min() and image.max() <= 1.0
        background = np.median(image.reshape(-1, 3), axis=0)  # the shape covers well under half the image
        mask = np.abs(image - background).max(axis=-1) > 0.1  # (S, S)
        assert mask.any(), f"nothing drawn for {obj}"
        rows, cols = np.nonzero(mask)
        cy, cx = rows.mean() + 0.5, cols.mean() + 0.5  # pixel centres
        row, col = GRID[obj.position]
        third = image_size / 3
        assert col * third <= cx < (col + 1) * third, f"{obj}: centroid x={cx:.1f} outside column {col}"
        assert row * third <= cy < (row + 1) * third, f"{obj}: centroid y={cy:.1f} outside row {row}"
        pixel = image[int(cy), int(cx)]
        nearest = min(PLAIN_RGB, key=lambda n: np.sum((pixel - np.array(PLAIN_RGB[n])) ** 2))
        assert nearest == obj.colour, f"{obj}: centroid pixel {pixel} looks {nearest}"
        areas.setdefault((obj.shape, obj.size), []).append(mask.sum())
    for shape in SHAPE_WORDS:
        small, large = areas.get((shape, "small")), areas.get((shape, "large"))
        assert small and large, f"sample more: no small/large {shape}"
        assert max(small) < min(large), f"{shape}: small areas {small} vs large {large}"


def test_two_objects_are_both_drawn_where_stated():
    cfg = ShapesConfig(max_objects=2, **CLEAN)
    n_two = 0
    for i in range(60):
        s = sample(cfg, 2, i)
        if len(s.objects) == 1:
            continue
        n_two += 1
        image = render(s, 32, cfg.antialias).astype(np.float64)
        for obj in s.objects:
            # The shape pixels inside the object's third of the image (the other object is
            # two cells away, so it cannot reach there) have the object's colour.
            row, col = GRID[obj.position]
            rows, cols = slice(row * 32 // 3, (row + 1) * 32 // 3), slice(col * 32 // 3, (col + 1) * 32 // 3)
            cell = image[rows, cols].reshape(-1, 3)
            background = np.median(image.reshape(-1, 3), axis=0)
            drawn = cell[np.abs(cell - background).max(axis=-1) > 0.1]
            assert len(drawn) >= 4, f"{obj}: nothing drawn in its cell"
            pixel = np.median(drawn, axis=0)
            nearest = min(PLAIN_RGB, key=lambda n: np.sum((pixel - np.array(PLAIN_RGB[n])) ** 2))
            assert nearest == obj.colour, f"{obj}: cell colour {pixel} looks {nearest}"
        assert [attributes(o) for o in s.objects] == parse(s.caption)
    assert 15 < n_two < 45  # about half the images hold two shapes


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize("max_objects", [1, 2])
def test_varied_captions_state_exactly_the_attributes(max_objects):
    cfg = ShapesConfig(max_objects=max_objects)
    captions = set()
    for i in range(300):
        s = sample(cfg, 11, i)
        assert parse(s.caption) == [attributes(o) for o in s.objects], s.caption
        assert not re.search(r"\ba [aeiou]", s.caption), f"article: {s.caption!r}"
        captions.add(re.sub(r"red|green|blue|yellow|purple|orange", "C", s.caption))
    assert len(captions) > 50  # many phrasings, not one template


def test_canonical_captions():
    cfg = ShapesConfig(captions="canonical")
    where = {
        "left": "on the left",
        "top left": "in the top left corner",
        "centre": "in the centre",
        "bottom": "at the bottom",
    }
    checked = 0
    for i in range(200):
        o = sample(cfg, 0, i).main
        if o.position in where:
            article = "an" if o.size[0] in "aeiou" else "a"
            assert sample(cfg, 0, i).caption == f"{article} {o.size} {o.colour} {o.shape} {where[o.position]}"
            checked += 1
    assert checked > 20


# --------------------------------------------------------------------------- held-out combinations


def test_split_by_combinations_holds_out_pairs_never_seen_in_training():
    cfg = ShapesConfig(max_objects=2)
    train, heldout = split_by_combinations(cfg, per_shape=1, seed=0)
    assert len(heldout) == len(cfg.shapes)  # one colour per shape
    assert set(train) | set(heldout) == set(cfg.combinations) and not set(train) & set(heldout)
    assert {s for _, s in heldout} == set(cfg.shapes)  # each shape loses one colour
    assert len({c for c, _ in heldout}) == len(heldout)  # ... and no colour loses two shapes

    ds = ShapesDataset(400, cfg, seed=0, combinations=train)
    colours, shapes = set(), set()
    for i in range(len(ds)):
        for o in ds.sample(i).objects:
            assert (o.colour, o.shape) not in heldout
            colours.add(o.colour)
            shapes.add(o.shape)
    assert colours == set(cfg.colours) and shapes == set(cfg.shapes)

    test = ShapesDataset(100, cfg, seed=1, combinations=heldout)
    for i in range(len(test)):
        assert cfg.combinations[test.labels(test.sample(i))["combo"]] in heldout
    assert cfg.combinations[test[0][2]["combo"]] in heldout


def test_the_documented_default_split_is_the_one_made():
    """The docstring (and so the chapter) names the held-out pairs: keep it true."""
    doc = split_by_combinations.__doc__
    listed = re.search(r"held-out pairs are \(5 of 30\):\s+(.+)", doc).group(1)
    documented = {tuple(pair.split()) for pair in listed.split(", ")}
    assert set(split_by_combinations(ShapesConfig(), per_shape=1, seed=0)[1]) == documented


def test_split_with_more_held_out_keeps_every_factor_and_depends_on_seed():
    cfg = ShapesConfig()
    train, heldout = split_by_combinations(cfg, per_shape=3, seed=7)
    assert len(heldout) == 3 * len(cfg.shapes)
    assert {c for c, _ in train} == set(cfg.colours) and {s for _, s in train} == set(cfg.shapes)
    others = {tuple(split_by_combinations(cfg, seed=s)[1]) for s in range(6)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="per_shape"):
        split_by_combinations(cfg, per_shape=len(cfg.shapes))


# --------------------------------------------------------------------------- dataset and helpers


def test_dataset_labels_and_dataloader_batches():
    cfg = ShapesConfig(image_size=24)
    ds = ShapesDataset(10, cfg, seed=0)
    assert len(ds) == 10
    image, cap, labels = ds[3]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    o = ds.sample(3).main
    assert cfg.shapes[labels["shape"]] == o.shape and cfg.colours[labels["colour"]] == o.colour
    assert cfg.sizes[labels["size"]] == o.size and cfg.positions[labels["position"]] == o.position
    assert cfg.combinations[labels["combo"]] == (o.colour, o.shape)
    assert torch.allclose(image.permute(1, 2, 0), torch.from_numpy(render(ds.sample(3), 24)))

    images, captions, batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert images.shape == (4, 3, 24, 24)
    assert isinstance(captions, (list, tuple)) and len(captions) == 4
    assert all(isinstance(c, str) for c in captions)
    assert set(batch) == {"shape", "colour", "size", "position", "combo"}
    assert all(v.shape == (4,) and v.dtype == torch.long for v in batch.values())


def test_normalize_and_prompts(rng):
    x = torch.from_numpy(rng.random((2, 3, 5, 5)))  # float64
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected = (x.numpy() - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(normalize(x, mean, std).numpy(), expected, rtol=1e-12, atol=0)
    assert normalize(x[0]).shape == (3, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(2, 4, 5, 5))
    assert class_names([("red", "circle"), ("blue", "star")]) == ["red circle", "blue star"]
    assert class_prompts([("red", "circle")]) == ["a photo of a red circle"]
    with pytest.raises(ValueError, match="template"):
        class_prompts([("red", "circle")], "no slot")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=4), "image_size"),
        (dict(shapes=("circle", "hexagon")), "shapes"),
        (dict(colours=()), "colours"),
        (dict(sizes=("small", "small")), "duplicates"),
        (dict(positions="left"), "positions"),
        (dict(max_objects=3), "max_objects"),
        (dict(max_objects=2, positions=("left", "centre")), "max_objects"),
        (dict(captions="fancy"), "captions"),
        (dict(noise=-0.1), "noise"),
        (dict(jitter=0.2), "jitter"),
        (dict(antialias=0), "antialias"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesConfig(**kwargs)


def test_bad_dataset_arguments_raise():
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(-1)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(3, seed=-2)
    with pytest.raises(ValueError, match="combinations"):
        ShapesDataset(3, combinations=[("red", "hexagon")])
    with pytest.raises(ValueError, match="combinations"):
        ShapesDataset(3, combinations=[])
    with pytest.raises(ValueError, match="size"):
        render(sample(ShapesConfig(), 0, 0), size=2)
