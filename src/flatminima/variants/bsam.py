"""bSAM (Möllenhoff and Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023, arXiv 2210.01620): SAM as a
relaxation of the Bayes objective, run as an Adam-like method that also learns a diagonal Gaussian posterior.

The paper's Algorithm 1, with ``w`` the mean (the model's weights), ``s`` the per-parameter precision and ``N`` the
data-set size:

    theta = w + z,   z ~ N(0, 1/(N s))                     (a draw from the posterior)
    g     = gradient of the batch's loss at theta          (first pass)
    e     = rho g / s                                      (the ascent, scaled by the precision: no norm)
    g_e   = gradient of the batch's loss at w + e          (second pass)
    g_m   <- beta1 g_m + (1 - beta1)(g_e + delta w)
    s     <- beta2 s + (1 - beta2)(sqrt(s) |g| + delta + gamma)
    w     <- w - alpha g_m / s

and the posterior ``N(w, 1/(N s))`` at the end. On the seams: the base optimiser ``BSAMBase``
(``flatminima.optim.bsam_base``: the last three lines, ``s`` in its state), the ascent rule ``BayesianAscent``
(``e = rho g / s``, reading ``s`` from the base's state and handing it ``|g|``), SAM's descent and cadence. The
first pass at a draw is the one thing SAM's plan does not do: ``BSAM``, a ``SAM`` built on those two, adds to
each plan a phase that moves the weights to ``theta`` before the pass at ``w`` and one that puts ``w`` back, exactly,
before the ascent (``SamplePosterior``, ``ReturnToMean``). Every driver that runs the plan (``step(closure)``,
``SharpnessAwareStep``, the Trainer and Lightning integrations) therefore takes the noisy pass; a loop calling
``first_step`` / ``second_step`` itself wraps its first pass in ``with optimizer.sampled_pass():`` (``first_step``
refuses a first pass taken outside it, which would be bSAM without its noise). Two passes per step, as SAM.
The posterior is read with ``posterior_variance``, ``posterior_sample``, ``sample_weights`` and ``predictive``
(``flatminima.optim.posterior``, re-exported here).

Choices where the paper leaves room, each stated or an option:

* defaults: ``beta1 = 0.9``, ``beta2 = 0.999``, ``gamma = 0.1``, ``s_0 = 1``, ``alpha = 0.5``, ``rho = 0.01`` (the
  authors' code and CIFAR commands); ``delta = 5e-4`` (their ``priorprec / N`` is 25 / 50000 for SGD);
* ``order``: the paper updates ``s`` and then ``w`` with it; the authors' code takes ``w``'s step with the old
  ``s`` (``"official"``);
* ``noise=False``: the first pass at ``w`` (a deterministic bSAM, used by the tests of the update);
* m-SAM groups (``group_size``): each group its own draw and ascent, ``|g|`` averaged over the groups and the
  perturbed gradients too, as the authors' ``--batchsplit`` (8 in all their runs);
* the draw and the ascent cover the groups that SAM perturbs (``rho > 0`` and ``perturb``): ``rho = 0`` is the
  base optimiser alone, along ``g(w)``, bit for bit;
* the noise comes from the ascent rule's ``generator`` (by default one of its own on the parameters' device,
  seeded from torch's global generator when built), whose state the optimiser's ``state_dict`` carries, so a
  resumed run draws what the straight one drew; the first pass is all-reduced under DDP (so ``s`` stays the same
  on every rank), and every rank with the same seed draws the same noise;
* not with FSDP2 (the rule is not shard-aware) nor ``flatten=True``; the step's reported loss is the first
  pass's, at the draw.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.optim.bsam_base import ABS_GRAD_COUNT, ABS_GRAD_SUM, ORDERS, PRECISION, BSAMBase
from flatminima.optim.guard import NonFinitePolicy
from flatminima.optim.plan import Ascend, Pass, StepPlan
from flatminima.optim.posterior import posterior_sample, posterior_variance, predictive, sample_weights
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import AscentRule, RuleContext
from flatminima.optim.sam import SAM

__all__ = [
    "BSAM",
    "BSAMBase",
    "BayesianAscent",
    "ReturnToMean",
    "SamplePosterior",
    "posterior_sample",
    "posterior_variance",
    "predictive",
    "sample_weights",
]

GENERATOR_KEY = "bsam_generator"  # the noise generator's state in the optimiser's state dict


class BayesianAscent(AscentRule):
    """bSAM's ascent ``e = rho g / s``, ``g`` the gradient at the step's draw and ``s`` the precision in the base
    optimiser's state (a ``BSAMBase``); it adds ``|g|`` to that state for the precision's update. ``generator``:
    where ``BSAM`` draws the first pass's noise from."""

    # It reads s (fixed during a step) from the base's state, which SAM hands every rule without a linear
    # coefficient, and adds |g| once per draw: right for m-SAM's groups too, which needs_state would refuse.
    needs_state = False
    shard_aware = False

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __repr__(self) -> str:
        return "BayesianAscent()"

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        """``grads`` (``g``) becomes ``rho g / s``; ``|g|`` is added to each parameter's base state."""
        if context is None:
            raise TypeError("BayesianAscent reads the precision s from the base optimiser's state: pass context=.")
        states = list(context.optimizer_states)
        precisions = [state.get(PRECISION) for state in states]
        if any(s is None for s in precisions):
            raise TypeError(
                "BayesianAscent needs the precision s that BSAMBase keeps: use it with BSAM (or a SAM around "
                "flatminima.optim.bsam_base.BSAMBase)."
            )
        if not grads:
            return
        for state, magnitude in zip(states, torch._foreach_abs(grads)):
            if ABS_GRAD_SUM in state:  # another m-SAM group's draw of this step
                state[ABS_GRAD_SUM].add_(magnitude)
                state[ABS_GRAD_COUNT] += 1
            else:
                state[ABS_GRAD_SUM], state[ABS_GRAD_COUNT] = magnitude, 1
        torch._foreach_mul_(grads, rho)
        torch._foreach_div_(grads, precisions)


