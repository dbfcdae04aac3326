"""``hessian-spectrum``: at matched training loss, SAM ends in a flatter region than SGD (smaller lambda_max).

Foret et al. (ICLR 2021, sec. 4.2) report the Hessian spectrum of a WideResNet without BatchNorm trained on CIFAR-10:
at the end of training lambda_max is about 24 without SAM and 1.0 with it, and lambda_max / lambda_5 about 11.4 and
2.6. Sharpness compares fairly only at similar training loss: the cross-entropy Hessian shrinks with the loss (its
Gauss-Newton part is weighted by ``p (1 - p)`` of the softmax), so a run measured at a lower loss looks flatter for
that reason alone. So here both optimisers train until their *full* training loss first falls below a common
threshold, and are measured there.

Setting: the embedded digits with clean labels, the library's :class:`~flatminima.models.SmallCNN` (no BatchNorm,
151k parameters), the same initialisation and batch order for both optimisers: ``torch.optim.SGD`` (lr 0.05,
momentum 0.9, weight decay 5e-4, batch 32, constant learning rate, since the stopping point is not known in advance)
and the library's :class:`~flatminima.SAM` around the same SGD. The full training loss is computed every
``check_every`` steps; when it falls below the threshold, the run goes back to the previous check (model and
optimiser state were kept) and replays those steps one at a time, computing the loss after each, so that the run
stops at the first step whose full training loss is below the threshold (the replay is bit-exact: same batches,
same states). lambda_max is tracked along the way with :class:`~flatminima.sharpness.SharpnessTracker` (power
iteration warm-started from the previous eigenvector). At the stopping point, on a fixed subset of the training
examples (the first 512 of the split): the top-5 eigenvalues by Lanczos (``value_tol=1e-3``, verified residuals and
error bounds), tr(H) by Hutchinson with its standard error, and the spectral density by SLQ.

The radius: on these 8x8 digits the paper's rho = 0.05 barely changes lambda_max at matched loss (the full run
trains it too, as an ablation); rho = 0.3, the radius of the library's digits demo, does.

The package: :mod:`.setting` (the paper's numbers, the recipe, the run sizes), :mod:`.problem` (data, model,
optimiser), :mod:`.training` (:func:`train_to_loss`), :mod:`.measure` (:func:`measure_spectrum`), :mod:`.compute`
(:func:`compute`, the typed :class:`HessianSpectrumResult`), and :mod:`.report` and :mod:`.plots` (the Outcome).
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
    PAPER_RHO,
    QUICK,
    SAM_RHO,
    Recipe,
    Setting,
    paper_scale,
    recipe_from,
)
from flatminima.experiments.hessian_spectrum.training import TrainedRun, train_to_loss
from flatminima.experiments.reproduce import Context, Outcome, Reproduction

__all__ = [
    "FULL",
    "LR",
    "PAPER",
    "PAPER_RHO",
    "QUICK",
    "REPRODUCTION",
    "SAM_RHO",
    "HessianSpectrumResult",
    "Recipe",
    "RunRecord",
    "Setting",
    "Spectrum",
    "TrainedRun",
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
    """Train SGD and SAM to a common training loss on clean digits, per seed, and compare their Hessian spectra."""
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
    # the paper trains with a cosine schedule to the end (200 epochs); here the learning rate is constant and the
    # run stops at the first epoch below the common training loss (or after --epochs)
    paper_command=(
        "flatminima reproduce hessian-spectrum --dataset cifar10 --data-root DATA --model wrn28_10_nobn --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --rho 0.05 --device cuda"
    ),
)
