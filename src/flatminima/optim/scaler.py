"""The glue between SAM's two passes and ``torch.amp.GradScaler``, kept apart from the maths.

A GradScaler unscales and checks an optimiser's gradients once per iteration and skips ``optimizer.step()``
when they hold inf/NaN. SAM has two gradients per iteration: the first is unscaled here, before the norm of the
ascent (an inf/NaN first gradient leaves the weights unperturbed), and the second goes through the scaler's own
``unscale_`` / ``step`` so that its skip logic and back-off apply unchanged. The scaler calls
``optimizer.step(BASE_STEP)`` back, which SAM answers with its descent and base step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["BASE_STEP", "already_unscaled", "is_active", "step_through", "unscale_first_gradient"]


class _BaseStep:
    """Marker passed through ``GradScaler.step`` so SAM knows the call is the scaler's callback."""

    def __repr__(self) -> str:
        return "BASE_STEP"


BASE_STEP = _BaseStep()


def is_active(grad_scaler: torch.amp.GradScaler | None) -> bool:
    return grad_scaler is not None and grad_scaler.is_enabled()


def already_unscaled(grad_scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether the scaler has unscaled this optimiser's gradients in the current iteration."""
    states = getattr(grad_scaler, "_per_optimizer_states", {})
    stage = states.get(id(optimizer), {}).get("stage") if isinstance(states, dict) else None
    return getattr(stage, "name", None) == "UNSCALED"


def unscale_first_gradient(grad_scaler: torch.amp.GradScaler, grads: list[Tensor]) -> bool:
    """Unscale ``grads`` in place and report whether they are finite (one sync, as GradScaler does).

    Done with the scaler's current scale but without recording anything in the scaler, so that the second
    gradient is unscaled and checked by the scaler itself.
    """
    scale = grad_scaler._get_scale_async()
    if scale is None:  # scaler not yet used: its first scale() call creates it
        return True
    found_inf = torch.zeros(1, device=scale.device)
    inv_scale = scale.double().reciprocal().float()
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, device_grads in by_device.items():
        device_inf = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(device_grads, device_inf, inv_scale.to(device))
        found_inf += device_inf.to(found_inf.device)
    return not bool(found_inf.item())


def step_through(grad_scaler: torch.amp.GradScaler, optimizer: Optimizer) -> Any:
    """Let the scaler unscale, check and (unless inf/NaN) call ``optimizer.step(BASE_STEP)``."""
    return grad_scaler.step(optimizer, BASE_STEP)
