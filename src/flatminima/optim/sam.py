"""SAM: the two-pass protocol around any ``torch.optim`` optimiser (Foret et al. 2021, Algorithm 1).

One step: gradient ``g`` at ``w`` -> move to ``w + e`` (``e`` from an ascent rule) -> gradient there -> restore
``w`` exactly -> base optimiser step along the descent rule's direction. Which passes a step runs is its plan
(:mod:`flatminima.optim.plan`), decided here from three seams (:mod:`flatminima.optim.rules`: ascent, descent,
cadence) and run by a driver (:mod:`flatminima.optim.closure`, :class:`~flatminima.step.SharpnessAwareStep`, the
integrations). The ascent's buckets and fast paths are in :mod:`flatminima.optim.ascent`, the descent's in
:mod:`flatminima.optim.descent`, per-group options in :mod:`flatminima.optim.groups`, where ``w`` is kept in
:mod:`flatminima.optim.weights`, the inf/NaN policy in :mod:`flatminima.optim.guard`, GradScaler glue in
:mod:`flatminima.optim.scaler` and sharded (FSDP2) parameters in :mod:`flatminima.optim.sharded`.

The class is itself a :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are* the base
optimiser's, so LR schedulers, per-group options and checkpoints work as with the base optimiser.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatminima import running_stats
from flatminima.optim import ascent, descent, sharded
from flatminima.optim import scaler as amp
from flatminima.optim.closure import run_closure
from flatminima.optim.flat import FlatLayout
from flatminima.optim.groups import GROUP_KEYS, RuleBook, build_base, check_group
from flatminima.optim.guard import NonFiniteGuard, NonFinitePolicy
from flatminima.optim.plan import StepPlan, build_plan
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
_RULE_STATE_KEY = "sam_rule_state"  # the rules' per-parameter state, by parameter index as the base's "state"


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
        base = build_base(params, base_optimizer, base_kwargs)
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
            check_group(group)
        self.rules = RuleBook(perturbation)  # each group's ascent rule, and what every rule declares
        self.descent = descent if descent is not None else PerturbedGradient()
        self.cadence = cadence if cadence is not None else EveryStep()
        self.steps = 0  # completed steps, as the cadence counts them
        self.rule_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)  # the rules' own, per parameter
        self.last_plan: StepPlan | None = None  # the plan of the step under way, or of the last one
        self._running_stats = running_stats.RunningStatsFreezer(model)
        self._step = StepState()  # what is known of the step under way
        self._batch_rule: Any = None
        self._warned_blind = False
        super().__init__(base.param_groups, defaults)
        self.base_optimizer = base
        # Share, not copy: schedulers, add_param_group and state_dict all act on the base optimiser.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        self.shard_groups = sharded.shard_groups(p for g in self.param_groups for p in g["params"])
        if self.sharded:
            if flatten:
                raise ValueError(
                    "flatten=True re-points the parameters into one buffer, which FSDP's sharded parameters do not "
                    "allow; use flatten=False with fully_shard."
                )
            sharded.check_shardable(self.rules, self.descent, self.param_groups)
        self._flat = FlatLayout([p for g in self.param_groups for p in g["params"]]) if flatten else None
        # where w is kept while the parameters hold w + e: one strategy, from how the parameters are stored
        self._weights: WeightStore = FlatWeights(self._flat) if flatten else self._plain_store()

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
        """True when the parameters are sharded DTensors (FSDP2's ``fully_shard``)."""
        return self.shard_groups is not None

    @property
    def ascent_due(self) -> bool:
        """Whether the cadence has this step take the ascent (else: one pass at ``w`` and ``second_step``)."""
        return self.cadence.takes_ascent(self.steps)

    @property
    def needs_first_pass(self) -> bool:
        """Whether this step needs the gradient at ``w`` before ``first_step``: False when the ascent is due and
        neither rule reads ``g(w)`` (a random direction under SAM's descent), saving one forward-backward."""
        return not self.ascent_due or self.descent.needs_first_gradient or ascent.needs_gradient(self)

    @property
    def ascent_declined(self) -> bool:
        """True when this step's ascent was declined at ``g(w)`` (by the descent rule, or a GradScaler's overflow):
        ``.grad`` holds ``g(w)`` and ``second_step`` takes a plain step (or the scaler skips it)."""
        return self._step.declined

    @property
    def step_skipped(self) -> bool:
        """True between a ``first_step`` that met a non-finite gradient (``nonfinite="skip"``) and ``second_step``."""
        return self._step.skipped

    @property
    def flat_layout(self) -> FlatLayout | None:
        """The buffers parameters and gradients are views of (``flatten=True``), else None."""
        return self._flat

    @property
    def batch_rule(self) -> Any:
        """The batch rule that picks each pass's examples (n-SAM, RW-SAM, a single example), or None. Only a driver
        that hands the plan its batch (:class:`~flatminima.step.SharpnessAwareStep`) can run one."""
        return self._batch_rule

    @batch_rule.setter
    def batch_rule(self, rule: Any) -> None:
        if rule is not None and not callable(getattr(rule, "ascent_sample", None)):
            raise TypeError(f"batch_rule must be a flatminima.batch_rules.BatchRule; got {type(rule).__name__}.")
        self._batch_rule = None if rule is None or getattr(rule, "is_default", False) else rule

    def plan(
        self,
        grad_scaler: torch.amp.GradScaler | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
        groups: int = 1,
        sync_perturbation: bool = False,
    ) -> StepPlan:
        """The plan of the next step (:mod:`flatminima.optim.plan`), for a driver to run.

        ``batch``: the step's ``(inputs, targets)``, from which a :attr:`batch_rule` picks examples (a driver that
        cannot hand them over gets an error when a batch rule is set); ``groups``: m-SAM's number of groups;
        ``sync_perturbation``: under DDP, all-reduce the ascent's gradient (one perturbation for all ranks).
        """
        self.last_plan = build_plan(self, grad_scaler, batch, groups, sync_perturbation)
        return self.last_plan

    def watch_running_stats(self, model: nn.Module) -> None:
        """Keep ``model``'s BatchNorm statistics from the first pass (what ``model=`` does at construction)."""
        self._running_stats.watch(model)

    # ------------------------------------------------------------------ the step, phase by phase

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
        return descent.keep_first_gradient(self, grad_scaler)

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

    def _ascend(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None, *, first_pass: bool = True) -> bool:
        """The ascent phase: keep ``g(w)`` if the descent asks (it may decline), move to ``w + e``, freeze
        BatchNorm for the pass there, release the gradients."""
        if self.is_perturbed:
            self._abandon_step()
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights were still at w + e; they are "
                "restored to w and this step is abandoned. Call second_step() after the second backward pass."
            )
        sharded.check_scaler(self.sharded, grad_scaler)
        step = self._step
        step.skipped = False
        if not step.first_kept:
            step.first_grads = None
        if grad_scaler is not None and amp.already_unscaled(grad_scaler, self):
            raise RuntimeError(
                "grad_scaler.unscale_(optimizer) was called before first_step: SAM unscales the first gradient "
                "itself. Call unscale_ (e.g. for clipping) only after the second backward, before second_step."
            )
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
            if not self.ascent_due and self._flat is None:  # g(w) kept for a second_step with no second pass
                step.set_aside = [(p, p.grad) for p in self._params() if p.grad is not None]
            self.zero_grad()
        return step.ascended

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
        if self._step.set_aside and not self._has_gradient():  # first_step on a cadence's off step, no 2nd pass
            for param, grad in self._step.set_aside:
                param.grad = grad
        if self.sharded and amp.is_active(grad_scaler):
            self._abandon_step()
            sharded.check_scaler(self.sharded, grad_scaler)
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
                if descent.descent_gradient_ok(self, grads):
                    descent.base_step(self)
                else:
                    zero_grad = True
            if zero_grad:
                self.zero_grad()
            self.steps += 1
        finally:
            self._step = StepState()

    def apply_descent_rule(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Turn ``.grad`` into the descent direction (once per step; ``second_step`` calls it if you did not).

        Call it yourself only to clip the final direction rather than ``g(w + e)``. With a GradScaler the
        gradients are unscaled first (through ``grad_scaler.unscale_``), since the rule may mix them with
        ``g(w)``, which is unscaled.
        """
        descent.apply_direction(self, grad_scaler)

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
            return descent.base_step(self)
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
        return run_closure(self, closure, grad_scaler)

    # ------------------------------------------------------------------ checkpoints and groups

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict, plus the step counter the cadence reads and the rules' state."""
        state = self.base_optimizer.state_dict()
        state[_STEP_KEY] = self.steps
        kept = {i: dict(self.rule_state[p]) for i, p in enumerate(self._params()) if self.rule_state.get(p)}
        if kept:
            state[_RULE_STATE_KEY] = kept
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimiser's state, the per-group SAM options and the rules' state; stays shared with the
        base. A checkpoint written before SAM kept the rules' state apart (their ``state_keys`` in the base
        optimiser's state) loads too: those keys move to :attr:`rule_state`."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.steps = int(state_dict.get(_STEP_KEY, 0))
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            check_group(group)
        params = self._params()
        self.rule_state = defaultdict(dict)
        for index, saved in state_dict.get(_RULE_STATE_KEY, {}).items():
            owner = params[int(index)]
            self.rule_state[owner] = {key: _on_param(value, owner) for key, value in saved.items()}
        legacy = (*self.rules.declared(self.perturbation).state_keys, *self._declared_descent().state_keys)
        for owner in params:
            held = self.state.get(owner, {})
            moved = {key: held.pop(key) for key in legacy if key in held}
            if moved:
                self.rule_state[owner].update(moved)

    def rule_context(self, params: list[Tensor]) -> RuleContext:
        """The :class:`~flatminima.optim.rules.RuleContext` of ``params`` (each field computed when read)."""
        rule_state, state = self.rule_state, self.state

        def learning_rates() -> list[float]:
            lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
            return [float(lr_of[id(p)]) for p in params]

        states = lambda: [rule_state[p] for p in params]  # noqa: E731
        return RuleContext(states, lambda: [state[p] for p in params], learning_rates, self.steps)

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
        for key in GROUP_KEYS:
            param_group.setdefault(key, self.defaults[key])
        check_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        groups = sharded.shard_groups([*params, *(p for g in self.param_groups for p in g["params"])])
        if groups is not None:
            sharded.check_shardable(self.rules, self.descent, [*self.param_groups, param_group])
        self.base_optimizer.add_param_group(param_group)
        self.shard_groups = groups
        if not self.is_perturbed:  # the weights' storage follows how the parameters are stored now
            self._weights = self._plain_store()

    # ------------------------------------------------------------------ internals

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _declared_descent(self) -> DescentCapabilities:
        return self.rules.declared(self.descent, DescentCapabilities)

    def _plain_store(self) -> WeightStore:
        return CopiedShards() if self.sharded else SwappedWeights()

    def _has_gradient(self) -> bool:
        """Whether any parameter holds a gradient (a backward pass at ``w`` preceded ``first_step``)."""
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _abandon_step(self) -> None:
        """Back to ``w`` (exactly) with BatchNorm unfrozen, and nothing of this step kept: before a misuse error."""
        self.restore()
        self._step = StepState()

    def _refuse_batch_rule(self, driver: str) -> None:
        if self._batch_rule is not None:
            raise ValueError(
                f"{driver} cannot run the batch rule {self._batch_rule!r}, which chooses the examples of each pass; "
                "train this optimiser with flatminima.SharpnessAwareStep (or set optimizer.batch_rule = None)."
            )


def _on_param(value: Any, param: Tensor) -> Any:
    """A saved rule-state value moved to its parameter's device, in its dtype when floating (as torch.optim does)."""
    if isinstance(value, Tensor):
        return value.to(device=param.device, dtype=param.dtype if value.is_floating_point() else value.dtype)
    return value
