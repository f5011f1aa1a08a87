"""Grader of exercise 7: photo search with CLIP (index a folder, save, load, query by text or image).

Coloured-shape images (tiny_mm.data.shapes) are written as PNG and JPEG files
to a temporary folder and indexed with a CLIP-like model (a tiny random
CLIP's text tower; PixelCLIP says what embeds the images) and CLIP's
preprocessing (tiny_mm.zeroshot.clip_preprocess). The grader embeds every
file itself, one at a time, and ranks by brute force with the chapter's NumPy
float64 reference (chapters/ch05_clip_zero_shot/reference.py,
`nearest_neighbours`); the learner's index, rankings and scores must agree.
Rankings are compared score by score, so two images whose scores differ by
float32 rounding may come in either order.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex07` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import chapters.ch05_clip_zero_shot.reference as ref
from tests.grading.conftest import Learner, check_close, describe, fail
from tiny_mm.clip import CLIP, CLIPConfig, TextConfig
from tiny_mm.data.shapes import ShapesConfig, ShapesDataset
from tiny_mm.tokenizer import tokenize
from tiny_mm.vit import VisionConfig
from tiny_mm.zeroshot import clip_preprocess

EXERCISE = "ex07_photo_search"
SCORE_TOL = 1e-5  # cosine scores lie in [-1, 1]: an absolute tolerance
CONTEXT = 16  # the tiny text tower's context length
IMAGE = 16  # the tiny image tower's input side; the files are 32 px, resized by the preprocessing
N_IMAGES = 10
QUERIES = ["a red circle", "a large blue star on the left", "there is a green cross"]


# ---------------------------------------------------------------- helpers


def tiny_clip(embed_dim: int = 16, seed: int = 0) -> CLIP:
    """A random CLIP small enough to run in milliseconds: one block per tower."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, layers=1, heads=2, output_dim=embed_dim),
        text=TextConfig(context_length=CONTEXT, width=32, heads=2, layers=1),
    )
    return CLIP(config).eval()


class PixelCLIP(nn.Module):
    """A CLIP-like model: the tiny CLIP's text tower, and images embedded by a fixed random
    projection of their 4x4 average-pooled pixels.

    A random tiny CLIP's image tower sends every shape image in nearly the same
    direction (cosine > 0.998 between any two), so a wrong ranking of images
    could pass; these image embeddings differ (cosine 0.92-0.997 between the
    folder's images, text scores a few 1e-3 apart), and the checks can tell.
    """

    def __init__(self, clip: CLIP, seed: int = 0) -> None:
        super().__init__()
        self.clip = clip
        gen = torch.Generator().manual_seed(seed)
        embed_dim = clip.config.embed_dim
        self.register_buffer("proj", torch.randn(3 * 4 * 4, embed_dim, generator=gen) / 48**0.5)  # (48, E)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(images, images.shape[-1] // 4)  # (B, 3, 4, 4)
        return pooled.flatten(1) @ self.proj  # (B, E)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)  # (B, E)


class Recording(nn.Module):
    """A CLIP that notes the batch size of every encode_image call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.batches: list[int] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(images.shape[0]))
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def tok(texts: list[str]) -> torch.Tensor:
    return tokenize(texts, context_length=CONTEXT)  # (P, 16)


PREPROCESS = clip_preprocess(IMAGE)


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    """n 32-px shape images, PNG and (every third) JPEG with an upper-case suffix; returns the files sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _, _ = ShapesDataset(n, ShapesConfig(image_size=32), seed=seed).materialize()
    files = []
    for i, image in enumerate(images):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (32, 32, 3)
        path = folder / (f"img_{i:02d}.JPG" if i % 3 == 2 else f"img_{i:02d}.png")
        Image.fromarray(pixels).save(path)
        files.append(path)
    return sorted(files)


