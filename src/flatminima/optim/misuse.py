"""The errors for SAM's methods called out of order: each restores ``w`` first and names the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flatminima.optim import scaler as amp

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = ["check_ascent_order", "refuse_batch_rule"]


def check_ascent_order(sam: SAM, grad_scaler: torch.amp.GradScaler | None) -> None:
    """``first_step`` needs the weights at ``w`` and the first gradient still scaled (SAM unscales it)."""
    if sam.is_perturbed:
        sam._abandon_step()
        raise RuntimeError(
            "first_step() was called twice without second_step(): the weights were still at w + e; they are "
            "restored to w and this step is abandoned. Call second_step() after the second backward pass."
        )
    if grad_scaler is not None and amp.already_unscaled(grad_scaler, sam):
        raise RuntimeError(
            "grad_scaler.unscale_(optimizer) was called before first_step: SAM unscales the first gradient "
            "itself. Call unscale_ (e.g. for clipping) only after the second backward, before second_step."
        )


def refuse_batch_rule(sam: SAM, driver: str) -> None:
    """A driver that cannot hand a batch rule the step's examples refuses an optimiser that has one."""
    if sam.batch_rule is not None:
        raise ValueError(
            f"{driver} cannot run the batch rule {sam.batch_rule!r}, which chooses the examples of each pass; "
            "train this optimiser with flatminima.SharpnessAwareStep (or set optimizer.batch_rule = None)."
        )
