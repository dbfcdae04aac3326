"""What one run on a random quadratic shows: the cycle's amplitude and sign, what is left of the other coordinates,
and their decay factors measured against the linearisation, in a ``RunRecord``."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.sam_cycle.quadratic import decay_factor, random_quadratic, run_sam

__all__ = ["RunRecord", "measured_decay", "one_run"]


@dataclass(frozen=True)
class RunRecord:
    """One run: SAM at ``eta lambda_1`` and ``rho`` on the quadratic of ``seed``, against the closed forms."""

    seed: int
    eta_lambda1: float
    rho: float
    c_predicted: float
    amplitude_measured: float  # |w . u_1| at the last step
    amplitude_rel_error: float
    sign_alternates: bool  # at the last step
    others_norm_final: float  # the norm of the other coordinates at the last step
    slowest_coordinate: int  # 1-based, in descending lambda: the coordinate with the largest predicted |f_i|
    decay_predicted: float  # |f_i| of the slowest coordinate
    decay_measured: float  # its measured factor (NaN when it could not be measured)
    decay_coordinates_measured: int
    decay_max_abs_error: float  # over every coordinate whose decay was measured (NaN when none was)

    def as_dict(self) -> dict[str, Any]:
        """The record as results.json holds it."""
        return dataclasses.asdict(self)


def measured_decay(top: Tensor, other: Tensor, c: float) -> float:
    """Geometric mean of ``|x_{t+1} / x_t|`` of a non-top coordinate over the steps where the linearisation holds:
    the top coordinate within 1e-3 of ``+-c`` and the other coordinate between 1e-13 c (rounding) and 1e-3 c. NaN
    when fewer than 5 consecutive steps qualify (the coordinate died before the top one settled)."""
    window = ((top.abs() - c).abs() <= 1e-3 * c) & (other.abs() >= 1e-13 * c) & (other.abs() <= 1e-3 * c)
    ratios = [
        math.log(abs(float(other[t + 1]) / float(other[t])))
        for t in range(len(other) - 1)
        if window[t] and window[t + 1]
    ]
    return math.exp(statistics.mean(ratios)) if len(ratios) >= 5 else math.nan


def _decays(coordinates: Tensor, eigenvalues: Tensor, eta: float, c: float) -> dict[str, Any]:
    """Predicted and measured decay factors of the non-top coordinates: the slowest one's, and the largest
    disagreement over every coordinate whose decay could be measured."""
    lambda_1 = float(eigenvalues[0])
    predicted = [abs(decay_factor(eta, float(v), lambda_1)) for v in eigenvalues[1:]]
    measured = [measured_decay(coordinates[:, 0], coordinates[:, i + 1], c) for i in range(len(predicted))]
    slowest = max(range(len(predicted)), key=predicted.__getitem__)
    errors = [abs(m - p) for m, p in zip(measured, predicted) if not math.isnan(m)]
    return {
        "slowest_coordinate": slowest + 2,
        "decay_predicted": predicted[slowest],
        "decay_measured": measured[slowest],
        "decay_coordinates_measured": len(errors),
        "decay_max_abs_error": max(errors) if errors else math.nan,
    }


def one_run(seed: int, x: float, rho: float, dim: int, steps: int) -> RunRecord:
    """SAM with ``eta lambda_1 = x`` for ``steps`` steps on the quadratic of ``seed``, from a random start."""
    hessian, eigenvalues, vectors = random_quadratic(seed, dim)
    eta = x / float(eigenvalues[0])
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    trajectory = run_sam(hessian, w0, eta, rho, steps)
    coordinates = trajectory @ vectors  # (steps + 1, d) in the eigenbasis
    c = two_cycle_amplitude(eta, rho, float(eigenvalues[0]))
    last, before = coordinates[-1], coordinates[-2]
    return RunRecord(
        seed=seed,
        eta_lambda1=x,
        rho=rho,
        c_predicted=c,
        amplitude_measured=abs(float(last[0])),
        amplitude_rel_error=abs(abs(float(last[0])) - c) / c,
        sign_alternates=bool(float(last[0]) * float(before[0]) < 0),
        others_norm_final=float(torch.linalg.vector_norm(last[1:])),
        **_decays(coordinates, eigenvalues, eta, c),
    )
