"""What is read off a trajectory: the drift rate at ``y = 1`` from whole 2-cycles, where y crosses 1, and how
closely the iterates keep to the cycle ``+-c(y)``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatminima.experiments.sam_drift.problem import HALF_WIDTH, SETTLE
from flatminima.experiments.sam_drift.theory import correction_terms, predicted_rate, refined_rate, small_eta_rate

__all__ = ["RateRecord", "crossing", "cycle_deviation", "measured_rate", "rate_record"]


def measured_rate(y: Tensor, target: float = 1.0, half_width: float = HALF_WIDTH, settle: int = SETTLE) -> float:
    """dy per step at ``y = target``, from whole 2-cycles.

    Each cycle starting at an even step ``t >= settle`` gives the rate ``(y_(t+2) - y_t) / 2``, the mean of the
    rates at ``y_t`` and ``y_(t+1)``, so it belongs to ``(y_t + y_(t+1)) / 2`` (taking ``y_(t+1)`` instead biases
    the result by a relative ~8e-6, half a step of y). The cycles whose y is within ``half_width`` of ``target`` are
    fitted by least squares with a quadratic in ``y - target``, read at ``target`` (a linear fit would carry a
    curvature bias of a relative ~3e-6 at ``half_width = 0.005``). NaN when fewer than 5 cycles qualify.
    """
    starts = torch.arange(settle + settle % 2, len(y) - 2, 2)
    rates = (y[starts + 2] - y[starts]) / 2
    centres = (y[starts] + y[starts + 1]) / 2 - target
    keep = centres.abs() <= half_width
    if int(keep.sum()) < 5:
        return math.nan
    scaled = centres[keep] / half_width
    design = torch.stack([torch.ones_like(scaled), scaled, scaled**2], dim=1)
    coefficients = torch.linalg.lstsq(design, rates[keep].unsqueeze(1)).solution
    return float(coefficients[0, 0])


def crossing(y: Tensor, target: float = 1.0) -> int | None:
    """The first step at which y is below ``target``, or None."""
    below = torch.nonzero(y < target)
    return int(below[0, 0]) if len(below) else None


def cycle_deviation(trajectory: Tensor, eta: float, rho: float, settle: int = SETTLE) -> tuple[float, bool]:
    """How closely SAM keeps to the frozen-y cycle after ``settle`` steps: the largest ``| |x_t| / c(y_t) - 1 |``
    (``c = eta rho a / (2 - eta a)``), and whether x changes sign at every step (NaN and False when no step is
    past ``settle``)."""
    x, y = trajectory[settle:, 0], trajectory[settle:, 1]
    if len(x) < 2:
        return math.nan, False
    curvature = 1.0 + y**2
    c = eta * rho * curvature / (2.0 - eta * curvature)
    deviation = float((x.abs() / c - 1.0).abs().max())
    return deviation, bool((x[1:] * x[:-1] < 0).all())


@dataclass(frozen=True)
class RateRecord:
    """A SAM run's drift rate at y = 1 against the closed form, the refined value and the small-eta term."""

    rho: float
    steps: int
    y_end: float
    measured_rate: float
    predicted_rate: float
    rel_difference: float  # |measured - predicted| / |predicted|
    second_order_corrections: float  # the sum of correction_terms: what the closed form drops
    refined_predicted_rate: float
    refined_rel_difference: float
    small_eta_rate: float
    measured_over_rho_squared: float

    @property
    def signed_rel_difference(self) -> float:
        """``measured / predicted - 1``: the quantity the second-order terms add up to."""
        return self.measured_rate / self.predicted_rate - 1.0

    def as_dict(self) -> dict[str, Any]:
        """The record as results.json holds it."""
        return dataclasses.asdict(self)


def rate_record(eta: float, rho: float, trajectory: Tensor) -> RateRecord:
    """The ``RateRecord`` of a SAM trajectory at ``rho``."""
    measured = measured_rate(trajectory[:, 1])
    predicted = predicted_rate(eta, rho, 1.0)
    refined = refined_rate(eta, rho, 1.0)
    return RateRecord(
        rho=rho,
        steps=len(trajectory) - 1,
        y_end=float(trajectory[-1, 1]),
        measured_rate=measured,
        predicted_rate=predicted,
        rel_difference=abs(measured - predicted) / abs(predicted),
        second_order_corrections=correction_terms(eta, rho, 1.0)["sum"],
        refined_predicted_rate=refined,
        refined_rel_difference=abs(measured - refined) / abs(refined),
        small_eta_rate=small_eta_rate(eta, rho, 1.0),
        measured_over_rho_squared=measured / rho**2,
    )
