"""The runs: choose the settings on the held-out seeds, then train the chosen ones (and every radius of the grid)
over ``(||mu||, d)`` and the reported seeds.

``compute`` trains and measures and returns a ``CnnDataModelResult``; it draws and formats nothing (the
report does, ``flatminima.experiments.cnn_data_model.report``). The runs go through worker processes, one cell
of one seed a job (``_train_cell``), each in one thread: a step is microseconds of maths, so a second thread in
one run only adds overhead, and the runs of one job share their draw of the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from flatminima.experiments.cnn_data_model.problem import STEPS, Setting, make_data
from flatminima.experiments.cnn_data_model.regions import Arm, Cell, boundary_constant, paired
from flatminima.experiments.cnn_data_model.selection import (
    BUDGETS,
    LR_GRID,
    RHO_GRID,
    SELECTION_SEEDS,
    SGD_CHECKPOINTS,
    Selection,
    choose_lr,
    select,
)
from flatminima.experiments.cnn_data_model.training import TrainedCNN, train_checkpoints
from flatminima.experiments.protocol import MORE_SEEDS, SEEDS, Budget, disjoint_seeds, needs_more_seeds
from flatminima.experiments.reproduce import Context
from flatminima.worker_pool import worker_pool

__all__ = [
    "FULL_DIMS",
    "FULL_SIGNAL_NORMS",
    "QUICK_DIMS",
    "QUICK_SIGNAL_NORMS",
    "TRACKED",
    "TRACK_EVERY",
    "CnnDataModelResult",
    "compute",
]

TRACK_EVERY = 5  # steps between two records of the coefficients in the tracked cell
FULL_SIGNAL_NORMS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0)
FULL_DIMS = (100, 300, 500, 700, 900, 1100)
QUICK_SIGNAL_NORMS = (2.0, 7.0)
QUICK_DIMS = (300, 900)
TRACKED = (2.0, 900)  # (||mu||, d): where the coefficients are tracked over training; in both grids

#: one run of a job: ``(rho, lr, steps)``, ``rho=None`` for gradient descent
Run = tuple[float | None, float, int]
#: a job's runs, measured after each checkpoint: ``(seed, i, j, rho, lr) -> [TrainedCNN per checkpoint]``
Found = dict[tuple[int, int, int, float | None, float], list[TrainedCNN]]


@dataclass(frozen=True)
class CnnDataModelResult:
    """The grid's axes, the reported seeds (``seeds``; ``more_seeds``: whether ``MORE_SEEDS`` were added
    because a difference was within two standard errors of zero), what the
    held-out seeds chose (``selection``), SGD's arm at its chosen learning rate per budget, SAM's arm at every
    radius of the grid (by rho, in the grid's order; the chosen one is ``chosen``), and SGD's boundary
    constant at equal steps."""

    seeds: tuple[int, ...]
    more_seeds: bool
    signal_norms: tuple[float, ...]
    dims: tuple[int, ...]
    selection: Selection
    sgd: dict[Budget, Arm]
    sam: dict[float, Arm]
    boundary_constant: float

    @property
    def chosen(self) -> Arm:
        """SAM at the radius the held-out seeds chose."""
        return self.sam[self.selection.rho]

    @property
    def cells(self) -> int:
        return len(self.dims) * len(self.signal_norms)

    @property
    def tracked(self) -> Cell:
        """The index ``(i, j)`` of the tracked cell, ``TRACKED``."""
        return self.dims.index(TRACKED[1]), self.signal_norms.index(TRACKED[0])


@dataclass(frozen=True)
class _Job:
    """The runs of one cell of one seed, on one draw of the data."""

    signal_norm: float
    dim: int
    seed: int
    index: Cell
    runs: tuple[Run, ...]
    track_every: int

    @property
    def cost(self) -> float:
        """Roughly its seconds: a SAM step costs about three of SGD's, and a step grows with ``d``."""
        return sum(steps * (3 if rho is not None else 1) for rho, _, steps in self.runs) * (200 + self.dim)


def _train_cell(job: _Job) -> list[list[TrainedCNN]]:
    """Train a job's runs (in a worker: one thread), each measured after ``STEPS`` steps and at its end."""
    torch.set_num_threads(1)
    data = make_data(job.signal_norm, job.dim, job.seed)
    return [
        train_checkpoints(Setting(job.signal_norm, job.dim, job.seed, rho, lr, steps), data, job.track_every, (STEPS,))
        for rho, lr, steps in job.runs
    ]


def _run(jobs: Sequence[_Job], pool: Executor | None, say: Callable[[str], None], stage: str) -> Found:
    """Every job's runs, in the pool (the longest first) or here when there is none."""
    found: Found = {}

    def keep(job: _Job, results: list[list[TrainedCNN]]) -> None:
        for (rho, lr, _), measured in zip(job.runs, results, strict=True):
            found[(job.seed, *job.index, rho, lr)] = measured

    ordered = sorted(jobs, key=lambda job: -job.cost)
    if pool is None:
        threads = torch.get_num_threads()
        try:
            for job in ordered:
                keep(job, _train_cell(job))
        finally:
            torch.set_num_threads(threads)
    else:
        futures = {pool.submit(_train_cell, job): job for job in ordered}
        for done, future in enumerate(as_completed(futures), 1):
            keep(futures[future], future.result())
            if done % max(1, len(jobs) // 4) == 0 or done == len(jobs):
                say(f"cnn-data-model: {stage}: {done}/{len(jobs)} cells trained")
    return found


def _arm(found: Found, rho: float | None, lr: float, steps: int, seeds: Sequence[int], shape: Cell) -> Arm:
    """The arm of one setting from the runs found, measured after ``steps`` steps."""

    def at(measured: list[TrainedCNN]) -> TrainedCNN:
        return next(r for r in measured if r.steps == steps)

    runs = [[[at(found[(seed, i, j, rho, lr)]) for seed in seeds] for j in range(shape[1])] for i in range(shape[0])]
    return Arm(rho, lr, steps, runs)


def _jobs(
    seeds: Iterable[int], norms: Sequence[float], dims: Sequence[int], runs: tuple[Run, ...], track: bool
) -> list[_Job]:
    """One job per cell and seed; the tracked cell's runs record their coefficients when ``track``."""
    return [
        _Job(norm, dim, seed, (i, j), runs, TRACK_EVERY if track and (norm, dim) == TRACKED else 0)
        for seed in seeds
        for i, dim in enumerate(dims)
        for j, norm in enumerate(norms)
    ]


def _reported_runs(lr: dict[Budget, float]) -> tuple[Run, ...]:
    """The runs of a reported seed: SGD at each budget's chosen learning rate (one run when both chose the same:
    its measure after ``STEPS`` steps is the equal-steps run) and SAM at every radius, at SGD's equal-steps
    learning rate."""
    longest = SGD_CHECKPOINTS[Budget.EQUAL_EVALUATIONS]
    sgd = {lr[Budget.EQUAL_EPOCHS]: STEPS, lr[Budget.EQUAL_EVALUATIONS]: longest}
    if lr[Budget.EQUAL_EPOCHS] == lr[Budget.EQUAL_EVALUATIONS]:
        sgd = {lr[Budget.EQUAL_EPOCHS]: longest}
    sam = tuple((float(s["rho"]), lr[Budget.EQUAL_EPOCHS], STEPS) for s in RHO_GRID.settings)
    return tuple((None, rate, steps) for rate, steps in sgd.items()) + sam


def compute(ctx: Context, workers: int | None = None) -> CnnDataModelResult:
    """Choose SGD's learning rate (per budget) and SAM's radius on ``SELECTION_SEEDS``, then train SGD and SAM
    at every radius over the grid and the reported seeds (``ctx.seeds``; ``MORE_SEEDS`` when they are
    ``SEEDS`` and SAM's paired difference with SGD where SGD is harmful is within two standard errors of zero).

    ``workers`` processes train at once (default: one per CPU core); the results do not depend on it.
    """
    seeds = tuple(ctx.seeds)
    disjoint_seeds(seeds, SELECTION_SEEDS)
    norms = QUICK_SIGNAL_NORMS if ctx.quick else FULL_SIGNAL_NORMS
    dims = QUICK_DIMS if ctx.quick else FULL_DIMS
    shape = (len(dims), len(norms))
    workers = max(1, workers or os.cpu_count() or 1)
    longest = SGD_CHECKPOINTS[Budget.EQUAL_EVALUATIONS]
    lrs = [float(s["lr"]) for s in LR_GRID.settings]
    with worker_pool(workers) if workers > 1 else nullcontext() as pool:
        # 1. SGD's learning rates on the held-out seeds, both budgets from the same runs
        sgd_runs = tuple((None, lr, longest) for lr in lrs)
        held_sgd = _run(_jobs(SELECTION_SEEDS, norms, dims, sgd_runs, False), pool, ctx.progress, "choosing SGD's lr")
        sgd_arms = {
            b: [_arm(held_sgd, None, lr, SGD_CHECKPOINTS[b], SELECTION_SEEDS, shape) for lr in lrs] for b in BUDGETS
        }
        _, lr = choose_lr(sgd_arms)
        # 2. SAM's radii on the held-out seeds at SGD's equal-steps rate, and every reported run (they need no rho)
        sam_runs = tuple((float(s["rho"]), lr[Budget.EQUAL_EPOCHS], STEPS) for s in RHO_GRID.settings)
        reported = _reported_runs(lr)
        found = _run(
            _jobs(SELECTION_SEEDS, norms, dims, sam_runs, False) + _jobs(seeds, norms, dims, reported, True),
            pool,
            ctx.progress,
            f"choosing SAM's rho, and the reported seeds {list(seeds)}",
        )
        sam_held = [_arm(found, rho, rate, steps, SELECTION_SEEDS, shape) for rho, rate, steps in sam_runs]
        selection = select(sgd_arms, sam_held, SELECTION_SEEDS)
        more = seeds == SEEDS and _too_close(found, selection, seeds, shape)
        if more:
            extra = MORE_SEEDS[len(SEEDS) :]
            found |= _run(_jobs(extra, norms, dims, reported, True), pool, ctx.progress, f"more seeds {list(extra)}")
            seeds = MORE_SEEDS
    sgd = {b: _arm(found, None, selection.lr[b], SGD_CHECKPOINTS[b], seeds, shape) for b in BUDGETS}
    sam = {rho: _arm(found, rho, rate, steps, seeds, shape) for rho, rate, steps in sam_runs}
    return CnnDataModelResult(
        seeds=seeds,
        more_seeds=more,
        signal_norms=tuple(norms),
        dims=tuple(dims),
        selection=selection,
        sgd=sgd,
        sam=sam,
        boundary_constant=boundary_constant(sgd[Budget.EQUAL_EPOCHS].thresholds(norms), dims),
    )


def _too_close(found: Found, selection: Selection, seeds: Sequence[int], shape: Cell) -> bool:
    """Whether SAM's paired difference with SGD where SGD is harmful, at either budget, is within two standard
    errors of zero (``needs_more_seeds``)."""
    lr = selection.lr
    sam = _arm(found, selection.rho, lr[Budget.EQUAL_EPOCHS], STEPS, seeds, shape)
    for budget in BUDGETS:
        cells = selection.sgd_harmful[budget]
        if cells:
            sgd = _arm(found, None, lr[budget], SGD_CHECKPOINTS[budget], seeds, shape)
            if needs_more_seeds(paired(sam, sgd, "test_error", cells)):
                return True
    return False