@dataclass(frozen=True)
class SamplePosterior:
    """A phase of bSAM's plan: the weights move to a draw from the posterior for the pass that follows."""

    def run(self, plan: StepPlan) -> None:
        plan.sam._hold_sample()


@dataclass(frozen=True)
class ReturnToMean:
    """A phase of bSAM's plan: ``w`` back, exactly, after the pass at the draw and before the ascent."""

    def run(self, plan: StepPlan) -> None:
        plan.sam._weights.restore()


def _with_samples(phases: Iterable[Any]) -> tuple[Any, ...]:
    """``phases`` with each pass that an ascent reads taken at a draw: ``SamplePosterior`` before it,
    ``ReturnToMean`` after it."""
    phases = list(phases)
    out: list[Any] = []
    for index, phase in enumerate(phases):
        following = phases[index + 1] if index + 1 < len(phases) else None
        if isinstance(phase, Pass) and phase.at == "w" and isinstance(following, Ascend) and following.first_pass:
            out += [SamplePosterior(), phase, ReturnToMean()]
        else:
            out.append(phase)
    return tuple(out)


class BSAM(SAM):
    """bSAM: SAM around ``BSAMBase`` with the ascent ``BayesianAscent`` and the first pass at a posterior draw.

    Args:
        params: parameters or parameter groups (a group may set ``rho``, ``lr``, ``weight_decay``...).
        num_data: ``N``, the data-set size (the authors multiply it by 4 under data augmentation).
        lr: ``alpha``, the mean's step size (``BSAMBase``).
        rho: the ascent's scale in ``e = rho g / s`` (not a radius: ``s`` sets the length).
        betas: ``(beta1, beta2)``, the decays of the momentum and of the precision.
        weight_decay: ``delta``, in the momentum and in the precision.
        damping: ``gamma``, added to the precision at every step.
        init_precision: ``s_0``, the precision before the first step.
        order: ``"paper"`` (the mean's step divides by the updated ``s``) or ``"official"`` (by the old ``s``).
        noise: draw the first pass's weights from the posterior (False: the first pass at ``w``).
        generator: the noise's generator (default: a new one on the parameters' device, seeded from torch's).
        model: as for ``SAM``.
        nonfinite: as for ``SAM``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        num_data: float,
        lr: float = 0.5,
        rho: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        damping: float = 0.1,
        init_precision: float = 1.0,
        order: str = "paper",
        noise: bool = True,
        generator: torch.Generator | None = None,
        model: nn.Module | None = None,
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        if not isinstance(noise, bool):
            raise TypeError(f"BSAM: noise must be True or False; got {noise!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"BSAM: generator must be a torch.Generator; got {type(generator).__name__}.")
        super().__init__(
            params,
            BSAMBase,
            rho=rho,
            perturbation=BayesianAscent(generator),
            model=model,
            nonfinite=nonfinite,
            num_data=num_data,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            damping=damping,
            init_precision=init_precision,
            order=order,
        )
        self.noise = noise
        self._sampled = False  # a first pass was taken inside sampled_pass() since the last first_step
        if generator is None:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = first.device if first is not None else torch.device("cpu")
            seed = int(torch.randint(0, 2**62, ()).item())
            self.perturbation.generator = torch.Generator(device=device).manual_seed(seed)

    # ------------------------------------------------------------------ the noisy first pass

    def plan(
        self,
        grad_scaler: torch.amp.GradScaler | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
        groups: int = 1,
        sync_perturbation: bool = False,
        first_pass: bool = False,
    ) -> StepPlan:
        """SAM's plan with each first pass at a posterior draw; under DDP the first pass is always all-reduced,
        so that every rank updates ``s`` alike (``sync_perturbation`` is then True whatever is asked)."""
        self._drop_abs_gradients()
        self._sampled = False
        plan = super().plan(grad_scaler, batch=batch, groups=groups, sync_perturbation=True, first_pass=first_pass)
        if self.noise:
            plan.phases = _with_samples(plan.phases)
        return plan

    @contextlib.contextmanager
    def sampled_pass(self) -> Iterator[None]:
        """For a loop that calls ``first_step`` / ``second_step`` itself: run the first forward-backward pass
        inside this block, where the weights hold a posterior draw (with ``noise=False``, ``w``)."""
        if self.is_perturbed:
            raise RuntimeError("sampled_pass: the weights are not at w (a step is under way); finish it first.")
        if self.noise:
            self._hold_sample()
        try:
            yield
        finally:
            self._weights.restore()
        self._sampled = True

    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None, *, first_pass: bool = True
    ) -> bool:
        """SAM's ``first_step``, after a first pass taken inside ``sampled_pass()`` (refused otherwise, with the
        weights untouched: a pass at ``w`` would silently be bSAM without its noise)."""
        sampled, self._sampled = self._sampled, False
        if self.noise and not sampled:
            raise ValueError(
                "bSAM takes its first pass at a posterior draw: run that forward-backward pass inside "
                "`with optimizer.sampled_pass():` before first_step(), or drive it with step(closure) or "
                "SharpnessAwareStep (or build it with noise=False)."
            )
        return super().first_step(zero_grad, grad_scaler, first_pass=first_pass)

    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        try:
            super().second_step(zero_grad, grad_scaler)
        finally:
            self._drop_abs_gradients()  # a skipped step leaves none behind for the next

    def _abandon_step(self) -> None:
        super()._abandon_step()
        self._drop_abs_gradients()

    def _noisy_params(self) -> list[Tensor]:
        """The parameters the ascent perturbs (groups with ``perturb`` and ``rho != 0``) and the draw covers."""
        return [p for g in self.param_groups if g["perturb"] and g["rho"] != 0 for p in g["params"] if p.requires_grad]

    def _hold_sample(self) -> None:
        params = self._noisy_params()
        if params:
            self._weights.hold(params, posterior_sample(self, generator=self.perturbation.generator, params=params))

    def _drop_abs_gradients(self) -> None:
        for state in self.state.values():
            state.pop(ABS_GRAD_SUM, None)
            state.pop(ABS_GRAD_COUNT, None)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict and the noise generator's state (a resumed run draws the same noise)."""
        state = super().state_dict()
        generator = self.perturbation.generator
        if generator is not None:
            state[GENERATOR_KEY] = generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved, generator = state_dict.get(GENERATOR_KEY), self.perturbation.generator
        if saved is not None and generator is not None:
            try:
                generator.set_state(saved.cpu())
            except RuntimeError as error:
                raise ValueError(
                    f"BSAM.load_state_dict: the noise generator's state does not fit this {generator.device} "
                    f"generator (saved from another device?): {error}"
                ) from error


