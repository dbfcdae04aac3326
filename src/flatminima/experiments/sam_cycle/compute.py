"""The reproduction's runs: the sweep of ``eta lambda_1`` and ``rho`` over one random quadratic per seed, and the
2-d ravine the trajectory figure shows, gathered in a ``SamCycleResult`` (no text, no figures)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.experiments.sam_cycle.measure import RunRecord, one_run
from flatminima.experiments.sam_cycle.quadratic import run_sam

__all__ = ["DIM", "Ravine", "SamCycleResult", "compute", "ravine"]

DIM = 10  # the quadratics' dimension


@dataclass(frozen=True)
class Ravine:
    """SAM on the 2-d ravine ``diag(1, 0.15)`` from ``(0.3, 2.2)``: the iterates ``(steps + 1, 2)`` at
    ``eta``, ``rho``, to draw the bounce across it."""

    eta: float
    rho: float
    curvatures: tuple[float, float]
    trajectory: Tensor


@dataclass(frozen=True)
class SamCycleResult:
    """The sweep's settings and one ``RunRecord`` per (seed, eta lambda_1, rho), seed-major; the ravine."""

    dim: int
    steps: int
    seeds: tuple[int, ...]
    etas: tuple[float, ...]  # the eta lambda_1 values
    rhos: tuple[float, ...]
    records: list[RunRecord]
    ravine: Ravine

    def cell(self, x: float, rho: float) -> list[RunRecord]:
        """The records (one per seed) at ``eta lambda_1 = x`` and ``rho``."""
        return [r for r in self.records if r.eta_lambda1 == x and r.rho == rho]


def ravine(eta: float = 1.6, rho: float = 0.3, steps: int = 150) -> Ravine:
    """A 2-d ravine (lambda = 1 and 0.15): the SAM iterates bounce across the minimum along u_1."""
    curvatures = (1.0, 0.15)
    hessian = torch.diag(torch.tensor(curvatures, dtype=torch.float64))
    trajectory = run_sam(hessian, torch.tensor([0.3, 2.2], dtype=torch.float64), eta, rho, steps)
    return Ravine(eta=eta, rho=rho, curvatures=curvatures, trajectory=trajectory)


def compute(quick: bool, seeds: Sequence[int], progress: Callable[[str], None] = print) -> SamCycleResult:
    """Sweep ``eta lambda_1`` and ``rho`` over random quadratics (one per seed): quick, 1,500 steps at
    ``eta lambda_1`` in {0.2, 1} and rho 0.05; full, 4,000 steps at {0.1, 0.5, 1, 1.5} x {0.01, 0.05, 0.2}."""
    steps = 1500 if quick else 4000
    etas = (0.2, 1.0) if quick else (0.1, 0.5, 1.0, 1.5)
    rhos = (0.05,) if quick else (0.01, 0.05, 0.2)
    records = []
    for seed in seeds:
        for x in etas:
            for rho in rhos:
                records.append(one_run(seed, x, rho, DIM, steps))
        progress(f"sam-cycle: quadratic seed {seed} done ({len(etas) * len(rhos)} runs)")
    return SamCycleResult(
        dim=DIM, steps=steps, seeds=tuple(seeds), etas=etas, rhos=rhos, records=records, ravine=ravine()
    )
