"""The report: the table, results.json, the commentary (every outcome it states chosen from the runs) and the
figures, made from a :class:`~flatminima.experiments.hessian_spectrum.compute.HessianSpectrumResult`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult, RunRecord
from flatminima.experiments.hessian_spectrum.plots import plot_density, plot_tracking
from flatminima.experiments.hessian_spectrum.setting import PAPER, PAPER_RHO, TOP_K, VALUE_TOL, WIDTH, key, label
from flatminima.experiments.reproduce import Context, Outcome, markdown_table
from flatminima.experiments.summary import cell, mean, spread

__all__ = ["HEADERS", "caption", "commentary", "outcome", "results_json", "summaries", "table_rows"]

HEADERS = [
    "optimiser",
    "training loss (all)",
    "loss on the {examples} measured",
    "epochs",
    "lambda_max",
    "lambda_5",
    "lambda_max / lambda_5",
    "tr(H)",
    "test acc %",
    "paper lambda_max",
    "paper lambda_max / lambda_5",
]
SUMMARISED = ("lambda_max", "lambda_5", "ratio", "trace", "train_loss", "subset_loss", "step", "test_accuracy")


def _value(record: RunRecord, name: str) -> float:
    """A record's number by name, from the record or its spectrum."""
    return float(getattr(record.spectrum if hasattr(record.spectrum, name) else record, name))


def _summary(runs: list[RunRecord]) -> dict[str, Any]:
    """Mean and spread over seeds (NaN for a single seed) of one optimiser's measurements; the trace's standard
    error is that of the mean of the per-seed estimates (each with its own Hutchinson error)."""
    out: dict[str, Any] = {"seeds": [r.seed for r in runs], "all_reached": all(r.reached for r in runs)}
    for name in SUMMARISED:
        values = [_value(r, name) for r in runs]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = spread(values) if len(values) > 1 else math.nan
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    out["trace_stderr"] = math.sqrt(sum(r.spectrum.trace_stderr**2 for r in runs)) / len(runs)
    return out


def summaries(result: HessianSpectrumResult) -> dict[str, dict[str, Any]]:
    """results.json's ``measured``: per optimiser key, its radius, the summary over seeds and the paper's numbers."""
    return {
        name: {
            "rho": rho,
            **_summary(result.runs(name)),
            "paper_lambda_max": PAPER["sgd" if rho is None else "sam"]["lambda_max"],
            "paper_ratio": PAPER["sgd" if rho is None else "sam"]["ratio"],
        }
        for name, rho in zip(result.keys, result.rhos)
    }


def _per_seed(result: HessianSpectrumResult, name: str, of: str, how: str = "over") -> list[float]:
    """Per seed, SGD's ``name`` over SAM ``of``'s (``how="over"``) or their absolute difference (``"gap"``)."""
    by_seed = result.by_seed()
    pairs = [(_value(by_seed[(s, "sgd")], name), _value(by_seed[(s, of)], name)) for s in result.seeds]
    return [a / b if how == "over" else abs(b - a) for a, b in pairs]


