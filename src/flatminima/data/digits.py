"""scikit-learn's 8x8 handwritten digits as a seeded, stratified, standardised train/test split.

The digits set (1797 images, shipped with scikit-learn, no download) is small enough to train CNNs on a CPU in
seconds, which makes it the default data for the examples and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flatminima.data.dataset import ImageDataset, image_dataset

__all__ = ["DigitsSplit", "load_digits", "load_digits_split"]


@dataclass
class DigitsSplit:
    """Train/test tensors: images float32 ``[N, 1, 8, 8]``, labels int64 ``[N]``.

    ``mean`` and ``std`` are the scalar statistics of the (``[0, 1]``-scaled) training images used to
    standardise both sets.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float
    num_classes: int = 10


def _split_digits(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (pixel values 0..16) split stratified by class with ``seed``: x_tr, x_te, y_tr, y_te."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    _check_seed(seed)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits need scikit-learn, a dependency of flatminima: pip install scikit-learn") from exc
    digits = sklearn_load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    return train_test_split(images, labels, test_size=test_fraction, random_state=seed, stratify=labels)


def _check_seed(seed: int) -> None:
    """Refuse a seed scikit-learn's ``random_state`` would reject, with our own message rather than its."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must be >= 0 (an integer in [0, 2**32 - 1], the range scikit-learn accepts for the digits "
            f"split), got {seed!r}; pass e.g. seed=0"
        )


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Load the digits, split them stratified by class with ``seed``, scale to [0, 1], standardise.

    Standardisation uses the mean and standard deviation of the TRAIN pixels only, so no test
    information leaks into the preprocessing.
    """
    x_tr, x_te, y_tr, y_te = _split_digits(test_fraction, seed)
    x_tr, x_te = (x_tr / 16.0).astype(np.float32), (x_te / 16.0).astype(np.float32)
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return DigitsSplit(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr[:, None])),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te[:, None])),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        mean=mean,
        std=std,
        num_classes=10,
    )


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> ImageDataset:
    """The digits as an ``ImageDataset``: uint8 ``[N, 1, 8, 8]`` (0..16 rescaled to 0..255), 10 classes.

    The train/test split is exactly that of ``load_digits_split`` with the same ``seed`` and
    ``test_fraction``, so the two APIs see the same examples.
    """
    x_tr, x_te, y_tr, y_te = _split_digits(test_fraction, seed)
    to_uint8 = lambda x: np.rint(x * (255.0 / 16.0)).astype(np.uint8)  # noqa: E731
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return image_dataset(
        "digits",
        (as_tensor(to_uint8(x_tr)[:, None]), as_tensor(y_tr)),
        (as_tensor(to_uint8(x_te)[:, None]), as_tensor(y_te)),
        num_classes=10,
    )
