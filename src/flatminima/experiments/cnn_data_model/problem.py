"""The problem: the signal/noise patch data of Chen et al. (2023) and the two-layer CNN trained on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import make_signal_noise_patches

__all__ = [
    "FLIP_PROB",
    "INIT_STD",
    "LR",
    "NOISE_STD",
    "N_TEST",
    "N_TRAIN",
    "STEPS",
    "WIDTH",
    "Setting",
    "held_out_labels",
    "make_data",
    "noise_patches",
]

N_TRAIN = 20
N_TEST = 1000
WIDTH = 10  # filters per class, m
INIT_STD = 0.01  # sigma_0
NOISE_STD = 1.0  # sigma_p
FLIP_PROB = 0.1  # p
LR = 0.1  # a run's learning rate when none is given (the tuned one is chosen on held-out seeds, .selection)
STEPS = 200  # full-batch steps of SAM, and of SGD in the equal-steps budget


@dataclass(frozen=True)
class Setting:
    """One training run: the data's signal strength ``||mu||`` and dimension ``d``, the seed, the optimiser
    (``rho=None`` for gradient descent, else SAM with that radius), the learning rate and the full-batch steps."""

    signal_norm: float
    dim: int
    seed: int
    rho: float | None
    lr: float = LR
    steps: int = STEPS


def make_data(signal_norm: float, dim: int, seed: int) -> ImageDataset:
    """The patch data of docs/papers.md sec. 5: n = 20, 1000 clean test points, sigma_p = 1, flip probability 0.1.

    For a given ``(d, seed)`` the labels, flips and noise are the same draw for every ``||mu||`` (the generator
    draws nothing whose size depends on ``||mu||``), so the cells of a row of the grid differ only in the signal.
    """
    return make_signal_noise_patches(
        N_TRAIN, N_TEST, dim=dim, signal_norm=signal_norm, noise_std=NOISE_STD, flip_prob=FLIP_PROB, seed=seed
    )


def held_out_labels(data: ImageDataset, seed: int) -> Tensor:
    """The test labels flipped like the training ones (each with probability ``FLIP_PROB``): the labels a
    held-out draw is scored on when it chooses a setting (the paper's test error is on the noisy distribution, so
    its optimum is ``p``). The flips come from their own generator, seeded ``seed + 20_000``, the same for every
    ``||mu||`` of a row and every optimiser."""
    generator = torch.Generator().manual_seed(seed + 20_000)
    flip = torch.rand(len(data.test_labels), generator=generator) < FLIP_PROB
    return torch.where(flip, 1 - data.test_labels, data.test_labels)


def noise_patches(images: Tensor) -> Tensor:
    """The noise patch ``xi_i`` of each example, ``[n, d]`` from images ``[n, 2, d]``.

    The signal patch ``+-mu`` lies along ``e_1`` and the noise is orthogonal to it, so the noise patch is the one
    with the larger component off ``e_1`` (the signal patch has none).
    """
    off_signal = images[:, :, 1:].norm(dim=2)  # [n, 2]
    which = off_signal.argmax(dim=1)
    return images[torch.arange(len(images)), which]
