"""The report: from a ``CnnDataModelResult`` to the table, the
claims, the text (every outcome in it read off the result), ``results.json`` and the figures."""

from __future__ import annotations

import math
import statistics
from typing import Any

from flatminima.experiments.cnn_data_model.compute import TRACKED, CnnDataModelResult
from flatminima.experiments.cnn_data_model.plots import (
    FIT_MARKS,
    cell_marks,
    draws_boundary,
    plot_maps,
    plot_selection,
    plot_trajectories,
)
from flatminima.experiments.cnn_data_model.problem import FLIP_PROB, INIT_STD, N_TEST, N_TRAIN, NOISE_STD, STEPS, WIDTH
from flatminima.experiments.cnn_data_model.regions import (
    BENIGN_MARGIN,
    NEVER_FITS_BELOW,
    OVERFITS_FROM,
    Arm,
    Decided,
    Fit,
)
from flatminima.experiments.cnn_data_model.selection import BUDGETS, LR_GRID, RHO_GRID, SELECTION_SEEDS
from flatminima.experiments.cnn_data_model.verdicts import budget_name, claims, fit_row
from flatminima.experiments.protocol import Budget
from flatminima.experiments.reproduce import Context, Outcome
from flatminima.experiments.summary import mean

__all__ = ["boundary_phrase", "caption", "edge_phrase", "fit_counts", "report"]

_BUDGET_KEYS = {Budget.EQUAL_EPOCHS: "equal_steps", Budget.EQUAL_EVALUATIONS: "equal_evaluations"}


def _arms(result: CnnDataModelResult) -> dict[str, Arm]:
    """Every arm by its key in ``results.json``: SGD per budget, then SAM per radius."""
    arms = {f"sgd_{_BUDGET_KEYS[b]}": result.sgd[b] for b in BUDGETS}
    return arms | {f"sam_rho{rho:g}": arm for rho, arm in result.sam.items()}


def _score(result: CnnDataModelResult, key: str, arm: Arm) -> float:
    """The arm's held-out score, the number that chose (or would have chosen) it."""
    selection = result.selection
    if arm.rho is None:
        budget = next(b for b in BUDGETS if key.endswith(_BUDGET_KEYS[b]))
        return selection.sgd_scores[budget][[s["lr"] for s in LR_GRID.settings].index(arm.lr)]
    return selection.sam_scores[[s["rho"] for s in RHO_GRID.settings].index(arm.rho)]


def _row(result: CnnDataModelResult, key: str, arm: Arm) -> list[Any]:
    """One arm's table row."""
    harmful = result.selection.sgd_harmful[Budget.EQUAL_EPOCHS]
    fit = fit_row(arm)
    chosen = arm.rho is not None and arm.rho == result.selection.rho
    decided = [arm.decided_count(d) for d in (Decided.BENIGN, Decided.UNDECIDED, Decided.HARMFUL)]
    return [
        arm.label + (" (chosen)" if chosen else ""),
        _score(result, key, arm),
        f"{arm.benign_count}/{result.cells}",
        "/".join(map(str, decided)),
        mean([arm.test_error[i][j] for i, j in harmful]) if harmful else math.nan,
        mean([r.train_error for r in arm.all_runs()]),
        fit.fraction,
        fit.fit.value,
    ]


def fit_counts(arm: Arm) -> dict[str, int]:
    """How many of the arm's benign cells it fits the flipped labels in (by the letters of the maps)."""
    marks = [m.rstrip("?") for row in cell_marks(arm) for m in row if m.rstrip("?")]
    return {fit.value: marks.count(FIT_MARKS[fit]) for fit in FIT_MARKS}


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
    """The caption: what was chosen where, and what the table compares."""
    selection = result.selection
    return (
        f"SGD (lr chosen per budget) against SAM (rho chosen, {len(RHO_GRID)} radii) on the (||mu||, d) grid: "
        f"settings chosen on the held-out seeds {list(selection.seeds)}, everything else measured on the reported "
        f"seeds {list(result.seeds)}. Chosen: SGD lr {selection.lr[Budget.EQUAL_EPOCHS]:g} (equal steps) and "
        f"{selection.lr[Budget.EQUAL_EVALUATIONS]:g} (equal gradient evaluations), SAM rho {selection.rho:g}."
    )


