"""The report: from a :class:`~flatminima.experiments.cnn_data_model.compute.CnnDataModelResult` to the table, the
text (every outcome in it read off the result), ``results.json`` and the figures."""

from __future__ import annotations

import math
import statistics
from typing import Any

from flatminima.experiments.cnn_data_model.compute import (
    BENIGN_MARGIN,
    SAM_RHO,
    TRACKED,
    CnnDataModelResult,
    OptimiserGrid,
)
from flatminima.experiments.cnn_data_model.plots import draws_boundary, label, plot_maps, plot_trajectories
from flatminima.experiments.cnn_data_model.problem import (
    EPOCHS,
    FLIP_PROB,
    INIT_STD,
    LR,
    N_TEST,
    N_TRAIN,
    NOISE_STD,
    WIDTH,
)
from flatminima.experiments.reproduce import Context, Outcome
from flatminima.experiments.summary import mean

__all__ = ["boundary_phrase", "caption", "report"]


def _key(rho: float | None) -> str:
    return "sgd" if rho is None else f"sam_rho{rho:g}"


def _row(result: CnnDataModelResult, grid: OptimiserGrid) -> list[Any]:
    """One optimiser's table row: its benign cells and area, its errors, and the tracked cell's coefficients."""
    runs = grid.all_runs()
    flipped = sum(r.flipped for r in runs)
    ti, tj = result.tracked
    tracked = grid.runs[ti][tj]
    return [
        label(grid.rho),
        f"{grid.benign_count}/{result.cells}",
        grid.benign_count / result.cells,
        mean([grid.test_error[i][j] for i, j in result.sgd_harmful]),
        mean([r.train_error for r in runs]),
        sum(r.flipped_fitted for r in runs) / flipped if flipped else math.nan,
        mean([r.test_error for r in tracked]),
        mean([r.noise_memorisation for r in tracked]),
        mean([r.signal_learning for r in tracked]),
    ]


def boundary_phrase(result: CnnDataModelResult) -> str:
    """What the text says of SGD's boundary constant ``C``: its value and whether the maps draw its curve."""
    if not math.isfinite(result.boundary_constant):
        return "SGD is benign at the strongest signal of no row, so C is undefined and no curve is drawn"
    if not draws_boundary(result):
        return (
            f"the median is C = {result.boundary_constant:.3g}; no curve is drawn on a grid of "
            f"{len(result.signal_norms)} signal strengths"
        )
    return f"the median, C = {result.boundary_constant:.3g}, draws the dashed curve"


def caption(result: CnnDataModelResult) -> str:
    """The caption; it says whether SGD and SAM differ in the tracked cell (benign or not) as measured."""
    ti, tj = result.tracked
    sgd, sam = result.optimisers[None].benign[ti][tj], result.optimisers[SAM_RHO].benign[ti][tj]
    where = "where they differ" if sgd != sam else ("where both are benign" if sgd else "where neither is benign")
    return (
        f"Benign region (mean clean test error <= {BENIGN_MARGIN:g}) of SGD and SAM over the (||mu||, d) grid; "
        f"noise memorisation and signal learning in one cell {where}."
    )


def _text(result: CnnDataModelResult) -> str:
    """The report's markdown: the setting, the definitions, and each row's smallest benign signal strength."""
    rhos, dims, total, harmful = result.rhos, result.dims, result.cells, len(result.sgd_harmful)
    thresholds = {rho: grid.thresholds for rho, grid in result.optimisers.items()}
    threshold_table = "\n".join(
        [
            "| d | SGD: smallest benign ‖mu‖ | n ‖mu‖^4 / d there | "
            + " | ".join(f"{label(rho)}: smallest benign ‖mu‖" for rho in rhos[1:])
            + " |",
            "|---:|---:|---:|" + "---:|" * (len(rhos) - 1),
        ]
        + [
            f"| {d} | {thresholds[None][i]:g} | "
            + (f"{N_TRAIN * thresholds[None][i] ** 4 / d:.3g}" if math.isfinite(thresholds[None][i]) else "n/a")
            + " | "
            + " | ".join(f"{thresholds[rho][i]:g}" for rho in rhos[1:])
            + " |"
            for i, d in enumerate(dims)
        ]
    )
    return f"""
Each cell is {len(result.seeds)} seed(s) of the patch data (n = {N_TRAIN}, {N_TEST} test points, two patches,
sigma_p = {NOISE_STD:g}, training labels flipped with probability {FLIP_PROB:g}, test labels clean) and a
`TwoLayerCNN` (m = {WIDTH} filters per class, ReLU, fixed second layer, sigma_0 = {INIT_STD:g}) trained for
{EPOCHS} full-batch steps with lr {LR:g} on the logistic loss, by gradient descent and by `SAM(SGD, rho)` from the
same initialisation. A cell is *benign* when its mean clean test error is at most {BENIGN_MARGIN:g} (the optimum on
clean labels is 0; on labels flipped like the training ones it is p = {FLIP_PROB:g}, and an error e on clean labels
reads p + (1 - 2p) e there, so the margin is {(1 - 2 * FLIP_PROB) * BENIGN_MARGIN:.3g} above p). The benign area is
the fraction of the {total} cells. "SGD-harmful cells" are the {harmful} cells where SGD is not benign; train
error and flipped labels fitted are over every run of the grid. Noise memorisation is
`mean_i max_r <w_(y_i,r), xi_i>` (y_i the observed label), signal learning `mean_j max_r <w_(j,r), j mu>`, both at
the end of training in the tracked cell.

Per dimension, the smallest ||mu|| from which every stronger signal is benign, and SGD's n ||mu||^4 / d there (the
paper's condition is n ||mu||^4 >= C d sigma_p^4; {boundary_phrase(result)}):

{threshold_table}
"""


