"""``label-noise``: SAM resists label noise, SGD memorises it (Foret et al. 2021, Table 4), over noise levels.

The paper trains ResNet-32 on CIFAR-10 with a fraction of the training labels replaced at random and reports clean
test accuracy, SGD against SAM: 84.8 / 68.8 / 48.2 / 26.2 against 95.1 / 93.4 / 90.5 / 77.9 at 20 / 40 / 60 / 80 %
noise. Here the setting is the ``flatminima demo``'s (``DEMO_CONFIG``:
SmallCNN on the embedded digits, batch 32, SGD with a cosine schedule and momentum 0.9), swept over the paper's noise
levels and several seeds, SGD against SAM around the same SGD from the same initialisation and batch order. Each
run reports the clean test accuracy at the end and the fraction of the corrupted training labels the final model
predicts (``fitted_fractions``): SGD's accuracy falls because it memorises
them, and SAM's holds as long as it does not.

The runs follow the protocol of every training reproduction (``flatminima.experiments.protocol``): at each
noise level, on a validation split whose labels are corrupted like the training labels, SGD is tuned over its
learning rate and weight decay (at both budgets: equal epochs, and equal gradient evaluations, twice the epochs) and
SAM over rho on SGD's chosen pair, with grids of the same size; the tuned settings are then trained on the whole
training set over the seeds (more seeds where the gap is within two standard errors), and each noise level's SAM -
SGD paired difference gets a 95 % interval and a computed verdict. At 60 and 80 % noise SAM also runs at the
paper's rho (0.1, 0.05) where validation chose another.

The package computes, then reports: ``.settings`` (the grids and each run's config), ``.training`` (the
runs, through the library's ``flatminima.train`` loop), ``.compute`` (``compute``, the sweep, to a
``LabelNoiseResult``) and ``.report`` (``report``, the result to the table, text, results and figure).
"""

from __future__ import annotations

from flatminima.experiments.label_noise_sweep.compute import ROLES, LabelNoiseResult, RunRecord, Tuning, compute
from flatminima.experiments.label_noise_sweep.report import claims, difference, report
from flatminima.experiments.label_noise_sweep.settings import (
    EPOCHS,
    NOISE_LEVELS,
    PAPER_RHO,
    PAPER_TEST_ACCURACY,
    QUICK_EPOCHS,
    QUICK_NOISE_LEVELS,
    VALIDATION_FRACTION,
    base_config,
    describe_setting,
    grids,
    run_config,
)
from flatminima.experiments.label_noise_sweep.training import run_trainings
from flatminima.experiments.reproduce import TRAINING_FIELDS, Context, Outcome, Reproduction

__all__ = [
    "EPOCHS",
    "NOISE_LEVELS",
    "PAPER_RHO",
    "PAPER_TEST_ACCURACY",
    "QUICK_EPOCHS",
    "QUICK_NOISE_LEVELS",
    "REPRODUCTION",
    "ROLES",
    "VALIDATION_FRACTION",
    "LabelNoiseResult",
    "RunRecord",
    "Tuning",
    "base_config",
    "claims",
    "compute",
    "describe_setting",
    "difference",
    "grids",
    "report",
    "run",
    "run_config",
    "run_trainings",
]


def run(ctx: Context) -> Outcome:
    """Tune every optimiser on a noisy validation split, train the tuned settings over the seeds, and report."""
    return report(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="label-noise",
    summary="SAM resists label noise: clean test accuracy and memorised noisy labels, SGD vs SAM, noise 20-80 %",
    paper="Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization (ICLR 2021), Table 4",
    run=run,
    quick_seeds=(0, 1),
    overridable=frozenset(TRAINING_FIELDS),
    # the paper's hyper-parameters, given, so nothing is tuned; its rho is 0.1 (0.05 at 80 % noise: rerun that
    # level alone with --rho 0.05)
    paper_command=(
        "flatminima reproduce label-noise --dataset cifar10 --data-root DATA --model resnet32 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.1 --device cuda"
    ),
)
