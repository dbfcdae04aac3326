"""``sam-drift``: along a valley of minima, SAM bounces across it and drifts toward its flat end; GD does not move.

Bartlett, Long and Bousquet (JMLR 2023), the non-quadratic case: near a valley, SAM's oscillation acts as gradient
descent, with a smaller step, on ``lambda_max``. The valley here is ``L(x, y) = 1/2 a(y) x^2`` with
``a(y) = 1 + y^2``: every point ``x = 0`` is a minimum and ``lambda_max = a(y)`` there, so the flat end is ``y = 0``.

At frozen ``y`` the problem is the 1-d quadratic with ``lambda = a(y)``, whose normalised-SAM 2-cycle is
``x = +-c(y)``, ``c = eta rho a / (2 - eta a)``. The gradient is ``g = (a x, 1/2 a' x^2)`` and the perturbation
``e = rho g / ||g|| = rho (sign x, a' |x| / (2 a)) / sqrt(1 + (a' x / (2 a))^2)``, so on the cycle ``x + e_x`` has
the sign of ``x`` and ``|x + e_x| = c + rho`` to leading order. The y-coordinate of the SAM gradient,
``1/2 a'(y + e_y) (x + e_x)^2``, is the same on both steps of the cycle, so y moves by

    dy/step = -eta/2 a'(y) (c + rho)^2 = -2 eta rho^2 a'(y) / (2 - eta a)^2

(``c + rho = 2 rho / (2 - eta a)``), up to four relative corrections of order ``rho^2`` (``correction_terms``;
8.0e-6 in all at ``y = 1``, ``eta = 0.1``, ``rho = 0.01``). For small ``eta a`` this is ``-eta rho^2 a'(y) / 2``:
gradient descent on ``lambda_max = a(y)`` with step ``eta rho^2 / 2``; the closed form's extra factor
``4 / (2 - eta a)^2`` is 1.23 at ``y = 1``. Gradient descent from the same point contracts ``x`` by ``1 - eta a``
per step, moves ``y`` by ``O(eta x0^2)`` while it does, and then stops: ``x = 0`` is a fixed point.

The runs use the library's ``SAM`` around ``torch.optim.SGD`` (and plain ``torch.optim.SGD``
for GD) on the parameter ``w = (x, y)`` in float64: the product, not a separate simulator. The derivation is in
``docs/reproductions.md`` (section sam-drift).

The package computes, then reports: ``.problem`` (the valley and the runs on it), ``.theory`` (the closed
forms), ``.measure`` (what is read off a trajectory) and ``.compute`` (the runs, gathered in a
``SamDriftResult``); ``.report`` turns that result into the table and the commentary, and
``.plots`` into the figures.
"""

from __future__ import annotations

from flatminima.experiments.reproduce import Context, Outcome, Reproduction
from flatminima.experiments.sam_drift.compute import GDNumbers, SamDriftResult, compute
from flatminima.experiments.sam_drift.measure import RateRecord, measured_rate
from flatminima.experiments.sam_drift.problem import a, a_prime, run_valley, valley_loss
from flatminima.experiments.sam_drift.report import outcome
from flatminima.experiments.sam_drift.theory import correction_terms, predicted_rate, refined_rate, small_eta_rate

__all__ = [
    "REPRODUCTION",
    "GDNumbers",
    "RateRecord",
    "SamDriftResult",
    "a",
    "a_prime",
    "compute",
    "correction_terms",
    "measured_rate",
    "outcome",
    "predicted_rate",
    "refined_rate",
    "run",
    "run_valley",
    "small_eta_rate",
    "valley_loss",
]


def run(ctx: Context) -> Outcome:
    """SAM and GD from ``(x, y) = (1e-3, 1.05)``: the drift rate of y at ``y = 1`` against the prediction, lambda_max
    over a long run, and the rate's scaling with rho."""
    return outcome(compute(ctx.quick, ctx.progress), ctx)


REPRODUCTION = Reproduction(
    name="sam-drift",
    summary="SAM drifts along a valley of minima toward lower lambda_max; GD stays put",
    paper="Bartlett, Long, Bousquet, The Dynamics of Sharpness-Aware Minimization (JMLR 2023), drift to wide minima",
    run=run,
    default_seeds=(0,),
    quick_seeds=(0,),
)
