"""bSAM's base step: an Adam-like update that keeps, per parameter, the precision ``s`` of a Gaussian posterior.

Möllenhoff and Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023 (arXiv 2210.01620), Algorithm 1, lines
6-8, with ``g_e`` the gradient at ``w + e`` (``.grad`` when the step is taken) and ``g`` the one at the noisy
sample ``theta ~ N(w, 1/(N s))`` of the step's first pass:

    g_m <- beta1 g_m + (1 - beta1) (g_e + delta w)                       (momentum, with the L2 term)
    s   <- beta2 s   + (1 - beta2) (sqrt(s) |g| + delta + gamma)          (precision)
    w   <- w - alpha g_m / s                                              (mean)

``delta`` is the weight decay (the prior's precision divided by N), ``gamma`` a damping that keeps ``s`` away
from 0. The posterior ``N(w, 1/(N s))`` is read with ``flatminima.optim.posterior``. The ascent of a bSAM step
(``flatminima.variants.bsam``) hands the base ``|g|`` through the parameter's state (``ABS_GRAD_SUM``, and
``ABS_GRAD_COUNT`` for the mean over m-SAM's groups); without it (the optimiser used alone, or a step with no
ascent) ``|g|`` is that of ``.grad``. ``order="official"`` takes the mean's step with the precision before its
update, as the authors' code (``team-approx-bayes/bayesian-sam``, ``optim.py``) does; the paper updates ``s``
first. The state is created when a parameter joins the optimiser, so that the ascent can read ``s`` before the
first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ABS_GRAD_COUNT", "ABS_GRAD_SUM", "MOMENTUM", "ORDERS", "PRECISION", "BSAMBase"]

PRECISION = "precision"  # s
MOMENTUM = "momentum"  # g_m
ABS_GRAD_SUM = "bsam_abs_grad"  # sum of |g| at the step's noisy samples, written by the ascent, used once
ABS_GRAD_COUNT = "bsam_abs_grad_count"  # how many samples that sum holds (m-SAM's groups)
ORDERS = ("paper", "official")


class BSAMBase(Optimizer):
    """The mean, momentum and precision update of bSAM (see the module); ``N`` is kept for the posterior.

    Args:
        params: parameters or parameter groups (each group may set any option below but ``num_data``'s meaning).
        num_data: ``N``, the data-set size: the posterior's variance is ``1 / (N s)``.
        lr: ``alpha``; 0.5, the authors' CIFAR value (with their warm-up and cosine decay).
        betas: ``(beta1, beta2)``, the momentum's and the precision's decay.
        weight_decay: ``delta``, the L2 term, in the momentum and in ``s``.
        damping: ``gamma``, added to ``s`` at every step (0.1, the authors' default).
        init_precision: ``s`` at the start (1, the authors' default).
        order: ``"paper"`` (``s`` updated, then ``w`` with it) or ``"official"`` (``w`` with the old ``s``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        num_data: float,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        damping: float = 0.1,
        init_precision: float = 1.0,
        order: str = "paper",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            damping=damping,
            init_precision=init_precision,
            num_data=num_data,
            order=order,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group (checked), and each new parameter's state: ``s = init_precision``, ``g_m = 0``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group)
        for p in group["params"]:
            if PRECISION not in self.state[p]:
                self._start(p, group)

    def _start(self, p: Tensor, group: dict[str, Any]) -> None:
        self.state[p][PRECISION] = torch.full_like(
            p, float(group["init_precision"]), memory_format=torch.preserve_format
        )
        self.state[p][MOMENTUM] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter with a gradient (``closure``, if given, is run first, with gradients)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, delta, gamma = group["lr"], group["weight_decay"], group["damping"]
            params, grads, precisions, momenta, scales = [], [], [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("BSAMBase does not take sparse gradients; use a dense embedding.")
                state = self.state[p]
                if PRECISION not in state:  # a state dict that did not hold this parameter
                    self._start(p, group)
                total, count = state.pop(ABS_GRAD_SUM, None), state.pop(ABS_GRAD_COUNT, 1)
                scales.append(grad.abs() if total is None else (total if count == 1 else total / count))
                params.append(p)
                grads.append(grad)
                precisions.append(state[PRECISION])
                momenta.append(state[MOMENTUM])
            if params:
                _update(params, grads, precisions, momenta, scales, lr, beta1, beta2, delta, gamma, group["order"])
        return loss


def _update(
    params: list[Tensor],
    grads: list[Tensor],
    precisions: list[Tensor],
    momenta: list[Tensor],
    scales: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    delta: float,
    gamma: float,
    order: str,
) -> None:
    """One group's update with multi-tensor (``torch._foreach_*``) kernels: one launch per operation for the whole
    group, as torch.optim's foreach paths, rather than a Python loop of small kernels per parameter."""
    direction = torch._foreach_add(grads, params, alpha=delta)  # g_e + delta w
    torch._foreach_mul_(momenta, beta1)
    torch._foreach_add_(momenta, direction, alpha=1 - beta1)
    if order != "paper":  # the authors' code: the mean's step with the old s
        torch._foreach_addcdiv_(params, momenta, precisions, value=-lr)
    curvature = torch._foreach_sqrt(precisions)
    torch._foreach_mul_(curvature, scales)
    torch._foreach_add_(curvature, delta + gamma)  # sqrt(s) |g| + delta + gamma
    torch._foreach_mul_(precisions, beta2)
    torch._foreach_add_(precisions, curvature, alpha=1 - beta2)
    if order == "paper":
        torch._foreach_addcdiv_(params, momenta, precisions, value=-lr)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_group(group: dict[str, Any]) -> None:
    """A clear error for each option of ``group`` out of range, naming it and what it accepts."""
    betas = group["betas"]
    checks = [
        (_number(group["lr"]) and group["lr"] >= 0, "lr (alpha) must be a finite number >= 0"),
        (
            isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
            "betas must be two numbers in [0, 1), e.g. (0.9, 0.999)",
        ),
        (_number(group["weight_decay"]) and group["weight_decay"] >= 0, "weight_decay (delta) must be finite, >= 0"),
        (_number(group["damping"]) and group["damping"] >= 0, "damping (gamma) must be a finite number >= 0"),
        (
            _number(group["init_precision"]) and group["init_precision"] > 0,
            "init_precision (the initial s) must be a finite number > 0",
        ),
        (
            _number(group["num_data"]) and group["num_data"] > 0,
            "num_data (N, the data-set size of the posterior's 1 / (N s)) must be a finite number > 0",
        ),
        (group["order"] in ORDERS, f"order must be one of {', '.join(ORDERS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"BSAMBase: {message}; got {_shown(group, message)}.")


def _shown(group: dict[str, Any], message: str) -> str:
    name = message.split(" ", 1)[0]
    return f"{name}={group.get(name)!r}"