def edge_phrase(result: CnnDataModelResult) -> str:
    """What the text says when a chosen setting lies at an end of its grid (the grid may not bracket the best)."""
    selection = result.selection
    ends = []
    rhos = [s["rho"] for s in RHO_GRID.settings]
    if selection.rho in (rhos[0], rhos[-1]):
        ends.append(f"SAM's rho {selection.rho:g}")
    lrs = [s["lr"] for s in LR_GRID.settings]
    edges = (lrs[0], lrs[-1])
    ends += [f"SGD's lr {selection.lr[b]:g} ({budget_name(b)})" for b in BUDGETS if selection.lr[b] in edges]
    if not ends:
        return "Every chosen setting lies inside its grid."
    return (
        f"At an end of its grid: {'; '.join(ends)}. The held-out error may fall further beyond it; the grids are "
        "fixed before the run (SAM's is the SAM paper's) and are not extended after it."
    )


def _selection_table(result: CnnDataModelResult) -> str:
    """The held-out scores of every setting of both grids, the chosen ones in bold."""
    selection = result.selection
    lines = [
        "| setting | " + " | ".join(f"SGD, {budget_name(b)}" for b in BUDGETS) + " | setting | SAM |",
        "|---|" + "---:|" * len(BUDGETS) + "---|---:|",
    ]
    for index, (lr, rho) in enumerate(zip(LR_GRID.settings, RHO_GRID.settings)):
        sgd = [
            (
                f"**{selection.sgd_scores[b][index]:.4f}**"
                if lr["lr"] == selection.lr[b]
                else f"{selection.sgd_scores[b][index]:.4f}"
            )
            for b in BUDGETS
        ]
        score = selection.sam_scores[index]
        sam = f"**{score:.4f}**" if rho["rho"] == selection.rho else f"{score:.4f}"
        lines.append(f"| lr {lr['lr']:g} | " + " | ".join(sgd) + f" | rho {rho['rho']:g} | {sam} |")
    return "\n".join(lines)


def _threshold_table(result: CnnDataModelResult) -> str:
    """Per dimension, each compared arm's smallest benign ``||mu||``, and SGD's ``n ||mu||^4 / d`` there."""
    arms = [*result.sgd.values(), result.chosen]
    thresholds = [arm.thresholds(result.signal_norms) for arm in arms]
    lines = [
        "| d | " + " | ".join(f"{arm.label}: smallest benign ‖mu‖" for arm in arms) + " | SGD's n ‖mu‖^4 / d there |",
        "|---:|" + "---:|" * (len(arms) + 1),
    ]
    for i, d in enumerate(result.dims):
        first = thresholds[0][i]
        ratio = f"{N_TRAIN * first**4 / d:.3g}" if math.isfinite(first) else "n/a"
        lines.append(f"| {d} | " + " | ".join(f"{t[i]:g}" for t in thresholds) + f" | {ratio} |")
    return "\n".join(lines)


