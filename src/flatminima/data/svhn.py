"""SVHN (Street View House Numbers, cropped-digits format 2) from the official ``.mat`` files, no download.

Each file holds ``X``, uint8 ``[32, 32, 3, N]``, and ``y``, ``[N, 1]`` with labels 1..10 where 10 stands for the
digit 0; the loader returns ``[N, 3, 32, 32]`` images and labels 0..9 (label = digit).  Reading needs scipy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flatminima.data._files import corrupt, find_folder, folder_hint, missing
from flatminima.data.dataset import ImageDataset, image_dataset, label_shape_problem

__all__ = ["load_svhn"]

_URL = "http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits)"
_TRAIN, _TEST, _EXTRA = "train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"


def load_svhn(root: str | os.PathLike[str], include_extra: bool = False) -> ImageDataset:
    """Load SVHN (73 257 train / 26 032 test, uint8 ``[N, 3, 32, 32]``, 10 classes, label = digit).

    ``root`` is the folder holding ``train_32x32.mat`` and ``test_32x32.mat``, or a parent with them under
    ``svhn`` or ``SVHN``.  ``include_extra=True`` appends the 531 131 images of ``extra_32x32.mat`` to the
    training set (the usual protocol for the strongest SVHN numbers).
    """
    base = Path(root).expanduser()
    subfolders = ("svhn", "SVHN")
    folder = find_folder(base, [_TRAIN, _TEST], subfolders)
    if folder is None:
        hint = folder_hint(base, subfolders)
        raise FileNotFoundError(missing("SVHN", [_TRAIN, _TEST], base, _URL, hint=hint))
    names = [_TRAIN, _TEST, *([_EXTRA] if include_extra else [])]
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(missing("SVHN", absent, folder, _URL))

    x_train, y_train = _read_mat(folder / _TRAIN)
    x_test, y_test = _read_mat(folder / _TEST)
    train_from = str(folder / _TRAIN)
    if include_extra:
        x_extra, y_extra = _read_mat(folder / _EXTRA)
        x_train, y_train = torch.cat([x_train, x_extra]), torch.cat([y_train, y_extra])
        train_from += f" + {_EXTRA}"
    return image_dataset(
        "svhn",
        (x_train, y_train),
        (x_test, y_test),
        num_classes=10,
        where={
            "train_images": train_from,
            "train_labels": train_from,
            "test_images": str(folder / _TEST),
            "test_labels": str(folder / _TEST),
        },
        fix=f"Replace the wrong file(s): download the official ones again from {_URL}",
        title="SVHN",
    )


def _read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_svhn needs scipy to read the .mat files: pip install scipy") from exc
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ... for damaged files
        raise ValueError(corrupt("SVHN", path, f"scipy.io.loadmat cannot read it ({exc!r})", _URL)) from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(corrupt("SVHN", path, f"it lacks the variables 'X' and 'y' (found {sorted(mat)})", _URL))
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    problem = label_shape_problem(y.shape, "'y'", mat=True)
    if problem:
        raise ValueError(corrupt("SVHN", path, problem, _URL))
    y = y.reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or x.shape[3] != y.shape[0]:
        raise ValueError(
            corrupt(
                "SVHN",
                path,
                f"'X' is {x.dtype} {x.shape} with {y.shape[0]} labels, expected uint8 (32, 32, 3, N) with N labels",
                _URL,
            )
        )
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(corrupt("SVHN", path, f"labels range over [{y.min()}, {y.max()}], expected 1..10", _URL))
    labels = y.astype(np.int64) % 10  # 10 stands for the digit 0
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [H, W, C, N] -> [N, C, H, W]
    return torch.from_numpy(images), torch.from_numpy(labels)
