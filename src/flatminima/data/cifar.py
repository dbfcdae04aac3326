"""CIFAR-10 and CIFAR-100 from the official files (https://www.cs.toronto.edu/~kriz/cifar.html), no download.

Accepted layouts, for ``root`` =

* the extracted binary-version folder (``cifar-10-batches-bin`` / ``cifar-100-binary``) or its parent;
* the extracted python-version folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent, read with
  a restricted unpickler (``flatminima.data.safe_pickle``) so a tampered file cannot run code;
* the ``.tar.gz`` archive itself, or a folder holding it; members are read in memory, nothing is extracted.

Binary records are 1 label byte (CIFAR-100: coarse then fine label byte) followed by 3072 pixel bytes, the
1024 red, 1024 green and 1024 blue values of a 32x32 image in row-major order.  Any number of whole records per
file is accepted, so small test files in the real format work.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flatminima.data._files import ArchiveSource, FolderSource, Source, corrupt, missing
from flatminima.data.dataset import ImageDataset, image_dataset, label_shape_problem
from flatminima.data.safe_pickle import RefusedGlobalError, restricted_load

__all__ = ["load_cifar10", "load_cifar100"]

_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """File names of one version (binary or python) of one CIFAR set."""

    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    binary: bool


@dataclass(frozen=True)
class _Spec:
    name: str
    binary: _Layout
    python: _Layout
    label_bytes: int  # binary version: label bytes per record


_CIFAR10 = _Spec(
    name="CIFAR-10",
    binary=_Layout(
        folder="cifar-10-batches-bin",
        archive="cifar-10-binary.tar.gz",
        train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test=("test_batch.bin",),
        binary=True,
    ),
    python=_Layout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        binary=False,
    ),
    label_bytes=1,
)

_CIFAR100 = _Spec(
    name="CIFAR-100",
    binary=_Layout(
        folder="cifar-100-binary",
        archive="cifar-100-binary.tar.gz",
        train=("train.bin",),
        test=("test.bin",),
        binary=True,
    ),
    python=_Layout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        binary=False,
    ),
    label_bytes=2,
)


def load_cifar10(root: str | os.PathLike[str]) -> ImageDataset:
    """Load CIFAR-10 (50 000 train / 10 000 test, uint8 ``[N, 3, 32, 32]``, 10 classes) from ``root``.

    ``root`` may be the extracted ``cifar-10-batches-bin`` or ``cifar-10-batches-py`` folder, its parent, a
    ``cifar-10-binary.tar.gz`` / ``cifar-10-python.tar.gz`` archive, or a folder holding one.
    """
    return _load(_CIFAR10, root, fine=True)


def load_cifar100(root: str | os.PathLike[str], label_type: str = "fine") -> ImageDataset:
    """Load CIFAR-100 (50 000 train / 10 000 test, uint8 ``[N, 3, 32, 32]``) from ``root``.

    ``label_type='fine'`` (default) gives the usual 100 classes, ``'coarse'`` the 20 superclasses.  ``root``
    may be the extracted ``cifar-100-binary`` or ``cifar-100-python`` folder, its parent, a
    ``cifar-100-binary.tar.gz`` / ``cifar-100-python.tar.gz`` archive, or a folder holding one.
    """
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' (100 classes) or 'coarse' (20 classes), got {label_type!r}")
    return _load(_CIFAR100, root, fine=label_type == "fine")


# ---------------------------------------------------------------- locating the files


def _open_archive(spec: _Spec, archive: Path) -> tuple[Source, _Layout]:
    try:
        source = ArchiveSource(archive, prefix="")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ValueError(corrupt(spec.name, archive, f"cannot be read as a tar archive ({exc})", _URL)) from exc
    for layout in (spec.binary, spec.python):
        if any(source.exists(f"{layout.folder}/{name}") for name in (*layout.train, *layout.test)):
            source.set_prefix(layout.folder)
            return source, layout
    source.close()
    wanted = f"'{spec.binary.folder}/' or '{spec.python.folder}/'"
    raise ValueError(corrupt(spec.name, archive, f"the archive holds no {wanted} member files", _URL))


def _locate(spec: _Spec, root: str | os.PathLike[str]) -> tuple[Source, _Layout]:
    base = Path(root).expanduser()
    layouts = (spec.binary, spec.python)
    if base.is_file():
        return _open_archive(spec, base)
    if base.is_dir():
        # the extracted folder itself, recognised by any of its data files
        for layout in layouts:
            if any((base / name).is_file() for name in (*layout.train, *layout.test)):
                return FolderSource(base), layout
        # its parent
        for layout in layouts:
            if (base / layout.folder).is_dir():
                return FolderSource(base / layout.folder), layout
        # a folder holding the downloaded archive
        for layout in layouts:
            if (base / layout.archive).is_file():
                return _open_archive(spec, base / layout.archive)
    expected = (
        f"the extracted folder '{spec.binary.folder}/' (files {', '.join(spec.binary.train + spec.binary.test)}) "
        f"or '{spec.python.folder}/', or the archive '{spec.binary.archive}' or '{spec.python.archive}'"
    )
    hint = "binary version preferred" if base.is_dir() else "that folder does not exist"
    raise FileNotFoundError(missing(spec.name, [expected], base, _URL, hint=hint))


# ---------------------------------------------------------------- parsing


#: The largest batch file read (CIFAR-100's training file, the largest, is about 150 MiB): a larger one is damaged,
#: or a decompression bomb in an archive, and is refused before it is read.
MAX_BATCH_BYTES = 2**29


def _check_size(source: Source, name: str, spec: _Spec) -> None:
    size = source.size(name)
    if size > MAX_BATCH_BYTES:
        raise ValueError(
            corrupt(spec.name, source.path(name), f"it is {size >> 20} MiB, more than any batch file of it", _URL)
        )


def _read_binary(source: Source, name: str, spec: _Spec, fine: bool) -> tuple[np.ndarray, np.ndarray]:
    record = spec.label_bytes + _PIXELS
    _check_size(source, name, spec)
    with source.open(name) as handle:
        raw = handle.read()
    if len(raw) == 0 or len(raw) % record:
        raise ValueError(
            corrupt(
                spec.name,
                source.path(name),
                f"its size {len(raw)} bytes is not a positive multiple of the {record}-byte record "
                f"({spec.label_bytes} label byte(s) + {_PIXELS} pixels)",
                _URL,
            )
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    label_col = spec.label_bytes - 1 if fine else 0
    return rows[:, spec.label_bytes :].reshape(-1, 3, 32, 32), rows[:, label_col].astype(np.int64)


def _read_python(source: Source, name: str, spec: _Spec, fine: bool) -> tuple[np.ndarray, np.ndarray]:
    where = source.path(name)
    _check_size(source, name, spec)
    try:
        with source.open(name) as handle:
            batch = restricted_load(handle)
    except RefusedGlobalError as exc:
        raise RefusedGlobalError(
            f"{spec.name}: '{where}': {exc}; this is not an official batch file: delete it and download the dataset "
            f"again from {_URL}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(corrupt(spec.name, where, f"it cannot be unpickled ({exc!r})", _URL)) from exc
    if not isinstance(batch, dict):
        raise ValueError(corrupt(spec.name, where, f"expected a pickled dict, found {type(batch).__name__}", _URL))
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    label_key = "labels" if spec.label_bytes == 1 else "fine_labels" if fine else "coarse_labels"
    if "data" not in batch or label_key not in batch:
        raise ValueError(
            corrupt(spec.name, where, f"the dict lacks 'data' or '{label_key}' (keys: {sorted(map(str, batch))})", _URL)
        )
    data = np.asarray(batch["data"])
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(corrupt(spec.name, where, f"'{label_key}' is not a list of integers ({exc})", _URL)) from exc
    problem = label_shape_problem(labels.shape, f"'{label_key}'")
    if problem:
        raise ValueError(corrupt(spec.name, where, problem, _URL))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS or data.shape[0] != labels.shape[0]:
        raise ValueError(
            corrupt(
                spec.name,
                where,
                f"'data' is {data.dtype} {data.shape} with {labels.shape[0]} labels, "
                f"expected uint8 [N, {_PIXELS}] with N labels",
                _URL,
            )
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(
    source: Source, layout: _Layout, names: tuple[str, ...], spec: _Spec, fine: bool, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    absent = [name for name in names if not source.exists(name)]
    if absent:
        raise FileNotFoundError(missing(spec.name, absent, source.location, _URL))
    reader = _read_binary if layout.binary else _read_python
    images, labels = [], []
    for name in names:
        try:
            x, y = reader(source, name, spec, fine)
        except (EOFError, tarfile.TarError, zlib.error) as exc:  # a truncated .tar.gz
            raise ValueError(corrupt(spec.name, source.path(name), f"reading it failed ({exc!r})", _URL)) from exc
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                corrupt(
                    spec.name,
                    source.path(name),
                    f"labels range over [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]",
                    _URL,
                )
            )
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _load(spec: _Spec, root: str | os.PathLike[str], fine: bool) -> ImageDataset:
    num_classes = 10 if spec.label_bytes == 1 else 100 if fine else 20
    source, layout = _locate(spec, root)
    with source:
        x_train, y_train = _read_split(source, layout, layout.train, spec, fine, num_classes)
        x_test, y_test = _read_split(source, layout, layout.test, spec, fine, num_classes)
        train_from, test_from = _describe(source, layout.train), _describe(source, layout.test)
    name = "cifar10" if spec.label_bytes == 1 else "cifar100" if fine else "cifar100-coarse"
    return image_dataset(
        name,
        (x_train, y_train),
        (x_test, y_test),
        num_classes=num_classes,
        where={
            "train_images": train_from,
            "train_labels": train_from,
            "test_images": test_from,
            "test_labels": test_from,
        },
        fix=f"Replace the wrong file(s): download the official ones again from {_URL}",
        title=spec.name,
    )


def _describe(source: Source, names: tuple[str, ...]) -> str:
    """Where a split came from, for error messages: one file's path, or the folder/archive and the file names."""
    return source.path(names[0]) if len(names) == 1 else f"{source.location} ({', '.join(names)})"
