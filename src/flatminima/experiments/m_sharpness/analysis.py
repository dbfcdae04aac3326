"""From the trainings to the numbers the claims rest on, and the claims' verdicts, by rules fixed before the run.

Claims and rules (accuracies in percentage points; seed-paired differences over the seeds both methods ran,
Student-t 95 % intervals, ``verdict``):

1. Smaller m generalises better (Foret et al., Fig. 3 left): test accuracy of m-SAM at the smallest m minus SAM's
   (m = the batch), paired by seed; the paper says positive.
2. The same as a trend: per seed, the least-squares slope of test accuracy on log2 m over every m; negative.
3. SAM beats SGD at equal epochs, and 4. at equal gradient evaluations (SGD at twice the epochs): SAM minus SGD.
5. m-sharpness predicts the generalisation gap better for small m (Fig. 3 right): over every trained model (grid
   points and seeds, every method), the Spearman correlation of the final weights' m-sharpness with the gap
   (training accuracy on the labels as trained minus test accuracy), at the smallest m minus at the batch; its 95 %
   interval is the percentile bootstrap over models (2000 resamples, seed 0); positive.
6. RW-SAM recovers part of small-m m-SAM's benefit at SAM's cost (Luo et al.): RW-SAM minus SAM; positive (its
   cost is reported beside it, not judged: wall-clock time on a shared machine is not a measurement to rule on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flatminima.experiments.m_sharpness.compute import MSharpnessResult, RunRecord
from flatminima.experiments.protocol import (
    Claim,
    Interval,
    interval,
    needs_more_seeds,
    paired_difference,
    verdict,
)

__all__ = [
    "BOOTSTRAP",
    "Correlation",
    "accuracy_interval",
    "claims",
    "correlation_difference",
    "correlations",
    "more_seeds_for",
    "paired",
    "slope_interval",
]

BOOTSTRAP = 2000


def accuracy_interval(runs: Sequence[RunRecord]) -> Interval:
    """The mean test accuracy (points) over the runs' seeds and its 95 % interval."""
    return interval([100 * r.test_accuracy for r in runs])


def _common(result: MSharpnessResult, names: Sequence[str]) -> list[dict[int, RunRecord]]:
    """Each method's final runs by seed, restricted to the seeds all of ``names`` ran."""
    by_seed = [{r.seed: r for r in result.finals(name)} for name in names]
    seeds = sorted(set.intersection(*(set(runs) for runs in by_seed)))
    return [{s: runs[s] for s in seeds} for runs in by_seed]


def _differences(result: MSharpnessResult, first: str, second: str) -> list[float]:
    a, b = _common(result, [first, second])
    return [100 * (a[s].test_accuracy - b[s].test_accuracy) for s in a]


def paired(result: MSharpnessResult, first: str, second: str) -> Interval:
    """``first`` minus ``second`` in test accuracy (points), seed by seed over their common seeds."""
    a, b = _common(result, [first, second])
    return paired_difference([100 * a[s].test_accuracy for s in a], [100 * b[s].test_accuracy for s in b])


def _m_names(result: MSharpnessResult) -> list[str]:
    return [m.name for m in result.settings.methods if m.m is not None and m.name != "rwsam"]


def slope_interval(result: MSharpnessResult) -> Interval:
    """Per seed (those every m ran), the least-squares slope of test accuracy (points) on log2 m; its interval."""
    names = _m_names(result)
    logs = np.log2([result.settings.method(name).m for name in names])
    by_seed = _common(result, names)
    slopes = [
        float(np.polyfit(logs, [100 * runs[seed].test_accuracy for runs in by_seed], 1)[0]) for seed in by_seed[0]
    ]
    return interval(slopes)


@dataclass(frozen=True)
class Correlation:
    """At one m, over ``n`` trained models: the Spearman and Pearson correlations of the final weights'
    m-sharpness with the generalisation gap, and the Spearman's bootstrap 95 % interval."""

    m: int
    spearman: float
    pearson: float
    low: float
    high: float
    n: int


