"""The loss and 0-1 error of one batch of outputs, in the forms the measures need.

m-sharpness needs per-example losses (to average them over a group); loss landscapes accept a loss function that
returns either per-example losses or the batch mean; both report the 0-1 error where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossFn", "batch_mean_loss", "error_rate", "per_example_losses"]

LossFn = Callable[[Any, Any], Tensor]


def _as_tensor(losses: object) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(losses).__name__}")
    return losses


def per_example_losses(loss_fn: LossFn, outputs: Any, targets: Any, n: int) -> Tensor:
    """``loss_fn``'s per-example losses of a batch of ``n`` examples as a 1-D tensor (extra dimensions averaged)."""
    losses = _as_tensor(loss_fn(outputs, targets))
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(
            f"loss_fn must return per-example losses (reduction='none') of leading size {n}, got shape "
            f"{tuple(losses.shape)}"
        )
    return losses.reshape(n, -1).mean(dim=1) if losses.dim() > 1 else losses


def batch_mean_loss(loss_fn: LossFn, outputs: Any, targets: Any, n: int) -> Tensor:
    """The mean loss of a batch of ``n`` examples, whether ``loss_fn`` returns the mean or per-example losses."""
    losses = _as_tensor(loss_fn(outputs, targets))
    if losses.dim() == 0:
        return losses
    if losses.shape[0] == n:
        return losses.mean()
    raise ValueError(
        f"loss_fn must return the batch mean or per-example losses of leading size {n}, got shape {tuple(losses.shape)}"
    )


def error_rate(outputs: Any, targets: Any) -> float:
    """0-1 error of ``outputs.argmax(1)`` against integer class ``targets``; NaN when that is not defined."""
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        return math.nan
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return math.nan
    if outputs.dim() != targets.dim() + 1 or outputs.shape[0] != targets.shape[0]:
        return math.nan
    if outputs.shape[2:] != targets.shape[1:]:
        return math.nan
    return (outputs.argmax(dim=1) != targets).double().mean().item()