def table_rows(result: HessianSpectrumResult, measured: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per optimiser (mean ± std over seeds, the paper's numbers), then SGD's value over each SAM's."""
    rows: list[list[Any]] = []
    for name, rho in zip(result.keys, result.rhos):
        runs = result.runs(name)
        paper = PAPER["sgd" if rho is None else "sam"]
        title = label(rho) + (" (paper's rho)" if rho == PAPER_RHO else "")
        rows.append(
            [
                title + ("" if measured[name]["all_reached"] else " (threshold NOT reached)"),
                cell([r.train_loss for r in runs]),
                cell([r.subset_loss for r in runs]),
                cell([r.epochs for r in runs], 2),
                *(cell([_value(r, field) for r in runs]) for field in ("lambda_max", "lambda_5", "ratio", "trace")),
                cell([r.test_accuracy for r in runs], 3, scale=100),
                f"{paper['lambda_max']:g}",
                f"{paper['ratio']:g}",
            ]
        )
    for name in result.keys[1:]:
        rows.append(
            [
                f"SGD / {label(measured[name]['rho'])}",
                "",
                "",
                "",
                *(cell(_per_seed(result, field, name)) for field in ("lambda_max", "lambda_5", "ratio", "trace")),
                "",
                f"{PAPER['sgd']['lambda_max'] / PAPER['sam']['lambda_max']:g}",
                f"{PAPER['sgd']['ratio'] / PAPER['sam']['ratio']:.3g}",
            ]
        )
    return rows


def _seconds(result: HessianSpectrumResult) -> dict[str, dict[str, float]]:
    """Mean seconds per run of each phase, per optimiser."""
    return {
        name: {
            "training": statistics.fmean(r.seconds_training for r in result.runs(name)),
            "tracking": statistics.fmean(r.seconds_tracking for r in result.runs(name)),
            "measuring": statistics.fmean(r.spectrum.seconds_measuring for r in result.runs(name)),
        }
        for name in result.keys
    }


def results_json(result: HessianSpectrumResult, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json: the setting, the paper's numbers, the summaries, SGD over SAM per seed, and every run."""
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
            "threshold": setting.threshold,
            "max_epochs": setting.max_epochs,
            "check_every": setting.check_every,
            "track_every": setting.track_every,
            "hessian_examples": setting.examples,
            "lanczos_value_tol": VALUE_TOL,
            "trace_probes": setting.trace_probes,
            "density_runs": setting.density_runs,
            "density_steps": setting.density_steps,
            "rhos": list(setting.rhos),
        },
        "paper_numbers": PAPER,
        "measured": measured,
        "sgd_over_sam_lambda_max": {name: _per_seed(result, "lambda_max", name) for name in result.keys[1:]},
        "paper_sgd_over_sam_lambda_max": PAPER["sgd"]["lambda_max"] / PAPER["sam"]["lambda_max"],
        "train_loss_gap": {name: _per_seed(result, "train_loss", name, "gap") for name in result.keys[1:]},
        "seconds_per_run": _seconds(result),
        "runs": [r.as_json() for r in result.records],
    }


def _detail_table(result: HessianSpectrumResult) -> str:
    """Per seed and optimiser: the stopping point, the top-5 eigenvalues with their residuals and error bounds, and
    the trace with its standard error."""
    before = "a step before" if result.setting.replay else "at the check before"
    rows = []
    for r in result.records:
        s = r.spectrum
        bounds = s.error_bounds if s.error_bounds is not None else [math.nan] * len(s.eigenvalues)
        rows.append(
            [
                r.seed,
                label(r.rho),
                f"{r.train_loss:.4g} at step {r.step} ({r.train_loss_step_before:.4g} {before})",
                ", ".join(f"{v:.4g}" for v in s.eigenvalues),
                f"{max(s.relative_residuals):.1e}",
                f"{max(b / abs(v) for b, v in zip(bounds, s.eigenvalues)):.1e}",
                f"{s.trace:.4g} ± {s.trace_stderr:.2g}",
                s.lanczos_hvp,
            ]
        )
    headers = [
        "seed",
        "optimiser",
        "training loss at the measured point",
        "top-5 eigenvalues",
        "max rel. residual",
        "max rel. error bound",
        "tr(H) ± stderr",
        "Lanczos products",
    ]
    return markdown_table(headers, rows)


def _count(records: list[RunRecord], test: Callable[[RunRecord], bool]) -> str:
    """``k of n``: how many of ``records`` pass ``test``."""
    return f"{sum(bool(test(r)) for r in records)} of {len(records)}"


def _fairness(result: HessianSpectrumResult) -> tuple[str, str]:
    """The stopping rule as run, and what the per-seed table's earlier loss is (and whether it was above the
    threshold in every run, as the stopping rule intends)."""
    setting = result.setting
    stop = (
        f"Each run stops at the *first step* at which its full training loss (all training examples, clean labels) is "
        f"below {setting.threshold:g}: the loss is computed every {setting.check_every} steps, and when a check falls "
        "below the threshold the run goes back to the previous check (its model and optimiser state were kept) and "
        "replays the steps one at a time (bit-exact)."
        if setting.replay
        else f"Each run stops at the first check (once per epoch, every {setting.check_every} steps) at which its full "
        f"training loss (all training examples, clean labels) is below {setting.threshold:g}, or after "
        f"{setting.max_epochs} epochs."
    )
    earlier = "one step earlier" if setting.replay else "at the check before"
    above = [r.reached and r.train_loss_step_before >= setting.threshold for r in result.records]
    where = "" if all(above) else f" in {sum(above)} of {len(above)} runs; the others never reached it"
    return stop, f"the loss {earlier} too (above the threshold{where})"


def _other_statements(result: HessianSpectrumResult, measured: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The computed clauses of the commentary, by name."""
    setting, records, keys = result.setting, result.records, result.keys
    converged = [r.spectrum.lanczos_converged for r in records]
    start = mean([r.loss_checks[0][1] for r in result.runs("sgd")])  # every optimiser of a seed starts alike
    uniform = math.log(result.classes)
    near = "near" if abs(start - uniform) < 0.1 else "away from"
    ablation = (
        f" The paper's radius, rho = {PAPER_RHO:g}, was not trained in this run (the full run on digits, without "
        "--rho, trains it as an ablation)."
    )
    if PAPER_RHO in setting.rhos:
        values = _per_seed(result, "lambda_max", key(PAPER_RHO))
        ablation = (
            f" With the paper's radius, rho = {PAPER_RHO:g}, SGD's lambda_max is "
            f"{statistics.fmean(values):.3g} times SAM's (per seed {', '.join(f'{v:.3g}' for v in values)})."
        )
    return {
        "matched": "At matched training loss"
        if all(r.reached for r in records)
        else "At the stopping points (not every run reached the threshold, so the losses are not matched)",
        "converged": "" if all(converged) else f" (reached in {sum(converged)} of {len(converged)} runs only)",
        "start": f"it starts at {start:.3g}{' on average' if len(result.seeds) > 1 else ''}, {near} ln "
        f"{result.classes} = {uniform:.2f}, the uniform prediction",
        "ablation": ablation,
        "plateau": "; ".join(
            f"{label(measured[k]['rho'])} "
            + cell(
                [math.nan if r.steps_to_loss_below_2 is None else r.steps_to_loss_below_2 for r in result.runs(k)], 4
            )
            for k in keys
        ),
        "negative": "; ".join(
            f"{label(measured[k]['rho'])} {sum(t[2] <= 0 for r in result.runs(k) for t in r.tracked)}"
            f" of {sum(len(r.tracked) for r in result.runs(k))}"
            for k in keys
        ),
        "timing": "; ".join(
            f"{label(measured[k]['rho'])}: {s['training']:.0f} s training, {s['tracking']:.0f} s tracking "
            f"lambda_max, {s['measuring']:.0f} s measuring"
            for k, s in _seconds(result).items()
        ),
    }


def commentary(result: HessianSpectrumResult, measured: dict[str, dict[str, Any]]) -> str:
    """The commentary that follows the table: the protocol, the per-seed details, and the comparison with the paper,
    each statement computed from the runs."""
    setting, recipe = result.setting, result.recipe
    main = result.keys[1]
    sgd, sam = measured["sgd"], measured[main]
    by_seed = result.by_seed()
    sam_runs = [by_seed[(s, main)] for s in result.seeds]
    flatter_ratio = _count(sam_runs, lambda r: r.spectrum.ratio < by_seed[(r.seed, "sgd")].spectrum.ratio)
    smaller_trace = _count(sam_runs, lambda r: r.spectrum.trace < by_seed[(r.seed, "sgd")].spectrum.trace)
    largest_gap = max(max(_per_seed(result, "train_loss", k, "gap")) for k in result.keys[1:])
    ratios = _per_seed(result, "lambda_max", main)
    stop, earlier = _fairness(result)
    said = _other_statements(result, measured)
    model = f"SmallCNN width {WIDTH} on digits" if recipe.is_default else f"{recipe.model} on {recipe.dataset}"
    return f"""
**How the comparison was made fair.** Both optimisers start from the same initialisation and see the same batches
({model}; SGD: lr {recipe.lr:g}, momentum {recipe.momentum:g}, weight decay {recipe.weight_decay:g}, batch
{recipe.batch_size}, constant lr; SAM: the library's `SAM` around that same SGD). {stop} The table gives both
optimisers' losses at those
points, over all training examples and over the {setting.examples} the Hessian is taken on; the per-seed table
below gives {earlier}. The largest SGD-SAM difference in training loss
at the measured points is {largest_gap:.2g}. The cross-entropy Hessian shrinks as the loss goes to zero, so
lambda_max is plotted against the training loss too (figure, right), over the whole runs.

**Measurements**, on the first {setting.examples} training examples of each seed's split: the top-{TOP_K}
eigenvalues by Lanczos with full reorthogonalisation, stopped when every eigenvalue's error bound is within
{VALUE_TOL:g} of it relatively (`value_tol`, one guard value){said["converged"]}, residuals verified with true \
products; tr(H) by
Hutchinson with {setting.trace_probes} Rademacher probes (± its standard error per seed below; the table gives mean
± std over seeds, and the standard error of that mean from the probes alone is {sgd["trace_stderr"]:.2g} for SGD and
{sam["trace_stderr"]:.2g} for SAM); the spectral density by SLQ ({setting.density_runs} start vector(s) x
{setting.density_steps} Lanczos steps per model, pooled over seeds); lambda_max along training every
{setting.track_every} steps by `SharpnessTracker` (warm-started power iteration, relative tolerance 1e-3).

{_detail_table(result)}

**Against the paper.** {said["matched"]} SGD's lambda_max is {statistics.fmean(ratios):.3g} times SAM's
(per seed {", ".join(f"{v:.3g}" for v in ratios)}; the paper: 24). SAM's lambda_max / lambda_5 is the smaller in
{flatter_ratio} seed(s) ({sam["ratio"]:.3g} against SGD's {sgd["ratio"]:.3g}; the paper: 2.6 against
11.4), and its trace the smaller in {smaller_trace}.{said["ablation"]}

**On the way.** Steps until the full training loss first fell below 2 ({said["start"]}; checked every \
{setting.check_every} steps): {said["plateau"]}. Tracked points where the eigenvalue of largest
magnitude, which power iteration finds, was negative (a saddle; drawn as x in the figure): {said["negative"]}.

Time per run (mean over seeds): {said["timing"]}.
"""


def caption(result: HessianSpectrumResult) -> str:
    """The table's caption: what the cells are, and where each run stopped."""
    setting = result.setting
    where = "step" if setting.replay else "check"
    capped = "" if all(r.reached for r in result.records) else f" (or after {setting.max_epochs} epochs if never)"
    return (
        f"Mean ± std over seeds {list(result.seeds)}; each optimiser stopped at the first {where} whose full training "
        f"loss is below {setting.threshold:g}{capped}; Hessian of the cross-entropy on the first {setting.examples} "
        "training examples. The last row(s): SGD's value over SAM's, per seed. The paper's numbers are a "
        "WideResNet without BatchNorm on CIFAR-10."
    )


def outcome(result: HessianSpectrumResult, ctx: Context) -> Outcome:
    """The Outcome of the reproduction: table, results.json, commentary and the two figures (in ``ctx``'s folder)."""
    measured = summaries(result)
    figures = [
        plot_tracking(ctx.figure_path("lambda_max_along_training.png"), result),
        plot_density(
            ctx.figure_path("spectral_density.png"), result, {k: v["lambda_max"] for k, v in measured.items()}
        ),
    ]
    return Outcome(
        headers=[h.format(examples=result.setting.examples) for h in HEADERS],
        rows=table_rows(result, measured),
        results=results_json(result, measured),
        report=commentary(result, measured),
        figures=figures,
        caption=caption(result),
    )
