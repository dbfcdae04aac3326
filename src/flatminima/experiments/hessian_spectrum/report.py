"""The report: the table, results.json, the claims, the commentary (every outcome it states computed from the runs)
and the figures, made from a ``HessianSpectrumResult``."""

from __future__ import annotations

import math
from typing import Any

from flatminima.experiments.hessian_spectrum.claims import (
    QUANTITIES,
    Comparison,
    claims,
    comparisons,
)
from flatminima.experiments.hessian_spectrum.commentary import (
    caption,
    commentary,
    interval_text,
    optimizer_title,
    per_seed,
    run_value,
    seconds_by_name,
)
from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult, RunRecord
from flatminima.experiments.hessian_spectrum.plots import plot_density, plot_tracking
from flatminima.experiments.hessian_spectrum.setting import (
    PAPER,
    PAPER_NETWORK,
    PAPER_RHO,
    VALUE_TOL,
    WIDTH,
    key,
    label,
)
from flatminima.experiments.protocol import interval
from flatminima.experiments.reproduce import Context, Outcome
from flatminima.experiments.summary import cell, spread

__all__ = ["HEADERS", "caption", "commentary", "outcome", "results_json", "summaries", "table_rows"]

HEADERS = [
    "optimiser",
    "training loss (all)",
    "epochs",
    "gradient evaluations",
    "lambda_max",
    "lambda_max / lambda_5",
    "lambda_5",
    "tr(H)",
    "test acc %",
    "paper lambda_max",
    "paper lambda_max / lambda_5",
]
SUMMARISED = (
    "lambda_max",
    "lambda_5",
    "ratio",
    "trace",
    "train_loss",
    "subset_loss",
    "step",
    "epochs",
    "gradient_evaluations",
    "test_accuracy",
)


def _summary(runs: list[RunRecord]) -> dict[str, Any]:
    """Mean, spread, range and 95 % interval over seeds of one optimiser's measurements; the trace's standard
    error is that of the mean of the per-seed estimates (each with its own Hutchinson error)."""
    out: dict[str, Any] = {"seeds": [r.seed for r in runs], "all_reached": all(r.reached for r in runs)}
    for name in SUMMARISED:
        values = [run_value(r, name) for r in runs]
        found = interval(values)
        out[name] = found.mean
        out[f"{name}_std"] = spread(values) if len(values) > 1 else math.nan
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
        out[f"{name}_interval"] = [found.low, found.high]
    out["trace_stderr"] = math.sqrt(sum(r.spectrum.trace_stderr**2 for r in runs)) / len(runs)
    out["max_relative_error_bound"] = max(_relative_bound(r) for r in runs)
    return out


def _relative_bound(record: RunRecord) -> float:
    """The largest Lanczos error bound of the record's top eigenvalues, relative to its eigenvalue."""
    spectrum = record.spectrum
    if spectrum.error_bounds is None:
        return math.inf
    return max(b / abs(v) for b, v in zip(spectrum.error_bounds, spectrum.eigenvalues))


def summaries(result: HessianSpectrumResult) -> dict[str, dict[str, Any]]:
    """results.json's ``measured``: per optimiser key, its radius, the summary over seeds and the paper's numbers."""
    return {
        key(rho): {
            "rho": rho,
            **_summary(result.runs(key(rho))),
            "paper_lambda_max": PAPER["sgd" if rho is None else "sam"]["lambda_max"],
            "paper_ratio": PAPER["sgd" if rho is None else "sam"]["ratio"],
        }
        for rho in (None, *result.rhos)
    }


def table_rows(result: HessianSpectrumResult, compared: list[Comparison]) -> list[list[Any]]:
    """One row per optimiser (95 % intervals of lambda_max and the ratio, mean ± std of the rest, the paper's
    numbers), then SGD / SAM per radius (geometric mean and 95 % interval; lambda_5 and tr(H): mean ± std of the
    per-seed ratio)."""
    rows: list[list[Any]] = []
    for rho in (None, *result.rhos):
        runs = result.runs(key(rho))
        paper = PAPER["sgd" if rho is None else "sam"]
        reached = all(r.reached for r in runs)
        rows.append(
            [
                optimizer_title(result, rho) + ("" if reached else " (threshold NOT reached)"),
                cell([r.train_loss for r in runs]),
                cell([r.epochs for r in runs], 2),
                cell([float(r.gradient_evaluations) for r in runs], 3),
                interval_text([r.spectrum.lambda_max for r in runs]),
                interval_text([r.spectrum.ratio for r in runs]),
                cell([r.spectrum.lambda_5 for r in runs]),
                cell([r.spectrum.trace for r in runs]),
                cell([r.test_accuracy for r in runs], 3, scale=100),
                f"{paper['lambda_max']:g}",
                f"{paper['ratio']:g}",
            ]
        )
    by = {(c.rho, c.quantity): c for c in compared}
    for rho in result.rhos:
        rows.append(
            [
                f"SGD / {label(rho)}",
                "",
                "",
                "",
                by[(rho, "lambda_max")].ratio_text(),
                by[(rho, "ratio")].ratio_text(),
                cell(per_seed(result, "lambda_5", key(rho))),
                cell(per_seed(result, "trace", key(rho))),
                "",
                f"{PAPER['sgd']['lambda_max'] / PAPER['sam']['lambda_max']:g}",
                f"{PAPER['sgd']['ratio'] / PAPER['sam']['ratio']:.3g}",
            ]
        )
    return rows