def _models(result: MSharpnessResult) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The gap of every model whose m-sharpness is finite at every m, and the m-sharpness per m."""
    ms = [m for m in result.settings.ms if all(str(m) in r.m_sharpness for r in result.runs)]
    kept = [r for r in result.runs if all(math.isfinite(r.m_sharpness[str(m)]) for m in ms)]
    gaps = np.array([r.gap for r in kept])
    return gaps, {m: np.array([r.m_sharpness[str(m)] for r in kept]) for m in ms}


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The Spearman correlation of each row of ``x`` with the same row of ``y`` (ties: average ranks)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx**2).sum(axis=-1) * (ry**2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=-1) / denominator


def _resamples(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP, n))


def correlations(result: MSharpnessResult) -> list[Correlation]:
    """Per m, the correlation of m-sharpness with the gap over every trained model."""
    gaps, sharpness = _models(result)
    if len(gaps) < 3:
        return []
    draws = _resamples(len(gaps))
    found = []
    for m, values in sharpness.items():
        spearman = float(_spearman_rows(values[None], gaps[None])[0])
        pearson = float(np.corrcoef(values, gaps)[0, 1])
        boot = _spearman_rows(values[draws], gaps[draws])
        low, high = np.nanpercentile(boot, [2.5, 97.5])
        found.append(Correlation(m, spearman, pearson, float(low), float(high), len(gaps)))
    return found


def correlation_difference(result: MSharpnessResult) -> Interval:
    """Spearman at the smallest m minus at the batch, with its percentile-bootstrap 95 % interval over models."""
    gaps, sharpness = _models(result)
    small, batch = result.settings.ms[0], result.settings.ms[-1]
    if len(gaps) < 3 or small not in sharpness or batch not in sharpness:
        return Interval(math.nan, -math.inf, math.inf, len(gaps))
    point = _spearman_rows(np.stack([sharpness[small], sharpness[batch]]), np.stack([gaps, gaps]))
    draws = _resamples(len(gaps))
    boot = _spearman_rows(sharpness[small][draws], gaps[draws]) - _spearman_rows(sharpness[batch][draws], gaps[draws])
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return Interval(float(point[0] - point[1]), float(low), float(high), len(gaps))


def _seeds_text(difference: Interval) -> str:
    return f"{difference} points (95 % interval, {difference.n} seed{'s' if difference.n != 1 else ''})"


def claims(result: MSharpnessResult) -> list[Claim]:
    """The six claims with their measurements and verdicts (module docstring)."""
    settings = result.settings
    small, batch = settings.ms[0], settings.ms[-1]
    smallest = f"msam-{small}"
    rule = "paired difference over seeds, Student-t 95 % interval: SUPPORTS if it lies above 0, CONTRADICTS if below"
    found = []
    difference = paired(result, smallest, "sam")
    found.append(
        Claim(
            f"smaller m generalises better: m-SAM at m = {small} beats SAM (m = {batch}, the batch) in test accuracy",
            _seeds_text(difference),
            rule + " (m-SAM minus SAM)",
            verdict(difference, paper_says_positive=True),
        )
    )
    slope = slope_interval(result)
    found.append(
        Claim(
            f"test accuracy falls as m grows (m = {', '.join(str(m) for m in settings.ms)})",
            f"slope {slope} points per doubling of m (95 % interval, {slope.n} seed{'s' if slope.n != 1 else ''})",
            "per-seed least-squares slope of test accuracy on log2 m, Student-t 95 % interval: SUPPORTS if below 0, "
            "CONTRADICTS if above",
            verdict(slope, paper_says_positive=False),
        )
    )
    for other, budget in (("sgd", "equal epochs"), ("sgd-2x", "equal gradient evaluations (SGD at 2x epochs)")):
        difference = paired(result, "sam", other)
        found.append(
            Claim(
                f"SAM beats SGD at {budget}",
                _seeds_text(difference),
                rule + " (SAM minus SGD)",
                verdict(difference, paper_says_positive=True),
            )
        )
    difference = correlation_difference(result)
    found.append(
        Claim(
            f"m-sharpness of the final weights correlates better with the generalisation gap at small m: Spearman at "
            f"m = {small} above Spearman at m = {batch}",
            f"{difference} (Spearman difference, 95 % bootstrap interval over {difference.n} trained models)",
            "percentile bootstrap over the models (2000 resamples): SUPPORTS if the interval lies above 0, "
            "CONTRADICTS if below",
            verdict(difference, paper_says_positive=True),
        )
    )
    difference = paired(result, "rwsam", "sam")
    cost = _cost_ratio(result, "rwsam")
    found.append(
        Claim(
            "RW-SAM recovers part of small-m m-SAM's benefit at about SAM's cost: RW-SAM beats SAM",
            f"{_seeds_text(difference)}; cost {cost:.2f}x SAM's per epoch (m-SAM m = {small}: "
            f"{_cost_ratio(result, smallest):.2f}x)",
            rule + " (RW-SAM minus SAM); the cost is reported, not judged",
            verdict(difference, paper_says_positive=True),
        )
    )
    return found


def _cost_ratio(result: MSharpnessResult, name: str) -> float:
    """The method's median training seconds per epoch over SAM's (final runs)."""
    seconds = [r.seconds_per_epoch for r in result.finals(name)]
    sam = [r.seconds_per_epoch for r in result.finals("sam")]
    return float(np.median(seconds) / np.median(sam))


def more_seeds_for(result: MSharpnessResult) -> dict[str, list[str]]:
    """The methods a close call needs more seeds for (its paired difference within two standard errors of zero),
    each with the comparisons that asked: claim 1 extends every m (so that claim 2's slope keeps all of them)."""
    settings = result.settings
    smallest = f"msam-{settings.ms[0]}"
    pairs = {
        (smallest, "sam"): _m_names(result),
        ("sam", "sgd"): ["sam", "sgd"],
        ("sam", "sgd-2x"): ["sam", "sgd-2x"],
        ("rwsam", "sam"): ["rwsam", "sam"],
    }
    extended: dict[str, list[str]] = {}
    for (first, second), names in pairs.items():
        if needs_more_seeds(_differences(result, first, second)):
            for name in names:
                extended.setdefault(name, []).append(f"{first} vs {second}")
    return {m.name: extended[m.name] for m in settings.methods if m.name in extended}
