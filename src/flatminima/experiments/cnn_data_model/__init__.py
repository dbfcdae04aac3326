"""``cnn-data-model``: on the signal/noise patch model, SAM generalises over a larger range of signal strength than SGD.

Chen, Zhang, Kou, Chen, Hsieh and Gu (NeurIPS 2023) train a two-layer ReLU CNN with a fixed ``+1/-1`` second layer
(``TwoLayerCNN``) on two-patch data, one patch ``y mu`` and the other Gaussian
noise ``xi`` orthogonal to ``mu``, with training labels flipped with probability ``p``
(``make_signal_noise_patches``). Gradient descent overfits benignly only when the signal
is strong enough, roughly ``n ||mu||^4 >= C d sigma_p^4``; below that it fits the flipped labels by memorising the
noise patches (the coefficients ``<w_{y_i,r}, xi_i>`` grow) and the test error stays far from the optimum. SAM's
ascent step deactivates the filters that align with noise early in training, so the signal is learnt first and the
test error is small over a strictly larger part of the ``(||mu||, d)`` plane.

The reproduction follows the shared protocol (``flatminima.experiments.protocol``): SGD's learning rate and
SAM's radius are chosen from grids of the same size on held-out seeds (``.selection``), SGD and SAM at the chosen
settings (and SAM at every radius of the grid) are then trained over the ``(||mu||, d)`` grid on the reported seeds,
one model at a time from the same initialisation, at equal steps and at equal gradient evaluations, and the claims
are verdicts on paired differences and on cells decided by their intervals (``.verdicts``). Each benign cell is
also classed by how much of the flipped labels the model fits there: SAM may "overfit benignly" (fit them and still
generalise, the paper's picture) or "never overfit" (generalise without fitting them).

The radius: at initialisation the gradient is dominated by its noise part, and the ascent ``rho g / ||g||`` moves
each coefficient ``<w_{y_i,r}, xi_i>`` down by about ``rho sqrt(d / (n m))``, while the coefficients are spread with
standard deviation ``sigma_0 sigma_p sqrt(d)``; the shift is ``rho / (sigma_0 sqrt(n m))`` standard deviations,
independent of ``d``. With ``sigma_0 = 0.01``, ``n = 20``, ``m = 10`` that is ``rho / 0.14``: only the largest
radii of the SAM paper's grid switch the noise-aligned filters off at the perturbed point.

The package computes, then reports: ``.problem`` (the data and the settings), ``.training`` (one run,
``train_cnn``), ``.regions`` (one setting over the grid, ``Arm``, and its benign region),
``.selection`` (the grids and the choice), ``.compute`` (``compute``, to a ``CnnDataModelResult``),
``.verdicts`` (the claims), ``.report`` (``report``, the table, text and results) and ``.plots``.
"""

from __future__ import annotations

from flatminima.experiments.cnn_data_model.compute import TRACKED, CnnDataModelResult, compute
from flatminima.experiments.cnn_data_model.problem import Setting, held_out_labels, make_data, noise_patches
from flatminima.experiments.cnn_data_model.regions import (
    BENIGN_MARGIN,
    Arm,
    Decided,
    Fit,
    benign_cells,
    benign_threshold,
    fit_class,
)
from flatminima.experiments.cnn_data_model.report import report
from flatminima.experiments.cnn_data_model.selection import LR_GRID, RHO_GRID, SELECTION_SEEDS, Selection
from flatminima.experiments.cnn_data_model.training import TrainedCNN, train_checkpoints, train_cnn
from flatminima.experiments.cnn_data_model.verdicts import claims
from flatminima.experiments.protocol import SEEDS
from flatminima.experiments.reproduce import Context, Outcome, Reproduction

__all__ = [
    "BENIGN_MARGIN",
    "LR_GRID",
    "REPRODUCTION",
    "RHO_GRID",
    "SELECTION_SEEDS",
    "TRACKED",
    "Arm",
    "CnnDataModelResult",
    "Decided",
    "Fit",
    "Selection",
    "Setting",
    "TrainedCNN",
    "benign_cells",
    "benign_threshold",
    "claims",
    "compute",
    "fit_class",
    "held_out_labels",
    "make_data",
    "noise_patches",
    "report",
    "run",
    "train_checkpoints",
    "train_cnn",
]


def run(ctx: Context) -> Outcome:
    """Choose the settings on the held-out seeds, train SGD and SAM over the grid and the reported seeds, report."""
    return report(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="cnn-data-model",
    summary="SAM generalises over a larger range of signal strength and dimension than SGD on the patch data model",
    paper="Chen, Zhang, Kou, Chen, Hsieh, Gu, Why Does Sharpness-Aware Minimization Generalize Better Than SGD? "
    "(NeurIPS 2023)",
    run=run,
    default_seeds=SEEDS,
    quick_seeds=SEEDS,
)
