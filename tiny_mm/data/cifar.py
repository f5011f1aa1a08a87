"""CIFAR-10 from the user's own copy, and a miniature copy in the real format for tests.

Nothing here downloads. ``load_cifar10`` reads the standard ``cifar-10-batches-py``
folder (the python pickle release of CIFAR-10) through ``torchvision.datasets.CIFAR10``;
``write_mini_cifar10`` writes a tiny dataset in that same pickle format so tests can
exercise the real reader.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["CIFAR10_CLASSES", "CIFAR10_URL", "load_cifar10", "write_mini_cifar10"]

# The label names stored in batches.meta of the official release, in label order.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_FOLDER = "cifar-10-batches-py"
_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch", "batches.meta"]


def load_cifar10(
    data_dir: str | Path, train: bool = False, transform: Callable | None = None, *, verify_md5: bool = True
):
    """The CIFAR-10 test split (or train split) under ``data_dir``.

    data_dir: the folder that contains ``cifar-10-batches-py`` (torchvision's ``root``).
    verify_md5: torchvision checks every file against the official MD5 sums; pass False
        to read a copy in the same format with other contents (``write_mini_cifar10``).
    Returns a ``torchvision.datasets.CIFAR10``; item i is ``(transform(PIL image 32x32 RGB), label)``.
    Raises FileNotFoundError naming the resolved folder it looked in and how to get the data,
    and ValueError when the files are there but fail the MD5 check.
    """
    root = Path(data_dir).expanduser().resolve()
    folder = root / _FOLDER
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: looked in {folder} (missing {', '.join(missing)}). "
            f"Download the python version from {CIFAR10_URL} and unpack it into {root}, "
            f"or run: python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', download=True)\""
        )
    from torchvision.datasets import CIFAR10

    cls = CIFAR10 if verify_md5 else _unverified_cifar10(CIFAR10)
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except RuntimeError as error:  # torchvision's "not found or corrupted": every file is there
        raise ValueError(
            f"the files in {folder} do not match CIFAR-10's published MD5 sums (a partial "
            f"download, or another dataset in the same format?). Download it again from "
            f"{CIFAR10_URL}; for a copy you made yourself, pass verify_md5=False."
        ) from error


def _unverified_cifar10(base: type) -> type:
    """``base`` with every MD5 set to None: torchvision then checks only that each file exists."""
    return type(
        "UnverifiedCIFAR10",
        (base,),
        {
            "train_list": [[name, None] for name, _ in base.train_list],
            "test_list": [[name, None] for name, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        },
    )


def _write_batch(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    """One pickle batch as the release stores it: uint8 rows of 3072 = R plane, G plane, B plane."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)  # (n, 3072)
    # str keys: the release was pickled by Python 2, whose str keys torchvision reads
    # back (encoding="latin1") as str.
    batch = {
        "batch_label": name,
        "labels": labels,
        "data": np.ascontiguousarray(rows, dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_mini_cifar10(root: str | Path, n_per_class: int = 2, seed: int = 0) -> Path:
    """Write a miniature CIFAR-10 under ``root/cifar-10-batches-py`` in the real pickle format.

    Each of the six batches (data_batch_1..5, test_batch) holds ``n_per_class`` random
    32x32x3 uint8 images per class, labels in class order; batches.meta holds
    ``label_names``. Returns the ``cifar-10-batches-py`` folder.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    folder = Path(root) / _FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [c for c in range(10) for _ in range(n_per_class)]
    for name in _FILES[:-1]:
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)  # (n, H, W, C)
        _write_batch(folder / name, images, labels, name)
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(labels), "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder
