"""The three seams every sharpness-aware algorithm plugs into: ascent, descent and cadence.

A SAM-family step is: (maybe) a gradient ``g(w)`` at ``w``, a move to ``w + e``, a gradient ``g(w + e)`` there,
``w`` restored, and a base-optimiser step along some direction. The algorithms differ only in three choices,
each a small object that ``SAM`` consults and never looks inside:

- an **ascent rule** (``AscentRule``): the perturbation ``e`` from ``w`` and, if it wants one, ``g(w)``;
  the dual-norm rules of the SAM paper, ASAM and USAM live in ``flatminima.optim.perturb``;
- a **descent rule** (``DescentRule``): the update direction from ``g(w + e)`` and, when it asks, ``g(w)``;
  SAM's own is ``PerturbedGradient``, "use g(w + e) as it is";
- a **cadence** (``Cadence``): does this step take the ascent at all? SAM's own is ``EveryStep``.

SAM is ``(DualNorm(2), PerturbedGradient(), EveryStep())``. This mirrors ``optax.contrib.sam``, which builds SAM
from an ascent transformation passed in, and keeps the maths out of the optimiser class.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "AscentCapabilities",
    "AscentRule",
    "AscentWrapper",
    "Cadence",
    "DescentCapabilities",
    "DescentRule",
    "EveryKSteps",
    "EveryStep",
    "PerturbationRule",
    "PerturbedGradient",
    "RuleContext",
    "takes_context",
]


class _Declarations:
    """Reads a rule's declarations into the dataclass's fields, each defaulted when the rule does not declare it."""

    @classmethod
    def of(cls, rule: Any) -> Any:
        return cls(**{f.name: getattr(rule, f.name, f.default) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class AscentCapabilities(_Declarations):
    """What an ascent rule declares, read in one place (``of``): the class attributes of ``AscentRule``,
    with the same defaults for any object that has ``perturb_`` and declares nothing."""

    needs_gradient: bool = True
    scales_with_rho: bool = True
    shard_aware: bool = False
    needs_state: bool = False
    state_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DescentCapabilities(_Declarations):
    """What a descent rule declares, read in one place (``of``): the attributes of ``DescentRule``."""

    needs_first_gradient: bool = False
    shard_aware: bool = False
    state_keys: tuple[str, ...] = ()
    is_identity: bool = False
    steps_after_base: bool = False


@functools.cache
def _takes_context(kind: type, method: str) -> bool:
    try:
        parameters = inspect.signature(getattr(kind, method)).parameters
    except (AttributeError, TypeError, ValueError):  # no such method, a builtin, a callable without a signature
        return False
    return "context" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def takes_context(rule: Any, method: str = "perturb_") -> bool:
    """Whether ``rule``'s ``method`` accepts ``context=``: an ascent rule's ``perturb_`` (rules written before the
    context existed take four arguments), or a descent rule's ``declines_ascent`` (written before it, one)."""
    return _takes_context(type(rule), method)


class RuleContext:
    """What SAM hands every rule call besides the tensors, aligned with the call's ``params``.

    - ``states``: the rule's own per-parameter state dicts, kept by SAM (``SAM.rule_state``) and saved by
      ``SAM.state_dict()``, apart from the base optimiser's state (whose lazy initialisation, as Adam's, they
      never disturb);
    - ``optimizer_states``: the base optimiser's per-parameter state, to read (Momentum-SAM's momentum buffer);
    - ``lrs``: each parameter's current learning rate;
    - ``step``: the number of completed SAM steps.

    Each list may be given as a zero-argument function, called the first time the field is read: what a rule
    does not read costs the step nothing. Under sharded parameters the dicts are those of the DTensor
    parameters (take ``.to_local()`` of their tensors). The context also reads as its list of ``states`` (iterate,
    index, ``len``), as the ``states`` argument it replaced did, so descent rules written before it still run.
    """

    __slots__ = ("_lrs", "_optimizer_states", "_states", "step")

    def __init__(
        self,
        states: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]] | None = None,
        optimizer_states: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]] | None = None,
        lrs: list[float] | Callable[[], list[float]] | None = None,
        step: int = 0,
    ) -> None:
        self._states, self._optimizer_states, self._lrs, self.step = states, optimizer_states, lrs, step

    @property
    def states(self) -> list[dict[str, Any]]:
        return self._read("_states")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.states[index]

    @property
    def optimizer_states(self) -> list[dict[str, Any]]:
        return self._read("_optimizer_states")

    @property
    def lrs(self) -> list[float]:
        return self._read("_lrs")

    def _read(self, name: str) -> Any:
        value = getattr(self, name)
        if callable(value):
            value = value()
            setattr(self, name, value)
        if value is None:
            raise TypeError(f"this RuleContext was built without {name[1:]}; SAM gives every field.")
        return value


