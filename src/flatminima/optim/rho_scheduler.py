"""rho schedules as a scheduler over ``param_groups``, the way ``torch.optim.lr_scheduler.LambdaLR`` sets ``lr``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["RhoScheduler"]


class RhoScheduler:
    """Sets ``group["rho"] = initial_rho * factor(step)`` on every parameter group: the one place rho changes.

    Like ``LambdaLR``: constructing it applies ``factor(0)`` (the rho of the first step); call :meth:`step` after
    each optimiser step. Each group's starting value is kept in ``group["initial_rho"]`` (saved with the
    optimiser), and the step count in :meth:`state_dict`, so a resumed run continues the schedule exactly.

    Args:
        optimizer: any optimiser whose groups hold ``"rho"`` (a :class:`~flatminima.optim.SAM`).
        factor: ``step -> multiplier`` of the initial rho, or one such function per group.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        factor: Callable[[int], float] | list[Callable[[int], float]],
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
        self.optimizer = optimizer
        self.factors = factors
        for group in groups:
            group.setdefault("initial_rho", group["rho"])
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for group, factor in zip(self.optimizer.param_groups, self.factors):
            group["rho"] = group["initial_rho"] * factor(self.last_step)

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
