"""One optimiser setting over the ``(||mu||, d)`` grid (``Arm``) and what the report reads off it: the benign
region (by the mean and by each cell's 95 % interval), each row's smallest benign signal, and how much of the
flipped training labels the model fits where it is benign."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from flatminima.experiments.cnn_data_model.problem import N_TRAIN
from flatminima.experiments.cnn_data_model.training import TrainedCNN, Trajectory
from flatminima.experiments.protocol import interval
from flatminima.experiments.summary import mean

__all__ = [
    "BENIGN_MARGIN",
    "NEVER_FITS_BELOW",
    "OVERFITS_FROM",
    "Arm",
    "Cell",
    "Decided",
    "Fit",
    "benign_cells",
    "benign_threshold",
    "boundary_constant",
    "fit_class",
    "paired",
]

BENIGN_MARGIN = 0.05  # a cell is benign when its mean clean test error is at most this (the optimum is 0)
NEVER_FITS_BELOW = 0.1  # fitting at most this fraction of the flipped labels where benign: "never overfits"
OVERFITS_FROM = 0.5  # fitting at least this fraction of them where benign: "overfits benignly"

#: ``(i, j)``: the cell at ``d = dims[i]``, ``||mu|| = signal_norms[j]``
Cell = tuple[int, int]


class Decided(str, Enum):
    """What a cell's 95 % interval of the clean test error (over the seeds) says of it against the margin."""

    BENIGN = "benign"  # the whole interval at or below the margin
    HARMFUL = "harmful"  # the whole interval above it
    UNDECIDED = "undecided"


class Fit(str, Enum):
    """How an optimiser treats the flipped training labels where it is benign (``fit_class``)."""

    NEVER_OVERFITS = "never overfits"
    PARTLY_OVERFITS = "partly overfits"
    OVERFITS_BENIGNLY = "overfits benignly"
    UNKNOWN = "no flipped label where benign"


def fit_class(fraction: float) -> Fit:
    """The class of a fraction of flipped labels fitted in the benign cells: at most ``NEVER_FITS_BELOW``,
    never overfits (it generalises without fitting them); at least ``OVERFITS_FROM``, overfits benignly (it
    fits them and still generalises); partly in between; NaN (no benign cell, or no flipped label in one)."""
    if math.isnan(fraction):
        return Fit.UNKNOWN
    if fraction <= NEVER_FITS_BELOW:
        return Fit.NEVER_OVERFITS
    return Fit.OVERFITS_BENIGNLY if fraction >= OVERFITS_FROM else Fit.PARTLY_OVERFITS


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
class Arm:
    """One optimiser setting (``rho=None``: gradient descent, else SAM) trained over the grid: ``runs[i][j]`` are
    the runs at ``d = dims[i]``, ``||mu|| = signal_norms[j]``, one per seed in the order of the seeds."""

    rho: float | None
    lr: float
    steps: int
    runs: list[list[list[TrainedCNN]]]

    @property
    def label(self) -> str:
        """The setting's name in tables and legends."""
        if self.rho is None:
            return f"SGD lr={self.lr:g}, {self.steps} steps"
        return f"SAM rho={self.rho:g}, lr={self.lr:g}, {self.steps} steps"

    @property
    def seeds(self) -> int:
        return len(self.runs[0][0])

    def cells(self) -> list[Cell]:
        return [(i, j) for i in range(len(self.runs)) for j in range(len(self.runs[0]))]

    def all_runs(self) -> list[TrainedCNN]:
        return [r for row in self.runs for cell in row for r in cell]

    def cell_mean(self, key: str) -> list[list[float]]:
        """The mean over seeds of one measure (a ``TrainedCNN`` field) in every cell."""
        return [[mean([getattr(r, key) for r in cell]) for cell in row] for row in self.runs]

    @property
    def test_error(self) -> list[list[float]]:
        """The mean clean test error of every cell."""
        return self.cell_mean("test_error")

    @property
    def benign(self) -> list[list[bool]]:
        return benign_cells(self.test_error)

    @property
    def benign_count(self) -> int:
        return sum(map(sum, self.benign))

    def benign_list(self) -> list[Cell]:
        benign = self.benign
        return [(i, j) for i, j in self.cells() if benign[i][j]]

    def thresholds(self, signal_norms: Sequence[float]) -> list[float]:
        """Each row's smallest benign ``||mu||`` (``benign_threshold``)."""
        return [benign_threshold(row, signal_norms) for row in self.benign]

    def decided(self) -> list[list[Decided]]:
        """Each cell by its 95 % interval over the seeds (one seed decides nothing: its interval is unbounded)."""
        out = []
        for row in self.runs:
            line = []
            for cell in row:
                band = interval([r.test_error for r in cell])
                if band.high <= BENIGN_MARGIN:
                    line.append(Decided.BENIGN)
                elif band.low > BENIGN_MARGIN:
                    line.append(Decided.HARMFUL)
                else:
                    line.append(Decided.UNDECIDED)
            out.append(line)
        return out

    def decided_count(self, which: Decided) -> int:
        return sum(d is which for row in self.decided() for d in row)

    def flipped_fraction(self) -> list[list[float]]:
        """Every cell's fraction of the flipped training labels fitted, over its seeds; NaN where none was
        flipped."""
        return [
            [_fraction([r.flipped_fitted for r in cell], [r.flipped for r in cell]) for cell in row]
            for row in self.runs
        ]

    def per_seed(self, key: str, cells: Sequence[Cell]) -> list[float]:
        """One measure's mean over ``cells``, seed by seed (the values a paired difference pairs); NaN for no
        cells."""
        return [mean([getattr(self.runs[i][j][k], key) for i, j in cells]) for k in range(self.seeds)]

    def fitted_per_seed(self, cells: Sequence[Cell]) -> list[float]:
        """The fraction of the flipped labels fitted over ``cells``, seed by seed; NaN for a seed with none there."""
        return [
            _fraction(
                [self.runs[i][j][k].flipped_fitted for i, j in cells], [self.runs[i][j][k].flipped for i, j in cells]
            )
            for k in range(self.seeds)
        ]

    def fitted_where_benign(self) -> float:
        """The fraction of the flipped labels fitted over the benign cells, all seeds together."""
        cells = self.benign_list()
        fitted = [r.flipped_fitted for i, j in cells for r in self.runs[i][j]]
        return _fraction(fitted, [r.flipped for i, j in cells for r in self.runs[i][j]])

    def curves(self, cell: Cell) -> list[Trajectory]:
        """Each seed's tracked coefficients in ``cell`` (empty lists where none were tracked)."""
        i, j = cell
        return [r.trajectory for r in self.runs[i][j]]

    def extended(self, more: list[list[list[TrainedCNN]]]) -> Arm:
        """The same setting with the runs of more seeds appended to every cell."""
        runs = [[cell + extra for cell, extra in zip(row, more_row)] for row, more_row in zip(self.runs, more)]
        return Arm(self.rho, self.lr, self.steps, runs)


def _fraction(fitted: Sequence[int], flipped: Sequence[int]) -> float:
    total = sum(flipped)
    return sum(fitted) / total if total else math.nan


def paired(first: Arm, second: Arm, key: str, cells: Sequence[Cell]) -> list[float]:
    """Seed by seed, ``first``'s mean of one measure over ``cells`` minus ``second``'s (both trained on the same
    seeds in the same order: the values ``paired_difference`` takes)."""
    return [a - b for a, b in zip(first.per_seed(key, cells), second.per_seed(key, cells), strict=True)]
