"""``m-sharpness``: at a fixed batch size, does a smaller m in m-SAM generalise better, does the m-sharpness of the
final weights predict the generalisation gap better at small m, and does RW-SAM get part of the way at SAM's cost?

Foret et al. (ICLR 2021, sec. 4.1, Fig. 3) found that computing SAM's perturbation separately on groups of ``m``
examples (m-SAM) generalises better the smaller ``m`` is, with rho tuned per m, and that the m-sharpness of trained
models correlates better with their generalisation gap for small ``m``. Luo et al. (NeurIPS 2025) explain the first
with an SDE: the perturbation's gradient noise adds an implicit regulariser ``(rho / 2m) tr(V)``, ``V`` the
per-example gradient covariance; their Reweighted SAM (RW-SAM) keeps one batch-wide perturbation but weights the
examples toward the sharp ones, for about one sixth more than SAM's cost.

The task (``.problem``) is Chen et al.'s two-layer CNN on signal/noise patch data trained with mini-batches, a
setting where SGD overfits harmfully (it fits the flipped labels by memorising noise patches) and a small group's
ascent is dominated by its own examples' noise: the digits CNN of the former version was flat in m. The protocol of
``flatminima.experiments.protocol`` throughout: grids of one size per method, chosen on a validation split, two
budgets for SGD, seeds with paired intervals, and claims with verdicts computed by rules fixed before the run
(``.analysis``).

The package computes, then reports: ``.problem`` (the data), ``.methods`` (the methods and their grids),
``.settings`` (the design of a run), ``.tracking`` (one training, with tr(V) measured along it and the final
weights' m-sharpness), ``.compute`` (tuning, seeds, to an ``MSharpnessResult``), ``.analysis``
(intervals, correlations, claims) and ``.report`` (the table, the commentary and the figures).
"""

from __future__ import annotations

from flatminima.experiments.m_sharpness.analysis import claims, correlations, more_seeds_for
from flatminima.experiments.m_sharpness.compute import MSharpnessResult, RunRecord, Tuning, compute
from flatminima.experiments.m_sharpness.methods import SAMPLE, Method, m_values, methods_for, rho_grid
from flatminima.experiments.m_sharpness.problem import BASE, SignalNoise
from flatminima.experiments.m_sharpness.report import outcome
from flatminima.experiments.m_sharpness.settings import Settings, settings_for
from flatminima.experiments.m_sharpness.tracking import (
    Job,
    Measurement,
    TrackedRun,
    gradient_variance_trace,
    train_and_track,
)
from flatminima.experiments.reproduce import TRAINING_FIELDS, Context, Outcome, Reproduction

__all__ = [
    "BASE",
    "REPRODUCTION",
    "SAMPLE",
    "Job",
    "MSharpnessResult",
    "Measurement",
    "Method",
    "RunRecord",
    "Settings",
    "SignalNoise",
    "TrackedRun",
    "Tuning",
    "claims",
    "compute",
    "correlations",
    "gradient_variance_trace",
    "m_values",
    "methods_for",
    "more_seeds_for",
    "outcome",
    "rho_grid",
    "run",
    "settings_for",
    "train_and_track",
]


def run(ctx: Context) -> Outcome:
    """Tune every method on validation, train the chosen settings over the seeds, measure and judge the claims."""
    settings = settings_for(ctx.quick, ctx.seeds, ctx.overrides)
    return outcome(compute(settings, ctx.progress, more_seeds_for), ctx)


REPRODUCTION = Reproduction(
    name="m-sharpness",
    summary="m-sharpness: smaller m in m-SAM, m-sharpness against the generalisation gap, the regulariser "
    "(rho / 2m) tr(V), and RW-SAM",
    paper="Foret et al., SAM (ICLR 2021), sec. 4.1; Luo et al., Unveiling m-Sharpness (NeurIPS 2025)",
    run=run,
    overridable=frozenset(TRAINING_FIELDS),
    # Fig. 3 of the SAM paper: m in {1, 4, 16, 64, 256} on CIFAR-10; at batch 256 this runs m = 4, 16, 64, 256
    paper_command=(
        "flatminima reproduce m-sharpness --dataset cifar10 --data-root DATA --model wrn16_8 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.05 --device cuda"
    ),
)
