"""``sam-cycle``: full-batch normalised SAM on a convex quadratic settles into the 2-cycle ``+-c u_1``.

Bartlett, Long and Bousquet (JMLR 2023): on ``L(w) = 1/2 w^T H w``, SAM with ``e = rho g / ||g||`` and plain gradient
steps bounces across the minimum along the top eigenvector ``u_1`` with amplitude
``c = eta rho lambda_1 / (2 - eta lambda_1)``, while every other coordinate dies out. Linearising the update around
the cycle (``||g|| = lambda_1 c`` there) gives the rate at which coordinate ``i`` dies: it is multiplied each step by
``f_i = 1 - eta lambda_i - (lambda_i / lambda_1)^2 (2 - eta lambda_1)``, and ``|f_i| < 1`` for every
``lambda_i < lambda_1`` and ``0 < eta lambda_1 < 2`` (so the cycle is stable beyond the paper's ``eta < 1 / (2
lambda_1)``). The runs use the library's ``SAM`` around ``torch.optim.SGD`` in float64, so the
reproduction checks the product, not a separate simulator.

The package computes, then reports: ``.quadratic`` (the problem and the SAM runs on it), ``.measure`` (what
one run shows, a ``RunRecord``) and ``.compute`` (the sweep, a ``SamCycleResult``); ``.report``
turns that result into the table, the commentary and the figures.
"""

from __future__ import annotations

from flatminima.experiments.reproduce import Context, Outcome, Reproduction
from flatminima.experiments.sam_cycle.compute import Ravine, SamCycleResult, compute
from flatminima.experiments.sam_cycle.measure import RunRecord
from flatminima.experiments.sam_cycle.quadratic import decay_factor, random_quadratic, run_sam
from flatminima.experiments.sam_cycle.report import outcome

__all__ = [
    "REPRODUCTION",
    "Ravine",
    "RunRecord",
    "SamCycleResult",
    "compute",
    "decay_factor",
    "outcome",
    "random_quadratic",
    "run",
    "run_sam",
]


def run(ctx: Context) -> Outcome:
    """Sweep ``eta lambda_1`` and ``rho`` over random quadratics (one per seed); compare with the closed forms."""
    return outcome(compute(ctx.quick, ctx.seeds, ctx.progress), ctx)


REPRODUCTION = Reproduction(
    name="sam-cycle",
    summary="SAM's 2-cycle on a convex quadratic: amplitude c = eta rho lambda_1 / (2 - eta lambda_1)",
    paper="Bartlett, Long, Bousquet, The Dynamics of Sharpness-Aware Minimization (JMLR 2023), sec. 3",
    run=run,
)
