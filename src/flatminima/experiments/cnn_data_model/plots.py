"""The report's figures: the test-error maps over ``(||mu||, d)`` and the coefficients over training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatminima.experiments.cnn_data_model.compute import (
    BENIGN_MARGIN,
    SAM_RHO,
    TRACKED,
    CnnDataModelResult,
    OptimiserGrid,
)
from flatminima.experiments.cnn_data_model.problem import N_TRAIN
from flatminima.experiments.figures import saved_figure

__all__ = ["draws_boundary", "label", "plot_maps", "plot_trajectories"]


def label(rho: float | None) -> str:
    """The optimiser's name in tables and legends."""
    return "SGD" if rho is None else f"SAM rho={rho:g}"


def draws_boundary(result: CnnDataModelResult) -> bool:
    """Whether the maps draw the curve ``n ||mu||^4 = C d``: only with a finite ``C`` and more than two signal
    strengths (two columns show no curve)."""
    return math.isfinite(result.boundary_constant) and len(result.signal_norms) > 2


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


def plot_maps(path: Path, result: CnnDataModelResult, grids: Sequence[OptimiserGrid]) -> Path:
    """Heatmaps of the mean clean test error over ``(||mu||, d)``, side by side, with the benign cells outlined
    and the curve ``n ||mu||^4 = C d`` (``C`` read off SGD's boundary)."""
    import numpy as np

    signal_norms, dims, boundary_c = result.signal_norms, result.dims, result.boundary_constant
    curve = draws_boundary(result)
    title = f"blue outline: benign cells (mean clean test error <= {BENIGN_MARGIN:g})" + (
        f"; green dashes: n ||mu||^4 = C d, C = {boundary_c:.3g} from SGD's boundary" if curve else ""
    )
    size = (5.2 * len(grids), 3.9)
    with saved_figure(path, 1, len(grids), size=size, title=title, title_size=9, squeeze=False, crop=True) as (
        figure,
        axes,
    ):
        image = None
        for axis, grid in zip(axes[0], grids):
            values = np.array(grid.test_error)
            image = axis.imshow(values, origin="lower", cmap="magma_r", vmin=0.0, vmax=0.5, aspect="auto")
            for i in range(len(dims)):
                for j in range(len(signal_norms)):
                    colour = "white" if values[i, j] > 0.3 else "black"
                    axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour)
            benign = values <= BENIGN_MARGIN
            _outline(axis, benign.tolist())
            if curve:
                fine = np.linspace(dims[0], dims[-1], 100)
                norms = (boundary_c * fine / N_TRAIN) ** 0.25
                inside = (norms >= signal_norms[0]) & (norms <= signal_norms[-1])
                columns = np.interp(norms, signal_norms, np.arange(len(signal_norms)))
                rows = np.interp(fine, dims, np.arange(len(dims)))
                axis.plot(columns[inside], rows[inside], "--", color="limegreen", linewidth=1.2)
            axis.set_xticks(range(len(signal_norms)), [f"{v:g}" for v in signal_norms])
            axis.set_yticks(range(len(dims)), [str(v) for v in dims])
            axis.set_xlabel("signal strength ||mu||")
            if axis is axes[0][0]:
                axis.set_ylabel("dimension d")
            axis.set_title(f"{label(grid.rho)}: benign {int(benign.sum())}/{benign.size} cells", fontsize=10)
        if image is not None:
            figure.colorbar(image, ax=list(axes[0]), shrink=0.85, label="clean test error (mean over seeds)")
    return path


def plot_trajectories(path: Path, result: CnnDataModelResult) -> Path:
    """Noise memorisation and signal learning over training in the tracked cell: mean over seeds, min-max band."""
    import numpy as np

    title = f"||mu|| = {TRACKED[0]:g}, d = {TRACKED[1]}, {len(result.optimisers[None].curves)} seed(s)"
    with saved_figure(path, 1, 2, title=title, title_size=9) as (_, (left, right)):
        for rho, grid in result.optimisers.items():
            values = np.array(grid.curves)  # [seeds, records, 3]
            steps = values[0, :, 0]
            for axis, column in ((left, 1), (right, 2)):
                mean = values[:, :, column].mean(axis=0)
                (line,) = axis.plot(steps, mean, label=label(rho), linewidth=1.5 if rho in (None, SAM_RHO) else 1.0)
                axis.fill_between(
                    steps,
                    values[:, :, column].min(axis=0),
                    values[:, :, column].max(axis=0),
                    alpha=0.2,
                    color=line.get_color(),
                )
        left.set_ylabel("mean_i max_r <w_{y_i,r}, xi_i>")
        left.set_title("noise memorisation", fontsize=10)
        right.set_ylabel("mean_j max_r <w_{j,r}, j mu>")
        right.set_title("signal learning", fontsize=10)
        for axis in (left, right):
            axis.set_xlabel("full-batch step")
            axis.legend(fontsize=8)
    return path
