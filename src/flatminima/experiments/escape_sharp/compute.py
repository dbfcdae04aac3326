"""The runs of ``escape-sharp``: every row from the same sharp minimum, ``ahn-sa`` at other batch sizes, the
closed-form reference points and the exact-interpolation check, gathered in one typed result. Only computes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flatminima.experiments.escape_sharp.algorithms import SETTINGS, Run, Settings, exact_interpolation, run_algorithm
from flatminima.experiments.escape_sharp.problem import PROBLEM, Problem, dense_hessian, loss_at_start, make_problem
from flatminima.experiments.reproduce import Context

__all__ = [
    "FULL_STEPS",
    "QUICK_STEPS",
    "EscapeSharpResult",
    "References",
    "Variant",
    "compute",
    "references",
    "variants",
]

#: Steps of every run: the full reproduction, and ``--quick``.
FULL_STEPS, QUICK_STEPS = 6000, 2000


@dataclass(frozen=True)
class Variant:
    """One row: an algorithm with its settings; ``seeded`` runs once per seed (the random algorithms)."""

    label: str
    algorithm: str
    settings: Settings = SETTINGS
    batch_size: int = 1
    seeded: bool = True


def variants(n: int) -> tuple[list[Variant], list[Variant]]:
    """The main rows, and the batch-size rows of ``ahn-sa`` (batch 1 is the main ``ahn-sa`` row)."""
    main = [
        Variant("GD", "GD", seeded=False),
        Variant("SAM", "SAM", seeded=False),
        Variant("ahn-rs", "ahn-rs"),
        Variant("ahn-sa", "ahn-sa"),
        Variant("ahn-rs, eta' x 8", "ahn-rs", Settings(SETTINGS.lr, SETTINGS.rho, 8 * SETTINGS.eta_prime)),
        Variant("ahn-sa, epsilon 1e-3", "ahn-sa", Settings(SETTINGS.lr, SETTINGS.rho, SETTINGS.eta_prime, 1e-3)),
    ]
    batch = [Variant(f"ahn-sa, batch {b}", "ahn-sa", batch_size=b) for b in (3, n)]
    return main, batch


@dataclass(frozen=True)
class References:
    """The points that are not runs: the sharp start (measured on its dense Hessian) and the two closed-form
    minima, the flattest in trace (``R = 0``, ``||w2|| = a*``) and the one of smallest ``lambda_max`` (``R = 0``,
    its own scale, along the start's direction ``q``)."""

    trace_start: float  # tr of the dense Hessian at the start
    lambda_max_start: float
    smallest_curvature_start: float  # the smallest eigenvalue above 1e-9
    loss_start: float
    distance_start: float  # to the flattest minima
    trace_off_balance_start: float  # tr(R Sigma R^T)
    trace_min: float  # tr(H) of the flattest minima
    flattest_scale: float  # a*
    lambda_max_at_flattest: float
    lambda_max_min: float  # the smallest lambda_max over the minima
    lambda_max_min_scale: float  # the ||w2|| where it is reached
    trace_at_lambda_min: float
    distance_at_lambda_min: float  # from that minimum to the flattest minima


@dataclass(frozen=True)
class EscapeSharpResult:
    """Everything ``escape-sharp`` measured: the runs of each row and each batch size, by label and by size (batch
    1 is the main ``ahn-sa`` row), the reference points and the displacements from an exactly interpolating
    minimum, by algorithm."""

    problem: Problem
    quick: bool
    steps: int
    main: list[Variant]
    batch: list[Variant]
    runs: dict[str, list[Run]]
    batch_runs: dict[int, list[Run]]
    references: References
    exact_interpolation: dict[str, float]

    @property
    def examples(self) -> int:
        """``n``, the number of examples (the largest batch)."""
        return int(self.problem.inputs.shape[0])


def _runs(ctx: Context, problem: Problem, variant: Variant, steps: int) -> list[Run]:
    seeds = ctx.seeds if variant.seeded else ctx.seeds[:1]
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        result = run_algorithm(problem, variant.algorithm, variant.settings, steps, seed, variant.batch_size)
        runs.append(result)
        ctx.progress(
            f"escape-sharp: {variant.label}, seed {seed}: tr(H) {result.trace[0]:.4g} -> {result.trace[-1]:.4g} "
            f"in {steps} steps ({time.perf_counter() - started:.1f} s)"
        )
    return runs


def references(problem: Problem) -> References:
    """The start's dense-Hessian measurements and the closed-form minima of ``problem``."""
    start_hessian = dense_hessian(problem, problem.w2_start, problem.W1_start)
    lambda_min, lambda_scale = problem.lambda_max_min()
    q = problem.w2_start / torch.linalg.vector_norm(problem.w2_start)
    at_lambda_min = (lambda_scale * q, torch.outer(q, problem.beta) / lambda_scale)
    eigenvalues = torch.linalg.eigvalsh(start_hessian)
    return References(
        trace_start=float(torch.trace(start_hessian)),
        lambda_max_start=float(eigenvalues[-1]),
        smallest_curvature_start=float(min(v for v in eigenvalues if v > 1e-9)),
        loss_start=loss_at_start(problem),
        distance_start=problem.distance_to_flattest(problem.w2_start, problem.W1_start),
        trace_off_balance_start=problem.trace_off_balance(problem.w2_start, problem.W1_start),
        trace_min=problem.trace_min,
        flattest_scale=problem.flattest_scale,
        lambda_max_at_flattest=problem.lambda_max_at_minimum(problem.flattest_scale),
        lambda_max_min=lambda_min,
        lambda_max_min_scale=lambda_scale,
        trace_at_lambda_min=problem.trace(*at_lambda_min),
        distance_at_lambda_min=problem.distance_to_flattest(*at_lambda_min),
    )


def compute(ctx: Context) -> EscapeSharpResult:
    """Every row from the same sharp minimum, the same number of steps at the same learning rate: GD and SAM once
    (deterministic), the random algorithms once per seed; then ``ahn-sa`` with its extra passes on 3 and on all
    examples; then the reference points and the exact-interpolation check."""
    problem = make_problem(**PROBLEM)
    steps = QUICK_STEPS if ctx.quick else FULL_STEPS
    main, batch = variants(int(problem.inputs.shape[0]))
    runs = {v.label: _runs(ctx, problem, v, steps) for v in main}
    batch_runs = {1: runs["ahn-sa"]} | {v.batch_size: _runs(ctx, problem, v, steps) for v in batch}
    return EscapeSharpResult(
        problem=problem,
        quick=ctx.quick,
        steps=steps,
        main=main,
        batch=batch,
        runs=runs,
        batch_runs=batch_runs,
        references=references(problem),
        exact_interpolation=exact_interpolation(),
    )