def _fit_table(result: CnnDataModelResult) -> str:
    """Per radius of the grid: where SAM is benign, how much of the flipped labels it fits, and its class."""
    lines = [
        "| optimiser | benign cells | fits >= half (O) | fits <= 10 % (N) | partly (P) | flipped labels fitted "
        "where benign, per seed | class |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for arm in [*result.sgd.values(), *result.sam.values()]:
        counts, row = fit_counts(arm), fit_row(arm)
        lines.append(
            f"| {arm.label} | {arm.benign_count} | {counts[Fit.OVERFITS_BENIGNLY.value]} | "
            f"{counts[Fit.NEVER_OVERFITS.value]} | {counts[Fit.PARTLY_OVERFITS.value]} | "
            + (f"{row.band}" if row.band else f"{row.fraction:.3g}")
            + f" | {row.fit.value} |"
        )
    return "\n".join(lines)


def _text(result: CnnDataModelResult) -> str:
    """The report's markdown: the protocol, the choice, the fit of the flipped labels, the thresholds."""
    selection, total = result.selection, result.cells
    harmful = {b: len(selection.sgd_harmful[b]) for b in BUDGETS}
    more = (
        " (seeds 3-4 were added: a paired difference was within two standard errors of zero on seeds 0-2)"
        if result.more_seeds
        else ""
    )
    return f"""
**Protocol.** Each cell is one draw of the patch data per seed (n = {N_TRAIN}, {N_TEST} test points, two patches,
sigma_p = {NOISE_STD:g}, training labels flipped with probability {FLIP_PROB:g}, test labels clean) and a
`TwoLayerCNN` (m = {WIDTH} filters per class, ReLU, fixed second layer, sigma_0 = {INIT_STD:g}) trained on the
logistic loss by full-batch gradient descent ("SGD") and by `SAM(SGD, rho)`, from the same initialisation. The
settings are chosen on the held-out seeds {list(SELECTION_SEEDS)} (fresh draws of the training and test data over
the whole grid; a validation split of n = {N_TRAIN} points would change n), scored by the error on their test
points with labels flipped like the training ones, averaged over all {total} cells: SGD's learning rate from
{[s["lr"] for s in LR_GRID.settings]} (per budget), then SAM's rho from {[s["rho"] for s in RHO_GRID.settings]}
at SGD's equal-steps learning rate (grids of equal size; the model has no weight decay). Two budgets: equal steps
(both {STEPS}) and equal gradient evaluations (SGD twice the steps, SAM computing two gradients a step). Reported
seeds: {list(result.seeds)}{more}, disjoint from the held-out ones. Every SAM radius is also trained on the reported
seeds, to show how the fit of the flipped labels depends on it.

A cell is *benign* when its mean clean test error is at most {BENIGN_MARGIN:g} (the optimum on clean labels is 0;
on labels flipped like the training ones it is p = {FLIP_PROB:g}, and an error e on clean labels reads
p + (1 - 2p) e there, so the margin is {(1 - 2 * FLIP_PROB) * BENIGN_MARGIN:.3g} above p); "by interval" counts
the cells whose 95 % interval over the seeds lies at or below the margin / straddles it / lies above it. "Where SGD
is harmful" are the cells where the chosen SGD's mean clean test error on the **held-out** seeds is above the
margin ({harmful[Budget.EQUAL_EPOCHS]} of {total} at equal steps, {harmful[Budget.EQUAL_EVALUATIONS]} at equal
evaluations; the table uses the equal-steps ones), so that the cells are not picked for SGD's bad luck on the
reported seeds. Train error and flipped labels fitted are over every run of the grid (the latter over the benign
cells). Noise memorisation is `mean_i max_r <w_(y_i,r), xi_i>` (y_i the observed label), signal learning
`mean_j max_r <w_(j,r), j mu>`.

**The choice** (held-out error; bold: chosen, the smallest, a tie to the earlier):

{_selection_table(result)}

{edge_phrase(result)}

**Never overfits, or overfits benignly.** In its benign cells, an optimiser *overfits benignly* when it fits at
least {OVERFITS_FROM:g} of the flipped training labels there (it fits them and still generalises), *never
overfits* when it fits at most {NEVER_FITS_BELOW:g} of them (it generalises without fitting them), and partly
overfits in between; the maps mark each benign cell O, N or P (- where no label of the cell's seeds was flipped):

{_fit_table(result)}

Per dimension, the smallest ||mu|| from which every stronger signal is benign (the paper's condition is
n ||mu||^4 >= C d sigma_p^4; {boundary_phrase(result)}):

{_threshold_table(result)}
"""


def _arm_results(arm: Arm) -> dict[str, Any]:
    """One arm's part of ``results.json``: its maps over the grid and its fit of the flipped labels."""
    row = fit_row(arm)
    return {
        "rho": arm.rho,
        "lr": arm.lr,
        "steps": arm.steps,
        "benign_cells": arm.benign_count,
        "benign": arm.benign,
        "decided": [[d.value for d in line] for line in arm.decided()],
        "test_error_mean": arm.test_error,
        "test_error_std": [
            [statistics.stdev([r.test_error for r in cell]) if len(cell) > 1 else 0.0 for cell in line]
            for line in arm.runs
        ],
        "train_error_mean": arm.cell_mean("train_error"),
        "flipped_fitted_fraction": arm.flipped_fraction(),
        "flipped_fitted_where_benign": row.fraction,
        "flipped_fitted_where_benign_interval95": [row.band.low, row.band.high] if row.band else None,
        "fit": row.fit.value,
        "fit_cells": fit_counts(arm),
        "noise_memorisation_mean": arm.cell_mean("noise_memorisation"),
        "signal_learning_mean": arm.cell_mean("signal_learning"),
    }


def _trajectory_mean(arm: Arm, cell: tuple[int, int]) -> list[list[float]]:
    curves = arm.curves(cell)
    if not curves or not curves[0]:
        return []
    return [
        [step, mean([run[k][1] for run in curves]), mean([run[k][2] for run in curves])]
        for k, (step, _, _) in enumerate(curves[0])
    ]


def report(result: CnnDataModelResult, ctx: Context) -> Outcome:
    """The ``Outcome``: one table row per arm, the claims, the text, ``results.json`` and the figures (the
    maps of SGD and the chosen SAM, the other radii, the tracked cell's coefficients, the held-out scores)."""
    selection, arms = result.selection, _arms(result)
    rows = [_row(result, key, arm) for key, arm in arms.items()]
    others = [arm for rho, arm in result.sam.items() if rho != selection.rho]
    figures = [
        plot_maps(ctx.figure_path("test_error_maps.png"), result, [*result.sgd.values(), result.chosen]),
        plot_maps(ctx.figure_path("rho_ablation.png"), result, others),
        plot_trajectories(ctx.figure_path("noise_memorisation.png"), result),
        plot_selection(ctx.figure_path("selection.png"), result),
    ]
    verdicts = claims(result)
    results: dict[str, Any] = {
        "signal_norms": list(result.signal_norms),
        "dims": list(result.dims),
        "grid_cells": result.cells,
        "steps": STEPS,
        "benign_margin": BENIGN_MARGIN,
        "reported_seeds": list(result.seeds),
        "more_seeds": result.more_seeds,
        "selection": {
            "seeds": list(selection.seeds),
            "score": "error on the held-out draws' test points, labels flipped like the training labels, all cells",
            "lr_grid": [s["lr"] for s in LR_GRID.settings],
            "rho_grid": [s["rho"] for s in RHO_GRID.settings],
            "sgd_held_out_error": {_BUDGET_KEYS[b]: selection.sgd_scores[b] for b in BUDGETS},
            "sam_held_out_error": selection.sam_scores,
            "lr": {_BUDGET_KEYS[b]: selection.lr[b] for b in BUDGETS},
            "rho": selection.rho,
            "sgd_harmful_cells": {_BUDGET_KEYS[b]: [list(c) for c in selection.sgd_harmful[b]] for b in BUDGETS},
            "sgd_test_error_mean": {_BUDGET_KEYS[b]: selection.sgd_test_error[b] for b in BUDGETS},
        },
        "rho": selection.rho,
        "boundary_constant_sgd": result.boundary_constant,
        "tracked": {"signal_norm": TRACKED[0], "dim": TRACKED[1]},
        "arms": {key: _arm_results(arm) for key, arm in arms.items()},
        "trajectory_mean": {key: _trajectory_mean(arm, result.tracked) for key, arm in arms.items()},
    }
    headers = [
        "optimiser",
        "held-out error",
        "benign cells",
        "benign/undecided/harmful by interval",
        "test error where SGD is harmful",
        "train error",
        "flipped labels fitted where benign",
        "fit of the flipped labels",
    ]
    return Outcome(
        headers=headers,
        rows=rows,
        results=results,
        report=_text(result),
        figures=figures,
        caption=caption(result),
        claims=verdicts,
    )
