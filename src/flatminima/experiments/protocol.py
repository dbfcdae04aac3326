"""The numbers a reproduction's verdict rests on: 95 % intervals over seeds, the paired difference of two optimisers
run on the same seeds, and a verdict computed from that interval by a rule fixed before the run.

A claim "SAM beats SGD" is SUPPORTED when the 95 % interval of the paired difference (SAM minus SGD, seed by seed)
lies wholly on the paper's side of zero, CONTRADICTED when it lies wholly on the other side, and INCONCLUSIVE
otherwise. The interval is Student's t over the seeds (n - 1 degrees of freedom), so three seeds give a wide one:
that is the point, a verdict from few seeds has to be clear to count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["Interval", "Verdict", "interval", "paired_difference", "verdict"]


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