def embed_files(model: nn.Module, files: list[Path]) -> np.ndarray:
    """The grader's own index: every file opened, preprocessed and embedded alone; (N, E) float64."""
    rows = []
    with torch.no_grad():
        for path in files:
            with Image.open(path) as image:
                pixels = PREPROCESS(image.convert("RGB"))  # (3, S, S)
            rows.append(model.encode_image(pixels[None])[0].double().numpy())  # (E,)
    return ref.l2_normalize(np.stack(rows))  # (N, E), unit rows


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Any]:
    """A folder of N_IMAGES shape images plus a text file and a sub-folder (both to be ignored)."""
    folder = tmp_path_factory.mktemp("photos")
    files = write_images(folder, N_IMAGES, seed=5)
    (folder / "notes.txt").write_text("not an image\n")
    write_images(folder / "more", 2, seed=6)  # a sub-folder: not indexed
    model = PixelCLIP(tiny_clip())
    return {"folder": folder, "files": files, "model": model, "index": embed_files(model, files)}



def expect_error(learner: Learner, expected: type[BaseException], name: str, why: str,
                 *args: Any, **kwargs: Any) -> BaseException:
    """The learner's `name(*args)` must raise `expected`; say `why` it should when it does not."""
    fn = learner.function(name)
    try:
        fn(*args, **kwargs)
    except expected as exc:
        if not isinstance(exc, NotImplementedError):
            return exc
        reason = describe(name, exc, learner.file)
    except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
        raise
    except BaseException as exc:  # noqa: BLE001
        reason = f"{describe(name, exc, learner.file)} for {why}; expected {expected.__name__}"
    else:
        reason = f"{name} accepted {why}: raise {expected.__name__} naming the problem"
    fail(reason)
    raise AssertionError("unreachable")


def build(learner: Learner, photos: dict[str, Any], batch_size: int = 4) -> Any:
    index = learner.call("build_index", photos["model"], PREPROCESS, photos["folder"], batch_size=batch_size)
    for name in ("paths", "embeddings", "skipped"):
        if not hasattr(index, name):
            fail(f"build_index must return a PhotoIndex (with .{name}), got {type(index).__name__}")
    return index


def check_results(what: str, got: Any, query: np.ndarray, photos: dict[str, Any], k: int) -> None:
    """got must be the k best (path, score) pairs for `query` (E,) by the reference's brute force.

    Compared score by score: each returned path's score must be its reference
    score, and the returned scores must be the k best ones, in order.
    """
    names = [p.name for p in photos["files"]]
    _, best = ref.nearest_neighbours(query[None], photos["index"], k)  # (1, k)
    all_ids, all_scores = ref.nearest_neighbours(query[None], photos["index"], len(names))
    score_of = {names[i]: s for i, s in zip(all_ids[0], all_scores[0])}
    if not isinstance(got, list) or len(got) != k:
        fail(f"{what} returned {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}; "
             f"expected a list of k={k} (path, score) pairs")
    seen = []
    for rank, item in enumerate(got):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], float)):
            fail(f"{what}[{rank}] is {item!r}; expected a (path, score) tuple with a float score")
        name = Path(item[0]).name
        if name not in score_of:
            fail(f"{what}[{rank}] names {item[0]!r}, which is not an indexed image")
        if abs(item[1] - score_of[name]) > SCORE_TOL:
            fail(f"{what}[{rank}] gives {name} the score {item[1]:.6f}; its cosine similarity with the query "
                 f"is {score_of[name]:.6f}")
        seen.append(name)
    if len(set(seen)) != k:
        fail(f"{what} lists an image twice: {seen}")
    scores = np.array([score for _, score in got])
    if not np.all(np.abs(scores - best[0]) <= SCORE_TOL):
        fail(f"{what} returned scores {np.round(scores, 4).tolist()}; the {k} best are "
             f"{np.round(best[0], 4).tolist()} (sorted, best first)")


