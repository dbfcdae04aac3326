"""The two-patch signal/noise data model of Chen et al., "Why Does Sharpness-Aware Minimization Generalize Better
Than SGD?" (NeurIPS 2023), used there to show SAM avoids the noise memorisation that SGD falls into.

Each example has a true label ``y`` uniform in ``{-1, +1}`` and two patches of dimension ``dim``: one is ``y * mu``
(the signal, ``mu = signal_norm * e_1``), the other is noise ``xi ~ N(0, noise_std^2 (I - mu mu^T / ||mu||^2))``,
i.e. Gaussian noise in the subspace orthogonal to ``mu``; which patch comes first is random per example.  The
observed training label is ``y`` flipped with probability ``flip_prob``; test labels are clean, so test accuracy
measures recovery of the true rule.  Labels are stored as class indices, class 1 meaning ``y = +1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatminima.data.dataset import ImageDataset

__all__ = ["make_signal_noise_patches", "signal_vector"]


def signal_vector(dim: int, signal_norm: float) -> Tensor:
    """The signal ``mu = signal_norm * e_1`` of the patch model, float32 ``[dim]``."""
    mu = torch.zeros(dim, dtype=torch.float32)
    mu[0] = signal_norm
    return mu


def _sample(
    n: int, mu: Tensor, noise_std: float, flip_prob: float, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` examples: images ``[n, 2, dim]``, observed labels and true labels (class indices)."""
    dim = mu.numel()
    true = torch.randint(0, 2, (n,), generator=gen)
    sign = (2 * true - 1).to(torch.float32)
    signal_first = torch.randint(0, 2, (n,), generator=gen).bool()
    noise = noise_std * torch.randn(n, dim, generator=gen)
    unit = mu / mu.norm()
    noise = noise - (noise @ unit)[:, None] * unit  # project onto the complement of mu (exact for mu ∝ e_1)
    signal = sign[:, None] * mu
    first = torch.where(signal_first[:, None], signal, noise)
    second = torch.where(signal_first[:, None], noise, signal)
    images = torch.stack([first, second], dim=1)
    flip = torch.rand(n, generator=gen) < flip_prob
    observed = torch.where(flip, 1 - true, true)
    return images, observed, true


def make_signal_noise_patches(
    n_train: int = 20,
    n_test: int = 1000,
    dim: int = 500,
    signal_norm: float = 5.0,
    noise_std: float = 1.0,
    flip_prob: float = 0.1,
    seed: int = 0,
) -> ImageDataset:
    """Sample the Chen et al. (2023) patch model: float32 images ``[N, 2, dim]``, 2 classes, seeded.

    The defaults are the workable synthetic setting of the papers page of the documentation (papers.md sec. 5:
    n = 20, 1000 test points, sigma_p = 1, flip probability 0.1) with d = 500 and ||mu|| = 5, in the middle of the
    swept ranges.

    Training labels are flipped independently with probability ``flip_prob`` (the uncorrupted ones are kept in
    ``clean_train_labels``); test labels are clean.  ``mean``/``std`` are ``(0.0,)``/``(1.0,)``: the data are
    used as generated.  The same arguments always give the same tensors (one ``torch.Generator`` seeded with
    ``seed``; the test set is drawn after the training set).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 so the noise has a subspace orthogonal to the signal, got {dim}")
    if not signal_norm > 0:
        raise ValueError(f"signal_norm must be > 0, got {signal_norm}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be a probability in [0, 1], got {flip_prob}")

    gen = torch.Generator().manual_seed(seed)
    mu = signal_vector(dim, signal_norm)
    x_train, y_train, y_train_clean = _sample(n_train, mu, noise_std, flip_prob, gen)
    x_test, _, y_test = _sample(n_test, mu, noise_std, 0.0, gen)
    return ImageDataset(
        name="signal_noise",
        train_images=x_train,
        train_labels=y_train,
        test_images=x_test,
        test_labels=y_test,
        num_classes=2,
        mean=(0.0,),
        std=(1.0,),
        clean_train_labels=y_train_clean,
    )
