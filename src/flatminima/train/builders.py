"""From a TrainConfig to the objects a run needs: optimiser (from the registry), learning-rate and rho schedules,
loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.batch_rules import BatchRule
from flatminima.optim import OptimizerRequest, RhoScheduler, optimizer_spec
from flatminima.train.config import TrainConfig

__all__ = [
    "BASE_OPTIMIZERS",
    "build_batch_rule",
    "build_loss",
    "build_optimizer",
    "build_rho_scheduler",
    "build_scheduler",
    "optimizer_request",
    "rho_at",
    "rho_factor",
]

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def optimizer_request(
    config: TrainConfig,
    model: nn.Module,
    *,
    draw_examples: Callable[[int | None, torch.Generator], tuple[Tensor, Tensor]] | None = None,
    train_size: int = 0,
    rank: int = 0,
) -> OptimizerRequest:
    """What the registered builders get: the base optimiser chosen by the config, rho, p, and the run's data.

    A sharpness-aware name wraps ``config.base_optimizer``; a base name (sgd, adamw) is its own base. Weight decay
    moves to the loss if asked.
    """
    spec = optimizer_spec(config.optimizer)
    own_base = not spec.sharpness_aware and config.optimizer in BASE_OPTIMIZERS
    base_class = BASE_OPTIMIZERS[config.optimizer if own_base else config.base_optimizer]
    options: dict[str, Any] = {"lr": config.lr}
    if base_class is torch.optim.SGD:
        options["momentum"] = config.momentum
    options["weight_decay"] = 0.0 if config.weight_decay_in_loss else config.weight_decay
    return OptimizerRequest(
        model,
        base_class,
        options,
        rho=config.rho,
        p=config.p,
        config=config,
        draw_examples=draw_examples,
        train_size=train_size,
        rank=rank,
        nonfinite=config.nonfinite,
    )


def build_optimizer(
    config: TrainConfig, model: nn.Module, request: OptimizerRequest | None = None
) -> torch.optim.Optimizer:
    """The registered optimiser ``config.optimizer`` (see :func:`optimizer_request`)."""
    request = request if request is not None else optimizer_request(config, model)
    return optimizer_spec(config.optimizer).build(request)


def build_batch_rule(config: TrainConfig, request: OptimizerRequest) -> BatchRule | None:
    """The batch rule of ``config.optimizer`` if it registered one (n-SAM, RW-SAM, ahn-sa), else None."""
    spec = optimizer_spec(config.optimizer)
    return spec.batch_rule(request) if spec.batch_rule is not None else None


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


def rho_factor(config: TrainConfig, epoch_progress: float) -> float:
    """The multiplier of rho at a fractional epoch: 1, or growing linearly from 0 over the warm-up epochs."""
    if config.rho_schedule == "linear" and config.warmup_epochs > 0:
        return min(1.0, epoch_progress / config.warmup_epochs)
    return 1.0


def rho_at(config: TrainConfig, epoch_progress: float) -> float:
    """rho for a fractional epoch (what :func:`build_rho_scheduler` sets before each step)."""
    return config.rho * rho_factor(config, epoch_progress)


def build_rho_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> RhoScheduler:
    """Per-iteration rho: step ``s`` uses ``rho_at(config, s / steps_per_epoch)``."""
    return RhoScheduler(optimizer, lambda step: rho_factor(config, step / steps_per_epoch))


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
