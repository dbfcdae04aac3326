"""The problem: the signal/noise patch data of Chen et al. (2023) and the two-layer CNN trained on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import make_signal_noise_patches

__all__ = [
    "EPOCHS",
    "FLIP_PROB",
    "INIT_STD",
    "LR",
    "NOISE_STD",
    "N_TEST",
    "N_TRAIN",
    "WIDTH",
    "Setting",
    "make_data",
    "noise_patches",
]

N_TRAIN = 20
N_TEST = 1000
WIDTH = 10  # filters per class, m
INIT_STD = 0.01  # sigma_0
NOISE_STD = 1.0  # sigma_p
FLIP_PROB = 0.1  # p
LR = 0.1
EPOCHS = 200  # full-batch steps


@dataclass(frozen=True)
class Setting:
    """One training run: the data's signal strength ``||mu||`` and dimension ``d``, the seed, the optimiser
    (``rho=None`` for gradient descent, else SAM with that radius) and the number of full-batch steps."""

    signal_norm: float
    dim: int
    seed: int
    rho: float | None
    epochs: int = EPOCHS


def make_data(signal_norm: float, dim: int, seed: int) -> ImageDataset:
    """The patch data of papers.md sec. 5: n = 20, 1000 clean test points, sigma_p = 1, flip probability 0.1.

    For a given ``(d, seed)`` the labels, flips and noise are the same draw for every ``||mu||`` (the generator
    draws nothing whose size depends on ``||mu||``), so the cells of a row of the grid differ only in the signal.
    """
    return make_signal_noise_patches(
        N_TRAIN, N_TEST, dim=dim, signal_norm=signal_norm, noise_std=NOISE_STD, flip_prob=FLIP_PROB, seed=seed
    )


def noise_patches(images: Tensor) -> Tensor:
    """The noise patch ``xi_i`` of each example, ``[n, d]`` from images ``[n, 2, d]``.

    The signal patch ``+-mu`` lies along ``e_1`` and the noise is orthogonal to it, so the noise patch is the one
    with the larger component off ``e_1`` (the signal patch has none).
    """
    off_signal = images[:, :, 1:].norm(dim=2)  # [n, 2]
    which = off_signal.argmax(dim=1)
    return images[torch.arange(len(images)), which]
