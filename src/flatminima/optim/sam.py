"""SAM: the two-pass protocol around any ``torch.optim`` optimiser (Foret et al. 2021, Algorithm 1).

One step: gradient ``g`` at ``w`` -> move to ``w + e`` (an ascent rule's) -> gradient there -> restore ``w``
exactly -> base step along the descent rule's direction. The step's plan (``flatminima.optim.plan``) is decided
here from three seams (``flatminima.optim.rules``) and run by a driver; the maths is in the sibling modules
(ascent, descent, groups, weights, guard, scaler, sharded). ``param_groups`` and ``state`` *are* the base
optimiser's, so LR schedulers, per-group options and checkpoints work as with the base optimiser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatminima import running_stats
from flatminima.optim import ascent, descent, misuse, rule_state, sharded
from flatminima.optim import scaler as amp
from flatminima.optim.closure import run_closure
from flatminima.optim.flat import FlatLayout
from flatminima.optim.groups import RuleBook, add_group, build_base, check_lrs, check_seams, fill_group
from flatminima.optim.guard import NonFiniteGuard, NonFinitePolicy
from flatminima.optim.plan import StepPlan, build_plan, checked_batch_rule
from flatminima.optim.rule_state import RuleState
from flatminima.optim.rules import (
    Cadence,
    DescentCapabilities,
    DescentRule,
    EveryStep,
    PerturbationRule,
    PerturbedGradient,
    RuleContext,
)
from flatminima.optim.step_state import StepState
from flatminima.optim.weights import CopiedShards, FlatWeights, SwappedWeights, WeightStore

__all__ = ["SAM"]

_STEP_KEY = "sam_steps"  # the step counter the cadence reads, saved beside the base optimiser's state


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimiser.

    A SAM step is ``first_step`` after the backward pass at ``w``, then ``second_step`` after the one at
    ``w + e``, or ``step(closure)`` for both, or any driver running ``plan``. ``second_step`` without
    ``first_step`` is a plain step: the base optimiser's along the gradient in ``.grad``.

    Args:
        params: parameters or parameter groups, as for any optimiser (``None`` when ``base_optimizer`` is an
            instance: its groups are used).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (built here with ``**base_kwargs``) or an instance.
        rho: radius of the neighbourhood; 0 reproduces the base optimiser bit for bit.
        p: the ascent's L_p ball, ``1 <= p <= inf``.
        adaptive: ASAM, the ball taken in the space scaled by ``T_w = |w| + adaptive_eta``.
        adaptive_eta: ASAM's eta, 0.01 as in its paper; ``adaptive_eta=0`` is davda54/sam's and
            pytorch_optimizer's ``T_w = |w|`` (the Variants page of the documentation).
        normalize: ``False`` for USAM (``e = rho g``).
        perturbation: an ascent rule for all groups (``AscentRule``, or any object
            with ``perturb_``); overrides ``p``, ``adaptive``, ``normalize``.
        descent: the descent rule (default ``PerturbedGradient``: SAM's).
        cadence: which steps ascend (default ``EveryStep``).
        model: the model being trained: its BatchNorm statistics are then kept from the first pass. Without it,
            ``step(closure)`` finds the layers as they run, except in a model called from inside a
            ``torch.compile``'d function (the documentation's torch.compile and FSDP2 page).
        nonfinite: on an inf/NaN gradient, ``"raise"`` (default) a ``FloatingPointError``, ``"skip"`` the step
            (weights and state untouched) or ``"ignore"`` (no check: saves one device-to-host sync per pass; a
            GradScaler does its own checking).
        flatten: parameters and gradients as views of one buffer (``FlatLayout``): a step's maths is a few
            single operations, much faster for many small tensors. Gradients are zeroed in place; parameters share
            one device and dtype; not with FSDP. Steps that do not fit (per-group rho, a rule not linear in ``g``,
            a GradScaler...) take the general path; the two agree to rounding, not bit for bit.
        **base_kwargs: options of the base optimiser (``lr``, ``momentum``, ``weight_decay``...).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        normalize: bool = True,
        perturbation: PerturbationRule | None = None,
        descent: DescentRule | None = None,
        cadence: Cadence | None = None,
        model: nn.Module | None = None,
        nonfinite: NonFinitePolicy = "raise",
        flatten: bool = False,
        **base_kwargs: Any,
    ) -> None:
        base = build_base(params, base_optimizer, base_kwargs)
        check_seams(perturbation, descent, cadence)
        self.guard = NonFiniteGuard(nonfinite)
        defaults = dict(rho=rho, p=p, adaptive=adaptive, adaptive_eta=adaptive_eta, normalize=normalize, perturb=True)
        for group in base.param_groups:
            fill_group(group, defaults)
        self.rules = RuleBook(perturbation)  # each group's ascent rule, and what every rule declares
        self.descent = descent if descent is not None else PerturbedGradient()
        self.cadence = cadence if cadence is not None else EveryStep()
        self.steps = 0  # completed steps, as the cadence counts them
        self.rule_state = RuleState()  # the rules' own per-parameter state, saved by state_dict
        self.last_plan: StepPlan | None = None  # the plan of the step under way, or of the last one
        self._running_stats = running_stats.RunningStatsFreezer(model)
        self._step = StepState()  # what is known of the step under way
        self._batch_rule: Any = None
        self._warned_blind = False
        self._ascent_layout: Any = None  # which groups the ascent perturbs, by rule (optim.ascent.Layout)
        super().__init__(base.param_groups, defaults)
        self.base_optimizer = base
        # Share, not copy: schedulers, add_param_group and state_dict all act on the base optimiser.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        self.shard_groups = sharded.shard_groups(p for g in self.param_groups for p in g["params"])
        if self.sharded:
            sharded.check_shardable(self.rules, self.descent, self.param_groups, flatten)
        # the buffers parameters and gradients are views of (flatten=True); where w is kept while perturbed
        self.flat_layout = FlatLayout(self._params()) if flatten else None
        self._weights: WeightStore = FlatWeights(self.flat_layout) if flatten else self._plain_store()

    # ------------------------------------------------------------------ what the plan and users ask

    @property
    def perturbation(self) -> PerturbationRule | None:
        """The ascent rule given for all groups (``perturbation=``), else None (rules built from group options)."""
        return self.rules.perturbation

    @property
    def nonfinite(self) -> NonFinitePolicy:
        return self.guard.policy

    @property
    def is_perturbed(self) -> bool:
        """True between a ``first_step`` that moved the weights and ``second_step`` / ``restore``."""
        return self._weights.perturbed

    @property
    def sharded(self) -> bool:
        return self.shard_groups is not None  # FSDP2's fully_shard made the parameters DTensors

    @property
    def ascent_due(self) -> bool:
        """Whether the cadence has this step take the ascent (else: one pass at ``w`` and ``second_step``)."""
        return self.cadence.takes_ascent(self.steps)

    @property
    def needs_first_pass(self) -> bool:
        """Whether this step needs ``g(w)`` before ``first_step`` (not when the ascent reads none)."""
        return not self.ascent_due or self.descent.needs_first_gradient or ascent.needs_gradient(self)

    @property
    def ascent_declined(self) -> bool:
        """True when the ascent was declined at ``g(w)`` (the descent rule, or an overflow): a plain step follows."""
        return self._step.declined

    @property
    def step_skipped(self) -> bool:
        """True between a ``first_step`` that met a non-finite gradient (``nonfinite="skip"``) and ``second_step``."""
        return self._step.skipped

    @property
    def batch_rule(self) -> Any:
        """The batch rule that picks each pass's examples (n-SAM, RW-SAM, one example), or None; only a driver that
        hands the plan its batch (``SharpnessAwareStep``) can run one."""
        return self._batch_rule

    @batch_rule.setter
    def batch_rule(self, rule: Any) -> None:
        self._batch_rule = checked_batch_rule(rule)

    def plan(
        self,
        grad_scaler: torch.amp.GradScaler | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
        groups: int = 1,
        sync_perturbation: bool = False,
        first_pass: bool = False,
    ) -> StepPlan:
        """The plan of the next step (``flatminima.optim.plan``) for a driver to run; ``batch``: the step's
        ``(inputs, targets)``, for a ``batch_rule``; ``groups``: m-SAM's; ``sync_perturbation``: under DDP,
        one perturbation for all ranks; ``first_pass``: a pass at ``w`` even if the rules read no ``g(w)``."""
        self.last_plan = build_plan(self, grad_scaler, batch, groups, sync_perturbation, first_pass)
        return self.last_plan

    def watch_running_stats(self, model: nn.Module) -> None:
        """Keep ``model``'s BatchNorm statistics from the first pass (what ``model=`` does at construction)."""
        self._running_stats.watch(model)

    # ------------------------------------------------------------------ the step, phase by phase

    @torch.no_grad()
    def keep_first_gradient(self, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Hold ``.grad`` as ``g(w)`` for the descent rule before an ascent on another sample; returns whether the
        ascent goes ahead (if not, ``.grad`` still holds ``g(w)``: call ``second_step``)."""
        misuse.refuse_batch_rule(self, "keep_first_gradient()")
        return descent.keep_first_gradient(self, grad_scaler)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None, *, first_pass: bool = True
    ) -> bool:
        """Move from ``w`` to ``w + e`` with the gradient at ``w`` in ``.grad``; returns whether the weights moved.

        ``zero_grad=True`` clears the gradients for the second pass. With ``grad_scaler`` they are unscaled first,
        and an inf/NaN step is not perturbed (the scaler skips it in ``second_step``). On a step the cadence
        exempts, the weights stay at ``w`` and ``second_step`` steps along ``g(w)`` with or without a second pass.
        ``first_pass=False``: no pass at ``w`` preceded (``needs_first_pass``), so BatchNorm is not frozen.
        """
        misuse.refuse_batch_rule(self, "first_step()")
        return self._ascend(zero_grad, grad_scaler, first_pass=first_pass)

    @torch.no_grad()
    def _ascend(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None, *, first_pass: bool = True) -> bool:
        """The ascent phase: keep ``g(w)`` if the descent asks (it may decline), move to ``w + e``, freeze
        BatchNorm for the pass there, release the gradients."""
        sharded.check_scaler(self.sharded, grad_scaler)
        misuse.check_ascent_order(self, grad_scaler)
        step = self._step
        step.skipped = False
        if not step.first_kept:
            step.first_grads = None
        due = self.ascent_due and not step.declined
        if due and not step.first_kept and descent.hold_first_gradient(self, zero_grad, grad_scaler):
            step.declined = True  # a plain step along g(w), which .grad still holds (nothing was released)
            return False
        if due and not ascent.perturb(self, zero_grad, grad_scaler):
            # the scaled g(w) overflowed: keep it in .grad (not zeroed) and decline the ascent, so that no second
            # pass runs and the scaler, finding the inf/NaN in second_step, skips the step and backs off
            step.declined = True
            return False
        step.ascended = self.is_perturbed
        if due and not step.skipped and first_pass and (step.ascended or self._has_gradient()):
            # the unperturbed first pass set the statistics; the second keeps them. Without a gradient (and no
            # move) there was no first pass: the next forward pass is the step's only one and must update them.
            self._running_stats.freeze()
        if zero_grad and not step.declined:
            if not self.ascent_due:  # g(w) kept for a second_step that follows with no second pass
                step.set_aside = descent.set_aside(self)
            self.zero_grad()
        return step.ascended

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` exactly and take the base optimiser's step along the descent rule's direction.

        With ``grad_scaler`` the step goes through ``grad_scaler.step`` and its skip logic (call its ``update()``
        afterwards). Clip before calling this (after ``apply_descent_rule`` for a descent rule not SAM's, and
        ``grad_scaler.unscale_``). Called without ``first_step`` (or with no ascent) it is exactly the base
        optimiser's ``step()`` on ``.grad``.
        """
        self.restore()
        if self._step.set_aside is not None:  # first_step on a cadence's off step: g(w), unless a 2nd pass ran
            descent.put_back(self, self._step.set_aside)
        if self.sharded and amp.is_active(grad_scaler):
            self._abandon_step()
            sharded.check_scaler(self.sharded, grad_scaler)
        self._opt_called = True  # tells LR schedulers the optimiser has stepped (the two-step pattern too)
        try:
            check_lrs(self.param_groups)  # w is restored: a bad lr stops here, before any weight moves
            if self._step.skipped:
                self.zero_grad()
            elif amp.is_active(grad_scaler):
                self.apply_descent_rule(grad_scaler)
                amp.step_through(grad_scaler, self)
            else:
                self.apply_descent_rule()
                if descent.descent_gradient_ok(self):
                    self._base_step()
                else:
                    zero_grad = True
            if zero_grad:
                self.zero_grad()
            self.steps += 1
        finally:
            self._step = StepState()

    def apply_descent_rule(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Turn ``.grad`` into the descent direction, once per step (``second_step`` does if you did not): call it
        to clip the final direction. Under a GradScaler the gradients are unscaled first, to mix with ``g(w)``."""
        descent.apply_direction(self, grad_scaler)

    @torch.no_grad()
    def restore(self) -> None:
        """Put ``w`` back exactly (the weight store's strategy) and BatchNorm statistics back on; a no-op at ``w``."""
        self._weights.restore()
        self._running_stats.thaw()

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """A full SAM step, each of the plan's passes a call of ``closure`` (forward and backward; SAM zeroes the
        gradients before each). Returns the loss at ``w`` (at ``w + e`` for a plan with no pass at ``w``). With
        ``grad_scaler`` the closure backpropagates ``grad_scaler.scale(loss)``."""
        if closure is amp.BASE_STEP:  # GradScaler.step calling back from second_step
            return self._base_step()
        return run_closure(self, closure, grad_scaler)

    # ------------------------------------------------------------------ checkpoints and groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict, plus the step counter the cadence reads and the rules' state."""
        state = self.base_optimizer.state_dict()
        state[_STEP_KEY] = self.steps
        return self.rule_state.save(state, self._params())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimiser's state, the per-group SAM options and the rules' state; stays shared."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.base_optimizer.param_groups, self.base_optimizer.state
        self.steps = int(state_dict.get(_STEP_KEY, 0))
        for group in self.param_groups:
            fill_group(group, self.defaults)
        self.rule_state.load(state_dict, self)

    def rule_context(self, params: list[Tensor]) -> RuleContext:
        """The ``RuleContext`` of ``params`` (each field computed when read)."""
        return rule_state.context(self, params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; with ``flatten=True`` the gradients stay views of the flat buffer, zeroed in place."""
        if self.flat_layout is not None:
            self.flat_layout.zero_gradients()
        else:
            super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "base_optimizer"):  # not during Optimizer.__init__, when the groups are in place already
            add_group(self, param_group)
        else:
            super().add_param_group(param_group)

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _plain_store(self) -> WeightStore:
        return CopiedShards() if self.sharded else SwappedWeights()

    def _base_step(self) -> Any:
        """The base optimiser's step, then the descent rule's ``after_base_step_`` if it declares
        ``steps_after_base`` (WSAM's decoupled term): on the parameters with a gradient, as ``direction_`` had them."""
        result = descent.base_step(self)
        if self.rules.declared(self.descent, DescentCapabilities).steps_after_base:
            params = [p for p in self._params() if p.grad is not None]
            context = self.rule_context(params)
            if self.sharded:
                params = sharded.locals_of(params)
            with torch.no_grad(), sharded.reducing(self.shard_groups):
                self.descent.after_base_step_(params, context)
        return result

    def _has_gradient(self) -> bool:
        return any(p.grad is not None for p in self._params())

    def _abandon_step(self) -> None:
        """Back to ``w`` exactly, BatchNorm unfrozen, nothing of this step kept: before a misuse error."""
        self.restore()
        self._step = StepState()
