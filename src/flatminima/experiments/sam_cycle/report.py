"""From a ``SamCycleResult`` to the runner's ``Outcome``: the table, the commentary, results.json and
the figures. The sentences that state what the runs showed are chosen from their records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.figures import saved_figure
from flatminima.experiments.protocol import Claim, within
from flatminima.experiments.reproduce import Context, Outcome
from flatminima.experiments.sam_cycle.compute import SamCycleResult
from flatminima.experiments.sam_cycle.measure import RunRecord
from flatminima.experiments.summary import mean

__all__ = ["beyond_the_theorem", "claims", "outcome", "slowest_sentence"]


def beyond_the_theorem(records: Sequence[RunRecord], tolerance: float = 1e-6) -> str:
    """What the runs past the theorem's step size (eta lambda_1 >= 0.5) showed, from their records: whether every
    one settled into the cycle (amplitude within ``tolerance`` of c, the sign alternating)."""
    beyond = [r for r in records if r.eta_lambda1 >= 0.5]
    if not beyond:
        return "this run has no step size past that bound (the full run has eta lambda_1 = 1 and 1.5)."
    values = " and ".join(f"{x:g}" for x in sorted({r.eta_lambda1 for r in beyond}))
    settled = all(r.amplitude_rel_error <= tolerance and r.sign_alternates for r in beyond)
    worst = max(r.amplitude_rel_error for r in beyond)
    if settled:
        return (
            f"the runs with eta lambda_1 = {values} settle into the same cycle (amplitude error {worst:.1e} at "
            "most), as the linearisation predicts (|f_i| < 1 for every eta lambda_1 < 2)."
        )
    return (
        f"of the runs with eta lambda_1 = {values}, not all settle into the cycle (amplitude error up to "
        f"{worst:.1e}), against the linearisation's prediction (|f_i| < 1 for every eta lambda_1 < 2)."
    )


def slowest_sentence(records: Sequence[RunRecord], dim: int) -> str:
    """Which coordinate decays slowest: the flattest (coordinate ``dim``, in descending lambda) in every run, or
    which it was in the runs where it was not."""
    others = [r for r in records if r.slowest_coordinate != dim]
    if not others:
        return "The slowest is the flattest direction (f_i -> 1 - eta lambda_i as lambda_i -> 0), not lambda_2."
    where = ", ".join(
        f"coordinate {r.slowest_coordinate} at eta lambda_1 = {r.eta_lambda1:g}, rho = {r.rho:g}, seed {r.seed}"
        for r in others
    )
    return (
        "The slowest is the flattest direction (f_i -> 1 - eta lambda_i as lambda_i -> 0) in "
        f"{len(records) - len(others)} of {len(records)} runs, but not in the others ({where}; |f_i| -> 1 also as "
        "lambda_i -> lambda_1)."
    )


def _rows(result: SamCycleResult) -> list[list[str]]:
    """One row per (eta lambda_1, rho): the seeds' mean or worst of each measured number."""
    rows = []
    for x in result.etas:
        for rho in result.rhos:
            cell = result.cell(x, rho)
            decays = [r for r in cell if not math.isnan(r.decay_measured)]
            errors = [r.decay_max_abs_error for r in cell if not math.isnan(r.decay_max_abs_error)]
            rows.append(
                [
                    f"{x:g}",
                    f"{rho:g}",
                    f"{mean([r.c_predicted for r in cell]):.6g}",
                    f"{max(r.amplitude_rel_error for r in cell):.1e}",
                    "yes" if all(r.sign_alternates for r in cell) else "no",
                    f"{max(r.others_norm_final for r in cell):.1e}",
                    f"{mean([r.decay_predicted for r in cell]):.4f}",
                    f"{mean([r.decay_measured for r in decays]):.4f}" if decays else "n/a",
                    f"{max(errors):.1e}" if errors else "n/a",
                ]
            )
    return rows


def _plot_trajectory(ctx: Context, result: SamCycleResult) -> Path:
    """The 2-d ravine: the SAM iterates bounce across the minimum along u_1, the other coordinate dies out."""
    ravine = result.ravine
    trajectory, eta, rho = ravine.trajectory, ravine.eta, ravine.rho
    sharp, flat = ravine.curvatures
    c = two_cycle_amplitude(eta, rho, sharp)
    grid_x, grid_y = torch.meshgrid(torch.linspace(-2.5, 2.5, 200), torch.linspace(-0.5, 2.5, 200), indexing="xy")
    loss = 0.5 * (sharp * grid_x**2 + flat * grid_y**2)
    path = ctx.figure_path("trajectory.png")
    with saved_figure(path, 1, 2, size=(10, 4)) as (_, (left, right)):
        left.contour(grid_x, grid_y, loss, levels=20, linewidths=0.5, colors="grey")
        left.plot(trajectory[:, 0], trajectory[:, 1], "-o", markersize=2, linewidth=0.7, label="SAM iterates")
        left.plot([c, -c], [0, 0], "r*", markersize=10, label=f"2-cycle +-c, c = {c:.4f}")
        left.set_xlabel(f"u_1 (sharp, lambda = {sharp:g})")
        left.set_ylabel(f"u_2 (flat, lambda = {flat:g})")
        left.set_title(f"SAM bounces across the ravine (eta = {eta}, rho = {rho})")
        left.legend(fontsize=8)
        right.semilogy(trajectory[:, 0].abs(), label="|w . u_1|")
        right.semilogy(trajectory[:, 1].abs().clamp_min(1e-300), label="|w . u_2|")
        right.axhline(c, color="r", linestyle="--", linewidth=0.8, label="c (predicted)")
        right.set_ylim(1e-17, 10)
        right.set_xlabel("step")
        right.set_title("the top coordinate settles at c, the other dies out")
        right.legend(fontsize=8)
    return path