@contextlib.contextmanager
def pickle_forbidden():
    """pickle and torch.save/torch.load raise while the block runs."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the index must be saved and loaded without pickle (use safetensors)")

    names = [(pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
             (torch, "save"), (torch, "load")]
    saved = [(module, name, getattr(module, name)) for module, name in names]
    for module, name, _ in saved:
        setattr(module, name, refuse)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


# ---------------------------------------------------------------- checks


@pytest.mark.points(1)
def test_list_images(learner, photos):
    """list_images: the image files of the folder, sorted"""
    got = learner.call("list_images", photos["folder"])
    names = [Path(p).name for p in got] if isinstance(got, list) else got
    expected = [p.name for p in photos["files"]]
    if names != expected:
        fail(f"list_images returned {names!r}; expected {expected!r} (.png/.jpg/.jpeg in any case, "
             "sorted; not notes.txt, not the files of the sub-folder)")


@pytest.mark.points(1)
def test_list_images_errors(learner, tmp_path):
    """list_images: FileNotFoundError without the folder, ValueError when it holds no image"""
    expect_error(learner, FileNotFoundError, "list_images", "a folder that does not exist", tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here\n")
    exc = expect_error(learner, ValueError, "list_images", "a folder with no image", tmp_path)
    if str(tmp_path) not in str(exc):
        fail(f"list_images's error for a folder with no image should name the folder; it says: {exc}")


@pytest.mark.points(3)
def test_index_matches_reference(learner, photos):
    """build_index: unit embeddings of every image, in sorted order"""
    index = build(learner, photos)
    names = [Path(p).name for p in index.paths]
    expected = [p.name for p in photos["files"]]
    if names != expected:
        fail(f"the index holds {names!r}; expected {expected!r}")
    check_close("index.embeddings", index.embeddings, photos["index"],
                f"{N_IMAGES} images embedded one at a time by the grader (preprocess, encode_image, "
                "normalise each row to unit length)")


@pytest.mark.points(1)
def test_index_is_batched(learner, photos):
    """build_index: encode_image on batches of at most batch_size"""
    model = Recording(photos["model"])
    learner.call("build_index", model, PREPROCESS, photos["folder"], batch_size=4)
    batches = model.batches
    if sum(batches) != N_IMAGES or max(batches, default=0) > 4 or len(batches) != 3:
        fail(f"build_index(batch_size=4) called encode_image with batches of {batches} for {N_IMAGES} "
             "images; expected [4, 4, 2]: each image once, at most batch_size at a time")


@pytest.mark.points(1)
def test_unreadable_file_is_skipped(learner, tmp_path):
    """build_index: a file PIL cannot read is skipped and named"""
    files = write_images(tmp_path, 3, seed=8)
    (tmp_path / "broken.png").write_bytes(b"this is not a PNG file" * 4)
    index = learner.call("build_index", tiny_clip(), PREPROCESS, tmp_path, batch_size=8)
    names = [Path(p).name for p in getattr(index, "paths", [])]
    if names != [p.name for p in files]:
        fail(f"with a broken broken.png next to 3 images the index holds {names!r}; expected the 3 images")
    skipped = getattr(index, "skipped", None)
    if not skipped or "broken.png" not in str(skipped[0][0]):
        fail(f"index.skipped is {skipped!r}; expected [(path of broken.png, reason)]")


@pytest.mark.points(1)
def test_no_readable_image_is_an_error(learner, tmp_path):
    """build_index: ValueError naming the files when none can be read"""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but nothing after it")
    exc = expect_error(learner, ValueError, "build_index", "a folder whose only image is broken",
                       tiny_clip(), PREPROCESS, tmp_path)
    if "broken.png" not in str(exc):
        fail(f"build_index's error should name the unreadable file broken.png; it says: {exc}")


@pytest.mark.points(2)
def test_save_and_load(learner, photos, tmp_path):
    """save_index / load_index: a safetensors file, no pickle, same index back"""
    index = build(learner, photos)
    path = tmp_path / "photos.safetensors"
    with pickle_forbidden():
        learner.call("save_index", index, path)
        loaded = learner.call("load_index", path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is not safetensors
        fail(f"save_index did not write a safetensors file ({type(exc).__name__}: {exc})")
    if keys != ["embeddings"] or "paths" not in metadata or "format" not in metadata:
        fail(f"the saved file holds tensors {keys} and metadata keys {sorted(metadata)}; expected the "
             "tensor 'embeddings' and the metadata 'format' and 'paths'")
    if list(getattr(loaded, "paths", [])) != list(index.paths):
        fail("load_index did not give back the saved paths, in order")
    emb = getattr(loaded, "embeddings", None)
    if not isinstance(emb, torch.Tensor) or not torch.equal(emb, index.embeddings.float()):
        fail("load_index did not give back the saved embeddings exactly")


@pytest.mark.points(1)
def test_load_rejects_other_files(learner, tmp_path):
    """load_index: FileNotFoundError or ValueError for what is not an index"""
    from safetensors.torch import save_file

    expect_error(learner, FileNotFoundError, "load_index", "a file that does not exist", tmp_path / "none")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all" * 3)
    expect_error(learner, ValueError, "load_index", "a file that is not safetensors", junk)
    other = tmp_path / "weights.safetensors"
    save_file({"embeddings": torch.randn(3, 4)}, str(other))  # safetensors, but no index metadata
    expect_error(learner, ValueError, "load_index", "a safetensors file without the index's metadata", other)


@pytest.mark.points(3)
@pytest.mark.parametrize("k", [3, N_IMAGES])
def test_search_by_text(learner, photos, k):
    """search_by_text: the k best images and their cosine scores"""
    index = build(learner, photos)
    for text in QUERIES:
        got = learner.call("search_by_text", index, photos["model"], tok, text, k)
        with torch.no_grad():
            query = photos["model"].encode_text(tok([text]))[0].double().numpy()  # (E,)
        check_results(f"search_by_text({text!r}, k={k})", got, query, photos, k)


@pytest.mark.points(2)
def test_search_by_image(learner, photos):
    """search_by_image: an indexed image finds itself first, score 1"""
    index = build(learner, photos)
    target = photos["files"][4]
    got = learner.call("search_by_image", index, photos["model"], PREPROCESS, target, 4)
    if isinstance(got, list) and got and isinstance(got[0], tuple):
        if Path(got[0][0]).name != target.name:
            fail(f"searching with {target.name} put {Path(got[0][0]).name} first; the image itself "
                 "(cosine similarity 1) must come first")
    check_results(f"search_by_image({target.name}, k=4)", got, photos["index"][4], photos, 4)


@pytest.mark.points(1)
def test_search_ties_and_bad_k(learner, rng):
    """search: ties keep the earlier path; ValueError for k outside 1..N"""
    emb = rng.normal(size=(5, 8))
    emb[3] = emb[1]  # two equal rows: equal scores for every query
    emb = torch.tensor(ref.l2_normalize(emb), dtype=torch.float32)
    index = learner.call("PhotoIndex", [f"p{i}.png" for i in range(5)], emb)
    got = learner.call("search", index, emb[3] * 2.0, 2)
    if [p for p, _ in got] != ["p1.png", "p3.png"]:
        fail(f"search with a query equal to two tied rows (p1, p3) returned {got!r}; expected p1.png, then "
             "p3.png (ties keep the earlier path: a stable sort)")
    for k in (0, 6):
        expect_error(learner, ValueError, "search", f"k={k} with 5 indexed images", index, emb[0], k)


@pytest.mark.points(1)
def test_index_from_another_model(learner, photos):
    """search_by_text: ValueError when the model's embedding size differs from the index's"""
    index = build(learner, photos)
    other = tiny_clip(embed_dim=24, seed=1)
    exc = expect_error(learner, ValueError, "search_by_text", "a model with E = 24 on an index with E = 16",
                       index, other, tok, "a red circle", 3)
    if "16" not in str(exc) and "24" not in str(exc):
        fail(f"the error for an index from another model should give the sizes (16 vs 24); it says: {exc}")
