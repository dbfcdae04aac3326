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
from flatminima.optim.rho_scheduler import cosine_rho, lr_proportional_rho, step_rho
from flatminima.train.config import TrainConfig
from flatminima.trajectory import TrajectoryLoss

__all__ = [
    "BASE_OPTIMIZERS",
    "build_batch_rule",
    "build_loss",
    "build_optimizer",
    "build_rho_scheduler",
    "build_scheduler",
    "build_trajectory",
    "optimizer_request",
    "rho_at",
    "rho_factor",
]

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
# the step schedules (of lr and of rho) multiply by STEP_GAMMA at these fractions of the training after warm-up
STEP_MILESTONES = (0.3, 0.6, 0.8)
STEP_GAMMA = 0.2


def optimizer_request(
    config: TrainConfig,
    model: nn.Module,
    *,
    draw_examples: Callable[[int | None, torch.Generator], tuple[Tensor, Tensor]] | None = None,
    train_size: int = 0,
    rank: int = 0,
) -> OptimizerRequest:
    """What the registered builders get: the base optimiser chosen by the config, rho, p, and the run's data.

    A base name (sgd, adamw) is its own base; every other name, sharpness-aware or not (saf, mesa), uses
    ``config.base_optimizer``. Weight decay moves to the loss if asked.
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
        options=config.variant_options_of(spec),
    )


def build_optimizer(
    config: TrainConfig, model: nn.Module, request: OptimizerRequest | None = None
) -> torch.optim.Optimizer:
    """The registered optimiser ``config.optimizer`` (see ``optimizer_request``)."""
    request = request if request is not None else optimizer_request(config, model)
    return optimizer_spec(config.optimizer).build(request)


def build_batch_rule(config: TrainConfig, request: OptimizerRequest) -> BatchRule | None:
    """The batch rule of ``config.optimizer`` if it registered one (n-SAM, RW-SAM, ahn-sa), else None."""
    spec = optimizer_spec(config.optimizer)
    return spec.batch_rule(request) if spec.batch_rule is not None else None


def build_trajectory(config: TrainConfig, request: OptimizerRequest) -> TrajectoryLoss | None:
    """The trajectory loss of ``config.optimizer`` if it registered one (saf, mesa), else None."""
    spec = optimizer_spec(config.optimizer)
    return spec.trajectory(request) if spec.trajectory is not None else None


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-iteration schedule: linear warm-up, then cosine, step (x0.2 at 30/60/80 %) or constant."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = _progress(step, warmup, total)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if config.lr_schedule == "step":
            return STEP_GAMMA ** sum(progress >= milestone for milestone in STEP_MILESTONES)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(step: int, warmup: int, total: int) -> float:
    """The fraction of the training after warm-up that ``step`` has reached (negative during warm-up)."""
    return (step - warmup) / max(1, total - warmup)


def rho_factor(config: TrainConfig, epoch_progress: float) -> float:
    """The shape ``s`` of the constant and linear rho schedules at a fractional epoch: 1, or growing linearly from
    0 over the warm-up epochs (rho is ``rho_min + (rho - rho_min) s``). The other schedules are per step (and the
    lr schedule reads the learning rate): ``build_rho_scheduler`` builds them."""
    if config.rho_schedule not in ("constant", "linear"):
        raise ValueError(
            f"rho_factor covers the constant and linear rho schedules; {config.rho_schedule!r} is per step: use "
            "build_rho_scheduler(config, optimizer, steps_per_epoch).get_last_rho()"
        )
    if config.rho_schedule == "linear" and config.warmup_epochs > 0:
        return min(1.0, epoch_progress / config.warmup_epochs)
    return 1.0


def rho_at(config: TrainConfig, epoch_progress: float) -> float:
    """rho for a fractional epoch under the constant or linear schedule (what ``build_rho_scheduler`` sets
    before each step)."""
    return config.rho_min + (config.rho - config.rho_min) * rho_factor(config, epoch_progress)


def build_rho_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> RhoScheduler:
    """Per-iteration rho, moving each group's rho between ``config.rho_min`` and its own rho:

    - constant / linear: step ``s`` uses ``rho_at(config, s / steps_per_epoch)``;
    - cosine: a half cosine down to ``rho_min`` over the steps after the lr warm-up (``cosine_rho``);
    - step: x0.2 toward ``rho_min`` where the lr's step schedule drops (``step_rho``);
    - lr: ``rho_min + (rho - rho_min) lr_t / config.lr`` (``lr_proportional_rho``, lr_min = 0). It reads the
      groups' lr, so build it after ``build_scheduler`` and step it after the LR scheduler (the loop does).
    """
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.rho_schedule == "cosine":
        return cosine_rho(optimizer, max(1, total), config.rho_min, warmup_steps=min(warmup, max(1, total)))
    if config.rho_schedule == "step":
        milestones = [_first_step_at(m, warmup, total) for m in STEP_MILESTONES]
        return step_rho(optimizer, milestones, STEP_GAMMA, config.rho_min)
    if config.rho_schedule == "lr":
        return lr_proportional_rho(optimizer, lr_max=config.lr, lr_min=0.0, rho_min=config.rho_min)
    return RhoScheduler(optimizer, lambda step: rho_factor(config, step / steps_per_epoch), config.rho_min)


def _first_step_at(milestone: float, warmup: int, total: int) -> int:
    """The first step whose progress (as the lr's step schedule computes it) reaches ``milestone``."""
    step = max(warmup, 0)
    while _progress(step, warmup, total) < milestone:
        step += 1
    return step


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
