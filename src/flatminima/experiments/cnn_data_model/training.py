"""Training one two-layer CNN on one draw of the patch data, by gradient descent or SAM, and measuring it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import signal_vector
from flatminima.experiments.cnn_data_model.problem import INIT_STD, LR, WIDTH, Setting, make_data, noise_patches
from flatminima.models.two_layer_cnn import TwoLayerCNN, noise_memorisation
from flatminima.optim import SAM
from flatminima.step import PlainStep, SharpnessAwareStep

__all__ = ["TrainedCNN", "Trajectory", "train_cnn"]

#: ``(step, noise memorisation, signal learning)`` records over training.
Trajectory = list[tuple[int, float, float]]


@dataclass(frozen=True)
class TrainedCNN:
    """What one run measured at the end of training: clean test error, training error and loss (on the observed,
    partly flipped labels), how many labels were flipped and how many of those the model fits, and the noise and
    signal coefficients; ``trajectory`` holds the coefficients over training when they were tracked (else empty)."""

    test_error: float
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


def _step(model: TwoLayerCNN, rho: float | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The library's full-batch step on the logistic loss: ``PlainStep`` of ``torch.optim.SGD(lr=LR)`` for
    ``rho=None``, else ``SharpnessAwareStep`` of ``SAM(params, SGD, rho=rho, lr=LR)``."""
    if rho is None:
        return PlainStep(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=LR))
    return SharpnessAwareStep(model, F.cross_entropy, SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR))


def train_cnn(setting: Setting, data: ImageDataset | None = None, track_every: int = 0) -> TrainedCNN:
    """Train one :class:`TwoLayerCNN` on one draw of the patch data; return its errors and coefficients.

    ``data`` is ``make_data(signal_norm, dim, seed)`` when not given. The filters are drawn from
    ``N(0, INIT_STD^2)`` with a generator seeded ``seed + 10_000``, so both optimisers start from the same point.
    Each step is one full-batch step of the library's (:func:`_step`). With ``track_every > 0`` the noise and
    signal coefficients are recorded every ``track_every`` steps (and at step 0 and the end) in ``trajectory``.

    The loop is this function's, not :func:`flatminima.train`'s: that loop builds a registry model with its own
    initialisation from a :class:`~flatminima.train.TrainConfig` and records once per epoch, while this run needs
    the shared ``N(0, sigma_0^2)`` initialisation of :class:`TwoLayerCNN` and the coefficients every few steps.
    """
    if data is None:
        data = make_data(setting.signal_norm, setting.dim, setting.seed)
    x, y = data.train_images, data.train_labels
    mu = signal_vector(setting.dim, setting.signal_norm)
    xi = noise_patches(x)
    model = TwoLayerCNN(setting.dim, WIDTH, INIT_STD)
    generator = torch.Generator().manual_seed(setting.seed + 10_000)
    with torch.no_grad():
        model.weight.copy_(INIT_STD * torch.randn(model.weight.shape, generator=generator))
    step = _step(model, setting.rho)
    trajectory: Trajectory = []
    for index in range(setting.epochs):
        if track_every and index % track_every == 0:
            trajectory.append((index, *_coefficients(model, xi, y, mu)))
        step(x, y)
    noise, signal = _coefficients(model, xi, y, mu)
    if track_every:
        trajectory.append((setting.epochs, noise, signal))
    with torch.no_grad():
        test_error = float((model(data.test_images).argmax(dim=1) != data.test_labels).float().mean())
        logits = model(x)
    predicted = logits.argmax(dim=1)
    flipped = y != data.clean_train_labels
    return TrainedCNN(
        test_error=test_error,
        train_error=float((predicted != y).float().mean()),
        train_loss=float(F.cross_entropy(logits, y)),
        flipped=int(flipped.sum()),
        flipped_fitted=int((predicted[flipped] == y[flipped]).sum()),
        noise_memorisation=noise,
        signal_learning=signal,
        trajectory=trajectory,
    )
