"""``m-sharpness``: at a fixed batch size, does a smaller m in m-SAM generalise better, and does RW-SAM get there
at SAM's cost?

Foret et al. (ICLR 2021, sec. 4.1) found that computing SAM's perturbation separately on groups of ``m`` examples
(m-SAM) generalises better the smaller ``m`` is. Luo et al. (NeurIPS 2025) explain it with an SDE: the
perturbation's gradient noise adds an implicit regulariser ``(rho / 2m) tr(V)``, ``V`` the per-example gradient
covariance, so smaller ``m`` regularises more; their Reweighted SAM (RW-SAM) keeps one parallel, full-batch
perturbation but weights the examples toward the sharp ones, for about one sixth more than SAM's cost.

The reproduction trains the demo's small CNN on the embedded digits (batch 32, lr 0.05, cosine, but rho 0.05,
not the demo's 0.3; see :data:`~flatminima.experiments.label_noise.DEMO_CONFIG`) with SGD, m-SAM for several
``m`` (``m = 32``, the batch, is plain SAM), n-SAM and RW-SAM, with clean and with 40 %-noisy training labels.
Along training it measures ``tr(V) = mean_i ||g_i - g_bar||^2`` from per-example gradients (``torch.func``:
``vmap`` over ``grad``) on a fixed sample of training examples as trained (labels as corrupted, no augmentation),
and the regulariser ``(rho / 2m) tr(V)`` that m-SAM's own ``m`` puts on it.
The measurement runs from a global optimiser step hook
(:func:`torch.optim.optimizer.register_optimizer_step_post_hook`) on the base SGD step, so the library's training
loop runs unchanged; its time is taken out of the seconds per epoch.

The package computes, then reports: :mod:`.methods` (the methods and settings), :mod:`.tracking` (one training
with tr(V) measured along it) and :mod:`.compute` (every training and their summary, an :class:`MSharpnessResult`);
:mod:`.report` turns that result into the table, the commentary and the figures.
"""

from __future__ import annotations

from flatminima.experiments.m_sharpness.compute import (
    CurvePoint,
    MethodCell,
    MSharpnessResult,
    RunRecord,
    Settings,
    compute,
    settings_for,
)
from flatminima.experiments.m_sharpness.methods import BATCH, METHODS, RHO, SAMPLE, Methods, methods_for
from flatminima.experiments.m_sharpness.report import outcome
from flatminima.experiments.m_sharpness.tracking import (
    Measurement,
    TrackedRun,
    gradient_variance_trace,
    train_and_track,
)
from flatminima.experiments.reproduce import TRAINING_FIELDS, Context, Outcome, Reproduction

__all__ = [
    "BATCH",
    "METHODS",
    "REPRODUCTION",
    "RHO",
    "SAMPLE",
    "CurvePoint",
    "MSharpnessResult",
    "Measurement",
    "MethodCell",
    "Methods",
    "RunRecord",
    "Settings",
    "TrackedRun",
    "compute",
    "gradient_variance_trace",
    "methods_for",
    "outcome",
    "run",
    "settings_for",
    "train_and_track",
]


def run(ctx: Context) -> Outcome:
    """Train every (noise, method, seed) in two worker processes; tabulate accuracy, cost and regulariser."""
    return outcome(compute(settings_for(ctx.quick, ctx.seeds, ctx.overrides), ctx.progress), ctx)


REPRODUCTION = Reproduction(
    name="m-sharpness",
    summary="m-sharpness: smaller m in m-SAM, the regulariser (rho / 2m) tr(V), and RW-SAM's cost",
    paper="Foret et al., SAM (ICLR 2021), sec. 4.1; Luo et al., Unveiling m-Sharpness (NeurIPS 2025)",
    run=run,
    overridable=frozenset(TRAINING_FIELDS),
    # Fig. 3 of the SAM paper: m in {1, 4, 16, 64, 256} on CIFAR-10; at batch 256 this runs m = 4, 8, 16, 64, 256
    paper_command=(
        "flatminima reproduce m-sharpness --dataset cifar10 --data-root DATA --model wrn16_8 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.05 --device cuda"
    ),
)
