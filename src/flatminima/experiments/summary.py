"""Numbers over seeds, as the reports print them: a mean, its spread, and one table cell that shows both.

Every reproduction reports ``mean ± standard deviation`` over its seeds (the sample standard deviation; a single
seed shows its value alone), so that a reader sees at once how far apart the seeds landed. The three former
per-module formatters differed only in digits, units and sign; those are the arguments here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["cell", "mean", "mean_std", "spread"]


def mean(values: Sequence[float]) -> float:
    """The mean; NaN for no values (an empty cell of a grid), and NaN when any value is NaN."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return statistics.fmean(values)


def spread(values: Sequence[float]) -> float:
    """The sample standard deviation over seeds; 0 for a single seed, NaN for none or when any value is NaN."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean(values), spread(values))``."""
    return mean(values), spread(values)


def cell(
    values: Sequence[float],
    digits: int = 3,
    *,
    fixed: bool = False,
    scale: float = 1.0,
    sign: bool = False,
    spread_digits: int | None = None,
) -> str:
    """One table cell: ``mean ± std`` of ``values`` times ``scale`` (the value alone for one seed), ``n/a`` when
    undefined (no values, or a NaN among them).

    ``digits`` are significant digits, or decimals with ``fixed`` (percentages: ``scale=100, fixed=True``);
    the spread gets ``spread_digits`` (default: two significant digits, or as many decimals as the mean when
    ``fixed``); ``sign`` writes ``+`` before a positive mean (a difference).
    """
    scaled = [scale * float(v) for v in values]
    centre, deviation = mean_std(scaled)
    if math.isnan(centre):
        return "n/a"
    kind = "f" if fixed else "g"
    plus = "+" if sign else ""
    text = f"{centre:{plus}.{digits}{kind}}"
    if len(scaled) == 1:
        return text
    if spread_digits is None:
        spread_digits = digits if fixed else 2
    return f"{text} ± {deviation:.{spread_digits}{kind}}"