def _optimiser_results(grid: OptimiserGrid, cells: int) -> dict[str, Any]:
    """One optimiser's part of ``results.json``: its maps over the grid and its mean trajectory."""
    curves = grid.curves
    return {
        "rho": grid.rho,
        "benign_cells": grid.benign_count,
        "benign_area": grid.benign_count / cells,
        "benign": grid.benign,
        "smallest_benign_signal_norm": grid.thresholds,
        "test_error_mean": grid.test_error,
        "test_error_std": [[statistics.pstdev([r.test_error for r in cell]) for cell in row] for row in grid.runs],
        "train_error_mean": grid.cell_mean("train_error"),
        "flipped_fitted_fraction": [
            [sum(r.flipped_fitted for r in cell) / max(1, sum(r.flipped for r in cell)) for cell in row]
            for row in grid.runs
        ],
        "noise_memorisation_mean": grid.cell_mean("noise_memorisation"),
        "signal_learning_mean": grid.cell_mean("signal_learning"),
        "trajectory_mean": [
            [step, mean([run[k][1] for run in curves]), mean([run[k][2] for run in curves])]
            for k, (step, _, _) in enumerate(curves[0])
        ]
        if curves
        else [],
    }


def report(result: CnnDataModelResult, ctx: Context) -> Outcome:
    """The :class:`Outcome`: one table row per optimiser, the text, ``results.json`` and the figures (the maps of
    SGD and SAM, the full run's smaller radii, the tracked cell's coefficients)."""
    rhos, grids, cells = result.rhos, result.optimisers, result.cells
    rows = [_row(result, grids[rho]) for rho in rhos]
    figures = [plot_maps(ctx.figure_path("test_error_maps.png"), result, [grids[None], grids[SAM_RHO]])]
    if len(rhos) > 2:
        figures.append(plot_maps(ctx.figure_path("rho_ablation.png"), result, [grids[rho] for rho in rhos[2:]]))
    figures.append(plot_trajectories(ctx.figure_path("noise_memorisation.png"), result))
    results: dict[str, Any] = {
        "signal_norms": list(result.signal_norms),
        "dims": list(result.dims),
        "grid_cells": cells,
        "epochs": EPOCHS,
        "lr": LR,
        "rho": SAM_RHO,
        "rhos": [rho for rho in rhos if rho is not None],
        "benign_margin": BENIGN_MARGIN,
        "benign_area_sgd": grids[None].benign_count / cells,
        "benign_area_sam": grids[SAM_RHO].benign_count / cells,
        "benign_cells_sgd": grids[None].benign_count,
        "benign_cells_sam": grids[SAM_RHO].benign_count,
        "sgd_harmful_cells": len(result.sgd_harmful),
        "boundary_constant_sgd": result.boundary_constant,
        "tracked": {"signal_norm": TRACKED[0], "dim": TRACKED[1]},
        "noise_memorisation_final_sgd": rows[0][7],
        "noise_memorisation_final_sam": rows[1][7],
        "signal_learning_final_sgd": rows[0][8],
        "signal_learning_final_sam": rows[1][8],
        "optimisers": {_key(rho): _optimiser_results(grids[rho], cells) for rho in rhos},
    }
    headers = [
        "optimiser",
        "benign cells",
        "benign area",
        "test error, SGD-harmful cells",
        "train error",
        "flipped labels fitted",
        f"test error at ‖mu‖={TRACKED[0]:g}, d={TRACKED[1]}",
        "noise memorisation there",
        "signal learning there",
    ]
    return Outcome(
        headers=headers, rows=rows, results=results, report=_text(result), figures=figures, caption=caption(result)
    )
