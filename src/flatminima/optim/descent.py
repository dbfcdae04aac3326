"""The descent of a SAM step: ``g(w)`` kept for a descent rule that asks, the direction formed, the base step.

The descent rule (``DescentRule``) turns ``.grad`` into the update direction, from
``g(w + e)`` and, when it asks, ``g(w)``, which is kept here during the step; the base optimiser then steps along
it. Such a rule is asked here, once ``g(w)`` is kept, whether it declines the step's ascent
(``declines_ascent``), with its ``RuleContext``
when it takes one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flatminima.optim import scaler as amp
from flatminima.optim import sharded
from flatminima.optim.rules import takes_context

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = [
    "apply_direction",
    "base_step",
    "declines_ascent",
    "descent_gradient_ok",
    "hold_first_gradient",
    "keep_first_gradient",
    "put_back",
    "set_aside",
]


def hold_first_gradient(sam: SAM, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> bool:
    """Hold ``g(w)`` for a descent rule that asks for it (the tensors themselves when they are released, an
    unscaled copy under a GradScaler); returns whether the rule declines the ascent at it.

    Under a GradScaler a non-finite ``g(w)`` declines the ascent: the scaler then finds the inf/NaN in ``.grad``
    (still the scaled first gradient), skips the step and lowers its scale.
    """
    if not sam.descent.needs_first_gradient:
        return False
    params = _with_gradient(sam)
    if amp.is_active(grad_scaler):
        kept = [p.grad.clone() for p in params]
        sam._step.first_grads = (params, kept)
        if not amp.unscale_first_gradient(grad_scaler, kept):
            return True
    else:
        # the tensors themselves when they are released and own their memory (not a flat buffer's or DDP's
        # bucket views, which the next backward pass writes g(w + e) into)
        own = zero_grad and sam.flat_layout is None and all(p.grad._base is None for p in params)
        sam._step.first_grads = (params, [p.grad if own else p.grad.clone() for p in params])
    return declines_ascent(sam, *sam._step.first_grads)


@torch.no_grad()
def keep_first_gradient(sam: SAM, grad_scaler: torch.amp.GradScaler | None) -> bool:
    """A copy of the batch's ``g(w)`` kept before an ascent on another sample; returns whether the ascent goes
    ahead (see ``SAM.keep_first_gradient``)."""
    if sam.is_perturbed:
        sam._abandon_step()
        raise RuntimeError(
            "keep_first_gradient() must come before first_step(), but the weights were perturbed (at w + e); "
            "they are restored to w and this step is abandoned. Call it after the batch's backward pass at w."
        )
    sharded.check_scaler(sam.sharded, grad_scaler)
    params = _with_gradient(sam)
    kept = [p.grad.clone() for p in params]
    sam._step.first_grads = (params, kept)
    sam._step.first_kept = True
    if amp.is_active(grad_scaler):
        finite = amp.unscale_first_gradient(grad_scaler, kept)
    else:
        finite = not sam.guard.checks or sam.guard.first_gradient_ok(sharded.host_norms(sam.shard_groups, kept))
        if not finite:  # nonfinite="skip"
            sam._step.skipped = True
            return False
    sam._step.declined = sam.ascent_due and (not finite or declines_ascent(sam, params, kept))
    return not sam._step.declined


def declines_ascent(sam: SAM, params: list[Tensor], first_grads: list[Tensor]) -> bool:
    """Ask the descent rule whether it declines the ascent at ``first_grads`` (``g(w)`` of ``params``), handing it
    the context of ``params`` when its ``declines_ascent`` takes ``context=`` (a rule with state, such as AE-SAM's
    running statistics); a rule written without it gets ``first_grads`` alone."""
    rule = sam.descent
    if takes_context(rule, "declines_ascent"):
        return bool(rule.declines_ascent(first_grads, context=sam.rule_context(params)))
    return bool(rule.declines_ascent(first_grads))


def apply_direction(sam: SAM, grad_scaler: torch.amp.GradScaler | None = None) -> None:
    """Turn ``.grad`` into the descent rule's direction (once per step; see ``SAM.apply_descent_rule``)."""
    step = sam._step
    if step.direction_ready or sam.descent.is_identity:
        return
    sam.restore()
    if amp.is_active(grad_scaler) and not amp.already_unscaled(grad_scaler, sam):
        grad_scaler.unscale_(sam)
    params = _with_gradient(sam)
    first = None
    if step.first_grads is not None:
        by_param = dict(zip(map(id, step.first_grads[0]), step.first_grads[1]))
        first = [by_param.get(id(p), torch.zeros_like(p)) for p in params]
    context = sam.rule_context(params)
    grads = [p.grad for p in params]
    if sam.sharded:  # a shard-aware rule works on the local shards, its totals reduced over all ranks
        params, grads = sharded.locals_of(params), sharded.locals_of(grads)
        first = sharded.locals_of(first) if first is not None else None
    with sharded.reducing(sam.shard_groups):
        sam.descent.direction_(params, grads, first, context, step.ascended)
    step.direction_ready = True


def descent_gradient_ok(sam: SAM) -> bool:
    """The guard's check of the direction the base optimiser is about to take (one host sync)."""
    if not sam.guard.checks:
        return True
    grads = [p.grad for p in _with_gradient(sam)]
    flat = sam.flat_layout
    if flat is not None and flat.gradients_are_views():
        return sam.guard.descent_gradient_ok([flat.grads])
    if sam.sharded:
        with sharded.reducing(sam.shard_groups):
            return sam.guard.descent_gradient_ok(sharded.locals_of(grads))
    return sam.guard.descent_gradient_ok(grads)


def base_step(sam: SAM) -> Any:
    """The base optimiser's step (the rules keep their state in SAM's ``rule_state``, never in the base
    optimiser's, so one that initialises its state lazily, as Adam, is undisturbed)."""
    return sam.base_optimizer.step()


def set_aside(sam: SAM) -> Any:
    """``g(w)`` of a cadence's off step, before ``first_step(zero_grad=True)`` releases it: the tensors themselves,
    or a copy of the flat buffer when the gradients are its views (zeroed in place)."""
    flat = sam.flat_layout
    if flat is not None and flat.gradients_are_views():
        return flat.grads.clone()
    return [(p, p.grad) for p in _with_gradient(sam)]


def put_back(sam: SAM, kept: Any) -> None:
    """Give ``.grad`` the ``g(w)`` set aside, if no backward pass has filled it since (a loop that took
    ``first_step``'s False as "no second pass"); a second pass at ``w`` gave the same ``g(w)`` anew."""
    if isinstance(kept, Tensor):
        grads = sam.flat_layout.grads
        if not grads.any():
            grads.copy_(kept)
        return
    if not any(p.grad is not None and p.grad.any() for group in sam.param_groups for p in group["params"]):
        for param, grad in kept:
            param.grad = grad


def _with_gradient(sam: SAM) -> list[Tensor]:
    return [p for group in sam.param_groups for p in group["params"] if p.grad is not None]
