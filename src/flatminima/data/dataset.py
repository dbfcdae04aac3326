"""The common container every loader returns, and the uint8 -> float conversion.

All loaders (CIFAR, MNIST, SVHN, digits, the synthetic patch model) return an :class:`ImageDataset` so that
training code can treat them alike.  Image datasets keep their pixels as ``uint8`` (4x less memory than float32;
CIFAR-10's train set is 150 MB instead of 600 MB) and are converted batch by batch with :func:`to_float`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageDataset", "channel_mean_std", "to_float"]


@dataclass(repr=False)
class ImageDataset:
    """A train/test pair of image tensors with integer labels.

    ``train_images``/``test_images`` are ``uint8 [N, C, H, W]`` for image datasets and float32 for generated
    data (e.g. ``[N, 2, dim]`` for the signal/noise patch model).  Labels are int64 class indices ``[N]``.
    ``mean``/``std`` are the per-channel statistics of the TRAIN images in ``[0, 1]`` units (pixels / 255 for
    uint8), ready for :func:`flatminima.data.transforms.normalize`.

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
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if labels.dim() != 1 or labels.dtype != torch.int64:
                raise ValueError(
                    f"{self.name}: {split}_labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}"
                )
            if images.shape[0] != labels.shape[0]:
                raise ValueError(f"{self.name}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
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
