"""The closure driver: ``SAM.step(closure)`` runs the step's plan with ``closure`` as every pass (torch.optim's
contract: the closure runs forward and backward and returns the loss).

Without ``model=``, BatchNorm layers are found as the closure's pass at ``w + e`` runs them (compiled modules
included) and frozen there; a model run inside a ``torch.compile``'d function cannot be reached that way, which
is warned about once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flatminima import running_stats
from flatminima.optim import sharded
from flatminima.optim.plan import Descend, Pass

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = ["run_closure"]


def run_closure(
    sam: SAM, closure: Callable[[], Tensor] | None, grad_scaler: torch.amp.GradScaler | None
) -> Tensor | None:
    """One step of ``sam``'s plan, each pass a call of ``closure``; returns the loss of the pass that reports it
    (at ``w``, or at ``w + e`` when there is no pass at ``w``)."""
    if sam.is_perturbed:
        sam._abandon_step()
        raise RuntimeError(
            f"SAM.step({'' if closure is None else 'closure'}) was called between first_step() and "
            "second_step(), with the weights at w + e; they are restored to w and this step is abandoned. "
            "Finish a step begun with first_step() by calling second_step() after the second backward pass "
            "(not step()), or use step(closure) alone."
        )
    if closure is None:
        if _initialising_state(sam):
            return sam.base_optimizer.step()  # creates the base's state; no SAM step (not counted)
        raise RuntimeError(
            "SAM.step() needs a closure that runs forward and backward and returns the loss, e.g. "
            "opt.step(lambda: (loss_fn(model(x), y).backward(), ...)[-1]); or call first_step() after the "
            "first backward and second_step() after the second."
        )
    plan = sam.plan(grad_scaler)
    sam.zero_grad()
    loss = None
    try:
        for phase in plan:
            if isinstance(phase, Descend):
                break
            with torch.enable_grad(), _running_stats(sam, phase) as seen:
                value = closure()
            if seen is not None and not seen.modules_ran:
                _warn_blind(sam, value)
            if phase.reports_loss:
                loss = value
    except BaseException:
        sam._abandon_step()  # w exactly, BatchNorm as after the first pass
        raise
    sam.second_step(grad_scaler=grad_scaler)
    return loss


def _initialising_state(sam: SAM) -> bool:
    """Whether ``step()`` without a closure is torch's way of creating an optimiser's state before loading a
    checkpoint into it (``torch.distributed.checkpoint``'s ``_init_optim_state``, used by FSDP2 checkpoints in
    Lightning and Accelerate): no state yet, every learning rate 0, every gradient zero. The base optimiser's step
    then moves nothing and creates the state; any other ``step()`` without a closure is a mistake."""
    if sam.base_optimizer.state:
        return False
    groups = sam.param_groups
    if any(float(group.get("lr", 0.0)) != 0.0 for group in groups):
        return False
    grads = [p.grad for group in groups for p in group["params"] if p.requires_grad]
    return bool(grads) and all(g is not None and not bool(sharded.local(g).count_nonzero()) for g in grads)


def _running_stats(sam: SAM, phase: Pass) -> AbstractContextManager[running_stats.FrozenPass | None]:
    """A pass that must not update BatchNorm: frozen through the watched model (by the plan), else wherever it
    runs."""
    if phase.updates_running_stats or sam._running_stats.watching:
        return nullcontext()
    return running_stats.freeze_everywhere()


def _warn_blind(sam: SAM, loss: Any) -> None:
    """The perturbed pass called no nn.Module eagerly: warn if the loss came through a compiled graph (a model run
    inside a torch.compile'd function), not for a model without modules."""
    if sam._warned_blind or not _through_compiled_graph(loss):
        return
    sam._warned_blind = True
    warnings.warn(
        "SAM.step(closure): the closure's second (perturbed) pass called no nn.Module outside compiled code, "
        "as when the model runs inside a torch.compile'd function; SAM then cannot reach its BatchNorm layers, "
        "whose running statistics the perturbed pass would update. If the model has BatchNorm, build SAM "
        "with model=model (or compile the module itself: torch.compile(model)).",
        RuntimeWarning,
        stacklevel=5,  # the caller of step(), past torch.optim's wrapper, SAM.step and run_closure
    )


def _through_compiled_graph(loss: Any, limit: int = 10_000) -> bool:
    """Whether ``loss``'s autograd graph holds a node of a compiled (AOT autograd) graph; looks at ``limit`` nodes
    at most (the graph of a model without modules, the only one asked about, is small)."""
    stack, seen = [getattr(loss, "grad_fn", None)], set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__.startswith("CompiledFunction"):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
