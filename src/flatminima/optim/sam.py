"""SAM: the two-pass protocol around any ``torch.optim`` optimiser.

One step: gradient ``g`` at ``w`` -> move to ``w + e`` (``e`` from an ascent rule) -> gradient there -> restore
``w`` exactly -> base optimiser step along the descent rule's direction (Foret et al. 2021, Algorithm 1). The
class is the protocol only: which rules run is declared by three seams (:mod:`flatminima.optim.rules`), the
tensor maths is in :mod:`flatminima.optim.functional`, GradScaler glue in :mod:`flatminima.optim.scaler`, the
inf/NaN policy in :mod:`flatminima.optim.guard` and BatchNorm handling in :mod:`flatminima.running_stats`.

The class is itself a :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are* the base
optimiser's, so LR schedulers, per-group options and checkpoints work as with the base optimiser.

Per-group options (plain values, so a ``state_dict`` loads with ``torch.load(weights_only=True)``):

- ``rho``: radius (0 or ``perturb=False`` excludes the group from the perturbation, e.g. norms and biases);
- ``p``: the L_p ball of the ascent (:class:`~flatminima.optim.perturb.DualNorm`);
- ``adaptive`` and ``adaptive_eta``: ASAM scaling (:class:`~flatminima.optim.perturb.Adaptive`), ``T_w = |w| + eta``
  with the ASAM paper's ``eta = 0.01`` by default; ``adaptive_eta=0`` is the reference code's (davda54/sam,
  pytorch_optimizer) ``T_w = |w|`` (docs/variants.md);
- ``normalize``: ``False`` gives USAM, ``e = rho g`` (:class:`~flatminima.optim.perturb.Unnormalized`).

Groups whose rules coincide are normalised together (one global norm, as in the paper); a rule passed as
``perturbation=`` replaces these for every group.

Sharded parameters (FSDP2's ``fully_shard``, DTensors) are perturbed shard by shard, with the norms taken over all
ranks' shards (:mod:`flatminima.optim.sharded`): the step is SAM's on the whole model and the global batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatminima import running_stats
from flatminima.optim import functional as F
from flatminima.optim import scaler as amp
from flatminima.optim import sharded
from flatminima.optim.flat import FlatLayout
from flatminima.optim.guard import NonFiniteGuard, NonFinitePolicy
from flatminima.optim.norms import flat_norm, global_norm, reduced_over, tensor_norms
from flatminima.optim.perturb import Adaptive, DualNorm, Unnormalized
from flatminima.optim.plan import Descend, Pass, StepPlan, plan_step
from flatminima.optim.rules import (
    AscentCapabilities,
    AscentRule,
    Cadence,
    DescentCapabilities,
    DescentRule,
    EveryStep,
    PerturbationRule,
    PerturbedGradient,
)
from flatminima.optim.step_state import StepState
from flatminima.optim.weights import CopiedShards, FlatWeights, SwappedWeights, WeightStore

__all__ = ["SAM"]

_RULE_KEYS = ("p", "adaptive", "adaptive_eta", "normalize")
_GROUP_KEYS = ("rho", *_RULE_KEYS, "perturb")
_STEP_KEY = "sam_steps"  # the step counter the cadence reads, saved beside the base optimiser's state


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimiser.

    A SAM step is ``first_step`` after the backward pass at ``w``, then ``second_step`` after the one at
    ``w + e`` (or ``step(closure)`` for both). ``second_step`` called without ``first_step`` is the documented
    way to take a plain step: the base optimiser's step along the gradient in ``.grad``, with no ascent.

    Args:
        params: parameters or parameter groups, as for any optimiser (``None`` when ``base_optimizer`` is an
            instance: its groups are used).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (built here with ``**base_kwargs``) or an instance.
        rho: radius of the neighbourhood; 0 reproduces the base optimiser bit for bit.
        p: the ascent's L_p ball, ``1 <= p <= inf``.
        adaptive: ASAM, the ball taken in the space scaled by ``T_w = |w| + adaptive_eta``.
        adaptive_eta: ASAM's eta; 0.01 (the ASAM paper's) by default. The reference implementations
            (davda54/sam, pytorch_optimizer) use ``T_w = |w|``: pass ``adaptive_eta=0`` to match them (with the
            default the perturbation differs by about 10 % of its size; docs/variants.md).
        normalize: ``False`` for USAM (``e = rho g``).
        perturbation: an ascent rule for all groups (:class:`~flatminima.optim.rules.AscentRule`, or any object
            with ``perturb_``); overrides ``p``, ``adaptive``, ``normalize``.
        descent: the descent rule (default :class:`~flatminima.optim.rules.PerturbedGradient`: SAM's).
        cadence: which steps ascend (default :class:`~flatminima.optim.rules.EveryStep`).
        model: the model being trained. Given once here, its BatchNorm running statistics are kept from the
            first pass with no extra call in the training loop. Without it, ``step(closure)`` finds the layers
            as they run (compiled modules included, but not a model called from inside a ``torch.compile``'d
            function: pass ``model=`` then; docs/compile-fsdp.md).
        nonfinite: what to do when a gradient holds inf or NaN: ``"raise"`` (default) a ``FloatingPointError``,
            ``"skip"`` the step (weights and optimiser state untouched), ``"ignore"`` to check nothing. The check
            costs one device-to-host sync per pass; ``"ignore"`` removes it (a GradScaler, when passed, does its
            own checking and the policy is not applied to that step).
        flatten: keep parameters and gradients as views into one buffer (:class:`FlatLayout`), so each step's
            maths is a few single operations instead of a few per tensor: much faster for models of many small
            tensors, on a CPU especially. Gradients are then zeroed in place, as ``set_to_none=False`` does,
            and parameters must share one device and dtype. Steps that do not fit (a parameter without
            gradient, per-group rho, a rule not linear in ``g``, a GradScaler) take the general path. Not with
            sharded (FSDP) parameters. The flat and the per-tensor paths agree to rounding, not bit for bit: one
            operation over a buffer and one per tensor may take different CPU kernels.
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
        base = _build_base(params, base_optimizer, base_kwargs)
        if perturbation is not None and not isinstance(perturbation, PerturbationRule):
            raise TypeError(f"perturbation must have a perturb_(params, grads, rho) method; got {perturbation!r}.")
        if descent is not None and not callable(getattr(descent, "direction_", None)):
            raise TypeError(f"descent must be a DescentRule (a direction_ method); got {descent!r}.")
        if cadence is not None and not callable(getattr(cadence, "takes_ascent", None)):
            raise TypeError(f"cadence must be a Cadence (a takes_ascent(step) method); got {cadence!r}.")
        self.guard = NonFiniteGuard(nonfinite)
        defaults = dict(rho=rho, p=p, adaptive=adaptive, adaptive_eta=adaptive_eta, normalize=normalize, perturb=True)
        for group in base.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            _check_group(group)
        self.perturbation = perturbation
        self.descent = descent if descent is not None else PerturbedGradient()
        self.cadence = cadence if cadence is not None else EveryStep()
        self.steps = 0  # completed steps, as the cadence counts them
        self._running_stats = running_stats.RunningStatsFreezer(model)
        self._rules: dict[tuple, AscentRule] = {}
        self._capabilities: dict[tuple[Any, type], Any] = {}  # what each rule in use declares, read once
        self._step = StepState()  # what is known of the step under way
        self._batch_rule: Any = None
        self.last_plan: StepPlan | None = None  # the plan of the step under way, or of the last one
        super().__init__(base.param_groups, defaults)
        self.base_optimizer = base
        # Share, not copy: schedulers, add_param_group and state_dict all act on the base optimiser.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        self._flat: FlatLayout | None = None
        self._warned_blind = False
        self._shard_groups = sharded.shard_groups(p for g in self.param_groups for p in g["params"])
        if self._shard_groups is not None:
            if flatten:
                raise ValueError(
                    "flatten=True re-points the parameters into one buffer, which FSDP's sharded parameters do not "
                    "allow; use flatten=False with fully_shard."
                )
            self._check_shardable()
        # where w is kept while the parameters hold w + e: one strategy, from how the parameters are stored
        self._weights: WeightStore = CopiedShards() if self.sharded else SwappedWeights()
        if flatten:
            self._flat = FlatLayout([p for g in self.param_groups for p in g["params"]])
            self._weights = FlatWeights(self._flat)

    # ------------------------------------------------------------------ what a driver asks

    @property
    def nonfinite(self) -> NonFinitePolicy:
        return self.guard.policy

    @property
    def is_perturbed(self) -> bool:
        """True between a ``first_step`` that moved the weights and ``second_step`` / ``restore``."""
        return self._weights.perturbed

    @property
    def sharded(self) -> bool:
        """True when the parameters are sharded DTensors (FSDP2's ``fully_shard``)."""
        return self._shard_groups is not None

    @property
    def ascent_due(self) -> bool:
        """Whether the cadence has this step take the ascent (else: one pass at ``w`` and ``second_step``)."""
        return self.cadence.takes_ascent(self.steps)

    @property
    def needs_first_pass(self) -> bool:
        """Whether this step needs the gradient at ``w`` before ``first_step``.

        False when the ascent is due and neither rule reads ``g(w)`` (a random direction under SAM's descent):
        then ``first_step`` can be called without a backward pass, saving one forward-backward.
        """
        if not self.ascent_due or self.descent.needs_first_gradient:
            return True
        rules = {self._rule_for(g) for g in self.param_groups if g["perturb"] and g["rho"] != 0}
        return any(self._declared(rule).needs_gradient for rule in rules)

    @property
    def ascent_declined(self) -> bool:
        """True when this step's ascent was declined at ``g(w)``: by the descent rule
        (:meth:`DescentRule.declines_ascent`), or because ``g(w)`` overflowed under a GradScaler. ``.grad`` then
        holds ``g(w)`` and ``second_step`` takes a plain step (under a GradScaler that finds the overflow: no step,
        and the scale backs off); no second pass is needed."""
        return self._step.declined

    @property
    def step_skipped(self) -> bool:
        """True between a ``first_step`` that met a non-finite gradient (``nonfinite="skip"``) and ``second_step``."""
        return self._step.skipped

    @property
    def flat_layout(self) -> FlatLayout | None:
        """The buffers parameters and gradients are views of (``flatten=True``), else None."""
        return self._flat

    @torch.no_grad()
    def keep_first_gradient(self, grad_scaler: torch.amp.GradScaler | None = None) -> bool:
        """Hold the gradient now in ``.grad`` as ``g(w)`` for the descent rule, before an ascent pass on another
        sample (a hand-written loop whose ascent gradient is not the batch's, such as a single example's, calls
        this after the batch's pass at ``w``, then zeroes the gradients). Returns whether the ascent goes ahead:
        False when the descent rule declines it at this ``g(w)``; ``.grad`` is then left holding ``g(w)``, so call
        ``second_step`` for a plain step. With ``grad_scaler`` the kept copy is unscaled; a non-finite ``g(w)``
        then declines the ascent too, so that the scaler finds the inf/NaN left in ``.grad``, skips the step and
        lowers its scale, as for any overflow.
        """
        self._refuse_batch_rule("keep_first_gradient()")
        return self._keep_first_gradient(grad_scaler)

    def _keep_first_gradient(self, grad_scaler: torch.amp.GradScaler | None) -> bool:
        if self.is_perturbed:
            self._abandon_step()
            raise RuntimeError(
                "keep_first_gradient() must come before first_step(), but the weights were perturbed (at w + e); "
                "they are restored to w and this step is abandoned. Call it after the batch's backward pass at w."
            )
        self._check_scaler(grad_scaler)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        kept = [p.grad.clone() for p in params]
        self._step.first_grads = (params, kept)
        self._step.first_kept = True
        if amp.is_active(grad_scaler):
            finite = amp.unscale_first_gradient(grad_scaler, kept)
        else:
            finite = not self.guard.checks or self.guard.first_gradient_ok(self._host_norms(kept))
            if not finite:  # nonfinite="skip"
                self._step.skipped = True
                return False
        self._step.declined = self.ascent_due and (not finite or self.descent.declines_ascent(kept))
        return not self._step.declined

    def watch_running_stats(self, model: nn.Module) -> None:
        """Keep ``model``'s BatchNorm statistics from the first pass (what ``model=`` does at construction)."""
        self._running_stats.watch(model)

    # ------------------------------------------------------------------ the two passes

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None, *, first_pass: bool = True
    ) -> bool:
        """Move from ``w`` to ``w + e``, using the gradients now in ``.grad`` (the gradient at ``w``).

        ``zero_grad=True`` clears the gradients for the second pass (and lets ``e`` reuse their memory).
        With ``grad_scaler`` the gradients are unscaled first and an inf/NaN step is left unperturbed; the
        scaler then skips that step in :meth:`second_step`. When the cadence skips the ascent this step, the
        weights stay at ``w``. ``first_pass=False`` says no forward-backward at ``w`` preceded the call (see
        :attr:`needs_first_pass`): BatchNorm then keeps the statistics of the only pass, at ``w + e``.
        Returns whether the weights were moved.
        """
        self._refuse_batch_rule("first_step()")
        return self._ascend(zero_grad, grad_scaler, first_pass=first_pass)

    @torch.no_grad()
    def _ascend(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None, *, first_pass: bool = True) -> bool:
        if self.is_perturbed:
            self._abandon_step()
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights were still at w + e; they are "
                "restored to w and this step is abandoned. Call second_step() after the second backward pass."
            )
        self._check_scaler(grad_scaler)
        self._step.skipped = False
        if not self._step.first_kept:
            self._step.first_grads = None
        if grad_scaler is not None and amp.already_unscaled(grad_scaler, self):
            raise RuntimeError(
                "grad_scaler.unscale_(optimizer) was called before first_step: SAM unscales the first gradient "
                "itself. Call unscale_ (e.g. for clipping) only after the second backward, before second_step."
            )
        due = self.ascent_due and not self._step.declined
        if due and not self._step.first_kept and self._hold_first_gradient(zero_grad, grad_scaler):
            self._step.declined = True  # a plain step along g(w), which .grad still holds (nothing was released)
            return False
        if due:
            plan = self._flat_plan(grad_scaler)
            if plan is not None:
                self._perturb_flat(*plan)
            elif not self._perturb(zero_grad, grad_scaler):
                # the scaled g(w) overflowed: keep it in .grad (not zeroed) and decline the ascent, so that no
                # second pass runs and the scaler, finding the inf/NaN in second_step, skips the step and backs off
                self._step.declined = True
                return False
        self._step.ascended = self.is_perturbed
        if due and not self._step.skipped and first_pass and (self._step.ascended or self._has_gradient()):
            # the unperturbed first pass set the statistics; the second keeps them. Without a gradient (and no
            # move) there was no first pass: the next forward pass is the step's only one and must update them.
            self._running_stats.freeze()
        if zero_grad and not self._step.declined:
            self.zero_grad()
        return self._step.ascended

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` exactly and take the base optimiser's step along the descent rule's direction.

        With ``grad_scaler`` the step goes through ``grad_scaler.step``, so its skip logic applies (call
        ``grad_scaler.update()`` afterwards, as usual). Clip gradients before calling this (after
        :meth:`apply_descent_rule` if the descent rule is not SAM's, and after ``grad_scaler.unscale_(optimizer)``
        when scaling).

        Called without ``first_step`` (or after one the cadence or the descent rule declined), it is a plain step:
        exactly the base optimiser's ``step()`` along the gradient in ``.grad``, with no ascent (the step counter
        still advances).
        """
        self.restore()
        if self.sharded and amp.is_active(grad_scaler):
            self._abandon_step()
            self._check_scaler(grad_scaler)
        self._opt_called = True  # tells LR schedulers the optimiser has stepped (the two-step pattern too)
        try:
            if self._step.skipped:
                self.zero_grad()
            elif amp.is_active(grad_scaler):
                self.apply_descent_rule(grad_scaler)
                amp.step_through(grad_scaler, self)
            else:
                self.apply_descent_rule()
                grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
                if self._descent_gradient_ok(grads):
                    self._base_step()
                else:
                    zero_grad = True
            if zero_grad:
                self.zero_grad()
            self.steps += 1
        finally:
            self._reset_step()

    def _base_step(self) -> Any:
        """The base optimiser's step, with the keys the rules keep in its state (``state_keys``) taken out for its
        duration: one that initialises a parameter's state when the dict is empty (Adam) then still does."""
        descent = self._declared(self.descent, DescentCapabilities)
        keys = (*self._declared(self.perturbation).state_keys, *descent.state_keys)
        if not keys:
            return self.base_optimizer.step()
        hidden = {}
        for param, state in self.state.items():
            held = {key: state.pop(key) for key in keys if key in state}
            if held:
                hidden[param] = held
        try:
            return self.base_optimizer.step()
        finally:
            for param, held in hidden.items():
                self.state[param].update(held)

    def _reset_step(self) -> None:
        """Forget what this step kept (the step counter is the caller's business)."""
        self._step = StepState()

    def _abandon_step(self) -> None:
        """Back to ``w`` (exactly) with BatchNorm unfrozen, and nothing of this step kept: before a misuse error."""
        self.restore()
        self._reset_step()

    def apply_descent_rule(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Turn ``.grad`` into the descent direction (once per step; ``second_step`` calls it if you did not).

        Call it yourself only to clip the final direction rather than ``g(w + e)``. With a GradScaler the
        gradients are unscaled first (through ``grad_scaler.unscale_``), since the rule may mix them with
        ``g(w)``, which is unscaled.
        """
        if self._step.direction_ready or self.descent.is_identity:
            return
        self.restore()
        if amp.is_active(grad_scaler) and not amp.already_unscaled(grad_scaler, self):
            grad_scaler.unscale_(self)
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        first = None
        if self._step.first_grads is not None:
            by_param = dict(zip(map(id, self._step.first_grads[0]), self._step.first_grads[1]))
            first = [by_param.get(id(p), torch.zeros_like(p)) for p in params]
        states = [self.state[p] for p in params]
        lrs = None
        if self.descent.needs_learning_rates:
            lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
            lrs = [float(lr_of[id(p)]) for p in params]
        grads = [p.grad for p in params]
        if self.sharded:  # a shard-aware rule works on the local shards, its totals reduced over all ranks
            params, grads = sharded.locals_of(params), sharded.locals_of(grads)
            first = sharded.locals_of(first) if first is not None else None
        with self._reducing():
            if lrs is not None:
                self.descent.direction_(params, grads, first, states, self._step.ascended, lrs=lrs)
            else:
                self.descent.direction_(params, grads, first, states, self._step.ascended)
        self._step.direction_ready = True

    @torch.no_grad()
    def restore(self) -> None:
        """Give each parameter back its own tensor ``w`` (untouched, so exact; sharded parameters get their saved
        shards copied back, also exact); a no-op when not perturbed. BatchNorm layers frozen by ``first_step``
        are switched back on."""
        self._weights.restore()
        self._running_stats.thaw()

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """A full SAM step: ``closure`` runs forward and backward and returns the loss.

        SAM clears the gradients before each call of ``closure`` (at ``w``, then at ``w + e``), so closures
        written for torch.optim work whether or not they zero the gradients themselves. Returns the loss at
        ``w`` (at ``w + e`` when the rules need no gradient at ``w`` and that pass is skipped). With
        ``grad_scaler``, the closure must backpropagate ``grad_scaler.scale(loss)``. Called between
        ``first_step`` and ``second_step`` (with or without a closure), it restores ``w`` and raises.
        """
        if closure is amp.BASE_STEP:  # GradScaler.step calling back from second_step
            return self._base_step()
        if self.is_perturbed:
            self._abandon_step()
            raise RuntimeError(
                f"SAM.step({'' if closure is None else 'closure'}) was called between first_step() and "
                "second_step(), with the weights at w + e; they are restored to w and this step is abandoned. "
                "Finish a step begun with first_step() by calling second_step() after the second backward pass "
                "(not step()), or use step(closure) alone."
            )
        if closure is None:
            raise RuntimeError(
                "SAM.step() needs a closure that runs forward and backward and returns the loss, e.g. "
                "opt.step(lambda: (loss_fn(model(x), y).backward(), ...)[-1]); or call first_step() after the "
                "first backward and second_step() after the second."
            )
        plan = self.plan(grad_scaler)
        self.zero_grad()
        loss = None
        try:
            for phase in plan:
                if isinstance(phase, Descend):
                    break
                with torch.enable_grad(), self._closure_running_stats(phase) as seen:
                    value = closure()
                if seen is not None and not seen.modules_ran:
                    self._warn_blind(value)
                if phase.reports_loss:
                    loss = value
        except BaseException:
            self._abandon_step()  # w exactly, BatchNorm as after the first pass
            raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    def plan(
        self,
        grad_scaler: torch.amp.GradScaler | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
        groups: int = 1,
        sync_perturbation: bool = False,
    ) -> StepPlan:
        """The plan of the next step (:mod:`flatminima.optim.plan`), for a driver to run.

        ``batch``: the step's ``(inputs, targets)``, which a batch rule (:attr:`batch_rule`) picks examples from;
        a driver that cannot hand over tensors (a closure, the Trainer) gets an error when a batch rule is set.
        ``groups``: m-SAM's number of groups; ``sync_perturbation``: under DDP, one perturbation for all ranks.
        """
        rule = self.batch_rule
        if rule is not None and batch is None:
            self._refuse_batch_rule("this driver")
        if self.is_perturbed:
            self._abandon_step()
            raise RuntimeError(
                "a new step was begun with the weights at w + e (first_step() without second_step()); they are "
                "restored to w and that step is abandoned."
            )
        ascent_sample = None
        if rule is not None and self.ascent_due:
            ascent_sample = rule.ascent_sample(batch[0], batch[1], self.steps)
        phases = plan_step(
            self,
            batch_rule=rule is not None,
            separate_ascent_sample=ascent_sample is not None,
            weighted_ascent=rule is not None and rule.needs_per_example_losses,
            groups=groups,
            sync=sync_perturbation,
        )
        self.last_plan = StepPlan(self, phases, grad_scaler, rule, batch, ascent_sample)
        return self.last_plan

    @property
    def batch_rule(self) -> Any:
        """The batch rule that picks each pass's examples (n-SAM, RW-SAM, a single example), or None: only a
        driver that hands the plan its batch (:class:`~flatminima.step.SharpnessAwareStep`) can run one."""
        return self._batch_rule

    @batch_rule.setter
    def batch_rule(self, rule: Any) -> None:
        if rule is not None and not callable(getattr(rule, "ascent_sample", None)):
            raise TypeError(f"batch_rule must be a flatminima.batch_rules.BatchRule; got {type(rule).__name__}.")
        self._batch_rule = None if rule is None or getattr(rule, "is_default", False) else rule

    def _refuse_batch_rule(self, driver: str) -> None:
        if self._batch_rule is not None:
            raise ValueError(
                f"{driver} cannot run the batch rule {self._batch_rule!r}, which chooses the examples of each pass; "
                "train this optimiser with flatminima.SharpnessAwareStep (or set optimizer.batch_rule = None)."
            )

    def _closure_running_stats(self, phase: Pass) -> AbstractContextManager[running_stats.FrozenPass | None]:
        """The closure's pass at ``w + e``: BatchNorm frozen through the watched model, else wherever it runs."""
        if phase.updates_running_stats or self._running_stats.watching:
            return nullcontext()
        return running_stats.freeze_everywhere()

    # ------------------------------------------------------------------ checkpoints and groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict, plus the step counter the cadence reads."""
        state = self.base_optimizer.state_dict()
        state[_STEP_KEY] = self.steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimiser's state and the per-group SAM options; stays shared with the base."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.steps = int(state_dict.get(_STEP_KEY, 0))
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _check_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; with ``flatten=True`` the gradients stay views of the flat buffer, zeroed in place."""
        if self._flat is not None:
            self._flat.zero_gradients()
        else:
            super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__ the groups are already in place
            super().add_param_group(param_group)
            return
        if self._flat is not None:
            raise ValueError("add_param_group is not supported with flatten=True; build SAM with all groups.")
        for key in _GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        _check_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        groups = sharded.shard_groups([*params, *(p for g in self.param_groups for p in g["params"])])
        if groups is not None:
            self._check_shardable([*self.param_groups, param_group])
        self.base_optimizer.add_param_group(param_group)
        self._shard_groups = groups
        if not self.is_perturbed:  # the weights' storage follows how the parameters are stored now
            self._weights = CopiedShards() if self.sharded else SwappedWeights()

    # ------------------------------------------------------------------ internals: the ascent

    def _rule_for(self, group: dict[str, Any]) -> AscentRule:
        if self.perturbation is not None:
            return self.perturbation
        key = tuple(group[k] for k in _RULE_KEYS)
        rule = self._rules.get(key)
        if rule is None:
            rule = DualNorm(group["p"]) if group["normalize"] else Unnormalized()
            if group["adaptive"]:
                rule = Adaptive(rule, eta=group["adaptive_eta"])
            self._rules[key] = rule
        return rule

    def _declared(self, rule: Any, kind: type = AscentCapabilities) -> Any:
        """What ``rule`` declares (None, for no rule: nothing), read once per rule."""
        declared = self._capabilities.get((rule, kind))
        if declared is None:
            declared = self._capabilities[(rule, kind)] = kind.of(rule)
        return declared

    def _buckets(self) -> tuple[list[F.Bucket], list[Tensor]]:
        """Params to perturb with their gradients (or zero buffers, for rules that need none), by rule, and the
        real gradients among them. Sharded parameters are handed over as their local shards.

        Rules that scale with rho share one normalisation across groups; others get one bucket per rho. Rules that
        declare ``needs_state`` are handed the parameters' optimiser-state dicts too.
        """
        buckets: dict[Any, F.Bucket] = {}
        real: list[Tensor] = []
        for group in self.param_groups:
            rho = group["rho"]
            if not group["perturb"] or rho == 0:
                continue
            _check_rho(rho, "a param group has")
            rule = self._rule_for(group)
            declared = self._declared(rule)
            if declared.needs_gradient:
                params = [p for p in group["params"] if p.grad is not None]
                _check_dense(params)
                grads = sharded.locals_of(p.grad for p in params)
                real.extend(grads)
            else:
                params = [p for p in group["params"] if p.requires_grad]
                grads = [torch.zeros_like(sharded.local(p)) for p in params]
            if not params:
                continue
            key = rule if declared.scales_with_rho else (rule, rho)
            states = [self.state[p] for p in params] if declared.needs_state else None
            buckets.setdefault(key, F.Bucket(rule)).add(sharded.locals_of(params), grads, rho, states)
        return list(buckets.values()), real

    def _perturb(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> bool:
        """Swap each parameter's tensor for ``w + e``, keeping ``w`` itself; no change if the gradient is not finite.

        Restoring is then a pointer swap: exact, and free (sharded parameters: ``w + e`` is written into the
        local shards and ``w`` copied back, also exact). Returns False when a GradScaler's first gradient holds
        inf/NaN: the weights stay at ``w``, and the scaler skips the step itself.
        """
        buckets, grads = self._buckets()  # grads: the real gradients only
        if not buckets:
            return True
        scaled = amp.is_active(grad_scaler)
        if scaled and grads and not amp.unscale_first_gradient(grad_scaler, grads):
            return False  # inf/NaN: no perturbation; the scaler skips this step in second_step
        with self._reducing():
            self._perturb_buckets(buckets, grads, zero_grad, scaled)
        return True

    def _perturb_buckets(self, buckets: list[F.Bucket], grads: list[Tensor], zero_grad: bool, scaled: bool) -> None:
        norms = tensor_norms([g for b in buckets for g in b.grads])
        totals: list[Tensor] | list[float] = F.bucket_norms(buckets, norms)
        if self.guard.checks or _host_sync_is_free(norms):
            totals = torch.stack([t.to(totals[0].device) for t in totals]).tolist()  # one sync, free on a CPU
            if grads and not scaled and not self.guard.first_gradient_ok(totals):
                self._step.skipped = True
                return
        # a general rule may write e into the gradients if they are released afterwards and not needed again
        in_place = zero_grad and self._flat is None and self._step.first_grads is None
        moved: list[Tensor] = []
        offset = 0
        for bucket, total in zip(buckets, totals):
            bucket_norms = norms[offset : offset + len(bucket.params)]
            offset += len(bucket.params)
            moved.extend(F.perturbed_weights(bucket, total, bucket_norms, in_place=in_place))
        self._weights.hold([p for b in buckets for p in b.params], moved)

    def _flat_plan(self, grad_scaler: torch.amp.GradScaler | None) -> tuple[AscentRule, float] | None:
        """(rule, rho) when this step can run on the flat buffers, else None."""
        flat = self._flat
        if flat is None or amp.is_active(grad_scaler):
            return None
        groups = self.param_groups
        rho = groups[0]["rho"]
        if not 0 < rho < math.inf or any(not g["perturb"] or g["rho"] != rho for g in groups):
            return None
        rule = self._rule_for(groups[0])
        if any(self._rule_for(g) is not rule for g in groups[1:]):
            return None
        declared = self._declared(rule)
        if not declared.needs_gradient or declared.needs_state:
            return None
        if _linear_coefficient(rule, rho, 1.0) is None:
            return None
        _check_dense(flat.params)  # before adopt_gradients, which cannot copy a sparse gradient
        if not flat.weights_in_place() or not flat.adopt_gradients():
            return None
        return rule, rho

    def _perturb_flat(self, rule: AscentRule, rho: float) -> None:
        flat = self._flat
        norm = flat_norm(flat.grads)
        if self.guard.checks or _host_sync_is_free([norm]):
            norm = norm.item()
            if not self.guard.first_gradient_ok([norm]):
                self._step.skipped = True
                return
        self._weights.hold_flat(_linear_coefficient(rule, rho, norm))

    def _has_gradient(self) -> bool:
        """Whether any parameter holds a gradient (a backward pass at ``w`` preceded ``first_step``)."""
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _hold_first_gradient(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> bool:
        """Hold ``g(w)`` for a descent rule that asks for it (the tensors themselves when they are released, an
        unscaled copy under a GradScaler); returns whether the rule declines the ascent at it.

        Under a GradScaler a non-finite ``g(w)`` declines the ascent: the scaler then finds the inf/NaN in
        ``.grad`` (still the scaled first gradient), skips the step and lowers its scale.
        """
        if not self.descent.needs_first_gradient:
            return False
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if amp.is_active(grad_scaler):
            kept = [p.grad.clone() for p in params]
            self._step.first_grads = (params, kept)
            if not amp.unscale_first_gradient(grad_scaler, kept):
                return True
        else:
            own = zero_grad and self._flat is None
            self._step.first_grads = (params, [p.grad if own else p.grad.clone() for p in params])
        return self.descent.declines_ascent(self._step.first_grads[1])

    # ------------------------------------------------------------------ internals: the descent

    def _descent_gradient_ok(self, grads: list[Tensor]) -> bool:
        if self._flat is not None and self._flat.gradients_are_views():
            return self.guard.descent_gradient_ok([self._flat.grads])
        if self.sharded:
            with self._reducing():
                return self.guard.descent_gradient_ok(sharded.locals_of(grads))
        return self.guard.descent_gradient_ok(grads)

    def _host_norms(self, grads: list[Tensor]) -> list[float]:
        """Norms of ``grads`` read back for the guard: per tensor, or the total over all ranks' shards."""
        if not self.sharded:
            return torch.stack(tensor_norms(grads)).tolist() if grads else []
        with self._reducing():
            return [global_norm(tensor_norms(sharded.locals_of(grads))).item()] if grads else []

    def _reducing(self) -> AbstractContextManager[None]:
        """The block in which norms and sums run over all ranks' shards (sharded parameters), else a no-op."""
        return reduced_over(self._shard_groups) if self._shard_groups is not None else nullcontext()

    def _check_scaler(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        if self.sharded and amp.is_active(grad_scaler):
            raise ValueError(
                "a GradScaler with sharded (FSDP) parameters is not supported: its inf/NaN check would differ "
                "between ranks. Use bfloat16 autocast without a GradScaler, or float32."
            )

    def _check_shardable(self, groups: list[dict[str, Any]] | None = None) -> None:
        """Sharded parameters: every rule in use must work on local shards (declare ``shard_aware``)."""
        groups = self.param_groups if groups is None else groups
        rules = {self._rule_for(g) for g in groups}  # rho = 0 now may grow (a rho schedule): all are checked
        for rule in rules:
            if not self._declared(rule).shard_aware:
                raise ValueError(
                    f"the ascent rule {rule!r} is not declared shard_aware, so it cannot run on FSDP's sharded "
                    "parameters (its totals would cover this rank's shard only). The built-in DualNorm (any p), "
                    "Adaptive and Unnormalized rules can."
                )
        declared = self._declared(self.descent, DescentCapabilities)
        if not (declared.is_identity or declared.shard_aware):
            raise ValueError(
                f"the descent rule {self.descent!r} is not declared shard_aware, so it cannot run on FSDP's sharded "
                "parameters; use SAM's own descent (PerturbedGradient) with fully_shard."
            )

    def _warn_blind(self, loss: Any) -> None:
        """The perturbed pass called no nn.Module eagerly: warn if the loss came through a compiled graph (a model
        run inside a torch.compile'd function), not for a model without modules."""
        if self._warned_blind or not _through_compiled_graph(loss):
            return
        self._warned_blind = True
        warnings.warn(
            "SAM.step(closure): the closure's second (perturbed) pass called no nn.Module outside compiled code, "
            "as when the model runs inside a torch.compile'd function; SAM then cannot reach its BatchNorm layers, "
            "whose running statistics the perturbed pass would update. If the model has BatchNorm, build SAM "
            "with model=model (or compile the module itself: torch.compile(model)).",
            RuntimeWarning,
            stacklevel=4,  # the caller of step(), past torch.optim's wrapper
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


def _linear_coefficient(rule: Any, rho: float, norm: Tensor | float) -> Tensor | float | None:
    method = getattr(rule, "linear_coefficient", None)
    return method(rho, norm) if method is not None else None


def _build_base(
    params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer, base_kwargs: dict[str, Any]
) -> Optimizer:
    if isinstance(base_optimizer, Optimizer):
        if isinstance(base_optimizer, SAM):
            raise TypeError("base_optimizer is already a SAM optimiser; wrap the plain optimiser instead.")
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an instance, so its options must go to its own constructor; "
                f"got extra keyword arguments {sorted(base_kwargs)}."
            )
        if params is not None:
            given = {id(p) for p in _flatten_params(params)}
            held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != held:
                raise ValueError(
                    "params differ from the parameters the base optimiser instance holds; pass params=None "
                    "to use the instance's parameter groups."
                )
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if params is None:
            raise ValueError("params is None but base_optimizer is a class: pass the parameters to optimise.")
        return base_optimizer(params, **base_kwargs)
    raise TypeError(
        f"base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance of "
        f"one; got {base_optimizer!r}."
    )


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    flat: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            value = item["params"]
            flat.extend([value] if isinstance(value, Tensor) else list(value))
        else:
            flat.append(item)
    return flat


def _check_rho(rho: Any, where: str = "got") -> None:
    """A radius is a finite float >= 0 (a tensor would make each step sync; inf or NaN ruin the weights)."""
    if isinstance(rho, Tensor) or not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(
            f"rho must be a finite float >= 0 (0 gives the base optimiser); {where} rho={rho!r}. "
            "Fix the value, the param group or the rho scheduler."
        )


def _check_dense(params: list[Tensor]) -> None:
    """The clear message for sparse gradients (nn.Embedding(sparse=True)), on every path."""
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise RuntimeError("SAM does not support sparse gradients; use dense embeddings.")


def _check_group(group: dict[str, Any]) -> None:
    p, eta = group["p"], group["adaptive_eta"]
    _check_rho(group["rho"])
    if not float(p) >= 1:
        raise ValueError(f"p must be in [1, inf] (2 is SAM, inf the sign rule); got p={p!r}.")
    if not eta >= 0:
        raise ValueError(f"adaptive_eta must be >= 0; got {eta!r}.")


def _host_sync_is_free(tensors: list[Tensor]) -> bool:
    """On a CPU reading a value back costs nothing, so the fused float-scaled path is always taken there."""
    return all(t.device.type == "cpu" for t in tensors)
