"""``escape-sharp``'s result as the runner's ``Outcome``: the table rows,
the batch-size table, ``results.json``, the figures and the commentary (``.commentary``)."""

from __future__ import annotations

from typing import Any

from flatminima.experiments.escape_sharp.algorithms import SETTINGS, Run
from flatminima.experiments.escape_sharp.commentary import commentary
from flatminima.experiments.escape_sharp.compute import FULL_STEPS, EscapeSharpResult
from flatminima.experiments.escape_sharp.plots import plot_batch_sizes, plot_rows
from flatminima.experiments.escape_sharp.problem import PROBLEM
from flatminima.experiments.protocol import Claim, Verdict, agreement, interval, verdict
from flatminima.experiments.reproduce import Context, Outcome, markdown_table
from flatminima.experiments.summary import cell, mean, spread

__all__ = ["HEADERS", "claims", "outcome"]

HEADERS = [
    "",
    "runs",
    "tr(H) end",
    "tr(H), nearest minimum",
    "lambda_max end",
    "distance to flattest",
    "loss end (max)",
    "loss max along run",
    "perturbed steps",
]
BATCH_HEADERS = [
    "batch of the extra passes",
    "runs",
    "tr(H), nearest minimum",
    "tr(H) decrease",
    "lambda_max",
    "distance to flattest",
    "loss end (max)",
]


def _cell(values: list[float], digits: int = 4) -> str:
    """``mean ± standard deviation`` over seeds (the deviation to one digit), or the single value."""
    return cell(values, digits, spread_digits=1)


def _summary(runs: list[Run]) -> dict[str, Any]:
    """Mean, standard deviation and per-seed values of the final measurements of ``runs``."""
    finals = [r.final for r in runs]
    out: dict[str, Any] = {"runs": len(runs), "seeds": [r.seed for r in runs]}
    for key in finals[0]:
        values = [f[key] for f in finals]
        out[key] = {"mean": mean(values), "std": spread(values), "per_seed": values}
    return out


def _reference_row(label: str, trace: float, lambda_max: float, distance: float, loss: str) -> list[Any]:
    """A row that is a point, not a run: the start, or a closed-form minimum (there the minimum is the point)."""
    return [label, "", f"{trace:.4g}", f"{trace:.4g}", f"{lambda_max:.4g}", f"{distance:.3g}", loss, "", ""]


def _row(label: str, runs: list[Run]) -> list[Any]:
    """A table row: the final measurements of ``runs`` (mean ± sd over seeds; losses: the largest)."""
    finals = [r.final for r in runs]

    def values(key: str) -> list[float]:
        return [f[key] for f in finals]

    return [
        label,
        len(runs),
        _cell(values("trace")),
        _cell(values("trace_nearest_minimum")),
        _cell(values("lambda_max")),
        _cell(values("distance_to_flattest"), 3),
        f"{max(values('loss')):.1e}",
        f"{max(values('loss_max')):.1e}",
        f"{mean(values('perturbed_fraction')):.2f}",
    ]


def _rows(result: EscapeSharpResult) -> list[list[Any]]:
    """The main table: the start, every row's runs, and the two closed-form minima."""
    refs = result.references
    return [
        _reference_row(
            "start: the sharp minimum",
            refs.trace_start,
            refs.lambda_max_start,
            refs.distance_start,
            f"{refs.loss_start:.1e}",
        ),
        *(_row(label, group) for label, group in result.runs.items()),
        _reference_row("flattest minima (closed form)", refs.trace_min, refs.lambda_max_at_flattest, 0.0, "0"),
        _reference_row(
            "minima of smallest lambda_max (closed form)",
            refs.trace_at_lambda_min,
            refs.lambda_max_min,
            refs.distance_at_lambda_min,
            "0",
        ),
    ]


def _batch(result: EscapeSharpResult) -> tuple[list[list[Any]], dict[str, Any]]:
    """The batch-size table rows, and their ``results.json`` entries (by batch size)."""
    rows: list[list[Any]] = []
    effect: dict[str, Any] = {}
    start = result.references.trace_start
    for size, group in result.batch_runs.items():
        decrease = [start - r.final["trace_nearest_minimum"] for r in group]
        rows.append(
            [
                f"{size}" + (" (all)" if size == result.examples else ""),
                len(group),
                _cell([r.final["trace_nearest_minimum"] for r in group]),
                _cell(decrease),
                _cell([r.final["lambda_max"] for r in group]),
                _cell([r.final["distance_to_flattest"] for r in group], 3),
                f"{max(r.final['loss'] for r in group):.1e}",
            ]
        )
        effect[str(size)] = {
            "trace_decrease_mean": mean(decrease),
            "trace_decrease_std": spread(decrease),
            "trace_decrease_per_seed": decrease,
            **_summary(group),
        }
    return rows, effect


