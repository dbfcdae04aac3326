"""MNIST and Fashion-MNIST from their IDX files (plain or ``.gz``), no download.

IDX format: a big-endian uint32 magic number (2051 for images, 2049 for labels), one big-endian uint32 per
dimension (images: N, rows, cols; labels: N), then the uint8 values.  Magic numbers and sizes are checked so a
truncated or mixed-up file gives a clear error instead of garbage images.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from flatminima.data._files import corrupt, find_folder, folder_hint, missing
from flatminima.data.dataset import ImageDataset, image_dataset

__all__ = ["load_fashion_mnist", "load_mnist", "read_idx"]

_MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
_FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist (files under data/fashion/)"
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MAGIC = {3: 2051, 1: 2049}  # number of dimensions -> magic number


def load_mnist(root: str | os.PathLike[str]) -> ImageDataset:
    """Load MNIST (60 000 train / 10 000 test, uint8 ``[N, 1, 28, 28]``, 10 classes) from its four IDX files.

    ``root`` is the folder holding ``train-images-idx3-ubyte`` etc. (each plain or ``.gz``), or a parent with
    them under ``MNIST/raw`` (torchvision's layout), ``MNIST`` or ``mnist``.
    """
    return _load("MNIST", "mnist", root, ("MNIST/raw", "MNIST", "mnist"), _MNIST_URL)


def load_fashion_mnist(root: str | os.PathLike[str]) -> ImageDataset:
    """Load Fashion-MNIST (60 000 train / 10 000 test, uint8 ``[N, 1, 28, 28]``, 10 classes) from its IDX files.

    Same file names and format as MNIST.  ``root`` is the folder holding them, or a parent with them under
    ``FashionMNIST/raw``, ``FashionMNIST``, ``fashion_mnist``, ``fashion-mnist`` or ``fashion``.
    """
    subfolders = ("FashionMNIST/raw", "FashionMNIST", "fashion_mnist", "fashion-mnist", "fashion")
    return _load("Fashion-MNIST", "fashion_mnist", root, subfolders, _FASHION_URL)


#: The largest IDX body read (EMNIST's largest file is under 1 GiB); a header claiming more is damaged, or a
#: decompression bomb, and is refused before anything is read.
MAX_IDX_BYTES = 2**31


def read_idx(path: str | os.PathLike[str], ndim: int, dataset: str = "IDX", url: str = "") -> np.ndarray:
    """Read one uint8 IDX file (gzipped if its name ends in ``.gz``) holding an ``ndim``-dimensional array.

    Raises ``ValueError`` naming the file when the magic number or the size does not match the header.
    """
    path = Path(path)
    header = 4 * (1 + ndim)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            head = handle.read(header)
            if len(head) < header:
                raise ValueError(
                    corrupt(dataset, path, f"it has {len(head)} bytes, fewer than the {header}-byte header", url)
                )
            magic = int.from_bytes(head[:4], "big")
            if magic != _MAGIC[ndim]:
                raise ValueError(
                    corrupt(
                        dataset,
                        path,
                        f"bad magic number {magic}, expected {_MAGIC[ndim]} for a {ndim}-d uint8 IDX file "
                        f"({'images' if ndim == 3 else 'labels'})",
                        url,
                    )
                )
            shape = tuple(int.from_bytes(head[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
            body = math.prod(shape)  # Python integers: a crafted header cannot overflow the check
            if body > MAX_IDX_BYTES:  # read no more than the header promises, and never an absurd promise
                raise ValueError(
                    corrupt(
                        dataset,
                        path,
                        f"its header {shape} claims {body} bytes, more than the {MAX_IDX_BYTES >> 30} GiB any "
                        "IDX dataset of this kind holds",
                        url,
                    )
                )
            raw = handle.read(body + 1)  # one byte more than promised: trailing data is a damaged file too
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(corrupt(dataset, path, f"it cannot be decompressed ({exc})", url)) from exc
    if len(raw) != body:
        length = f"more than {header + body}" if len(raw) > body else str(header + len(raw))
        raise ValueError(
            corrupt(dataset, path, f"it has {length} bytes but its header {shape} implies {header + body}", url)
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load(dataset: str, name: str, root: str | os.PathLike[str], subfolders: tuple[str, ...], url: str) -> ImageDataset:
    base = Path(root).expanduser()
    folder = find_folder(base, list(_FILES.values()), subfolders)
    if folder is None:
        hint = folder_hint(base, subfolders)
        raise FileNotFoundError(missing(dataset, [f"{f}[.gz]" for f in _FILES.values()], base, url, hint=hint))
    paths = {key: _find_file(folder, file) for key, file in _FILES.items()}
    absent = [f"{_FILES[key]}[.gz]" for key, path in paths.items() if path is None]
    if absent:
        raise FileNotFoundError(missing(dataset, absent, folder, url))

    arrays = {}
    for key, path in paths.items():
        assert path is not None
        arrays[key] = read_idx(path, ndim=3 if key.endswith("images") else 1, dataset=dataset, url=url)
    # np.array copies the read-only buffers into writable memory for torch
    images = {key: torch.from_numpy(np.array(arrays[f"{key}_images"])[:, None]) for key in ("train", "test")}
    labels = {key: torch.from_numpy(arrays[f"{key}_labels"].astype(np.int64)) for key in ("train", "test")}
    return image_dataset(
        name,
        (images["train"], labels["train"]),
        (images["test"], labels["test"]),
        num_classes=10,
        where={key: str(path) for key, path in paths.items()},
        fix=f"Replace the wrong file(s): download the official ones again from {url}",
        title=dataset,
    )
