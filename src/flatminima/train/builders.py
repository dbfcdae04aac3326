"""From a TrainConfig to the objects a run needs: optimiser, learning-rate and rho schedules, loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.optim import SAM
from flatminima.train.config import TrainConfig

__all__ = ["build_loss", "build_optimizer", "build_scheduler", "rho_at"]

SAM_FAMILY = ("sam", "asam", "usam")


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Plain SGD / AdamW, or the SAM family around one of them; weight decay moves to the loss if asked."""
    weight_decay = 0.0 if config.weight_decay_in_loss else config.weight_decay
    base_name = config.optimizer if config.optimizer in ("sgd", "adamw") else config.base_optimizer
    if base_name == "sgd":
        base_class, options = torch.optim.SGD, {"lr": config.lr, "momentum": config.momentum}
    else:
        base_class, options = torch.optim.AdamW, {"lr": config.lr}
    options["weight_decay"] = weight_decay
    if config.optimizer not in SAM_FAMILY:
        return base_class(model.parameters(), **options)
    return SAM(
        model.parameters(),
        base_class,
        rho=rho_at(config, 0.0),
        p=config.p,
        adaptive=config.optimizer == "asam",
        normalize=config.optimizer != "usam",
        model=model,
        **options,
    )


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-iteration schedule: linear warm-up, then cosine, step (x0.2 at 30/60/80 %) or constant."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if config.lr_schedule == "step":
            return 0.2 ** sum(progress >= milestone for milestone in (0.3, 0.6, 0.8))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rho_at(config: TrainConfig, epoch_progress: float) -> float:
    """rho for a fractional epoch: constant, or growing linearly from 0 over the warm-up epochs."""
    if config.rho_schedule == "linear" and config.warmup_epochs > 0:
        return config.rho * min(1.0, epoch_progress / config.warmup_epochs)
    return config.rho


def build_loss(config: TrainConfig, model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-example cross-entropy (with label smoothing); plus wd/2 ||w||^2 when weight decay is in the loss.

    The penalty is added to every example's loss, which leaves the batch and group means as they should be.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        losses = F.cross_entropy(outputs.float(), targets, reduction="none", label_smoothing=config.label_smoothing)
        if config.weight_decay_in_loss and config.weight_decay > 0:
            losses = losses + 0.5 * config.weight_decay * sum(p.pow(2).sum() for p in params)
        return losses

    return loss_fn