# ---------------------------------------------------------------- command line


def _finite(low: float, high: float = math.inf, *, closed: bool = True) -> Any:
    return lambda v: math.isfinite(v) and (low <= v if closed else low < v) and v < high


@dataclass(frozen=True)
class BSAMOptions:
    """bSAM's options (``--bsam-*``); ``--lr`` is alpha, ``--rho`` rho, ``--weight-decay`` delta."""

    bsam_data_size: float = option(
        0.0,
        "bsam: N, the data-set size in the posterior N(w, 1/(N s)); 0: the training set's size",
        check=_finite(0.0),
        why="must be finite and >= 0",
    )
    bsam_init_precision: float = option(
        1.0, "bsam: s_0, the initial precision", check=_finite(0.0, closed=False), why="must be finite and > 0"
    )
    bsam_damping: float = option(
        0.1, "bsam: gamma, the damping added to the precision", check=_finite(0.0), why="must be finite and >= 0"
    )
    bsam_beta1: float = option(
        0.9, "bsam: beta1, the momentum's decay", check=_finite(0.0, 1.0), why="must be in [0, 1)"
    )
    bsam_beta2: float = option(
        0.999, "bsam: beta2, the precision's decay", check=_finite(0.0, 1.0), why="must be in [0, 1)"
    )
    bsam_noise: bool = option(True, "bsam: take the first pass at a posterior draw (off: at the mean w)")
    bsam_order: str = option(
        "paper", "bsam: the mean's step divides by s updated (paper) or by the old s (official code)", choices=ORDERS
    )


