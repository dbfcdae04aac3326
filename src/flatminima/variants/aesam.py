"""AE-SAM: SAM's step only where the loss is sharp, told by the size of the batch gradient (Jiang, Yang, Zhang, Kwok,
"An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023, arXiv 2304.14647; Algorithm 1, "AE-SAM").

The paper models the squared norm of the stochastic gradient as normally distributed, tracks its mean and variance
with exponential moving averages, and takes SAM's step when the current value is large for that distribution (a
sharp region), the plain ERM step otherwise. At step ``t`` (0-based, SAM's own counter), with ``g = g(w_t)`` the
batch gradient and ``s_t = ||g||_2^2`` over every parameter:

    mu_t     = delta mu_{t-1}     + (1 - delta) s_t                        (mu_{-1} = 0)
    sigma2_t = delta sigma2_{t-1} + (1 - delta) (s_t - mu_t)^2             (sigma2_{-1} = 0)
    c_t      = lambda_2 + (lambda_1 - lambda_2) min(t / T, 1)              (lambda_2 at t = 0, lambda_1 at t = T)
    s_t >= mu_t + c_t sqrt(sigma2_t):  SAM's step, the base optimiser along g(w_t + rho g / ||g||)  (two passes)
    otherwise:                         the base optimiser along g(w_t)                                (one pass)

The statistics are updated before the test, as Algorithm 1 writes it: ``s_t`` is compared with a mean and a
variance that already include it (so the first step, where ``mu_0 = (1 - delta) s_0`` and ``sqrt(sigma2_0) =
delta sqrt(1 - delta) s_0``, ascends whenever ``lambda_2 <= 1 / sqrt(1 - delta)``, 3.16 for delta = 0.9). ``T`` is
the run's number of steps; past it ``c_t`` stays at ``lambda_1``. The defaults are the paper's: ``delta = 0.9``,
``lambda_1 = -1``, ``lambda_2 = 1``: the threshold falls from one standard deviation above the mean to one below
it, so that, were ``s_t`` normal with that mean and spread, SAM's share of the steps would grow from about 16 % to
about 84 % over the run, half of them on average (the fraction actually taken depends on the run: read it with
``policy_statistics``).

On the seams: ascent ``DualNorm`` (SAM's), cadence every step, descent
``AdaptivePolicy``, a rule that reads ``g(w)`` (``needs_first_gradient``) only to decline the ascent
(``declines_ascent``, which it is asked with its rule context); its
direction is SAM's, untouched. A declined step is the one pass at ``w`` and the base step along ``g(w)``, as a
cadence's off step, under every driver. Under DDP ``g(w)`` is all-reduced before the rule sees it (every rule that
reads it gets the global batch's), so every rank computes the same ``s_t`` and takes the same decision.

State: ``mu``, ``sigma2`` and the counts of the policy's decisions (SAM steps and plain steps) live in the rule state
of the first parameter with a gradient (``SAM.rule_state``, saved by ``SAM.state_dict()`` as ``"sam_rule_state"``
and by ``flatminima train``'s checkpoints), under the keys ``STATE_KEYS``, as Python floats and ints: exact
doubles, which a checkpoint carries bit for bit (SAM loads a tensor of rule state in its parameter's dtype, so a
float64 tensor would come back float32 on a float32 model). ``policy_statistics`` reads them. The step ``t``
is SAM's counter, also in the ``state_dict``, so a resumed run takes the same decisions.

Choices where the paper is open: ``s_t`` sums the per-tensor squared norms in float64 (each tensor's norm taken in
its own precision, float32 at least); a non-finite ``s_t`` (an overflowing batch) is left to SAM's non-finite
policy and touches neither the statistics nor the counts; ``lambda_1 > lambda_2`` (a threshold that rises) is
refused, since it swaps the paper's schedule, whose start is ``lambda_2``; ``lambda_1 = lambda_2`` is a constant
threshold. Very negative lambdas ascend on every step (SAM bit for bit), very large ones never (the base optimiser
bit for bit). Not for FSDP's sharded parameters (``s_t`` would be each rank's shard's, and FSDP's state dicts do not
carry the rule state): refused at the first step with a clear error.

Cost per step: one forward-backward pass plus one on the steps that ascend (``1 + f`` on average, ``f`` the
fraction of SAM steps, about one half with the defaults), one global squared norm of ``g(w)`` and one host sync to
decide; ``g(w)`` is held during the ascent (the gradients themselves when they are released, else one copy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim import sharded
from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import stack, tensor_norms
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import DescentRule, RuleContext
from flatminima.optim.sam import SAM

__all__ = ["STATE_KEYS", "AdaptivePolicy", "PolicyStatistics", "aesam", "policy_statistics", "squared_norm"]

MU, SIGMA2, ASCENTS, DECLINES = "aesam_mu", "aesam_sigma2", "aesam_sam_steps", "aesam_plain_steps"
STATE_KEYS = (MU, SIGMA2, ASCENTS, DECLINES)  # in the rule state of the first parameter with a gradient


def squared_norm(grads: list[Tensor]) -> float:
    """``||g||_2^2`` over every tensor, as a Python float (one host sync): the per-tensor norms (float32 at least)
    squared and summed in float64; 0 for no tensor."""
    if not grads:
        return 0.0
    norms = tensor_norms(grads)
    return float(stack([n.to(torch.float64) for n in norms]).square().sum().item())


class AdaptivePolicy(DescentRule):
    """AE-SAM's switch: decline the ascent unless ``||g(w)||^2 >= mu_t + c_t sigma_t`` (Algorithm 1); SAM's
    direction on the steps that ascend.

    Args:
        total_steps: ``T``, the run's number of steps, over which ``c_t`` goes from ``lambda2`` to ``lambda1``.
        delta: the statistics' decay, in ``[0, 1)`` (0: no memory, every step ascends).
        lambda1: ``c_t`` at ``t >= T``.
        lambda2: ``c_t`` at ``t = 0``; ``lambda1 <= lambda2``.
    """

    needs_first_gradient = True
    state_keys = STATE_KEYS

    def __init__(self, total_steps: int, delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"AE-SAM needs total_steps (T, the run's number of steps) as an integer >= 1; got "
                             f"{total_steps!r}.")  # fmt: skip
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
            raise ValueError(f"AE-SAM's delta (the decay of its running statistics) must be in [0, 1); got {delta!r}.")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AE-SAM's {name} must be a finite number; got {value!r}.")
        if lambda1 > lambda2:
            raise ValueError(
                f"AE-SAM's threshold goes from lambda2 (at the first step) to lambda1 (at the last), so lambda1 <= "
                f"lambda2 (the paper's -1 and 1); got lambda1={lambda1!r} > lambda2={lambda2!r}: swap them."
            )
        self.total_steps = total_steps
        self.delta, self.lambda1, self.lambda2 = float(delta), float(lambda1), float(lambda2)

    def __repr__(self) -> str:
        return (
            f"AdaptivePolicy(total_steps={self.total_steps}, delta={self.delta}, lambda1={self.lambda1}, "
            f"lambda2={self.lambda2})"
        )

    @property
    def is_identity(self) -> bool:
        return True  # SAM's direction: the rule only decides whether the step ascends

    def threshold(self, step: int) -> float:
        """``c_t``: ``lambda2`` at step 0, linear to ``lambda1`` at step ``T``, then ``lambda1``."""
        return self.lambda2 + (self.lambda1 - self.lambda2) * min(step / self.total_steps, 1.0)

    def declines_ascent(self, first_grads: list[Tensor], *, context: RuleContext | None = None) -> bool:
        """Update the statistics with ``s_t = ||g(w)||^2`` and decline unless ``s_t >= mu_t + c_t sigma_t``."""
        if context is None:
            raise TypeError(
                "AdaptivePolicy keeps its running statistics in SAM's rule state: it is asked by SAM, which passes "
                "context=; call declines_ascent(first_grads, context=sam.rule_context(params)) yourself."
            )
        if any(sharded.is_sharded(g) for g in first_grads[:1]):
            raise ValueError(
                "AE-SAM (AdaptivePolicy) does not run on FSDP's sharded parameters: its ||g||^2 would be this rank's "
                "shard's, and FSDP's state dicts do not carry its statistics; use DDP, or SAM with fully_shard."
            )
        s = squared_norm(first_grads)
        states = context.states
        if not states or not math.isfinite(s):
            return False  # no gradient, or one that overflowed: SAM's non-finite policy deals with the step
        # the statistics' dict: the one holding them (first found), else the first parameter's, on the first step
        home = next((state for state in states if MU in state), states[0])
        delta = self.delta
        mu = delta * home.get(MU, 0.0) + (1 - delta) * s
        sigma2 = delta * home.get(SIGMA2, 0.0) + (1 - delta) * (s - mu) ** 2
        ascend = s >= mu + self.threshold(context.step) * math.sqrt(sigma2)
        home[MU], home[SIGMA2] = mu, sigma2
        home[ASCENTS] = home.get(ASCENTS, 0) + int(ascend)
        home[DECLINES] = home.get(DECLINES, 0) + int(not ascend)
        return not ascend


@dataclass(frozen=True)
class PolicyStatistics:
    """AE-SAM's state: ``mu`` and ``sigma2`` after the last step, and how many steps the policy let ascend (SAM's
    step) and declined (a plain step)."""

    mu: float
    sigma2: float
    sam_steps: int
    plain_steps: int

    @property
    def sam_fraction(self) -> float:
        """The fraction of the decided steps that took SAM's step (NaN before the first)."""
        decided = self.sam_steps + self.plain_steps
        return self.sam_steps / decided if decided else math.nan


