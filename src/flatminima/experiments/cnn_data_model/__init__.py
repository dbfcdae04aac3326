"""``cnn-data-model``: on the signal/noise patch model, SAM generalises over a larger range of signal strength than SGD.

Chen, Zhang, Kou, Chen, Hsieh and Gu (NeurIPS 2023) train a two-layer ReLU CNN with a fixed ``+1/-1`` second layer
(:class:`~flatminima.models.two_layer_cnn.TwoLayerCNN`) on two-patch data, one patch ``y mu`` and the other Gaussian
noise ``xi`` orthogonal to ``mu``, with training labels flipped with probability ``p``
(:func:`~flatminima.data.patches.make_signal_noise_patches`). Gradient descent overfits benignly only when the signal
is strong enough, roughly ``n ||mu||^4 >= C d sigma_p^4``; below that it fits the flipped labels by memorising the
noise patches (the coefficients ``<w_{y_i,r}, xi_i>`` grow) and the test error stays far from the optimum. SAM's
ascent step deactivates the filters that align with noise early in training, so the signal is learnt first and the
test error is small over a strictly larger part of the ``(||mu||, d)`` plane.

The reproduction trains the same initialisation on the same data with full-batch gradient descent
(``torch.optim.SGD``) and with the library's :class:`~flatminima.SAM` around it, over a grid of ``(||mu||, d)`` and
several seeds, one model at a time (SAM normalises its ascent over all of a model's parameters, so models trained
together as one stacked parameter would not be trained by SAM), and compares the regions where the mean clean test
error is within ``BENIGN_MARGIN`` of the optimum, 0.

The radius: at initialisation the gradient is dominated by its noise part, and the ascent ``rho g / ||g||`` moves
each coefficient ``<w_{y_i,r}, xi_i>`` down by about ``rho sqrt(d / (n m))``, while the coefficients are spread with
standard deviation ``sigma_0 sigma_p sqrt(d)``; the shift is ``rho / (sigma_0 sqrt(n m))`` standard deviations,
independent of ``d``. With ``sigma_0 = 0.01``, ``n = 20``, ``m = 10`` that is ``rho / 0.14``, so ``rho = 0.5``
(3.5 standard deviations) switches off the noise-aligned filters at the perturbed point, the paper's mechanism; the
full run also trains ``rho = 0.1`` and ``0.2``, which do not, to show how the effect depends on the radius.

The package computes, then reports: :mod:`.problem` (the data and the settings), :mod:`.training` (one run,
:func:`train_cnn`), :mod:`.compute` (:func:`compute`, the grid, to a :class:`CnnDataModelResult`), :mod:`.report`
(:func:`report`, the result to the table, text and results) and :mod:`.plots` (its figures).
"""

from __future__ import annotations

from flatminima.experiments.cnn_data_model.compute import (
    BENIGN_MARGIN,
    SAM_RHO,
    TRACKED,
    CnnDataModelResult,
    OptimiserGrid,
    benign_cells,
    benign_threshold,
    compute,
)
from flatminima.experiments.cnn_data_model.problem import Setting, make_data, noise_patches
from flatminima.experiments.cnn_data_model.report import report
from flatminima.experiments.cnn_data_model.training import TrainedCNN, train_cnn
from flatminima.experiments.reproduce import Context, Outcome, Reproduction

__all__ = [
    "BENIGN_MARGIN",
    "REPRODUCTION",
    "SAM_RHO",
    "TRACKED",
    "CnnDataModelResult",
    "OptimiserGrid",
    "Setting",
    "TrainedCNN",
    "benign_cells",
    "benign_threshold",
    "compute",
    "make_data",
    "noise_patches",
    "report",
    "run",
    "train_cnn",
]


def run(ctx: Context) -> Outcome:
    """Train SGD and SAM over the ``(||mu||, d)`` grid and every seed; compare the benign regions."""
    return report(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="cnn-data-model",
    summary="SAM generalises over a larger range of signal strength and dimension than SGD on the patch data model",
    paper="Chen, Zhang, Kou, Chen, Hsieh, Gu, Why Does Sharpness-Aware Minimization Generalize Better Than SGD? "
    "(NeurIPS 2023)",
    run=run,
    default_seeds=(0, 1, 2, 3, 4),
    quick_seeds=(0, 1, 2),
)