def _comparison_json(c: Comparison) -> dict[str, Any]:
    """One comparison as results.json's ``comparisons`` holds it."""
    return {
        "rho": c.rho,
        "quantity": QUANTITIES[c.quantity],
        "difference": "log(SGD / SAM) per seed",
        "seeds": list(c.seeds),
        "log_ratios": list(c.log_ratios),
        "interval": [c.interval.mean, c.interval.low, c.interval.high],
        "sgd_over_sam_geometric": [math.exp(v) for v in (c.interval.mean, c.interval.low, c.interval.high)],
        "lanczos_error": c.lanczos_error,
        "widened_interval": [c.widened.mean, c.widened.low, c.widened.high],
        "verdict": c.verdict.value,
    }


def results_json(
    result: HessianSpectrumResult, measured: dict[str, dict[str, Any]], compared: list[Comparison]
) -> dict[str, Any]:
    """results.json: the setting, the tuning, the paper's numbers, the summaries, the comparisons, and every run."""
    setting, recipe = result.setting, result.recipe
    return {
        "setting": {
            "dataset": f"{recipe.dataset} (clean labels)",
            "model": f"SmallCNN width {WIDTH}, no BatchNorm" if recipe.model == "small_cnn" else recipe.model,
            "lr": recipe.lr,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
            "batch_size": recipe.batch_size,
            "device": recipe.device,
            "exact_crossing": setting.replay,
            "lr_schedule": "constant",
            "budget": "every run to the same full training loss (the threshold)",
            "threshold": setting.threshold,
            "max_epochs": setting.max_epochs,
            "check_every": setting.check_every,
            "track_every": setting.track_every,
            "hessian_examples": setting.examples,
            "lanczos_value_tol": VALUE_TOL,
            "trace_probes": setting.trace_probes,
            "density_runs": setting.density_runs,
            "density_steps": setting.density_steps,
            "rhos": list(result.rhos),
            "headline_rho": PAPER_RHO,
            "validated_rho": result.validated_rho,
            "rho_source": result.rho_source,
            "workers": result.workers,
        },
        "paper_network": PAPER_NETWORK,
        "paper_numbers": PAPER,
        "tuning": result.tuning.as_json() if result.tuning is not None else None,
        "seeds_measured": list(result.seeds),
        "close_call": result.close_call,
        "seeds_extended": result.seeds_extended,
        "measured": measured,
        "comparisons": [_comparison_json(c) for c in compared],
        "sgd_over_sam_lambda_max": {name: per_seed(result, "lambda_max", name) for name in result.keys[1:]},
        "paper_sgd_over_sam_lambda_max": PAPER["sgd"]["lambda_max"] / PAPER["sam"]["lambda_max"],
        "train_loss_gap": {name: per_seed(result, "train_loss", name, "gap") for name in result.keys[1:]},
        "seconds_per_run": seconds_by_name(result),
        "runs": [r.as_json() for r in result.records],
    }


def outcome(result: HessianSpectrumResult, ctx: Context) -> Outcome:
    """The Outcome of the reproduction: table, claims, results.json, commentary and the two figures (in ``ctx``'s
    folder)."""
    measured = summaries(result)
    compared = comparisons(result)
    figures = [
        plot_tracking(ctx.figure_path("lambda_max_along_training.png"), result),
        plot_density(
            ctx.figure_path("spectral_density.png"), result, {k: v["lambda_max"] for k, v in measured.items()}
        ),
    ]
    return Outcome(
        headers=HEADERS,
        rows=table_rows(result, compared),
        results=results_json(result, measured, compared),
        report=commentary(result, measured, compared),
        figures=figures,
        caption=caption(result),
        claims=claims(result),
    )
