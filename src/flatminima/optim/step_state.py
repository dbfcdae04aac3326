"""What SAM knows of the step under way, in one object: a fresh one starts with every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["StepState"]


@dataclass
class StepState:
    """The per-step record of ``SAM`` (where the weights are kept while perturbed is the
    optimiser's storage, not this)."""

    ascended: bool = False  # the weights moved this step, so the last gradient is g(w + e)
    declined: bool = False  # the ascent was declined at g(w): by the descent rule, or a GradScaler's overflow
    skipped: bool = False  # g(w) was not finite under nonfinite="skip": no descent this step
    first_grads: tuple[list[Tensor], list[Tensor]] | None = None  # (params, g(w)) for a descent rule that asks
    first_kept: bool = False  # g(w) was kept by keep_first_gradient(), before an ascent on another sample
    direction_ready: bool = False  # the descent rule has already turned .grad into the direction
    set_aside: Any = None  # g(w) of a cadence's off step, released by first_step (optim.descent.set_aside)
