"""The claims' verdicts: per seed, log(SGD's value / SAM's) of lambda_max and of lambda_max / lambda_5, its 95 %
interval over the seeds widened by the Lanczos error bounds, and the verdict of ``protocol.verdict``.

The comparison is of logs (a ratio per seed) because the paper's numbers differ by factors (24 against 1.0) and the
eigenvalues of different seeds differ in scale; the interval of the mean log ratio, exponentiated, is that of the
geometric mean of SGD / SAM. Each eigenvalue theta has a Lanczos error bound b (``
eigenvalue_error_bounds``): the eigenvalue lies in ``[theta - b, theta + b]``, so its log is within
``-log(1 - b / theta)`` of log theta; a seed's log ratio is within the sum of those of the values it is made of
(two for lambda_max, four for lambda_max / lambda_5), and the interval is widened by the largest such sum over the
seeds before the verdict is taken, so that an eigenvalue error could not have made it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult, RunRecord, log_ratios
from flatminima.experiments.hessian_spectrum.setting import PAPER_RHO, TOP_K, key
from flatminima.experiments.protocol import Claim, Interval, Verdict, interval, verdict

__all__ = ["QUANTITIES", "RULE", "Comparison", "claims", "compare", "comparisons", "log_error", "ratio_bounds"]

#: the compared quantities: the Spectrum field and its name in text
QUANTITIES = {"lambda_max": "lambda_max", "ratio": "lambda_max / lambda_5"}
RULE = (
    "SUPPORTS if the 95 % Student-t interval over seeds of log(SGD / SAM), widened by the largest Lanczos error "
    "bound on it, lies above 0; CONTRADICTS if below 0; INCONCLUSIVE otherwise"
)


def log_error(value: float, bound: float) -> float:
    """How far log(eigenvalue) can be from log(value) when the eigenvalue is within ``bound`` of ``value``
    (infinite when the bound reaches zero)."""
    if value <= 0 or bound >= value:
        return math.inf
    return -math.log1p(-bound / value)


def _bounds(record: RunRecord) -> list[float]:
    """The record's eigenvalue error bounds (infinite when Lanczos gave none)."""
    spectrum = record.spectrum
    return list(spectrum.error_bounds) if spectrum.error_bounds is not None else [math.inf] * TOP_K


def ratio_bounds(record: RunRecord) -> tuple[float, float]:
    """The range of lambda_max / lambda_5 the Lanczos error bounds allow: ``[(t1 - b1) / (t5 + b5), (t1 + b1) /
    (t5 - b5)]`` (unbounded when ``b5 >= t5``)."""
    values, bounds = record.spectrum.eigenvalues, _bounds(record)
    t1, t5, b1, b5 = values[0], values[TOP_K - 1], bounds[0], bounds[TOP_K - 1]
    if t5 <= b5:  # lambda_5 may be 0 or negative: the ratio is not bounded
        return -math.inf, math.inf
    return (t1 - b1) / (t5 + b5), (t1 + b1) / (t5 - b5)


def _record_log_error(record: RunRecord, quantity: str) -> float:
    """The largest error of log(quantity) of one record that its eigenvalue bounds allow."""
    values, bounds = record.spectrum.eigenvalues, _bounds(record)
    indices = (0,) if quantity == "lambda_max" else (0, TOP_K - 1)
    return sum(log_error(values[i], bounds[i]) for i in indices)


@dataclass(frozen=True)
class Comparison:
    """SGD against SAM at radius ``rho`` on one quantity: the per-seed log ratios, their interval, the largest
    Lanczos error on a log ratio, the widened interval and the verdict."""

    rho: float
    quantity: str
    seeds: tuple[int, ...]
    log_ratios: tuple[float, ...]
    lanczos_error: float
    interval: Interval
    widened: Interval
    verdict: Verdict

    def ratio_text(self) -> str:
        """The geometric mean of SGD / SAM and its 95 % interval, in words."""
        i = self.interval
        return f"{math.exp(i.mean):.3g}x [{math.exp(i.low):.3g}, {math.exp(i.high):.3g}]"

    def measured(self) -> str:
        """The Claim's ``measured``: the ratio, the log ratio's interval, the Lanczos error and the seeds."""
        i = self.interval
        return (
            f"SGD / SAM = {self.ratio_text()} (geometric mean, 95 % interval, {len(self.seeds)} seeds; "
            f"log ratio {i.mean:.3g} [{i.low:.3g}, {i.high:.3g}]; Lanczos error on it <= {self.lanczos_error:.1g})"
        )


def compare(records: Sequence[RunRecord], seeds: Sequence[int], rho: float, quantity: str) -> Comparison:
    """The paired comparison of SGD with SAM at ``rho`` on ``quantity`` (``lambda_max`` or ``ratio``) over
    ``seeds``."""
    found = {(r.seed, r.optimizer): r for r in records}
    pairs = [(found[(s, "sgd")], found[(s, key(rho))]) for s in seeds]
    logs = tuple(log_ratios(records, seeds, key(rho), quantity))
    error = max(_record_log_error(a, quantity) + _record_log_error(b, quantity) for a, b in pairs)
    measured = interval(logs)
    widened = Interval(measured.mean, measured.low - error, measured.high + error, measured.n, measured.level)
    return Comparison(rho, quantity, tuple(seeds), logs, error, measured, widened, verdict(widened, True))


def comparisons(result: HessianSpectrumResult) -> list[Comparison]:
    """Every radius (the paper's first) against SGD, on both quantities."""
    return [compare(result.records, result.seeds, rho, quantity) for rho in result.rhos for quantity in QUANTITIES]


def claims(result: HessianSpectrumResult) -> list[Claim]:
    """The paper's two claims at the paper's rho (the headline), then at the validated (or given) one: SAM's
    lambda_max and lambda_max / lambda_5 are smaller than SGD's. When the validated (or given) rho is the paper's,
    the claims are stated once, saying so (the same runs would only be counted twice)."""
    by_rho = {(c.rho, c.quantity): c for c in comparisons(result)}
    source = "validated" if result.rho_source == "validation" else "given"
    if result.validated_rho == PAPER_RHO:
        names = [(PAPER_RHO, f"the paper's rho = {PAPER_RHO:g} (also the {source} one)")]
    else:
        names = [(PAPER_RHO, f"the paper's rho = {PAPER_RHO:g}")]
        if result.validated_rho is not None:
            names.append((result.validated_rho, f"the {source} rho = {result.validated_rho:g}"))
    found = []
    for rho, where in names:
        for quantity, name in QUANTITIES.items():
            comparison = by_rho[(rho, quantity)]
            statement = f"At {where}, SAM's final {name} is smaller than SGD's (both stopped at the same training loss)"
            found.append(Claim(statement, comparison.measured(), RULE, comparison.verdict))
    return found
