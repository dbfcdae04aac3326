"""rho schedules as a scheduler over ``param_groups``, the way ``torch.optim.lr_scheduler.LambdaLR`` sets ``lr``.

Every schedule is one ``RhoScheduler``: each group's radius moves between a floor ``rho_min`` and its own
initial radius ``rho_max`` (the ``rho`` the group was built with) along a shape ``s(t)``,

    rho_t = rho_min + (rho_max - rho_min) * s(t),

so the schedules compose with per-group rho (every group keeps its own ``rho_max``) and with every variant (they
only write ``group["rho"]``). The factories below give the shapes:

- ``constant_rho``: ``s(t) = 1``;
- ``linear_warmup_rho``: ``s(t) = min(1, t / W)``, from ``rho_min`` up to rho over ``W`` steps;
- ``cosine_rho``: ``s(t) = (1 + cos(pi min(1, (t - W) / (T - W)))) / 2`` after ``W`` steps at ``s = 1``,
  from rho down to ``rho_min`` over training (``T`` steps);
- ``step_rho``: ``s(t) = gamma ** #{milestones <= t}``, as ``MultiStepLR`` (toward ``rho_min``);
- ``lr_proportional_rho``: ``s(t) = (lr_t - lr_min) / (lr_max - lr_min)``, GSAM's schedule (Zhuang et al.,
  "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022, arXiv 2203.08065), which reads each
  group's current learning rate: **step it after the learning-rate scheduler** (build it after the LR scheduler too):

      lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
      rho_scheduler = lr_proportional_rho(optimizer)  # rho of step 0 from lr of step 0
      for batch in batches:
          ...  # the SAM step
          lr_scheduler.step()
          rho_scheduler.step()  # reads the lr just set: the rho of the next step

A group built with ``rho = 0`` (excluded from the perturbation) stays at 0 whatever ``rho_min`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "RhoScheduler",
    "constant_rho",
    "cosine_rho",
    "linear_warmup_rho",
    "lr_proportional_rho",
    "step_rho",
]

Factor = Callable[[int], float]


class RhoScheduler:
    """Sets ``group["rho"] = rho_min + (initial_rho - rho_min) * factor(step)`` on every parameter group: the one
    place rho changes (with ``rho_min = 0``, the default: ``initial_rho * factor(step)``).

    Like ``LambdaLR``: constructing it applies ``factor(0)`` (the rho of the first step); call ``step`` after
    each optimiser step. Each group's starting value is kept in ``group["initial_rho"]`` (saved with the
    optimiser), and the step count in ``state_dict``, so a resumed run continues the schedule exactly.

    Args:
        optimizer: any optimiser whose groups hold ``"rho"`` (a ``SAM``).
        factor: ``step -> multiplier`` of the initial rho, or one such function per group.
        rho_min: the floor the factor interpolates from (``factor = 0`` gives ``rho_min``), one for all groups or
            one per group; at most each group's initial rho. Groups whose initial rho is 0 stay at 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Factor | Sequence[Factor],
        rho_min: float | Sequence[float] = 0.0,
    ) -> None:
        missing = [i for i, group in enumerate(optimizer.param_groups) if "rho" not in group]
        if missing:
            raise ValueError(
                f"parameter groups {missing} have no 'rho': a RhoScheduler drives a sharpness-aware optimiser "
                f"(flatminima.SAM), not {type(optimizer).__name__}"
            )
        groups = optimizer.param_groups
        factors = list(factor) if isinstance(factor, (list, tuple)) else [factor] * len(groups)
        if len(factors) != len(groups) or not all(callable(f) for f in factors):
            raise ValueError(f"expected one callable factor, or one per parameter group ({len(groups)})")
        for group in groups:
            group.setdefault("initial_rho", group["rho"])
        floors = _per_group(rho_min, len(groups), "rho_min")
        for index, (group, floor) in enumerate(zip(groups, floors)):
            if not (math.isfinite(floor) and floor >= 0):
                raise ValueError(f"rho_min must be a finite number >= 0; got {floor!r} for parameter group {index}")
            if group["initial_rho"] != 0 and floor > group["initial_rho"]:
                raise ValueError(
                    f"rho_min={floor!r} exceeds the rho of parameter group {index} ({group['initial_rho']!r}): a "
                    "schedule moves each group's rho between rho_min and its own rho; lower rho_min"
                )
        self.optimizer = optimizer
        self.factors = factors
        self.rho_min = [0.0 if group["initial_rho"] == 0 else float(f) for group, f in zip(groups, floors)]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for group, factor, floor in zip(self.optimizer.param_groups, self.factors, self.rho_min):
            group["rho"] = floor + (group["initial_rho"] - floor) * factor(self.last_step)

    def step(self) -> None:
        """Advance one optimiser step and set the rho of the next."""
        self.last_step += 1
        self._apply()

    def get_last_rho(self) -> list[float]:
        """The rho each group will use on its next step."""
        return [group["rho"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved step count (and set the rho of that step)."""
        self.last_step = int(state["last_step"])
        self._apply()


def _per_group(value: float | Sequence[float], count: int, name: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}: expected one number, or one per parameter group ({count}); got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * count


def _check_steps(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def constant_rho(optimizer: torch.optim.Optimizer) -> RhoScheduler:
    """Every group keeps its own rho (the schedule of the SAM paper)."""
    return RhoScheduler(optimizer, lambda step: 1.0)


def linear_warmup_rho(
    optimizer: torch.optim.Optimizer, warmup_steps: int, rho_min: float | Sequence[float] = 0.0
) -> RhoScheduler:
    """rho grows linearly from ``rho_min`` (0 by default) to each group's rho over ``warmup_steps`` steps, then
    stays: ``s(t) = min(1, t / warmup_steps)``; 0 warm-up steps is the constant schedule."""
    warmup = _check_steps(warmup_steps, "warmup_steps", 0)
    return RhoScheduler(optimizer, lambda step: min(1.0, step / warmup) if warmup else 1.0, rho_min)


def cosine_rho(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    rho_min: float | Sequence[float] = 0.0,
    warmup_steps: int = 0,
) -> RhoScheduler:
    """rho follows a half cosine from each group's rho down to ``rho_min`` over training.

    ``s(t) = (1 + cos(pi p)) / 2`` with ``p = min(1, (t - W) / max(1, T - W))`` for ``t >= W`` and ``s = 1`` before:
    the shape of the learning rate's cosine after a warm-up of ``W = warmup_steps`` steps (0: from the first
    step), reaching ``rho_min`` at step ``T = total_steps`` and staying there.
    """
    total = _check_steps(total_steps, "total_steps", 1)
    warmup = _check_steps(warmup_steps, "warmup_steps", 0)
    if warmup > total:
        raise ValueError(f"warmup_steps ({warmup}) exceeds total_steps ({total})")

    def factor(step: int) -> float:
        if step < warmup:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))

    return RhoScheduler(optimizer, factor, rho_min)


def step_rho(
    optimizer: torch.optim.Optimizer,
    milestones: Sequence[int],
    gamma: float = 0.2,
    rho_min: float | Sequence[float] = 0.0,
) -> RhoScheduler:
    """rho moves toward ``rho_min`` by a factor ``gamma`` at each milestone step, as ``MultiStepLR`` does the
    learning rate: ``s(t) = gamma ** #{m in milestones : m <= t}`` (with ``rho_min = 0``, rho times gamma)."""
    marks = sorted(_check_steps(m, "each milestone", 0) for m in milestones)
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 <= gamma <= 1):
        raise ValueError(f"gamma must be a number in [0, 1] (rho shrinks at each milestone); got {gamma!r}")
    return RhoScheduler(optimizer, lambda step: gamma ** sum(step >= m for m in marks), rho_min)


