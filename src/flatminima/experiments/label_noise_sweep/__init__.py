"""``label-noise``: SAM resists label noise, SGD memorises it (Foret et al. 2021, Table 4), over noise levels.

The paper trains ResNet-32 on CIFAR-10 with a fraction of the training labels replaced at random and reports clean
test accuracy, SGD against SAM: 84.8 / 68.8 / 48.2 / 26.2 against 95.1 / 93.4 / 90.5 / 77.9 at 20 / 40 / 60 / 80 %
noise. Here the setting is the ``flatminima demo``'s (:data:`~flatminima.experiments.label_noise.DEMO_CONFIG`:
SmallCNN on the embedded digits, batch 32, SGD lr 0.05 cosine, momentum 0.9, wd 5e-4), swept over the noise levels
0 to 80 % and several seeds, SGD against SAM around the same SGD from the same initialisation and batch order. Each
run reports the clean test accuracy at the end and the fraction of the corrupted training labels the final model
predicts (:func:`~flatminima.experiments.label_noise.fitted_fractions`): SGD's accuracy falls because it memorises
them, and SAM's holds as long as it does not.

SAM's radius is chosen once, before the sweep and without the test set: SAM is trained at 40 % noise (the first
seed) for each rho of :data:`RHO_GRID` with :data:`VALIDATION_FRACTION` of the training set held out with its clean
labels (``TrainConfig.validation_fraction``: the split is made before the noise, so its labels are never
corrupted), and the rho with the best final validation accuracy is used at every noise level. The sweep's runs then
train on the whole training set, as the demo does. The same validation runs are repeated at the sweep's other noise
levels (first seed only); they choose nothing, and show how the best radius moves with the noise level.

The package computes, then reports: :mod:`.settings` (the grids and each run's config), :mod:`.training` (the
runs, through the library's :func:`flatminima.train` loop), :mod:`.compute` (:func:`compute`, the sweep, to a
:class:`LabelNoiseResult`) and :mod:`.report` (:func:`report`, the result to the table, text, results and figure).
"""

from __future__ import annotations

from flatminima.experiments.label_noise_sweep.compute import LabelNoiseResult, RunRecord, Validation, compute
from flatminima.experiments.label_noise_sweep.report import best_rho_sentence, report
from flatminima.experiments.label_noise_sweep.settings import (
    EPOCHS,
    NOISE_LEVELS,
    PAPER_RHO,
    PAPER_TEST_ACCURACY,
    QUICK_EPOCHS,
    QUICK_NOISE_LEVELS,
    QUICK_RHO_GRID,
    RHO_GRID,
    SELECTION_NOISE,
    VALIDATION_FRACTION,
    base_config,
    choose_rho,
    describe_setting,
    sweep_config,
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
    "QUICK_RHO_GRID",
    "REPRODUCTION",
    "RHO_GRID",
    "SELECTION_NOISE",
    "VALIDATION_FRACTION",
    "LabelNoiseResult",
    "RunRecord",
    "Validation",
    "base_config",
    "best_rho_sentence",
    "choose_rho",
    "compute",
    "describe_setting",
    "report",
    "run",
    "run_trainings",
    "sweep_config",
]


def run(ctx: Context) -> Outcome:
    """Choose rho on the clean validation split, sweep the noise levels with SGD and SAM, and report."""
    return report(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="label-noise",
    summary="SAM resists label noise: clean test accuracy and memorised noisy labels, SGD vs SAM, noise 0-80 %",
    paper="Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization (ICLR 2021), Table 4",
    run=run,
    overridable=frozenset(TRAINING_FIELDS),
    # the paper's rho is 0.1 (0.05 at 80 % noise: rerun that level alone with --rho 0.05)
    paper_command=(
        "flatminima reproduce label-noise --dataset cifar10 --data-root DATA --model resnet32 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.1 --device cuda"
    ),
)
