"""The SAM step as data: which forward-backward passes a step runs, decided once by the optimiser, run by a driver.

One step of SAM (Foret et al. 2021, Algorithm 1) is the plan

    Pass(at="w")        the gradient g(w) of the batch's loss
    Ascend              e from g(w) (the ascent rule); the weights move to w + e
    Pass(at="w+e")      the gradient g(w + e) of the batch's loss
    Descend             w restored exactly; the base optimiser steps along the descent rule's direction

and every variant is another short plan, built by ``plan_step`` from the optimiser's rules: one pass at ``w``
when the cadence exempts the step (LookSAM, periodic SAM), no pass at ``w`` when neither rule reads ``g(w)``
(Momentum-SAM, a random direction), a pass on the batch then one on another sample when a batch rule picks the
ascent's examples (n-SAM, a single example), one pair of passes per group for m-SAM.

A driver (``SAM.step(closure)``, ``SharpnessAwareStep``, the Hugging Face Trainer, the
Lightning mixin) iterates over a ``StepPlan`` and sees only ``Pass`` phases, which it runs its own way
(a closure, micro-batches under autocast, the Trainer's ``training_step``), and one ``Descend`` at the end,
where it clips and calls the descent. The optimiser's own phases (``Ascend``, ``KeepFirstGradient``,
``SetAside``) run inside the iteration. When the ascent is declined at ``g(w)`` (by the descent rule, or a
GradScaler's overflow) or the step is skipped (a non-finite ``g(w)`` under ``nonfinite="skip"``), the plan moves
straight to ``Descend(outcome="plain")`` or ``Descend(outcome="skipped")``: no driver asks the optimiser why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from flatminima.optim.descent import keep_first_gradient
from flatminima.optim.misuse import refuse_batch_rule
from flatminima.optim.step_state import StepState

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = [
    "Ascend",
    "Descend",
    "KeepFirstGradient",
    "Pass",
    "SetAside",
    "StepPlan",
    "build_plan",
    "checked_batch_rule",
    "plan_step",
]

Sample = tuple[Tensor, Tensor]
Outcome = Literal["ascended", "plain", "skipped"]


@dataclass(frozen=True)
class Pass:
    """One forward-backward pass that the driver runs, at the weights the parameters hold when it is yielded.

    ``sample``: the examples, ``"batch"`` or the batch rule's ``"ascent"`` / ``"descent"`` sample
    (``StepPlan.examples``); ``weighted``: the batch rule weights the per-example losses
    (``StepPlan.loss_weights``); ``group``: m-SAM's group of the batch (else None, the whole sample);
    ``sync``: under DistributedDataParallel, this pass's gradient is all-reduced (else it runs under ``no_sync``);
    ``updates_running_stats``: BatchNorm statistics follow this pass (the plan freezes them otherwise, in models
    the optimiser watches); ``reports_loss``: the pass's loss is (its share of) the loss the step returns.
    """

    at: Literal["w", "w+e"]
    sample: Literal["batch", "ascent", "descent"] = "batch"
    weighted: bool = False
    group: int | None = None
    sync: bool = True
    updates_running_stats: bool = True
    reports_loss: bool = True


@dataclass(frozen=True)
class Descend:
    """The end of the step: the driver clips if it will, then takes the descent (``SAM.second_step``).

    ``outcome`` (set on the one the iteration yields): ``"ascended"`` (the last pass was at ``w + e``), ``"plain"`` (no
    ascent this step: the cadence exempted it or the ascent was declined at ``g(w)``, which ``.grad`` holds) or
    ``"skipped"`` (no step at all: ``second_step`` only clears the gradients and counts the step).
    """

    outcome: Outcome | None = None  # None in the plan's list: the iteration yields the real one


@dataclass(frozen=True)
class Ascend:
    """Move to ``w + e`` from the gradient now in ``.grad`` (``first_pass=False``: none was taken at ``w``)."""

    first_pass: bool = True

    def run(self, plan: StepPlan) -> Outcome | None:
        sam = plan.sam
        sam._ascend(zero_grad=True, grad_scaler=plan.grad_scaler, first_pass=self.first_pass)
        if sam._step.skipped:
            return "skipped"
        if sam._step.declined:
            return "plain"
        plan._put_back_aside()
        return None


@dataclass(frozen=True)
class KeepFirstGradient:
    """Hold the batch's ``g(w)`` for the descent rule before an ascent pass on another sample."""

    def run(self, plan: StepPlan) -> Outcome | None:
        sam = plan.sam
        proceed = keep_first_gradient(sam, plan.grad_scaler)
        if sam._step.skipped:
            return "skipped"
        if not proceed:
            return "plain"
        sam.zero_grad()
        return None


