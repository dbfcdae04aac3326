"""The grid: train gradient descent and SAM over ``(||mu||, d)`` and the seeds, and measure their benign regions.

:func:`compute` trains and measures and returns a :class:`CnnDataModelResult`; it draws and formats nothing (the
report does, :mod:`flatminima.experiments.cnn_data_model.report`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flatminima.experiments.cnn_data_model.problem import N_TRAIN, Setting, make_data
from flatminima.experiments.cnn_data_model.training import TrainedCNN, Trajectory, train_cnn
from flatminima.experiments.reproduce import Context
from flatminima.experiments.summary import mean

__all__ = [
    "ABLATION_RHOS",
    "BENIGN_MARGIN",
    "FULL_DIMS",
    "FULL_SIGNAL_NORMS",
    "QUICK_DIMS",
    "QUICK_SIGNAL_NORMS",
    "SAM_RHO",
    "TRACKED",
    "TRACK_EVERY",
    "CnnDataModelResult",
    "OptimiserGrid",
    "benign_cells",
    "benign_threshold",
    "boundary_constant",
    "compute",
]

SAM_RHO = 0.5  # the radius of the main comparison (package docstring)
ABLATION_RHOS = (0.1, 0.2)  # the full run's smaller radii
BENIGN_MARGIN = 0.05  # a cell is benign when its mean clean test error is at most this (the optimum is 0)
TRACK_EVERY = 5  # steps between two records of the coefficients in the tracked cell

FULL_SIGNAL_NORMS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0)
FULL_DIMS = (100, 300, 500, 700, 900, 1100)
QUICK_SIGNAL_NORMS = (2.0, 7.0)
QUICK_DIMS = (300, 900)
TRACKED = (2.0, 900)  # (||mu||, d): SGD memorises the noise there, SAM does not; in both grids


def benign_cells(errors: Sequence[Sequence[float]], margin: float = BENIGN_MARGIN) -> list[list[bool]]:
    """Which cells of a map of mean clean test errors are benign: within ``margin`` of the optimum, 0."""
    return [[e <= margin for e in row] for row in errors]


def benign_threshold(benign_row: Sequence[bool], signal_norms: Sequence[float]) -> float:
    """The smallest ``||mu||`` of a row from which every larger ``||mu||`` is benign too; nan when the strongest
    signal is not benign."""
    threshold = math.nan
    for norm, ok in sorted(zip(signal_norms, benign_row), reverse=True):
        if not ok:
            break
        threshold = norm
    return threshold


def boundary_constant(thresholds: Sequence[float], dims: Sequence[int]) -> float:
    """``C`` of the paper's condition ``n ||mu||^4 >= C d``: the median of ``n t^4 / d`` over the rows with a
    threshold ``t``; nan when no row has one."""
    constants = [N_TRAIN * t**4 / d for t, d in zip(thresholds, dims) if math.isfinite(t)]
    return statistics.median(constants) if constants else math.nan


@dataclass(frozen=True)
class OptimiserGrid:
    """One optimiser (``rho=None``: gradient descent) over the grid: ``runs[i][j]`` are the seeds' runs at
    ``d = dims[i]``, ``||mu|| = signal_norms[j]``; ``test_error`` their mean clean test error, ``benign`` which
    cells are benign, ``thresholds`` each row's smallest benign ``||mu||`` (:func:`benign_threshold`), and
    ``curves`` each seed's coefficients over training in the tracked cell."""

    rho: float | None
    runs: list[list[list[TrainedCNN]]]
    curves: list[Trajectory]
    test_error: list[list[float]]
    benign: list[list[bool]]
    thresholds: list[float]

    @property
    def benign_count(self) -> int:
        return sum(map(sum, self.benign))

    def cell_mean(self, key: str) -> list[list[float]]:
        """The mean over seeds of one measure (a :class:`TrainedCNN` field) in every cell."""
        return [[mean([getattr(r, key) for r in cell]) for cell in row] for row in self.runs]

    def all_runs(self) -> list[TrainedCNN]:
        return [r for row in self.runs for cell in row for r in cell]


@dataclass(frozen=True)
class CnnDataModelResult:
    """The grid's axes, the seeds, each optimiser's :class:`OptimiserGrid` (keyed by rho, None first) and SGD's
    boundary constant (:func:`boundary_constant`)."""

    seeds: tuple[int, ...]
    signal_norms: tuple[float, ...]
    dims: tuple[int, ...]
    optimisers: dict[float | None, OptimiserGrid]
    boundary_constant: float

    @property
    def rhos(self) -> tuple[float | None, ...]:
        return tuple(self.optimisers)

    @property
    def cells(self) -> int:
        return len(self.dims) * len(self.signal_norms)

    @property
    def sgd_harmful(self) -> list[tuple[int, int]]:
        """The cells ``(i, j)`` where gradient descent is not benign."""
        sgd = self.optimisers[None].benign
        return [(i, j) for i in range(len(self.dims)) for j in range(len(self.signal_norms)) if not sgd[i][j]]

    @property
    def tracked(self) -> tuple[int, int]:
        """The index ``(i, j)`` of the tracked cell, :data:`TRACKED`."""
        return self.dims.index(TRACKED[1]), self.signal_norms.index(TRACKED[0])


def compute(ctx: Context) -> CnnDataModelResult:
    """Train gradient descent and SAM (and, in the full run, the smaller radii) in every cell of the grid for
    every seed, one model at a time from the same initialisation, and measure the benign regions."""
    signal_norms = QUICK_SIGNAL_NORMS if ctx.quick else FULL_SIGNAL_NORMS
    dims = QUICK_DIMS if ctx.quick else FULL_DIMS
    rhos: tuple[float | None, ...] = (None, SAM_RHO) if ctx.quick else (None, SAM_RHO, *ABLATION_RHOS)
    runs: dict[float | None, list[list[list[TrainedCNN]]]] = {
        rho: [[[] for _ in signal_norms] for _ in dims] for rho in rhos
    }
    curves: dict[float | None, list[Trajectory]] = {rho: [] for rho in rhos}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each step is microseconds of maths: a second thread only adds overhead
    try:
        for seed in ctx.seeds:
            for i, dim in enumerate(dims):
                for j, norm in enumerate(signal_norms):
                    data = make_data(norm, dim, seed)
                    tracked = (norm, dim) == TRACKED
                    for rho in rhos:
                        result = train_cnn(Setting(norm, dim, seed, rho), data, TRACK_EVERY if tracked else 0)
                        if tracked:
                            curves[rho].append(result.trajectory)
                        runs[rho][i][j].append(result)
            ctx.progress(
                f"cnn-data-model: seed {seed} done ({len(dims) * len(signal_norms)} cells, {len(rhos)} runs each)"
            )
    finally:
        torch.set_num_threads(threads)
    grids = {}
    for rho in rhos:
        errors = [[mean([r.test_error for r in cell]) for cell in row] for row in runs[rho]]
        benign = benign_cells(errors)
        thresholds = [benign_threshold(row, signal_norms) for row in benign]
        grids[rho] = OptimiserGrid(rho, runs[rho], curves[rho], errors, benign, thresholds)
    return CnnDataModelResult(
        seeds=tuple(ctx.seeds),
        signal_norms=tuple(signal_norms),
        dims=tuple(dims),
        optimisers=grids,
        boundary_constant=boundary_constant(grids[None].thresholds, dims),
    )
