"""The common container every loader returns, and the uint8 -> float conversion.

All loaders (CIFAR, MNIST, SVHN, digits, the synthetic patch model) return an ``ImageDataset`` so that
training code can treat them alike.  Image datasets keep their pixels as ``uint8`` (4x less memory than float32;
CIFAR-10's train set is 150 MB instead of 600 MB) and are converted batch by batch with ``to_float``.

The file loaders build it with ``image_dataset``, which refuses inconsistent splits (train and test image
shapes, label counts, shapes and ranges) at load time with a one-line message naming the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

__all__ = ["ImageDataset", "channel_mean_std", "check_splits", "image_dataset", "label_shape_problem", "to_float"]


@dataclass(repr=False)
class ImageDataset:
    """A train/test pair of image tensors with integer labels.

    ``train_images``/``test_images`` are ``uint8 [N, C, H, W]`` for image datasets and float32 for generated
    data (e.g. ``[N, 2, dim]`` for the signal/noise patch model).  Labels are int64 class indices ``[N]``.
    ``mean``/``std`` are the per-channel statistics of the TRAIN images in ``[0, 1]`` units (pixels / 255 for
    uint8), ready for ``flatminima.data.transforms.normalize``.

    ``clean_train_labels`` is set only when the loader itself corrupts the training labels (the patch model
    flips them); it holds the uncorrupted labels so memorisation of the noise can be measured.
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clean_train_labels: Tensor | None = None

    def __post_init__(self) -> None:
        check_splits(
            self.name, (self.train_images, self.train_labels), (self.test_images, self.test_labels), self.num_classes
        )
        clean = self.clean_train_labels
        if clean is not None and clean.shape != self.train_labels.shape:
            raise ValueError(
                f"{self.name}: clean_train_labels has shape {tuple(clean.shape)} but train_labels "
                f"{tuple(self.train_labels.shape)}; they must label the same examples"
            )
        if len(self.mean) != len(self.std):
            raise ValueError(f"{self.name}: mean has {len(self.mean)} entries but std has {len(self.std)}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(3, 32, 32)``."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={tuple(self.train_images.shape)} {self.train_images.dtype}, "
            f"test={tuple(self.test_images.shape)} {self.test_images.dtype}, num_classes={self.num_classes}, "
            f"mean={tuple(round(m, 4) for m in self.mean)}, std={tuple(round(s, 4) for s in self.std)})"
        )


def check_splits(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    where: Mapping[str, str] | None = None,
    fix: str = "",
) -> None:
    """Raise a one-line ``ValueError`` unless the ``(images, labels)`` splits fit together.

    Checked: labels are int64 ``[N]``, one per image, within ``[0, num_classes)``; train and test images have
    the same per-example shape (8x8 train with 28x28 test images would otherwise train a whole epoch and only
    fail in evaluation).  ``where`` maps ``'train_images'``, ``'train_labels'``, ``'test_images'`` and
    ``'test_labels'`` to the file(s) each came from, so the message names them; ``fix`` (a sentence saying what
    to do) is appended.
    """

    def at(key: str) -> str:
        return f" in '{where[key]}'" if where and key in where else ""

    def fail(problem: str) -> NoReturn:
        raise ValueError(f"{name}: {problem}" + (f". {fix}" if fix else ""))

    if num_classes < 1:
        fail(f"num_classes must be >= 1, got {num_classes}")
    for split, (images, labels) in (("train", train), ("test", test)):
        if labels.dim() != 1 or labels.dtype != torch.int64:
            fail(f"{split} labels{at(split + '_labels')} must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")
        if images.dim() < 1 or images.shape[0] != labels.shape[0]:
            n_images = images.shape[0] if images.dim() else "no"
            if where and f"{split}_labels" in where and f"{split}_images" in where:
                fail(
                    f"'{where[split + '_labels']}' holds {labels.shape[0]} labels but '{where[split + '_images']}' "
                    f"holds {n_images} images; each image needs exactly one label"
                )
            fail(f"{split} has {n_images} images but {labels.shape[0]} labels")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                fail(
                    f"{split} labels{at(split + '_labels')} range over [{lo}, {hi}], "
                    f"expected [0, {num_classes - 1}] for {num_classes} classes"
                )
    train_shape, test_shape = tuple(train[0].shape[1:]), tuple(test[0].shape[1:])
    if train_shape != test_shape:
        fail(
            f"train images{at('train_images')} are {_shape(train_shape)} but test images{at('test_images')} are "
            f"{_shape(test_shape)}; both splits must have one image shape (from different datasets?)"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalars"


def label_shape_problem(shape: tuple[int, ...], what: str, mat: bool = False) -> str | None:
    """``None`` if a label array of ``shape`` holds one label per example, else the problem, for an error message.

    Labels must be 1-D.  With ``mat=True`` (MATLAB ``.mat`` files, which have no 1-D arrays) a column ``(N, 1)``,
    as in the official SVHN files, or a row ``(1, N)``, what ``scipy.io.savemat`` writes for a 1-D array, is
    accepted too; anything else, e.g. ``(32, 2)`` for 64 images, would be silently flattened into garbage.
    """
    if len(shape) == 1 or (mat and len(shape) == 2 and 1 in shape):
        return None
    expected = "(N, 1) or (N,)" if mat else "(N,)"
    return f"{what} has shape {shape}, expected {expected}, one label per image"


def image_dataset(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    where: Mapping[str, str] | None = None,
    fix: str = "",
    title: str = "",
) -> ImageDataset:
    """Check the splits with ``check_splits`` (messages start with ``title``, default ``name``, and name the
    files in ``where``), then build the dataset with the per-channel statistics of the train images: the one
    place the file loaders build their ``ImageDataset``."""
    check_splits(title or name, train, test, num_classes, where=where, fix=fix)
    mean, std = channel_mean_std(train[0])
    return ImageDataset(name, train[0], train[1], test[0], test[1], num_classes=num_classes, mean=mean, std=std)


def to_float(images: Tensor) -> Tensor:
    """Convert uint8 pixels to float32 in ``[0, 1]`` (divide by 255); floating-point tensors pass through unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.dtype.is_floating_point:
        return images
    raise ValueError(f"to_float expects uint8 pixels or a floating-point tensor, got dtype {images.dtype}")


def channel_mean_std(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of ``images [N, C, ...]`` in ``[0, 1]`` units.

    Accumulates in float64 over chunks of ``chunk`` images so a 50 000-image uint8 set never needs a full
    float copy.
    """
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"channel_mean_std needs a non-empty [N, C, ...] tensor, got shape {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64)
        if images.dtype == torch.uint8:
            block = block / 255.0
        block = block.transpose(0, 1).reshape(channels, -1)
        total += block.sum(dim=1)
        total_sq += (block * block).sum(dim=1)
        count += block.shape[1]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.sqrt())
