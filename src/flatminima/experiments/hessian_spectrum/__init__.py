"""``hessian-spectrum``: at matched training loss, SAM ends in a flatter region than SGD (smaller lambda_max).

Foret et al. (ICLR 2021, sec. 4.2) report the Hessian spectrum of a WideResNet-40-10 without BatchNorm trained on
CIFAR-10: at the end of training lambda_max is about 24 without SAM and 1.0 with it, and lambda_max / lambda_5
about 11.4 and 2.6. Sharpness compares fairly only at similar training loss: the cross-entropy Hessian shrinks with
the loss (its Gauss-Newton part is weighted by ``p (1 - p)`` of the softmax), so a run measured at a lower loss looks
flatter for that reason alone. So here every run trains until its *full* training loss first falls below a common
threshold, and is measured there; that also settles the budget: each optimiser gets what it needs to reach the same
training loss (the report gives the epochs and gradient evaluations each spent).

Setting: the embedded digits with clean labels, the library's ``SmallCNN`` (no BatchNorm,
151k parameters), the same initialisation and batch order for every optimiser of a seed: ``torch.optim.SGD``
(momentum 0.9, batch 32, constant learning rate, since the stopping point is not known in advance) and the
library's ``SAM`` around the same SGD.

The protocol (``flatminima.experiments.protocol``): SGD's learning rate x weight decay (2 x 2) and then SAM's
rho (4 radii of the paper's grid, on SGD's chosen pair) are tuned on a validation split of the first seed's
training set, by validation accuracy at the common training loss only (``.tuning``). The headline is SAM at the
paper's rho = 0.05; SAM at the validated rho is measured beside it. Per seed (0-2, and 3-4 when a paired
difference is within two standard errors of zero), on a fixed subset of the training examples (the first 512):
the top-5 eigenvalues by Lanczos with their error bounds (``value_tol=1e-3``, residuals verified), tr(H) by
Hutchinson with its standard error, the SLQ spectral density, and lambda_max along training
(``SharpnessTracker``). The claims' verdicts rest on the per-seed log(SGD / SAM) of
lambda_max and of lambda_max / lambda_5 (``.claims``).

The package: ``.setting`` (the paper's numbers, the grids, the recipe, the run sizes), ``.problem`` (data,
model, optimiser), ``.training`` (``train_to_loss``), ``.tuning``, ``.measure``
(``measure_spectrum``), ``.compute`` (``compute``, the typed ``HessianSpectrumResult``),
``.claims``, and ``.report`` and ``.plots`` (the Outcome).
"""

from __future__ import annotations

from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult, RunRecord, compute
from flatminima.experiments.hessian_spectrum.measure import Spectrum, measure_spectrum
from flatminima.experiments.hessian_spectrum.problem import digits_tensors
from flatminima.experiments.hessian_spectrum.report import outcome
from flatminima.experiments.hessian_spectrum.setting import (
    FULL,
    LR,
    PAPER,
    PAPER_NETWORK,
    PAPER_RHO,
    QUICK,
    SAM_GRID,
    SGD_GRID,
    Recipe,
    Setting,
    paper_scale,
    recipe_from,
)
from flatminima.experiments.hessian_spectrum.training import TrainedRun, train_to_loss
from flatminima.experiments.hessian_spectrum.tuning import Tuning, TuningRun
from flatminima.experiments.reproduce import Context, Outcome, Reproduction

__all__ = [
    "FULL",
    "LR",
    "PAPER",
    "PAPER_NETWORK",
    "PAPER_RHO",
    "QUICK",
    "REPRODUCTION",
    "SAM_GRID",
    "SGD_GRID",
    "HessianSpectrumResult",
    "Recipe",
    "RunRecord",
    "Setting",
    "Spectrum",
    "TrainedRun",
    "Tuning",
    "TuningRun",
    "compute",
    "digits_tensors",
    "measure_spectrum",
    "outcome",
    "paper_scale",
    "recipe_from",
    "run",
    "train_to_loss",
]


def run(ctx: Context) -> Outcome:
    """Tune on a validation split, train SGD and SAM (the paper's rho and the validated one) to a common training
    loss on clean digits, per seed, and compare their Hessian spectra."""
    return outcome(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="hessian-spectrum",
    summary="At matched training loss SAM's Hessian has a smaller lambda_max and lambda_max / lambda_5 than SGD's",
    paper="Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization (ICLR 2021), sec. 4.2",
    run=run,
    overridable=frozenset(
        {"dataset", "data_root", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "rho", "device"}
        | {"threads"}
    ),
    quick_seeds=(0, 1, 2),
    # The paper's network is a WideResNet-40-10 without BatchNorm: wrn40_10_nobn. The paper trains 200 epochs with a
    # cosine schedule; here the learning rate is constant and a run stops at the first epoch below the common training
    # loss (or after --epochs). --lr, --weight-decay and --rho given: no tuning (the paper's settings).
    paper_command=(
        "flatminima reproduce hessian-spectrum --dataset cifar10 --data-root DATA --model wrn40_10_nobn --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --rho 0.05 --device cuda"
    ),
)
