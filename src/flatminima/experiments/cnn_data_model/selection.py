"""Choosing the settings on held-out seeds: SGD's learning rate and SAM's radius, from grids of the same size.

The data model is generative, so the held-out set is a fresh draw rather than a split: each of
``SELECTION_SEEDS`` draws its own training set (n = 20, labels flipped like the reported ones) and its own 1000
test points, over the whole ``(||mu||, d)`` grid. A split of a reported seed's training set would leave 15 or fewer
points to train on and change ``n``, one of the two axes of the paper's condition ``n ||mu||^4 >= C d``, and its
error would come in steps of a fifth. A setting's score is its error on the selection draws' test points with the
labels flipped like the training labels (``held_out_labels``:
the paper's test error is on the noisy distribution), averaged over every cell and selection seed; the reported
seeds' test sets are never looked at until the chosen settings are trained on them.

The grids (``LR_GRID``, ``RHO_GRID``) have six settings each (``
equal_sizes``): SGD over its learning rate (the model has no weight decay), SAM over the SAM paper's radii at SGD's
chosen learning rate. SGD is tuned once per budget, on the same runs (``SGD_CHECKPOINTS``: its score after
``STEPS`` steps for equal steps, after twice as many for equal gradient evaluations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flatminima.experiments.cnn_data_model.problem import STEPS
from flatminima.experiments.cnn_data_model.regions import BENIGN_MARGIN, Arm, Cell
from flatminima.experiments.protocol import (
    SELECTION_SEEDS,  # the draws that choose; never reported
    Budget,
    Grid,
    choose,
    equal_sizes,
    sgd_epochs,
)

__all__ = [
    "BUDGETS",
    "LR_GRID",
    "RHO_GRID",
    "SELECTION_SEEDS",
    "SGD_CHECKPOINTS",
    "Selection",
    "choose_lr",
    "held_out_score",
    "select",
]

#: SGD's learning rates: factors of 2 around 0.1, six like SAM's grid (the smallest among the first on a tie)
LR_GRID = Grid("SGD", tuple({"lr": lr} for lr in (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)))
#: the SAM paper's radii (Foret et al. 2021), at SGD's chosen learning rate
RHO_GRID = Grid("SAM", tuple({"rho": rho} for rho in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)))
equal_sizes(LR_GRID, RHO_GRID)
BUDGETS = (Budget.EQUAL_EPOCHS, Budget.EQUAL_EVALUATIONS)
#: SGD's steps in each budget against SAM's ``STEPS`` (a step is an epoch here: the batch is the training set)
SGD_CHECKPOINTS = {budget: sgd_epochs(STEPS, budget) for budget in BUDGETS}


def held_out_score(arm: Arm) -> float:
    """The selection score (lower is better): the error on the held-out labels, over every cell and seed."""
    runs = arm.all_runs()
    return sum(r.held_out_error for r in runs) / len(runs)


@dataclass(frozen=True)
class Selection:
    """What the held-out seeds chose: each setting's score (SGD's per budget), the chosen learning rates and
    radius, and the cells where the chosen SGD is not benign on the held-out draws (``sgd_harmful``, per budget:
    the cells the claims compare SAM and SGD in, fixed before the reported seeds are trained)."""

    seeds: tuple[int, ...]
    sgd_scores: dict[Budget, list[float]]
    sam_scores: list[float]
    lr: dict[Budget, float]
    rho: float
    sgd_harmful: dict[Budget, list[Cell]]
    sgd_test_error: dict[Budget, list[list[float]]]

    @property
    def chosen_rho_index(self) -> int:
        return [s["rho"] for s in RHO_GRID.settings].index(self.rho)


def choose_lr(sgd_arms: dict[Budget, Sequence[Arm]]) -> tuple[dict[Budget, list[float]], dict[Budget, float]]:
    """SGD's scores per budget (its arms in the order of ``LR_GRID``) and the chosen learning rate of each."""
    scores = {budget: [held_out_score(arm) for arm in arms] for budget, arms in sgd_arms.items()}
    chosen = {budget: float(choose(LR_GRID, [-s for s in scores[budget]])["lr"]) for budget in scores}
    return scores, chosen


def select(sgd_arms: dict[Budget, Sequence[Arm]], sam_arms: Sequence[Arm], seeds: Sequence[int]) -> Selection:
    """The ``Selection`` from the held-out runs: SGD's arms per budget and SAM's, in the order of the grids."""
    if len(sam_arms) != len(RHO_GRID) or any(len(arms) != len(LR_GRID) for arms in sgd_arms.values()):
        raise ValueError("one held-out arm per setting of each grid")
    sgd_scores, lr = choose_lr(sgd_arms)
    sam_scores = [held_out_score(arm) for arm in sam_arms]
    rho = float(choose(RHO_GRID, [-s for s in sam_scores])["rho"])
    harmful: dict[Budget, list[Cell]] = {}
    errors: dict[Budget, list[list[float]]] = {}
    for budget, arms in sgd_arms.items():
        chosen = arms[[s["lr"] for s in LR_GRID.settings].index(lr[budget])]
        errors[budget] = chosen.test_error
        harmful[budget] = [(i, j) for i, j in chosen.cells() if errors[budget][i][j] > BENIGN_MARGIN]
    return Selection(tuple(seeds), sgd_scores, sam_scores, lr, rho, harmful, errors)