def _build(request: OptimizerRequest) -> BSAM:
    config, options = request.config, request.options
    refusals = [
        (getattr(config, "base_optimizer", "sgd") != "sgd", "--base-optimizer: bsam is its own base optimiser"),
        (getattr(config, "weight_decay_in_loss", False), "--weight-decay-in-loss: bsam adds delta to s as well"),
        (getattr(config, "p", 2.0) != 2.0, "--p: bsam's ascent rho g / s is no L_p ball"),
    ]
    for refused, message in refusals:
        if refused:
            raise ValueError(f"{message}; drop it (--weight-decay is bsam's delta).")
    num_data = options.bsam_data_size or float(request.train_size)
    if num_data <= 0:
        raise ValueError("bsam needs N, the data-set size of its posterior: set --bsam-data-size.")
    return BSAM(
        request.model.parameters(),
        num_data=num_data,
        lr=request.base_options["lr"],
        rho=request.rho,
        betas=(options.bsam_beta1, options.bsam_beta2),
        weight_decay=request.base_options.get("weight_decay", 0.0),
        damping=options.bsam_damping,
        init_precision=options.bsam_init_precision,
        order=options.bsam_order,
        noise=options.bsam_noise,
        model=request.model,
        nonfinite=request.nonfinite,
    )


register_optimizer(
    "bsam",
    "bSAM: Adam-like SAM with a Gaussian posterior N(w, 1/(N s)), first pass at a draw (--bsam-*)",
    _build,
    sharpness_aware=True,
    options=BSAMOptions,
)