def _plot_amplitudes(ctx: Context, records: Sequence[RunRecord]) -> Path:
    """Measured amplitude against c, and the slowest coordinate's measured decay against |f_i|."""
    path = ctx.figure_path("amplitude_and_decay.png")
    with saved_figure(path, 1, 2, size=(10, 4)) as (_, (left, right)):
        predicted = [r.c_predicted for r in records]
        left.loglog(predicted, [r.amplitude_measured for r in records], "o", markersize=4)
        span = [min(predicted) / 1.5, max(predicted) * 1.5]
        left.loglog(span, span, "k--", linewidth=0.8, label="measured = predicted")
        left.set_xlabel("c = eta rho lambda_1 / (2 - eta lambda_1)")
        left.set_ylabel("measured amplitude |w . u_1|")
        left.legend(fontsize=8)
        decays = [r for r in records if not math.isnan(r.decay_measured)]
        right.plot([r.decay_predicted for r in decays], [r.decay_measured for r in decays], "o", markersize=4)
        right.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        right.set_xlabel("|f_i| predicted (linearised around the cycle)")
        right.set_ylabel("measured decay factor of the slowest coordinate")
    return path


#: the verdicts' tolerances: the amplitude is a closed form (float64 rounding is ~1e-15); the decay factors come from
#: a linearisation, measured as a geometric mean over the steps where it holds to 1e-3
AMPLITUDE_TOLERANCE = 1e-9
DECAY_TOLERANCE = 1e-2


def claims(records: Sequence[RunRecord]) -> list[Claim]:
    """The theorem's claim (eta lambda_1 < 1/2: the 2-cycle of amplitude c, the sign alternating) and the
    linearisation's (the other coordinates decay by |f_i|), each against its tolerance."""
    within_theorem = [r for r in records if r.eta_lambda1 < 0.5]
    worst = max((r.amplitude_rel_error for r in within_theorem), default=math.nan)
    if not all(r.sign_alternates for r in within_theorem):
        worst = math.inf
    decays = [r.decay_max_abs_error for r in records if not math.isnan(r.decay_max_abs_error)]
    decay = max(decays, default=math.nan)
    return [
        Claim(
            statement="full-batch normalised SAM on a quadratic with eta lambda_1 < 1/2 settles into a 2-cycle of "
            "amplitude c along the top eigenvector",
            measured=f"largest relative amplitude error {worst:.1e} over {len(within_theorem)} runs",
            rule=f"SUPPORTS if every run's amplitude is within {AMPLITUDE_TOLERANCE:g} of c (relative) with the sign "
            "alternating, CONTRADICTS otherwise",
            verdict=within(worst, AMPLITUDE_TOLERANCE),
        ),
        Claim(
            statement="the other coordinates decay by the factor |f_i| of the update linearised around the cycle",
            measured=f"largest absolute error of a measured decay factor {decay:.1e} ({len(decays)} runs)",
            rule=f"SUPPORTS if within {DECAY_TOLERANCE:g}, CONTRADICTS otherwise (INCONCLUSIVE when none measurable)",
            verdict=within(decay, DECAY_TOLERANCE),
        ),
    ]


def outcome(result: SamCycleResult, ctx: Context) -> Outcome:
    """The table (one row per eta lambda_1 and rho), results.json, the commentary and the two figures."""
    records = result.records
    worst = max(r.amplitude_rel_error for r in records)
    figures = [_plot_trajectory(ctx, result), _plot_amplitudes(ctx, records)]
    report = f"""
Each row is {len(result.seeds)} random quadratic(s) in {result.dim} dimensions (lambda_1 = 1, the rest log-uniform in
[0.05, 0.95]), started from a random point and run {result.steps} steps of `SAM(SGD(lr=eta), rho)` in float64. The
amplitude is |w . u_1| at the last step against c; "others" is the norm of the remaining coordinates at the last
step. The decay factor of each other coordinate is measured as the geometric mean of |x_(t+1) / x_t| over the
steps where the top coordinate is within 1e-3 of c and that coordinate is between 1e-13 c and 1e-3 c (not
measurable where it died before the top coordinate settled), and predicted by linearising the update around the
cycle: `f_i = 1 - eta lambda_i - (lambda_i / lambda_1)^2 (2 - eta lambda_1)` (derived in `docs/reproductions.md`).
{slowest_sentence(records, result.dim)}

Worst relative amplitude error over all {len(records)} runs: {worst:.1e}. The paper proves the cycle for
eta < 1 / (2 lambda_1) (eta lambda_1 < 0.5); {beyond_the_theorem(records)}
"""
    decay_errors = [r.decay_max_abs_error for r in records if not math.isnan(r.decay_max_abs_error)]
    return Outcome(
        claims=claims(records),
        headers=[
            "eta lambda_1",
            "rho",
            "c (predicted)",
            "amplitude rel. error (max)",
            "sign alternates",
            "other coords at end (max)",
            "slowest decay, predicted",
            "slowest decay, measured",
            "decay error, all coords (max)",
        ],
        rows=_rows(result),
        results={
            "dim": result.dim,
            "steps": result.steps,
            "max_amplitude_rel_error": worst,
            "max_others_norm_final": max(r.others_norm_final for r in records),
            "max_decay_abs_error": max(decay_errors, default=None),
            "runs": [r.as_dict() for r in records],
        },
        report=report,
        figures=figures,
        caption="Measured 2-cycle amplitude against the closed form c, and the decay of the other coordinates.",
    )
