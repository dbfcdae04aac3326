"""The protocol every training reproduction follows, and the numbers its verdict rests on.

Tuning: each optimiser gets a ``Grid`` of the same size (SGD over its learning rate and weight decay, SAM over
rho on top of SGD's chosen pair), each point trained on data held out from the test set (a validation split of the
training set, or draws of their own: ``SELECTION_SEEDS``), and the point with the best validation score is kept
(``choose``); the test set is never looked at until the tuned settings are trained over the reported seeds. Two
budgets (``Budget``): equal epochs, and equal gradient evaluations, where SGD trains
``SAM_EVALUATIONS_PER_STEP`` times SAM's epochs (SAM computes two gradients a step). Seeds: ``SEEDS``, and
``MORE_SEEDS`` when the paired difference lies within two standard errors of zero (``needs_more_seeds``).

Verdicts: 95 % intervals over seeds, the paired difference of two optimisers run on the same seeds, and a verdict
computed from that interval by a rule fixed before the run.

A claim "SAM beats SGD" is SUPPORTED when the 95 % interval of the paired difference (SAM minus SGD, seed by seed)
lies wholly on the paper's side of zero, CONTRADICTED when it lies wholly on the other side, and INCONCLUSIVE
otherwise. The interval is Student's t over the seeds (n - 1 degrees of freedom), so three seeds give a wide one: that
is the point, a verdict from few seeds has to be clear to count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "MORE_SEEDS",
    "SAM_EVALUATIONS_PER_STEP",
    "SEEDS",
    "SELECTION_SEEDS",
    "Budget",
    "Claim",
    "Grid",
    "Interval",
    "Verdict",
    "agreement",
    "choose",
    "disjoint_seeds",
    "equal_sizes",
    "interval",
    "needs_more_seeds",
    "paired_difference",
    "sgd_epochs",
    "verdict",
    "within",
]

#: gradients SAM computes per step (the ascent's and the descent's); SGD computes one
SAM_EVALUATIONS_PER_STEP = 2
#: seeds of every training comparison; ``MORE_SEEDS`` where the difference is within two standard errors of 0
SEEDS = (0, 1, 2)
MORE_SEEDS = (0, 1, 2, 3, 4)
#: seeds whose runs choose the settings where a reproduction tunes on separate draws (fresh data, or fresh runs whose
#: validation scores would otherwise be reported too): never among the reported seeds
SELECTION_SEEDS = (100, 101)


class Verdict(str, Enum):
    """What the measured interval says of the paper's claim."""

    SUPPORTS = "SUPPORTS"
    CONTRADICTS = "CONTRADICTS"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with its two-sided ``level`` confidence interval ``[low, high]`` (Student's t)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its Student-t confidence interval; one value gives an unbounded interval (one
    seed says nothing of the spread)."""
    if not values:
        raise ValueError("an interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, level)
    from scipy.stats import t

    deviation = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * deviation / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_difference(first: Sequence[float], second: Sequence[float], level: float = 0.95) -> Interval:
    """The interval of ``first - second`` seed by seed (both run on the same seeds, in the same order): the seeds'
    shared luck cancels, which an interval of each alone would not show."""
    if len(first) != len(second):
        raise ValueError(f"paired values need the same seeds: {len(first)} against {len(second)}")
    return interval([a - b for a, b in zip(first, second, strict=True)], level)


def verdict(difference: Interval, paper_says_positive: bool) -> Verdict:
    """SUPPORTS when the interval lies wholly on the paper's side of zero, CONTRADICTS when wholly on the other,
    INCONCLUSIVE otherwise (``paper_says_positive``: the paper's claim is that the difference is above zero)."""
    if not difference.excludes_zero():
        return Verdict.INCONCLUSIVE
    positive = difference.low > 0
    return Verdict.SUPPORTS if positive == paper_says_positive else Verdict.CONTRADICTS


class Budget(str, Enum):
    """How much training SGD gets against SAM: the same epochs, or the same number of gradient evaluations."""

    EQUAL_EPOCHS = "equal epochs"
    EQUAL_EVALUATIONS = "equal gradient evaluations"


def sgd_epochs(sam_epochs: int, budget: Budget) -> int:
    """SGD's epochs in ``budget`` when SAM trains ``sam_epochs``: the same, or ``SAM_EVALUATIONS_PER_STEP``
    times as many (the SAM paper's own comparison gave SGD twice the epochs)."""
    return sam_epochs * (SAM_EVALUATIONS_PER_STEP if budget is Budget.EQUAL_EVALUATIONS else 1)


@dataclass(frozen=True)
class Grid:
    """One optimiser's tuning grid: the settings tried (each a mapping of setting name -> value), in the order of
    preference a tie is broken by (the first: the smallest change)."""

    optimizer: str
    settings: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError(f"the tuning grid of {self.optimizer} is empty")

    def __len__(self) -> int:
        return len(self.settings)


def equal_sizes(*grids: Grid) -> None:
    """Refuse grids of different sizes: every optimiser gets the same tuning budget."""
    sizes = {grid.optimizer: len(grid) for grid in grids}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every optimiser needs a tuning grid of the same size; got {sizes}")


def choose(grid: Grid, validation_scores: Sequence[float]) -> dict[str, Any]:
    """The setting of ``grid`` with the best validation score (higher is better); a tie goes to the earlier one. A
    NaN score (a diverged run) never wins."""
    if len(validation_scores) != len(grid):
        raise ValueError(f"{len(validation_scores)} scores for a grid of {len(grid)} settings")
    finite = [(score, -index) for index, score in enumerate(validation_scores) if not math.isnan(score)]
    if not finite:
        return dict(grid.settings[0])
    return dict(grid.settings[-max(finite)[1]])


def disjoint_seeds(reported: Sequence[int], selection: Sequence[int] = SELECTION_SEEDS) -> None:
    """Refuse to report a seed whose runs chose the settings: its luck on validation would be reported as test."""
    overlap = sorted(set(reported) & set(selection))
    if overlap:
        raise ValueError(
            f"seeds {overlap} choose this reproduction's settings and cannot be reported too; give --seeds without "
            f"{list(selection)}"
        )


def needs_more_seeds(differences: Sequence[float]) -> bool:
    """Whether a paired difference over ``SEEDS`` is too close to call: its mean within two standard errors
    of zero (then the comparison is rerun over ``MORE_SEEDS``)."""
    n = len(differences)
    if n >= len(MORE_SEEDS) or n < 2:
        return False
    mean = math.fsum(differences) / n
    deviation = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    return abs(mean) <= 2 * deviation / math.sqrt(n)


def agreement(measured: float, predicted: float, relative_tolerance: float) -> Verdict:
    """A theory claim's verdict: SUPPORTS when ``measured`` is within ``relative_tolerance`` of ``predicted``
    (relative to its size), CONTRADICTS otherwise; INCONCLUSIVE only when nothing was measured (NaN)."""
    if math.isnan(measured):
        return Verdict.INCONCLUSIVE
    close = abs(measured - predicted) <= relative_tolerance * max(abs(predicted), 1e-300)
    return Verdict.SUPPORTS if close else Verdict.CONTRADICTS


def within(error: float, tolerance: float) -> Verdict:
    """A theory claim's verdict from an error already measured against its closed form: SUPPORTS when
    ``error <= tolerance``, CONTRADICTS when larger, INCONCLUSIVE when it could not be measured (NaN)."""
    if math.isnan(error):
        return Verdict.INCONCLUSIVE
    return Verdict.SUPPORTS if error <= tolerance else Verdict.CONTRADICTS


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and what the reproduction measured of it: the statement, the measurement it rests on
    (with its interval), the rule that turned the measurement into the verdict, and the verdict."""

    statement: str
    measured: str
    rule: str
    verdict: Verdict

    def as_dict(self) -> dict[str, str]:
        return {
            "statement": self.statement,
            "measured": self.measured,
            "rule": self.rule,
            "verdict": self.verdict.value,
        }
