"""Training one two-layer CNN on one draw of the patch data, by gradient descent or SAM, and measuring it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import signal_vector
from flatminima.experiments.cnn_data_model.problem import (
    INIT_STD,
    WIDTH,
    Setting,
    held_out_labels,
    make_data,
    noise_patches,
)
from flatminima.models.two_layer_cnn import TwoLayerCNN, noise_memorisation
from flatminima.optim import SAM
from flatminima.step import PlainStep, SharpnessAwareStep

__all__ = ["TrainedCNN", "Trajectory", "train_checkpoints", "train_cnn"]

#: ``(step, noise memorisation, signal learning)`` records over training.
Trajectory = list[tuple[int, float, float]]


@dataclass(frozen=True)
class TrainedCNN:
    """What one run measured after ``steps`` steps: clean test error, the error on the test points with labels
    flipped like the training ones (``held_out_error``, what a held-out draw chooses settings by), training error
    and loss (on the observed, partly flipped labels), how many labels were flipped and how many of those the
    model fits, and the noise and signal coefficients; ``trajectory`` holds the coefficients over training up to
    ``steps`` when they were tracked (else empty)."""

    steps: int
    test_error: float
    held_out_error: float
    train_error: float
    train_loss: float
    flipped: int
    flipped_fitted: int
    noise_memorisation: float
    signal_learning: float
    trajectory: Trajectory = field(default_factory=list)


def _coefficients(model: TwoLayerCNN, xi: Tensor, labels: Tensor, mu: Tensor) -> tuple[float, float]:
    """Noise memorisation ``mean_i max_r <w_{y_i,r}, xi_i>`` (``y_i`` the observed label: the filters that fit
    example ``i``) and signal learning ``mean_j max_r <w_{j,r}, j mu>`` over ``j = +-1``."""
    noise = noise_memorisation(model, xi)  # [2, m, n]
    own = noise[labels, :, torch.arange(len(labels))]  # [n, m]
    signal = noise_memorisation(model, mu[None])[:, :, 0]  # [2, m]: <w_{j,r}, mu>
    learnt = 0.5 * (signal[1].max() + (-signal[0]).max())
    return float(own.max(dim=1).values.mean()), float(learnt)


def _step(model: TwoLayerCNN, rho: float | None, lr: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The library's full-batch step on the logistic loss: ``PlainStep`` of ``torch.optim.SGD(lr=lr)`` for
    ``rho=None``, else ``SharpnessAwareStep`` of ``SAM(params, SGD, rho=rho, lr=lr)``."""
    if rho is None:
        return PlainStep(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=lr))
    return SharpnessAwareStep(model, F.cross_entropy, SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr))


def _measure(
    model: TwoLayerCNN,
    data: ImageDataset,
    noisy_test: Tensor,
    coefficients: tuple[float, float],
    steps: int,
    trajectory: Trajectory,
) -> TrainedCNN:
    """The run's measures at the current weights, after ``steps`` steps."""
    x, y = data.train_images, data.train_labels
    with torch.no_grad():
        test_predicted = model(data.test_images).argmax(dim=1)
        logits = model(x)
    predicted = logits.argmax(dim=1)
    flipped = y != data.clean_train_labels
    return TrainedCNN(
        steps=steps,
        test_error=float((test_predicted != data.test_labels).float().mean()),
        held_out_error=float((test_predicted != noisy_test).float().mean()),
        train_error=float((predicted != y).float().mean()),
        train_loss=float(F.cross_entropy(logits, y)),
        flipped=int(flipped.sum()),
        flipped_fitted=int((predicted[flipped] == y[flipped]).sum()),
        noise_memorisation=coefficients[0],
        signal_learning=coefficients[1],
        trajectory=trajectory,
    )


def train_checkpoints(
    setting: Setting, data: ImageDataset | None = None, track_every: int = 0, checkpoints: Sequence[int] = ()
) -> list[TrainedCNN]:
    """Train one ``TwoLayerCNN`` on one draw of the patch data; measure it after each of ``checkpoints``
    steps and at the end (``setting.steps``), in order of steps.

    Full-batch gradient descent is deterministic, so the measure after ``k`` steps of a longer run is the measure
    of a run of ``k`` steps: one run of twice the steps gives SGD's two budgets.

    ``data`` is ``make_data(signal_norm, dim, seed)`` when not given. The filters are drawn from
    ``N(0, INIT_STD^2)`` with a generator seeded ``seed + 10_000``, so every optimiser starts from the same point.
    Each step is one full-batch step of the library's (``_step``). With ``track_every > 0`` the noise and
    signal coefficients are recorded every ``track_every`` steps (and at step 0 and each checkpoint) in each
    measure's ``trajectory``.

    The loop is this function's, not ``flatminima.train``'s: that loop builds a registry model with its own
    initialisation from a ``TrainConfig`` and records once per epoch, while this run needs
    the shared ``N(0, sigma_0^2)`` initialisation of ``TwoLayerCNN`` and the coefficients every few steps.
    """
    if data is None:
        data = make_data(setting.signal_norm, setting.dim, setting.seed)
    stops = sorted({*(c for c in checkpoints if 0 <= c < setting.steps), setting.steps})
    x, y = data.train_images, data.train_labels
    mu = signal_vector(setting.dim, setting.signal_norm)
    xi = noise_patches(x)
    noisy_test = held_out_labels(data, setting.seed)
    model = TwoLayerCNN(setting.dim, WIDTH, INIT_STD)
    generator = torch.Generator().manual_seed(setting.seed + 10_000)
    with torch.no_grad():
        model.weight.copy_(INIT_STD * torch.randn(model.weight.shape, generator=generator))
    step = _step(model, setting.rho, setting.lr)
    trajectory: Trajectory = []
    measured: list[TrainedCNN] = []
    for index in range(setting.steps + 1):
        at_stop = index in stops
        tracked = bool(track_every) and (index % track_every == 0 or at_stop)
        if tracked or at_stop:
            coefficients = _coefficients(model, xi, y, mu)
            if tracked:
                trajectory.append((index, *coefficients))
            if at_stop:
                measured.append(_measure(model, data, noisy_test, coefficients, index, list(trajectory)))
        if index < setting.steps:
            step(x, y)
    return measured


def train_cnn(setting: Setting, data: ImageDataset | None = None, track_every: int = 0) -> TrainedCNN:
    """Train one ``TwoLayerCNN`` for ``setting.steps`` steps and measure it (``train_checkpoints``)."""
    return train_checkpoints(setting, data, track_every)[-1]