def results_json(result: EscapeSharpResult, batch_effect: dict[str, Any]) -> dict[str, Any]:
    """The named numbers of ``results.json``: the settings, the reference points, each row's means and the
    per-seed summaries of every row."""
    refs, d = result.references, result.problem.dim
    summaries = {label: _summary(group) for label, group in result.runs.items()}

    def means(key: str) -> dict[str, float]:
        return {label: s[key]["mean"] for label, s in summaries.items()}

    gd = result.runs["GD"][0].final
    return {
        "problem": {**PROBLEM, "d": d},
        "settings": {
            "lr": SETTINGS.lr,
            "rho": SETTINGS.rho,
            "eta_prime": SETTINGS.eta_prime,
            "eta_prime_relative": False,
            "epsilon": SETTINGS.epsilon,
            "variants": {v.label: vars(v.settings) | {"batch_size": v.batch_size} for v in result.main + result.batch},
        },
        "steps": result.steps,
        "trace_start": refs.trace_start,
        "trace_start_over_d": refs.trace_start / d,
        "trace_min_on_manifold": refs.trace_min,
        "trace_min_over_d": refs.trace_min / d,
        "flattest_scale": refs.flattest_scale,
        "lambda_max_start": refs.lambda_max_start,
        "smallest_curvature_start": refs.smallest_curvature_start,
        "lambda_max_min_on_manifold": refs.lambda_max_min,
        "lambda_max_min_scale": refs.lambda_max_min_scale,
        "lambda_max_at_flattest": refs.lambda_max_at_flattest,
        "trace_at_lambda_max_min": refs.trace_at_lambda_min,
        "distance_start": refs.distance_start,
        "trace_off_balance_start": refs.trace_off_balance_start,
        "trace_final": means("trace"),
        "trace_nearest_minimum": means("trace_nearest_minimum"),
        "distance_to_flattest": means("distance_to_flattest"),
        "lambda_max_final": means("lambda_max"),
        "loss_final": {label: max(s["loss"]["per_seed"]) for label, s in summaries.items()},
        "loss_max_along_run": {label: max(s["loss_max"]["per_seed"]) for label, s in summaries.items()},
        "perturbed_fraction": means("perturbed_fraction"),
        "gd_relative_trace_change": abs(gd["trace"] - refs.trace_start) / refs.trace_start,
        "gd_displacement": gd["displacement"],
        "hessian_trace_vs_closed_form_max_error": max(
            r.final["trace_closed_form_error"]
            for group in [*result.runs.values(), *result.batch_runs.values()]
            for r in group
        ),
        "batch_size_effect": batch_effect,
        "exact_interpolation_displacement": result.exact_interpolation,
        "runs": summaries,
    }


def claims(results: dict[str, Any]) -> list[Claim]:
    """The paper's claim for each random algorithm at its own settings: started at a sharp minimum, it moves along
    the minima set toward smaller tr(H). Measured: the fraction of the excess tr(H) - tr(H)_min removed by the
    run's nearest minimum, seed by seed, and its 95 % interval; SUPPORTS when the interval lies above 0."""
    start, floor = results["trace_start"], results["trace_min_on_manifold"]
    found = []
    for label, name in (("ahn-rs", "Algorithm 1 (random perturbation)"), ("ahn-sa", "Algorithm 2 (sharpness-aware)")):
        per_seed = results["runs"][label]["trace_nearest_minimum"]["per_seed"]
        removed = interval([100 * (start - trace) / (start - floor) for trace in per_seed])
        found.append(
            Claim(
                statement=f"{name} leaves a sharp minimum along the minima set toward smaller tr(H)",
                measured=f"excess tr(H) removed {removed.mean:.1f} % [{removed.low:.1f}, {removed.high:.1f}] over "
                f"{removed.n} seeds",
                rule="Student-t 95 % interval over seeds; SUPPORTS if above 0, CONTRADICTS if below, INCONCLUSIVE "
                "otherwise",
                verdict=verdict(removed, paper_says_positive=True),
            )
        )
    sa = results["runs"]["ahn-sa"]["trace_nearest_minimum"]["mean"]
    judged = results["steps"] >= FULL_STEPS  # a quick run stops before the walk can end: it is not judged
    found.append(
        Claim(
            statement="Algorithm 2 reaches the flattest minima: its nearest minimum's tr(H) is the closed-form minimum "
            "over the minima set",
            measured=f"tr(H) {sa:.4g} against {floor:.4g} (closed form) after {results['steps']} steps, seed mean"
            + ("" if judged else f"; not judged: fewer than the full run's {FULL_STEPS} steps"),
            rule=f"SUPPORTS if within {FLATTEST_TOLERANCE:.0%} of the closed form (relative) after {FULL_STEPS} steps, "
            "CONTRADICTS otherwise",
            verdict=agreement(sa, floor, FLATTEST_TOLERANCE) if judged else Verdict.INCONCLUSIVE,
        )
    )
    return found


#: how close to the closed-form flattest tr(H) Algorithm 2's run must end to count as having reached it
FLATTEST_TOLERANCE = 0.02


def outcome(result: EscapeSharpResult, ctx: Context) -> Outcome:
    """The table, ``results.json``, the figures (saved into ``ctx``'s folder) and the commentary of ``result``."""
    batch_rows, batch_effect = _batch(result)
    results = results_json(result, batch_effect)
    figures = [
        plot_rows(ctx.figure_path("trace_and_loss.png"), result),
        plot_batch_sizes(ctx.figure_path("batch_size.png"), result),
    ]
    batch_table = markdown_table(BATCH_HEADERS, batch_rows)
    return Outcome(
        claims=claims(results),
        headers=list(HEADERS),
        rows=_rows(result),
        results=results,
        report=commentary(results, batch_table, quick=result.quick, full_steps=FULL_STEPS),
        figures=figures,
        caption=(
            f"{result.steps} steps from the same sharp minimum, lr {SETTINGS.lr}; rho {SETTINGS.rho}, eta' "
            f"{SETTINGS.eta_prime}, epsilon {SETTINGS.epsilon} unless the row says otherwise. tr(H) of the dense "
            f"Hessian (d = {result.problem.dim}); mean ± standard deviation over seeds."
        ),
    )
