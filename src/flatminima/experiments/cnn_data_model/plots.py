"""The report's figures: the test-error maps over ``(||mu||, d)``, the coefficients over training in the tracked
cell, and the held-out scores that chose the settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatminima.experiments.cnn_data_model.compute import TRACKED, CnnDataModelResult
from flatminima.experiments.cnn_data_model.problem import N_TRAIN
from flatminima.experiments.cnn_data_model.regions import BENIGN_MARGIN, Arm, Decided, Fit, fit_class
from flatminima.experiments.cnn_data_model.selection import BUDGETS, LR_GRID, RHO_GRID
from flatminima.experiments.cnn_data_model.verdicts import budget_name
from flatminima.experiments.figures import saved_figure

__all__ = ["FIT_MARKS", "cell_marks", "draws_boundary", "plot_maps", "plot_selection", "plot_trajectories"]

#: the letter a benign cell's map shows for how much of the flipped labels the model fits there
FIT_MARKS = {Fit.NEVER_OVERFITS: "N", Fit.PARTLY_OVERFITS: "P", Fit.OVERFITS_BENIGNLY: "O", Fit.UNKNOWN: "-"}


def draws_boundary(result: CnnDataModelResult) -> bool:
    """Whether the maps draw the curve ``n ||mu||^4 = C d``: only with a finite ``C`` and more than two signal
    strengths (two columns show no curve)."""
    return math.isfinite(result.boundary_constant) and len(result.signal_norms) > 2


def cell_marks(arm: Arm) -> list[list[str]]:
    """Each cell's mark on the map: for a benign cell (by the mean) the letter of its fit of the flipped labels
    (``FIT_MARKS``; ``-``: none was flipped there), and ``?`` where its interval does not decide it."""
    benign, decided, fraction = arm.benign, arm.decided(), arm.flipped_fraction()
    return [
        [
            (FIT_MARKS[fit_class(fraction[i][j])] if benign[i][j] else "")
            + ("?" if decided[i][j] is Decided.UNDECIDED else "")
            for j in range(len(benign[0]))
        ]
        for i in range(len(benign))
    ]


def _outline(axis: Any, benign: Sequence[Sequence[bool]]) -> None:
    """Outline the benign cells: an edge wherever the neighbour is outside the region (or off the grid)."""
    rows, columns = len(benign), len(benign[0])
    for i in range(rows):
        for j in range(columns):
            if not benign[i][j]:
                continue
            if j == 0 or not benign[i][j - 1]:
                axis.plot([j - 0.5, j - 0.5], [i - 0.5, i + 0.5], color="deepskyblue", linewidth=2)
            if j == columns - 1 or not benign[i][j + 1]:
                axis.plot([j + 0.5, j + 0.5], [i - 0.5, i + 0.5], color="deepskyblue", linewidth=2)
            if i == 0 or not benign[i - 1][j]:
                axis.plot([j - 0.5, j + 0.5], [i - 0.5, i - 0.5], color="deepskyblue", linewidth=2)
            if i == rows - 1 or not benign[i + 1][j]:
                axis.plot([j - 0.5, j + 0.5], [i + 0.5, i + 0.5], color="deepskyblue", linewidth=2)


def plot_maps(path: Path, result: CnnDataModelResult, arms: Sequence[Arm], columns: int = 3) -> Path:
    """Heatmaps of the mean clean test error over ``(||mu||, d)``, ``columns`` to a row, with the benign cells
    outlined, each cell marked (``cell_marks``) and the curve ``n ||mu||^4 = C d`` (``C`` read off SGD's
    boundary at equal steps)."""
    import numpy as np

    signal_norms, dims, boundary_c = result.signal_norms, result.dims, result.boundary_constant
    curve = draws_boundary(result)
    title = (
        f"blue outline: benign cells (mean clean test error <= {BENIGN_MARGIN:g}); in a benign cell, the flipped "
        "labels: O fitted (>= half), N not (<= 10 %), P partly, - none flipped; ? undecided by the 95 % interval"
        + (f"\ngreen dashes: n ||mu||^4 = C d, C = {boundary_c:.3g} from SGD's boundary" if curve else "")
    )
    columns = min(columns, len(arms))
    rows = math.ceil(len(arms) / columns)
    size = (5.2 * columns, 3.9 * rows + 0.4)
    with saved_figure(path, rows, columns, size=size, squeeze=False, crop=True) as (figure, axes):
        # above the panels' titles (the bounding box is cropped to the drawing, so it may stick out)
        figure.suptitle(title, fontsize=9, y=0.88 + (0.45 + 0.15 * (title.count("\n") + 1)) / size[1])
        figure.subplots_adjust(hspace=0.4)
        image = None
        flat = [axis for row in axes for axis in row]
        for axis in flat[len(arms) :]:
            axis.axis("off")
        for index, (axis, arm) in enumerate(zip(flat, arms)):
            values = np.array(arm.test_error)
            marks = cell_marks(arm)
            image = axis.imshow(values, origin="lower", cmap="magma_r", vmin=0.0, vmax=0.5, aspect="auto")
            for i in range(len(dims)):
                for j in range(len(signal_norms)):
                    colour = "white" if values[i, j] > 0.3 else "black"
                    text = f"{values[i, j]:.2f}" + (f"\n{marks[i][j]}" if marks[i][j] else "")
                    axis.text(j, i, text, ha="center", va="center", fontsize=6, color=colour)
            _outline(axis, arm.benign)
            if curve:
                fine = np.linspace(dims[0], dims[-1], 100)
                norms = (boundary_c * fine / N_TRAIN) ** 0.25
                inside = (norms >= signal_norms[0]) & (norms <= signal_norms[-1])
                xs = np.interp(norms, signal_norms, np.arange(len(signal_norms)))
                ys = np.interp(fine, dims, np.arange(len(dims)))
                axis.plot(xs[inside], ys[inside], "--", color="limegreen", linewidth=1.2)
            axis.set_xticks(range(len(signal_norms)), [f"{v:g}" for v in signal_norms])
            axis.set_yticks(range(len(dims)), [str(v) for v in dims])
            axis.set_xlabel("signal strength ||mu||")
            if index % columns == 0:
                axis.set_ylabel("dimension d")
            axis.set_title(f"{arm.label}: benign {arm.benign_count}/{values.size}", fontsize=9)
        if image is not None:
            figure.colorbar(image, ax=flat, shrink=0.85, label="clean test error (mean over seeds)")
    return path


def plot_trajectories(path: Path, result: CnnDataModelResult) -> Path:
    """Noise memorisation and signal learning over training in the tracked cell: mean over seeds, min-max band;
    SGD at both budgets and SAM at every radius (the chosen one bold)."""
    import numpy as np

    cell = result.tracked
    # SGD once per learning rate: at the same rate its equal-steps run is the first half of the longer one
    sgd = {arm.lr: arm for arm in sorted(result.sgd.values(), key=lambda arm: arm.steps)}
    arms = [*sgd.values(), *result.sam.values()]
    title = f"||mu|| = {TRACKED[0]:g}, d = {TRACKED[1]}, {len(result.seeds)} seeds"
    with saved_figure(path, 1, 2, size=(11.0, 4.2), title=title, title_size=9) as (_, (left, right)):
        for arm in arms:
            values = np.array(arm.curves(cell))  # [seeds, records, 3]
            if values.ndim != 3:
                continue
            steps = values[0, :, 0]
            bold = arm.rho is None or arm.rho == result.selection.rho
            for axis, column in ((left, 1), (right, 2)):
                mean = values[:, :, column].mean(axis=0)
                (line,) = axis.plot(steps, mean, label=arm.label, linewidth=1.6 if bold else 0.8)
                if bold:
                    low, high = values[:, :, column].min(axis=0), values[:, :, column].max(axis=0)
                    axis.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        left.set_ylabel("mean_i max_r <w_{y_i,r}, xi_i>")
        left.set_title("noise memorisation", fontsize=10)
        right.set_ylabel("mean_j max_r <w_{j,r}, j mu>")
        right.set_title("signal learning", fontsize=10)
        for axis in (left, right):
            axis.set_xlabel("full-batch step")
        left.legend(fontsize=6)
    return path


def plot_selection(path: Path, result: CnnDataModelResult) -> Path:
    """The held-out scores that chose the settings: SGD's per learning rate (each budget) and SAM's per radius."""
    selection = result.selection
    lrs = [s["lr"] for s in LR_GRID.settings]
    rhos = [s["rho"] for s in RHO_GRID.settings]
    title = f"error on the held-out seeds {list(selection.seeds)} (labels flipped like the training ones), all cells"
    with saved_figure(path, 1, 2, size=(10.0, 3.8), title=title, title_size=9) as (_, (left, right)):
        for budget in BUDGETS:
            (line,) = left.plot(lrs, selection.sgd_scores[budget], "o-", label=budget_name(budget))
            chosen = lrs.index(selection.lr[budget])
            left.plot([lrs[chosen]], [selection.sgd_scores[budget][chosen]], "*", markersize=14, color=line.get_color())
        right.plot(rhos, selection.sam_scores, "o-", color="tab:red", label=f"SAM, lr {selection.lr[BUDGETS[0]]:g}")
        right.plot(
            [selection.rho], [selection.sam_scores[selection.chosen_rho_index]], "*", markersize=14, color="tab:red"
        )
        for axis, name, ticks in ((left, "SGD learning rate", lrs), (right, "SAM rho", rhos)):
            axis.set_xscale("log")
            axis.set_xticks(ticks, [f"{v:g}" for v in ticks])
            axis.minorticks_off()
            axis.set_xlabel(name)
            axis.set_ylabel("held-out error")
            axis.legend(fontsize=8)
        left.set_title("SGD (star: chosen)", fontsize=10)
        right.set_title("SAM at SGD's equal-steps learning rate (star: chosen)", fontsize=10)
    return path