def policy_statistics(sam: SAM) -> PolicyStatistics:
    """AE-SAM's statistics and counts in ``sam`` (all zero before its first step, or for another optimiser)."""
    home: dict[str, Any] = next((state for state in sam.rule_state.values() if MU in state), {})
    return PolicyStatistics(
        float(home.get(MU, 0.0)), float(home.get(SIGMA2, 0.0)), int(home.get(ASCENTS, 0)), int(home.get(DECLINES, 0))
    )


def aesam(
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
    base_optimizer: type[Optimizer] | Optimizer,
    total_steps: int,
    delta: float = 0.9,
    lambda1: float = -1.0,
    lambda2: float = 1.0,
    **options: Any,
) -> SAM:
    """SAM taking its step where ``||g(w)||^2`` is large against its running statistics and the base optimiser's
    plain step otherwise (AE-SAM); ``total_steps`` is ``T``, the run's number of steps; ``options`` go to
    ``SAM`` (``rho``, ``lr``, ``model``...)."""
    return SAM(params, base_optimizer, descent=AdaptivePolicy(total_steps, delta, lambda1, lambda2), **options)


@dataclass(frozen=True)
class AESAMOptions:
    """AE-SAM's options (``--aesam-*``)."""

    aesam_delta: float = option(
        0.9, "aesam: decay delta of the running mean and variance of ||g||^2 (the paper's 0.9)",
        check=lambda v: 0 <= v < 1, why="must be in [0, 1)",
    )  # fmt: skip
    aesam_lambda1: float = option(
        -1.0, "aesam: the threshold's c_t at the end of the run (the paper's -1; <= aesam_lambda2)",
        check=math.isfinite, why="must be finite",
    )  # fmt: skip
    aesam_lambda2: float = option(
        1.0, "aesam: the threshold's c_t at the first step (the paper's 1): SAM when ||g||^2 >= mu + c_t sigma",
        check=math.isfinite, why="must be finite",
    )  # fmt: skip
    aesam_total_steps: int = option(
        0, "aesam: T, the steps over which c_t goes from lambda2 to lambda1 (0: the run's, epochs x steps per epoch)",
        check=lambda v: v >= 0, why="must be >= 0 (0: the run's number of steps)",
    )  # fmt: skip


# ---------------------------------------------------------------- command line


def _total_steps(request: OptimizerRequest) -> int:
    """``T``: the option if given, else the run's steps, ``epochs * (train_size // batch_size)`` (the training loop
    drops the last incomplete batch)."""
    if request.options.aesam_total_steps:
        return int(request.options.aesam_total_steps)
    config = request.config
    total = config.epochs * (request.train_size // config.batch_size)
    if total < 1:
        raise ValueError(
            f"aesam needs the run's number of steps T, and {request.train_size} training examples make no batch of "
            f"{config.batch_size}: give it as --aesam-total-steps"
        )
    return total


def _build(request: OptimizerRequest) -> SAM:
    options = request.options
    policy = AdaptivePolicy(_total_steps(request), options.aesam_delta, options.aesam_lambda1, options.aesam_lambda2)
    return build_sam(request, descent=policy)


register_optimizer(
    "aesam",
    "AE-SAM: SAM's step when ||g||^2 is high against its running mean and spread, a plain step otherwise (--aesam-*)",
    _build,
    sharpness_aware=True,
    options=AESAMOptions,
    passes="1 + the fraction of SAM steps (about one half with the defaults)",
)