def lr_proportional_rho(
    optimizer: torch.optim.Optimizer,
    lr_max: float | Sequence[float] | None = None,
    lr_min: float | Sequence[float] = 0.0,
    rho_min: float | Sequence[float] = 0.0,
) -> RhoScheduler:
    """GSAM's schedule: rho proportional to the learning rate,
    ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``, per group.

    Each step reads the group's current ``lr``, so call ``RhoScheduler.step`` after the LR scheduler's
    ``step`` (and build this after the LR scheduler, whose construction sets the lr of step 0).

    Args:
        lr_max: the schedule's peak learning rate, one for all groups or one per group; by default each group's
            ``initial_lr`` (set by torch's LR schedulers), else its ``lr`` now.
        lr_min: the learning rate at which rho reaches ``rho_min`` (0: rho proportional to lr when ``rho_min = 0``).
        rho_min: rho's floor, reached when the lr is ``lr_min``.
    """
    groups = optimizer.param_groups
    peaks = (
        [float(g.get("initial_lr", g["lr"])) for g in groups]
        if lr_max is None
        else _per_group(lr_max, len(groups), "lr_max")
    )
    floors = _per_group(lr_min, len(groups), "lr_min")
    for index, (peak, floor) in enumerate(zip(peaks, floors)):
        if not (math.isfinite(peak) and math.isfinite(floor) and peak > floor >= 0):
            raise ValueError(
                f"lr_proportional_rho needs finite 0 <= lr_min < lr_max; got lr_min={floor!r}, lr_max={peak!r} "
                f"for parameter group {index}"
            )

    def factor_of(index: int) -> Factor:
        peak, floor = peaks[index], floors[index]

        def factor(step: int) -> float:
            # the optimiser's groups are read each time: load_state_dict replaces the group dicts
            return (float(optimizer.param_groups[index]["lr"]) - floor) / (peak - floor)

        return factor

    return RhoScheduler(optimizer, [factor_of(i) for i in range(len(groups))], rho_min)
