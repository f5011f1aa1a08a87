# Generated from solutions/ex07_photo_search.py by `python -m tiny_mm.stubs`: fill in every NotImplementedError.
"""Exercise 7 (chapter 5): search a folder of photos by text or by example, with CLIP.

CLIP puts images and sentences in one space, so a folder of photos becomes a
search engine in three steps: embed every image once and keep the unit
vectors (the index); embed a query, a sentence or another photo, the same
way; rank the photos by cosine similarity with the query. The index is saved
to disk so the slow step runs once, and saved without pickle, so loading an
index from someone else cannot run their code.

What to do:
  1. Fill in every function marked below: replace each
     `raise NotImplementedError(...)` with your code. The docstrings are the
     specification (shapes, file formats, which errors to raise).
  2. Grade your work:

         tinymm grade ex07

     The checks write coloured-shape images to a temporary folder, index them
     with a tiny random CLIP, and compare your rankings and scores with a
     brute-force search by the chapter's NumPy reference
     (chapters/ch05_clip_zero_shot/reference.py, `nearest_neighbours`).

The reference solution lives in solutions/ex07_photo_search.py
(`tinymm grade ex07 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared lower-case: "photo.JPG" counts
INDEX_FORMAT = "tiny_mm photo index 1"  # written into the file, checked when loading


class PhotoIndex(NamedTuple):
    """What build_index makes and save_index / load_index store.

    paths: N str, the indexed images in sorted order, each str(folder / filename).
    embeddings: (N, E) float32, row i the unit-length image embedding of paths[i].
    skipped: (path, reason) of every image file that could not be read.
    """

    paths: list[str]
    embeddings: Tensor
    skipped: tuple[tuple[str, str], ...] = ()


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (not in sub-folders), sorted by name.

    An image file is one whose suffix, lower-cased, is in IMAGE_SUFFIXES.
    Raise FileNotFoundError when `folder` is not a directory, and ValueError
    naming the folder when it holds no image file.
    """
    raise NotImplementedError(
        "ex07 (list_images): Path(folder).is_dir(); sorted(p for p in folder.iterdir() if "
        "p.is_file() and p.suffix.lower() in ...)"
    )


@torch.no_grad()
def build_index(
    model: nn.Module,
    preprocess: Callable,
    folder: str | Path,
    batch_size: int = 32,
) -> PhotoIndex:
    """Embed every image of `folder` (list_images) in batches: the index.

    model: a CLIP-like module with encode_image(images (B, 3, S, S)) -> (B, E).
    preprocess: PIL image -> (3, S, S) tensor (e.g. tiny_mm.zeroshot.clip_preprocess(S)).
    Open each file with PIL (PIL.Image.open, then .convert("RGB")). A file PIL
    cannot read is left out and recorded in `skipped` with the reason. Call
    encode_image on batches of at most batch_size images (the last may be
    smaller), and normalise every embedding to unit length.
    Raise ValueError when batch_size < 1, or when no image could be read
    (name the skipped files).
    """
    raise NotImplementedError(
        "ex07 (build_index): for each path of list_images: try Image.open(path).convert(\"RGB\") "
        "except OSError -> skipped; stack batch_size preprocessed images, "
        "F.normalize(model.encode_image(batch), dim=-1), torch.cat."
    )


def save_index(index: PhotoIndex, path: str | Path) -> None:
    """Write the index to one file, without pickle: safetensors.

    The tensor "embeddings" (N, E) float32, and in the file's metadata (a
    dict of str): "format" = INDEX_FORMAT and "paths" = json.dumps(index.paths).
    (safetensors.torch.save_file(tensors, path, metadata=...)). The skipped
    list is not saved.
    """
    raise NotImplementedError(
        "ex07 (save_index): save_file({\"embeddings\": index.embeddings.contiguous()}, str(path), "
        "metadata={...})"
    )


def load_index(path: str | Path) -> PhotoIndex:
    """Read an index written by save_index.

    Raise FileNotFoundError when the file does not exist, and ValueError when
    it is not such an index: not a safetensors file, no "format" =
    INDEX_FORMAT in its metadata, or a number of paths that differs from the
    number of embedding rows.
    """
    raise NotImplementedError(
        "ex07 (load_index): with safe_open(str(path), framework=\"pt\") as f: f.metadata(), "
        "f.get_tensor(\"embeddings\")"
    )


def search(index: PhotoIndex, query: Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The k indexed images most similar to a query embedding: [(path, score), ...], best first.

    query: (E,) embedding, any length (normalise it). score: cosine
    similarity as a Python float. Ties go to the earlier path.
    Raise ValueError when k is not in 1..N, or when the query's size E
    differs from the index's (an index built with another model).
    """
    raise NotImplementedError(
        "ex07 (search): scores = index.embeddings @ F.normalize(query, dim=-1)  (N,); order = "
        "torch.argsort(scores, descending=True, stable=True)[:k]"
    )


@torch.no_grad()
def search_by_text(
    index: PhotoIndex, model: nn.Module, tokenize: Callable[[list[str]], Tensor], text: str, k: int = 5
) -> list[tuple[str, float]]:
    """The k images that best match a sentence: embed it with model.encode_text(tokenize([text])), then search."""
    raise NotImplementedError(
        "ex07 (search_by_text): search(index, model.encode_text(tokenize([text]))[0], k)"
    )


@torch.no_grad()
def search_by_image(
    index: PhotoIndex, model: nn.Module, preprocess: Callable, image_path: str | Path, k: int = 5
) -> list[tuple[str, float]]:
    """The k indexed images most like the image at image_path (opened and preprocessed as in build_index)."""
    raise NotImplementedError(
        "ex07 (search_by_image): open and preprocess as build_index does; search(index, "
        "model.encode_image(pixels[None])[0], k)"
    )