@runtime_checkable
class PerturbationRule(Protocol):
    """What SAM needs of an ascent rule: write ``e`` into the buffers it is given.

    The structural interface; ``AscentRule`` implements it with the optional declarations defaulted.
    """

    def perturb_(
        self, params: list[Tensor], grads: list[Tensor], rho: float, grad_norms: list[Tensor] | None = None
    ) -> None: ...


class AscentRule:
    """Base class of ascent rules: maps ``(w, g(w))`` to the perturbation ``e`` at radius ``rho``.

    Subclasses implement ``perturb_``; the class attributes and ``linear_coefficient`` declare what the
    optimiser may rely on, with safe defaults:

    - ``needs_gradient``: ``False`` for rules that draw ``e`` from ``w`` alone (a random direction). Then the
      buffers handed to ``perturb_`` hold zeros, not a gradient, and a step skips the first forward-backward
      unless the descent rule wants ``g(w)``.
    - ``scales_with_rho``: ``e(rho) = rho * e(1)``. Lets groups with different ``rho`` share one normalisation
      (one global norm, as in the paper); a rule that says ``False`` gets one call per distinct ``rho``.
    - ``linear_coefficient``: for rules where ``e = c * g`` with a scalar ``c``, that ``c``; the optimiser
      then forms ``w + e`` in one fused operation (and on a flat buffer) without writing ``e`` anywhere.
    - ``shard_aware``: the rule is right on sharded parameters (FSDP2), where it is handed each rank's local
      shards: it is elementwise, or takes every total over tensors through ``flatminima.optim.norms``'s
      ``global_norm`` / ``global_max`` / ``global_sum``, which then combine the shards of all ranks. SAM refuses
      sharded parameters with a rule that does not declare it.
    - ``needs_state``: the rule reads or keeps per-parameter state (a running mean of gradients in
      ``context.states``; the base optimiser's momentum buffer in ``context.optimizer_states``). SAM then calls
      ``perturb_`` on every ascent (``first_step``), never the fused linear or flat path, each parameter in
      one call.
    - ``state_keys``: the keys such a rule keeps in its states. Versions before the step plan kept them in the
      base optimiser's state; SAM moves them to its own when such a checkpoint loads.

    SAM reads these declarations in one place, ``AscentCapabilities.of``. A rule built around another derives
    from ``AscentWrapper``, which declares what the inner rule declares.
    """

    needs_gradient: bool = True
    scales_with_rho: bool = True
    shard_aware: bool = False
    needs_state: bool = False
    state_keys: tuple[str, ...] = ()

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        """Overwrite ``grads`` with ``e`` at radius ``rho``.

        ``grads`` holds ``g(w)`` (or zeros when ``needs_gradient`` is False) and may be overwritten freely: the
        optimiser hands over tensors it owns. ``grad_norms``, when given, holds the L2 norm of each gradient
        tensor (computed once for the finiteness check); a rule that needs them reuses them. ``context``: the
        states, learning rates and step (``RuleContext``), passed whenever ``perturb_`` accepts it.
        """
        raise NotImplementedError

    def linear_coefficient(self, rho: float, grad_norm: Tensor | float) -> Tensor | float | None:
        """``c`` with ``e = c g`` given the global L2 norm of ``g``, or ``None`` if ``e`` is not a multiple of ``g``."""
        return None


class AscentWrapper(AscentRule):
    """Base class of ascent rules built around another (``inner``), such as ASAM's scaling or a random sign.

    The wrapper declares what the inner rule declares (``AscentCapabilities``), with the ``overrides`` the
    wrapper itself needs, so that a wrapper of a stateful rule is stateful and one of a gradient-free rule needs no
    gradient; ``perturb_inner_`` hands the inner rule the context when it is an ``AscentRule``.
    """

    def __init__(self, inner: PerturbationRule, **overrides: Any) -> None:
        if not callable(getattr(inner, "perturb_", None)):
            raise TypeError(f"{type(self).__name__} wraps an ascent rule (a perturb_ method); got {inner!r}.")
        self.inner = inner
        declared = dataclasses.replace(AscentCapabilities.of(inner), **overrides)
        for name, value in dataclasses.asdict(declared).items():
            setattr(self, name, value)

    def perturb_inner_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None,
        context: RuleContext | None,
    ) -> None:
        if takes_context(self.inner):
            self.inner.perturb_(params, grads, rho, grad_norms, context=context)
        else:
            self.inner.perturb_(params, grads, rho, grad_norms)


