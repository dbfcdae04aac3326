"""Symmetric label noise, the standard corruption for testing robustness of SAM-style training.

Convention: a fraction ``rate`` of the labels is chosen and each chosen label is replaced by one drawn
uniformly from the *other* ``num_classes - 1`` classes, so every chosen label really changes and "40 % noise"
means exactly 40 % wrong labels.  (The alternative convention draws from all classes, so about
``rate / num_classes`` of the chosen labels stay correct and the true noise rate is lower than stated.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["symmetric_label_noise"]


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Return a copy of ``labels`` in which exactly ``round(rate * N)`` entries are changed to another class.

    The positions and the new classes are drawn with a ``torch.Generator`` seeded with ``seed``, so the
    result is reproducible.  The input tensor is never modified.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a fraction in [0, 1] (e.g. 0.4 for 40 % noise), got {rate}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 so that a label can be changed, got {num_classes}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    n = labels.numel()
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}], found range [{lo}, {hi}]; "
                "pass the correct num_classes or remap the labels"
            )

    noisy = labels.clone()
    num_noisy = round(rate * n)
    if num_noisy == 0:
        return noisy
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:num_noisy].to(labels.device)
    # an offset in 1..C-1 added modulo C gives a uniform draw over the other C-1 classes
    offset = torch.randint(1, num_classes, (num_noisy,), generator=gen).to(device=labels.device, dtype=labels.dtype)
    noisy[idx] = (labels[idx] + offset) % num_classes
    return noisy