@dataclass(frozen=True)
class SetAside:
    """m-SAM, between groups: ``w`` restored, this group's perturbed gradient set aside for the next group's."""

    @torch.no_grad()
    def run(self, plan: StepPlan) -> Outcome | None:
        plan.sam.restore()
        params = plan._params()
        plan._aside = [p.grad for p in params]
        for p in params:
            p.grad = None
        return None


Phase = Pass | Ascend | KeepFirstGradient | SetAside | Descend


def plan_step(
    sam: SAM,
    *,
    batch_rule: bool = False,
    separate_ascent_sample: bool = False,
    weighted_ascent: bool = False,
    groups: int = 1,
    sync: bool = False,
    first_pass: bool = False,
) -> list[Phase]:
    """The phases of ``sam``'s next step.

    ``batch_rule``: a batch rule picks the passes' examples (the descent's sample and weights included);
    ``separate_ascent_sample``: it draws the ascent's examples apart from the batch (n-SAM, one example);
    ``weighted_ascent``: it weights the ascent's per-example losses (RW-SAM); ``groups``: m-SAM's number of groups
    in the batch; ``sync``: under DDP, all-reduce the ascent's gradient too (one perturbation for all ranks);
    ``first_pass``: a pass at ``w`` even where the rules read no ``g(w)`` (a driver whose accumulation window has
    begun at ``w`` already); BatchNorm then keeps that pass's statistics.
    """
    descent = Pass(at="w+e", sample="descent" if batch_rule else "batch", weighted=batch_rule)
    perturbed = Pass(at="w+e", sample=descent.sample, weighted=batch_rule, updates_running_stats=False)
    if not sam.ascent_due:  # LookSAM's and periodic SAM's cheap steps: the base optimiser's step on the batch
        return [Pass(at="w"), Descend()]
    if not (sam.needs_first_pass or first_pass):  # the ascent reads no g(w): move first, then the only pass
        return [Ascend(first_pass=False), descent, Descend()]
    first_sync = sync or sam.descent.needs_first_gradient  # a descent that reads g(w) must see the global one
    if separate_ascent_sample and sam.descent.needs_first_gradient:  # g(w) of the batch, then the ascent's sample
        ascent = Pass("w", "ascent", weighted_ascent, sync=sync, updates_running_stats=False, reports_loss=False)
        return [Pass(at="w"), KeepFirstGradient(), ascent, Ascend(), replace(perturbed, reports_loss=False), Descend()]
    if batch_rule:  # the step's loss is the batch's: at w, or at w + e when the ascent saw another sample
        sample = "ascent" if separate_ascent_sample else "batch"
        ascent = Pass("w", sample, weighted_ascent, sync=first_sync, reports_loss=not separate_ascent_sample)
        return [ascent, Ascend(), replace(perturbed, reports_loss=separate_ascent_sample), Descend()]
    phases: list[Phase] = []
    for group in range(groups):  # m-SAM: each group's own e; the perturbed gradients add up in .grad
        last = group == groups - 1
        index = group if groups > 1 else None
        phases += [Pass(at="w", group=index, sync=first_sync), Ascend()]
        phases.append(replace(perturbed, group=index, sync=last, reports_loss=False))
        if not last:
            phases.append(SetAside())
    return [*phases, Descend()]