class DescentRule:
    """Base class of descent rules: the update direction handed to the base optimiser.

    ``needs_first_gradient``: keep ``g(w)`` aside during the step and pass it to ``direction_``. SAM then
    holds one extra copy of the gradients (or, when the first gradients are released with ``zero_grad``, just
    the tensors themselves); such a rule may also decline the ascent from ``g(w)`` (``declines_ascent``).
    ``shard_aware``: as for ``AscentRule`` (the rule then gets local shards on sharded parameters).
    ``state_keys``: as for ``AscentRule``, the keys the rule keeps in ``context.states``.
    ``steps_after_base``: SAM calls ``after_base_step_`` once the base optimiser has stepped (WSAM's decoupled
    sharpness term, a move the base optimiser's moments never see).
    """

    needs_first_gradient: bool = False
    shard_aware: bool = False
    state_keys: tuple[str, ...] = ()
    steps_after_base: bool = False

    def declines_ascent(self, first_grads: list[Tensor], *, context: RuleContext | None = None) -> bool:
        """Whether, given ``g(w)``, this step should skip the ascent and step along ``g(w)`` (asked only of rules
        that need the first gradient, once per step that the cadence lets ascend, before the weights move).

        ``first_grads`` holds ``g(w)`` of the parameters with a gradient (unscaled under a GradScaler; under DDP
        already all-reduced, so every rank decides alike), to read, not to change. ``context``
        (``RuleContext``, aligned with those parameters): the rule's states, kept and checkpointed by SAM,
        and the step; passed whenever the method accepts it (``takes_context``), so rules written before it,
        with ``first_grads`` alone, still run. Ahn et al.'s algorithms perturb only once the gradient is small;
        AE-SAM only when ``||g(w)||^2`` is large against its running statistics, which it keeps in the states.
        """
        return False

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        first_grads: list[Tensor] | None,
        context: RuleContext,
        ascended: bool,
    ) -> None:
        """Overwrite ``grads`` (each parameter's ``.grad``) with the update direction.

        ``grads`` holds the gradient of the last pass: ``g(w + e)`` when ``ascended``, else ``g(w)`` (the
        cadence skipped the ascent). ``first_grads`` is ``g(w)`` when asked for and the step ascended.
        ``context`` (``RuleContext``): the rule's own states (checkpointed by SAM), the base optimiser's,
        each parameter's learning rate and the step.
        """

    def after_base_step_(self, params: list[Tensor], context: RuleContext) -> None:
        """Move the weights after the base optimiser's step (called only for rules that declare
        ``steps_after_base``, and only when the base step ran: not on a skipped step, nor one a GradScaler skips).

        ``params``: the parameters with a gradient, as ``direction_`` had them this step (local shards on sharded
        parameters); ``context``: their ``RuleContext``, the learning rates read after the base step.
        """

    @property
    def is_identity(self) -> bool:
        """True if ``direction_`` never changes anything (SAM's rule): the optimiser then skips the call."""
        return False


class PerturbedGradient(DescentRule):
    """SAM's descent: step along ``g(w + e)`` as it is (Foret et al. 2021, eq. 3, Hessian term dropped)."""

    shard_aware = True

    @property
    def is_identity(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "PerturbedGradient()"


class Cadence:
    """Whether step number ``step`` (0-based count of completed steps) takes the ascent at all.

    A step without the ascent is one forward-backward and a base step along ``g(w)`` (as the descent rule
    shapes it): what LookSAM and periodic SAM do on most steps.
    """

    def takes_ascent(self, step: int) -> bool:
        raise NotImplementedError


class EveryStep(Cadence):
    """SAM's cadence: every step ascends."""

    def takes_ascent(self, step: int) -> bool:
        return True

    def __repr__(self) -> str:
        return "EveryStep()"


class EveryKSteps(Cadence):
    """Ascend on steps ``0, k, 2k, ...`` only (periodic SAM; LookSAM's schedule)."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"EveryKSteps needs an integer k >= 1 (1 ascends every step); got k={k!r}.")
        self.k = k

    def takes_ascent(self, step: int) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"EveryKSteps({self.k})"
