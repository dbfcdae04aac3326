"""One policy for inf/NaN gradients, applied to both of SAM's passes."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from flatminima.optim.norms import is_finite

__all__ = ["NonFiniteGuard", "NonFinitePolicy"]

NonFinitePolicy = Literal["raise", "skip", "ignore"]


class NonFiniteGuard:
    """``"raise"`` a ``FloatingPointError``, ``"skip"`` the step, or ``"ignore"`` (check nothing, sync nothing).

    Each check returns True when the step may go on; under ``"skip"`` it returns False instead of raising.
    """

    def __init__(self, policy: NonFinitePolicy) -> None:
        if policy not in ("raise", "skip", "ignore"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'ignore'; got {policy!r}.")
        self.policy = policy

    @property
    def checks(self) -> bool:
        return self.policy != "ignore"

    def first_gradient_ok(self, norms: list[float]) -> bool:
        """Given the (host) norms of the gradient at ``w``."""
        if not self.checks or all(map(math.isfinite, norms)):
            return True
        return self._fail(
            "SAM.first_step: the gradient at w holds inf or NaN, so no perturbation was applied and the weights "
            "are unchanged. Check the loss and learning rate, pass a GradScaler for mixed precision, or build SAM "
            "with nonfinite='skip' to skip such steps."
        )

    def descent_gradient_ok(self, grads: list[Tensor]) -> bool:
        """Given the gradients the base optimiser is about to use (one host sync)."""
        if not self.checks or is_finite(grads):
            return True
        return self._fail(
            "SAM.second_step: the gradient at w + e holds inf or NaN; the weights were restored to w and no step "
            "was taken. Lower rho or the learning rate, or build SAM with nonfinite='skip' to skip such steps."
        )

    def _fail(self, message: str) -> bool:
        if self.policy == "raise":
            raise FloatingPointError(message)
        return False