class StepPlan:
    """One step's phases, and their state while a driver runs them: iterate over it (see the module docstring).

    ``passes`` is the number of forward-backward passes planned (the step's cost when nothing is declined);
    ``passes_run`` counts those yielded so far; ``outcome`` is the ``Descend`` outcome once reached.
    """

    def __init__(
        self,
        sam: SAM,
        phases: list[Phase],
        grad_scaler: torch.amp.GradScaler | None = None,
        batch_rule: Any = None,
        batch: Sample | None = None,
        ascent_sample: Sample | None = None,
    ) -> None:
        self.sam = sam
        self.phases = tuple(phases)
        self.grad_scaler = grad_scaler
        self.batch_rule = batch_rule
        self.passes = sum(isinstance(phase, Pass) for phase in self.phases)
        self.passes_run = 0
        self.outcome: Outcome | None = None
        self._batch = batch
        self._ascent_sample = ascent_sample
        self._descent_sample: Sample | None = None
        self._aside: list[Tensor | None] | None = None

    def __iter__(self) -> Iterator[Pass | Descend]:
        sam = self.sam
        for phase in self.phases:
            if isinstance(phase, Pass):
                if not phase.updates_running_stats:
                    sam._running_stats.freeze()
                self.passes_run += 1
                yield phase
                continue
            outcome = "ascended" if sam._step.ascended else "plain"
            if not isinstance(phase, Descend):
                outcome = phase.run(self)
                if outcome is None:
                    continue
            self.outcome = outcome
            self._batch = self._ascent_sample = self._descent_sample = None  # not kept alive by last_plan
            yield Descend(outcome)
            return

    def __repr__(self) -> str:
        return "StepPlan(" + ", ".join(map(repr, self.phases)) + ")"

    def examples(self, phase: Pass, inputs: Tensor, targets: Tensor) -> Sample:
        """The examples ``phase`` sees, of the batch ``(inputs, targets)``: the batch rule's choice, or the batch."""
        if phase.sample == "ascent" and self._ascent_sample is not None:
            return self._ascent_sample
        if phase.sample == "descent" and self.batch_rule is not None:
            if self._descent_sample is None:
                self._descent_sample = self.batch_rule.descent_sample(inputs, targets) or (inputs, targets)
            return self._descent_sample
        return inputs, targets

    def loss_weights(self, phase: Pass, losses: Tensor, probe: Callable[[], Any]) -> Tensor | None:
        """The batch rule's weights of ``phase``'s per-example ``losses`` (None: their mean); ``probe()`` builds
        the ``Probe`` a rule that scores examples asks for."""
        if not phase.weighted or self.batch_rule is None:
            return None
        if phase.at == "w":
            return self.batch_rule.ascent_weights(losses, probe())
        return self.batch_rule.descent_weights()

    def _params(self) -> list[Tensor]:
        return [p for group in self.sam.param_groups for p in group["params"]]

    def _put_back_aside(self) -> None:
        """m-SAM: the earlier groups' perturbed gradients back in ``.grad``, for this group's to add to."""
        if self._aside is not None:
            for p, grad in zip(self._params(), self._aside):
                p.grad = grad
            self._aside = None


def build_plan(
    sam: SAM,
    grad_scaler: torch.amp.GradScaler | None,
    batch: Sample | None,
    groups: int,
    sync_perturbation: bool,
    first_pass: bool = False,
) -> StepPlan:
    """``sam``'s plan of its next step (``SAM.plan``); the batch rule, if any, draws the ascent's sample now."""
    rule = sam.batch_rule
    if rule is not None and batch is None:
        refuse_batch_rule(sam, "this driver")
    if sam.is_perturbed:
        sam._abandon_step()
        raise RuntimeError(
            "a new step was begun with the weights at w + e (first_step() without second_step()); they are "
            "restored to w and that step is abandoned."
        )
    sam._step = StepState()  # nothing of an earlier step that a driver's error cut short carries over
    ascent_sample = None
    if rule is not None and sam.ascent_due:
        ascent_sample = rule.ascent_sample(batch[0], batch[1], sam.steps)
    phases = plan_step(
        sam,
        batch_rule=rule is not None,
        separate_ascent_sample=ascent_sample is not None,
        weighted_ascent=rule is not None and rule.needs_per_example_losses,
        groups=groups,
        sync=sync_perturbation,
        first_pass=first_pass,
    )
    return StepPlan(sam, phases, grad_scaler, rule, batch, ascent_sample)


def checked_batch_rule(rule: Any) -> Any:
    """``rule`` if it is a batch rule that changes something, None for none or SAM's own (the batch everywhere)."""
    if rule is not None and not callable(getattr(rule, "ascent_sample", None)):
        raise TypeError(f"batch_rule must be a flatminima.batch_rules.BatchRule; got {type(rule).__name__}.")
    return None if rule is None or getattr(rule, "is_default", False) else rule
