"""A seeded, stratified train/validation split, for tuning hyper-parameters (rho, learning rate) without
touching the test set."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["validation_split"]


def validation_split(
    images: Tensor, labels: Tensor, fraction: float, seed: int, stratify: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split off ``round(fraction * N)`` examples as a validation set: ``(train_x, train_y, val_x, val_y)``.

    With ``stratify=True`` each class contributes in proportion to its size (largest-remainder rounding, so
    the total is still exactly ``round(fraction * N)`` and each class is within one example of its share).
    Both parts keep the original order of the examples.  Reproducible for a given ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    if labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need labels [N] matching images [N, ...], got images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    n = labels.numel()
    n_val = round(fraction * n)
    if n_val == 0 or n_val == n:
        raise ValueError(f"fraction {fraction} of {n} examples leaves an empty train or validation set")

    gen = torch.Generator().manual_seed(seed)
    if not stratify:
        val_idx = torch.randperm(n, generator=gen)[:n_val]
    else:
        cpu_labels = labels.cpu()
        classes, counts = torch.unique(cpu_labels, return_counts=True)
        quota = counts.double() * fraction
        take = quota.floor().long()
        # hand the remaining examples to the classes with the largest fractional parts (ties: seeded random)
        remainder = n_val - int(take.sum())
        if remainder > 0:
            jitter = torch.rand(len(classes), generator=gen, dtype=torch.float64) * 1e-9
            order = torch.argsort(quota - take.double() + jitter, descending=True)
            take[order[:remainder]] += 1
        parts = []
        for c, k in zip(classes.tolist(), take.tolist()):
            members = torch.nonzero(cpu_labels == c, as_tuple=True)[0]
            parts.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
        val_idx = torch.cat(parts)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    is_val = is_val.to(labels.device)
    return images[~is_val.to(images.device)], labels[~is_val], images[is_val.to(images.device)], labels[is_val]
