"""The reproduction's runs and numbers: SAM and GD from the same start, the rate at ``y = 1``, GD's stillness, the
closed form's long-run path and the rho sweep, gathered in a ``SamDriftResult`` (no text, no figures)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from flatminima.experiments.sam_drift.measure import RateRecord, crossing, cycle_deviation, rate_record
from flatminima.experiments.sam_drift.problem import ETA, HALF_WIDTH, RHO, SETTLE, Y0, run_valley
from flatminima.experiments.sam_drift.theory import correction_terms, predicted_path, predicted_rate

__all__ = ["FULL_STEPS", "QUICK_STEPS", "GDNumbers", "SamDriftResult", "compute", "sweep_run"]

#: the main SAM run's step budget: the quick run stops earlier, just past the fitting window around y = 1
QUICK_STEPS, FULL_STEPS = 5_000, 100_000


@dataclass(frozen=True)
class GDNumbers:
    """How far GD's y moves: while x decays (``transient``, steps 0 to SETTLE), after (``settled_change``), and per
    step over ``window``, the steps around SAM's crossing of y = 1 (``rate``)."""

    rate: float
    settled_change: float
    transient: float
    window: tuple[int, int]


@dataclass(frozen=True)
class SamDriftResult:
    """Everything the report states: the trajectories, the rate records and the numbers derived from them."""

    eta: float
    rho: float
    #: the main SAM run stops once y falls below this (the quick run: just past the fitting window; else -inf)
    stop_below: float
    #: SAM's and GD's iterates, ``(steps + 1, 2)`` each, float64
    sam: Tensor
    gd: Tensor
    #: the main run's rate record, also the sweep's entry at ``rho``
    main: RateRecord
    sweep: list[RateRecord]
    gd_numbers: GDNumbers
    #: the first step at which SAM's y is below 1, and SAM's |x| there (NaN without a crossing)
    crossing_step: int | None
    amplitude_at_crossing: float
    #: ``correction_terms`` at ``(eta, rho, 1)``
    corrections: dict[str, float]
    #: y iterated with the closed-form rate alone, as many steps as SAM took
    predicted_path: list[float]
    #: the largest ``| |x| / c(y) - 1 |`` of SAM after SETTLE steps, and whether x alternated in sign throughout
    cycle_deviation: float
    cycle_alternates: bool

    @property
    def sam_y_end(self) -> float:
        return float(self.sam[-1, 1])

    @property
    def gd_y_end(self) -> float:
        return float(self.gd[-1, 1])

    @property
    def stopped_early(self) -> bool:
        """Whether the main run was cut short by ``stop_below`` (the quick run), so it does not show the long run."""
        return self.sam_y_end < self.stop_below


def sweep_run(eta: float, rho: float) -> Tensor:
    """SAM from the standard start until y is past the fitting window around 1 (at most 4x the predicted steps)."""
    steps = int(4 * (Y0 - 1.0) / abs(predicted_rate(eta, rho, 1.0))) + 10 * SETTLE
    return run_valley("sam", eta, rho, steps, stop_below=1.0 - 2 * HALF_WIDTH)


def _gd_numbers(gd: Tensor, crossing_step: int | None) -> GDNumbers:
    """GD over the 400 steps (200 cycles) around SAM's crossing of y = 1 (the last 400 without one), and its y's
    change before and after SETTLE; GD's own y stays near 1.05."""
    centre = crossing_step if crossing_step is not None else len(gd) - 201
    lo = max(SETTLE, centre - 200)
    lo -= lo % 2
    hi = min(len(gd) - 1, lo + 400)
    return GDNumbers(
        rate=float(gd[hi, 1] - gd[lo, 1]) / (hi - lo),
        settled_change=float(gd[-1, 1] - gd[SETTLE, 1]),
        transient=float(gd[SETTLE, 1] - gd[0, 1]),
        window=(lo, hi),
    )


def compute(quick: bool, progress: Callable[[str], None] = print) -> SamDriftResult:
    """SAM and GD from ``(x, y) = (1e-3, 1.05)`` and the rho sweep; ``quick`` stops SAM just past the fitting window
    around y = 1 (about 4,700 steps) and sweeps rho = 0.01, 0.02; the full run goes 100,000 steps down the valley
    and sweeps rho = 0.005 to 0.04."""
    eta, rho = ETA, RHO
    steps = QUICK_STEPS if quick else FULL_STEPS
    stop = 1.0 - 2 * HALF_WIDTH if quick else -math.inf
    sam = run_valley("sam", eta, rho, steps, stop_below=stop)
    progress(f"sam-drift: SAM, {len(sam) - 1} steps, y {Y0} -> {float(sam[-1, 1]):.6g}")
    gd = run_valley("gd", eta, rho, len(sam) - 1)
    progress(f"sam-drift: GD, {len(gd) - 1} steps, y {Y0} -> {float(gd[-1, 1]):.6g}")

    main = rate_record(eta, rho, sam)
    crossing_step = crossing(sam[:, 1])
    amplitude = float(sam[crossing_step, 0].abs()) if crossing_step is not None else math.nan
    path = predicted_path(eta, rho, Y0, len(sam) - 1)

    sweep = []
    for r in (0.01, 0.02) if quick else (0.005, 0.01, 0.02, 0.04):
        sweep.append(main if r == rho else rate_record(eta, r, sweep_run(eta, r)))
        progress(f"sam-drift: rho = {r}: {sweep[-1].steps} steps, rate {sweep[-1].measured_rate:.7g}")

    deviation, alternates = cycle_deviation(sam, eta, rho)
    return SamDriftResult(
        eta=eta,
        rho=rho,
        stop_below=stop,
        sam=sam,
        gd=gd,
        main=main,
        sweep=sweep,
        gd_numbers=_gd_numbers(gd, crossing_step),
        crossing_step=crossing_step,
        amplitude_at_crossing=amplitude,
        corrections=correction_terms(eta, rho, 1.0),
        predicted_path=path,
        cycle_deviation=deviation,
        cycle_alternates=alternates,
    )
