"""Periodic and random SAM: the SAM step on some steps only, a plain base-optimiser step along ``g(w)`` on the rest.

Both are SAM with another cadence (``Cadence``, the third seam): step ``t`` (0-based,
SAM's own step counter) either takes SAM's step, the base optimiser along

    g(w_t + e_t),   e_t = rho g(w_t) / ||g(w_t)||_2          (Foret et al. 2021, eq. 2 and 3),

or, exempted, the base optimiser's plain step along ``g(w_t)`` (one forward-backward, no ascent):

* **periodic SAM** (``periodic-sam``, ``EveryKSteps``): SAM on ``t = 0, k, 2k, ...``
  (``t mod k = 0``). The "SAM-k" baseline of LookSAM (Liu, Mai, Chen, Hsieh, You, "Towards Efficient and
  Scalable Sharpness-Aware Minimization", CVPR 2022, arXiv 2203.02714), which takes plain SGD steps between
  the SAM steps; LookSAM itself reuses a component of the last SAM gradient instead. ``k = 1`` is SAM.
* **random SAM** (``random-sam``, ``RandomCadence``): SAM on step ``t`` when a Bernoulli trial
  ``b_t ~ B(p)`` succeeds, as in Randomized Sharpness-Aware Training (RST: Zhao, Zhang, Hu, "Randomized
  Sharpness-Aware Training for Boosting Computational Efficiency in Deep Learning", arXiv 2203.09962, 2022),
  whose update is ``w_{t+1} = w_t - lr (b_t g(w_t + e_t) + (1 - b_t) g(w_t))`` with a constant ``p`` here (RST
  also schedules ``p_t``; not provided). ``p = 1`` is SAM, ``p = 0`` the base optimiser.

Cost per step, in forward-backward passes: ``1 + 1/k`` for periodic SAM, ``1 + p`` on average for random SAM
(SAM: 2). The trial of step ``t`` is a pure function of ``(seed, t)`` (a counter-based hash, below), so it needs
no state beyond SAM's step counter (saved in the optimiser's ``state_dict`` as ``sam_steps``): a resumed run
draws the same trials, bit for bit, and every rank under DDP draws the same (the steps stay in lock step).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim.catalog import build_sam
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import Cadence, EveryKSteps
from flatminima.optim.sam import SAM

__all__ = ["RandomCadence", "periodic_sam", "random_sam", "uniform_draw"]

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014): a bijection of 64-bit integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def uniform_draw(seed: int, step: int) -> float:
    """``u in [0, 1)`` for step ``step`` of seed ``seed``: the ``(step + 1)``-th output of a SplitMix64 generator
    whose state starts at ``seed`` (mod 2^64), top 53 bits as a double. Random access: no state is carried."""
    state = (seed + (step + 1) * _GOLDEN) & _MASK
    return (_mix64(state) >> 11) * 2.0**-53


class RandomCadence(Cadence):
    """Ascend on step ``t`` with probability ``p``: when ``uniform_draw(seed, t) < p`` (RST's Bernoulli trial).

    The decision is a pure function of ``(seed, t)``; ``p = 1`` ascends on every step, ``p = 0`` never.

    Args:
        p: probability of the SAM step, in ``[0, 1]``.
        seed: an integer >= 0; the training command line passes the run's ``--seed``.
    """

    def __init__(self, p: float, seed: int = 0) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= 1):
            raise ValueError(
                f"RandomCadence needs a probability p in [0, 1] (1: SAM on every step, 0: never); got p={p!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"RandomCadence needs an integer seed >= 0; got seed={seed!r}.")
        self.p = float(p)
        self.seed = seed

    def takes_ascent(self, step: int) -> bool:
        return uniform_draw(self.seed, step) < self.p

    def __repr__(self) -> str:
        return f"RandomCadence(p={self.p}, seed={self.seed})"


def periodic_sam(
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
    base_optimizer: type[Optimizer] | Optimizer,
    k: int = 2,
    **options: Any,
) -> SAM:
    """SAM taking its step every ``k`` steps (``t mod k = 0``) and the base optimiser's plain step otherwise;
    ``options`` go to ``SAM`` (``rho``, ``lr``, ``model``...)."""
    return SAM(params, base_optimizer, cadence=EveryKSteps(k), **options)


def random_sam(
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
    base_optimizer: type[Optimizer] | Optimizer,
    probability: float = 0.5,
    seed: int = 0,
    **options: Any,
) -> SAM:
    """SAM taking its step with probability ``probability`` (decided by ``(seed, step)``) and the base optimiser's
    plain step otherwise; ``options`` go to ``SAM`` (its ``p=`` is the L_p ball of the
    ascent, as always)."""
    return SAM(params, base_optimizer, cadence=RandomCadence(probability, seed), **options)


@dataclass(frozen=True)
class PeriodicSAMOptions:
    """Periodic SAM's option (``--sam-every``)."""

    sam_every: int = option(
        2, "periodic-sam: the SAM step on every k-th step, plain base steps between (1: SAM)",
        check=lambda v: v >= 1, why="must be >= 1 (1: the SAM step on every step)",
    )  # fmt: skip


@dataclass(frozen=True)
class RandomSAMOptions:
    """Random SAM's option (``--sam-probability``)."""

    sam_probability: float = option(
        0.5, "random-sam: probability of the SAM step on each step (RST; 1: SAM)",
        check=lambda v: 0 <= v <= 1, why="must be in [0, 1] (1: SAM, 0: the base optimiser)",
    )  # fmt: skip


# ---------------------------------------------------------------- command line


def _build_periodic(request: OptimizerRequest) -> SAM:
    return build_sam(request, cadence=EveryKSteps(request.options.sam_every))


def _build_random(request: OptimizerRequest) -> SAM:
    config = request.config
    return build_sam(request, cadence=RandomCadence(request.options.sam_probability, seed=config.seed))


register_optimizer(
    "periodic-sam",
    "SAM every k-th step, plain base steps between (--sam-every)",
    _build_periodic,
    sharpness_aware=True,
    options=PeriodicSAMOptions,
    passes="1 + 1/k on average",
)
register_optimizer(
    "random-sam",
    "SAM with probability p per step (RST), plain base steps otherwise (--sam-probability)",
    _build_random,
    sharpness_aware=True,
    options=RandomSAMOptions,
    passes="1 + p on average",
)
