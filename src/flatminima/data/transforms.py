"""Batched, vectorised data augmentation on ``[B, C, H, W]`` tensors (the standard CIFAR recipe used in SAM papers:
pad-and-crop, horizontal flip, Cutout), without torchvision.

Every random transform takes a ``torch.Generator`` so that augmentation is reproducible and independent of the
global RNG.  Random numbers are always drawn on the CPU and moved to the images' device, so the same seed gives
the same augmentation on CPU and GPU.  No transform loops over images in Python.  ``random_crop``,
``horizontal_flip`` and ``cutout`` also accept uint8 batches (augmenting before ``to_float`` saves memory);
their zero fill is then black, while on normalised images it is the channel mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augmentation", "cutout", "horizontal_flip", "normalize", "random_crop"]


def _check_batch(images: Tensor, fn: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"{fn} expects a batch [B, C, H, W], got shape {tuple(images.shape)}")


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each side by ``padding`` and crop back to ``H x W`` at a random offset per image.

    Equivalent to torchvision's ``RandomCrop(size, padding)``: the content moves by at most ``padding`` pixels
    in each direction and the uncovered border is zero.  Vectorised as one gather with per-image row and column
    indices.
    """
    _check_batch(images, "random_crop")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    b, c, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def horizontal_flip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right independently with probability ``p``."""
    _check_batch(images, "horizontal_flip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero a ``size x size`` square (all channels) at a uniformly random centre per image, clipped at the borders.

    DeVries & Taylor (2017), "Improved Regularization of Convolutional Neural Networks with Cutout": the centre
    may lie anywhere in the image, so near a border less than ``size * size`` pixels are erased.  The square
    covers rows ``cy - size // 2`` to ``cy - size // 2 + size - 1`` (likewise for columns).
    """
    _check_batch(images, "cutout")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size == 0:
        return images
    b, _, h, w = images.shape
    cy = torch.randint(0, h, (b,), generator=generator).to(images.device)
    cx = torch.randint(0, w, (b,), generator=generator).to(images.device)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=images.device)[None, :]  # [1, H]
    cols = torch.arange(w, device=images.device)[None, :]  # [1, W]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # [B, W]
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
    return images.masked_fill(mask[:, None], 0)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel standardisation ``(images - mean[c]) / std[c]`` of ``[B, C, ...]`` float images.

    ``mean``/``std`` have one entry per channel, or a single entry applied to all channels (e.g. the ``(0.0,)``
    / ``(1.0,)`` of the patch model).  Pass ``ImageDataset.mean``/``.std`` after ``to_float``.
    """
    if not images.dtype.is_floating_point:
        raise ValueError(f"normalize expects float images (use to_float first), got dtype {images.dtype}")
    if images.dim() < 2:
        raise ValueError(f"normalize expects [B, C, ...], got shape {tuple(images.shape)}")
    if len(mean) != len(std) or len(mean) not in (1, images.shape[1]):
        raise ValueError(
            f"mean/std need 1 or {images.shape[1]} (channels) entries each, got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std entries must be > 0, got {tuple(std)}")
    shape = (1, -1) + (1,) * (images.dim() - 2)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - m) / s


@dataclass(frozen=True)
class Augmentation:
    """Composable train-time augmentation: random crop with ``crop_padding``, optional flip, optional Cutout.

    Applied in that order (the usual "standard augmentation + Cutout" of SAM's CIFAR experiments is
    ``Augmentation(crop_padding=4, flip=True, cutout=16)``).  All fields at their defaults is the identity.
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {self.crop_padding} and {self.cutout}")

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch ``[B, C, H, W]``; the same generator state gives the same result."""
        _check_batch(images, "Augmentation")
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, generator)
        if self.flip:
            images = horizontal_flip(images, generator)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        return images
