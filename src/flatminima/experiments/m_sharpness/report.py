"""From an ``MSharpnessResult`` to the runner's ``Outcome``: the table, the commentary, results.json, the
claims and the figures."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from flatminima.experiments.figures import saved_figure
from flatminima.experiments.m_sharpness.analysis import (
    accuracy_interval,
    claims,
    correlations,
)
from flatminima.experiments.m_sharpness.compute import MSharpnessResult
from flatminima.experiments.protocol import Budget, sgd_epochs
from flatminima.experiments.reproduce import Context, Outcome
from flatminima.experiments.summary import mean

__all__ = ["outcome", "summary", "workers_phrase"]


def workers_phrase(workers: int, threads: int) -> str:
    """How the trainings ran side by side, for reading the seconds: ``"2 concurrent single-thread workers"``."""
    kind = {0: "default-threaded", 1: "single-thread"}.get(threads, f"{threads}-thread")
    return f"{workers} concurrent {kind} workers" if workers > 1 else f"one {kind} worker, one training at a time"


def _words(setting: dict[str, Any]) -> str:
    names = {"lr": "lr", "weight_decay": "wd", "rho": "rho", "rwsam_lambda": "lambda"}
    return ", ".join(f"{names.get(key, key)} {value:g}" for key, value in setting.items())


def summary(result: MSharpnessResult) -> dict[str, dict[str, Any]]:
    """Per method, over its final runs: the chosen setting and its validation score, test accuracy with its 95 %
    interval, training accuracy, gap, cost and the regulariser ``(rho / 2m) tr(V)`` at the chosen rho."""
    sam_seconds = statistics.median(r.seconds_per_epoch for r in result.finals("sam"))
    cells = {}
    for method in result.settings.methods:
        runs = result.finals(method.name)
        tuning = result.tuning[method.name]
        accuracy = accuracy_interval(runs)
        seconds = statistics.median(r.seconds_per_epoch for r in runs)
        rho = tuning.chosen.get("rho")
        curve = []
        if runs[0].trace_v:
            for index, point in enumerate(runs[0].trace_v):
                trace = mean([r.trace_v[index].trace_v for r in runs])
                regulariser = rho / (2 * method.m) * trace if method.m is not None and rho is not None else None
                curve.append({"epoch": point.epoch, "trace_v_mean": trace, "regulariser_mean": regulariser})
        cells[method.name] = {
            "m": method.m,
            "epochs": runs[0].epochs,
            "chosen": tuning.chosen,
            "chosen_validation_accuracy": tuning.validation_scores[tuning.chosen_index],
            "seeds": [r.seed for r in runs],
            "test_accuracies": [r.test_accuracy for r in runs],
            "test_accuracy_pct": {"mean": accuracy.mean, "low": accuracy.low, "high": accuracy.high},
            "train_accuracy_mean": mean([r.train_accuracy for r in runs]),
            "gap_mean": mean([r.gap for r in runs]),
            "seconds_per_epoch": seconds,
            "cost_relative_to_sam": seconds / sam_seconds,
            "trace_v_final": curve[-1]["trace_v_mean"] if curve else None,
            "regulariser_final": curve[-1]["regulariser_mean"] if curve else None,
            "regulariser_curve": curve,
        }
    return cells


def _interval_text(cell: dict[str, Any]) -> str:
    accuracy = cell["test_accuracy_pct"]
    if math.isinf(accuracy["low"]):
        return f"{accuracy['mean']:.1f}"
    return f"{accuracy['mean']:.1f} [{accuracy['low']:.1f}, {accuracy['high']:.1f}]"


def _rows(result: MSharpnessResult, cells: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for method in result.settings.methods:
        cell = cells[method.name]
        rows.append(
            [
                method.name,
                "-" if method.m is None else str(method.m),
                _words(cell["chosen"]),
                f"{100 * cell['chosen_validation_accuracy']:.1f}",
                _interval_text(cell),
                f"{100 * cell['train_accuracy_mean']:.1f}",
                f"{100 * cell['gap_mean']:+.1f}",
                f"{cell['cost_relative_to_sam']:.2f}",
                "n/a" if cell["trace_v_final"] is None else f"{cell['trace_v_final']:.3g}",
                "n/a" if cell["regulariser_final"] is None else f"{cell['regulariser_final']:.3g}",
            ]
        )
    return rows


def _plot(ctx: Context, result: MSharpnessResult, cells: dict[str, dict[str, Any]]) -> list[Path]:
    """Test accuracy against m and the tuning curves; m-sharpness against the gap; the regulariser."""
    settings = result.settings
    ms_methods = [m for m in settings.methods if m.m is not None and m.name != "rwsam"]
    accuracy = ctx.figure_path("accuracy_vs_m.png")
    with saved_figure(accuracy, 1, 2, size=(11, 4)) as (_, axes):
        xs = [m.m for m in ms_methods]
        ys = [cells[m.name]["test_accuracy_pct"]["mean"] for m in ms_methods]
        low = [cells[m.name]["test_accuracy_pct"]["low"] for m in ms_methods]
        high = [cells[m.name]["test_accuracy_pct"]["high"] for m in ms_methods]
        errors = [
            [0 if math.isinf(lo) else y - lo for y, lo in zip(ys, low)],
            [0 if math.isinf(hi) else hi - y for y, hi in zip(ys, high)],
        ]
        axes[0].errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"m-SAM (m = {settings.batch} is SAM)")
        for name, style in (("sgd", "k--"), ("sgd-2x", "k:"), ("rwsam", "r-."), ("nsam", "g:")):
            if name in cells:
                axes[0].axhline(cells[name]["test_accuracy_pct"]["mean"], color=style[0], ls=style[1:], label=name)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xticks(xs, [str(x) for x in xs])
        axes[0].set_xlabel(f"m (batch {settings.batch})")
        axes[0].set_ylabel("test accuracy % (mean, 95 % interval)")
        axes[0].legend(fontsize=8, loc="best")
        for index, method in enumerate(ms_methods):
            tuning = result.tuning[method.name]
            rhos = [s["rho"] for s in tuning.settings]
            order = sorted(range(len(rhos)), key=rhos.__getitem__)
            scores = [100 * tuning.validation_scores[i] for i in order]
            axes[1].plot([rhos[i] for i in order], scores, marker=".", color=f"C{index}", label=f"m = {method.m}")
            chosen = tuning.chosen_index
            best = 100 * tuning.validation_scores[chosen]
            axes[1].plot(rhos[chosen], best, "o", mfc="none", ms=10, color=f"C{index}")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("rho")
        axes[1].set_ylabel("validation accuracy % (tuning seeds' mean)")
        axes[1].set_title("tuning (circled: chosen)")
        axes[1].legend(fontsize=8)

    found = correlations(result)
    sharpness = ctx.figure_path("m_sharpness_gap.png")
    small, batch = settings.ms[0], settings.ms[-1]
    with saved_figure(sharpness, 1, 3, size=(14, 4)) as (_, axes):
        for axis, m in zip(axes[:2], (small, batch)):
            for index, method in enumerate(settings.methods):
                runs = [r for r in result.runs if r.method == method.name and str(m) in r.m_sharpness]
                axis.scatter(
                    [r.m_sharpness[str(m)] for r in runs],
                    [100 * r.gap for r in runs],
                    s=12,
                    color=f"C{index}",
                    label=method.name,
                )
            axis.set_xscale("log")
            axis.set_xlabel(f"{m}-sharpness of the final weights (rho {settings.sharpness_rho:g})")
            axis.set_ylabel("gap: train acc - test acc (points)")
            axis.set_title(f"m = {m}")
        axes[0].legend(fontsize=7)
        if found:
            xs = [c.m for c in found]
            ys = [c.spearman for c in found]
            errors = [[y - c.low for y, c in zip(ys, found)], [c.high - y for y, c in zip(ys, found)]]
            axes[2].errorbar(xs, ys, yerr=errors, marker="o", capsize=3)
            axes[2].set_xscale("log", base=2)
            axes[2].set_xticks(xs, [str(x) for x in xs])
        axes[2].set_xlabel("m")
        axes[2].set_ylabel("Spearman(m-sharpness, gap) (95 % bootstrap)")
        axes[2].set_title(f"over {found[0].n if found else 0} trained models")

    figures = [accuracy, sharpness]
    if result.trace_measured:
        regulariser = ctx.figure_path("regulariser.png")
        with saved_figure(regulariser, 1, 2, size=(11, 4)) as (_, axes):
            for index, method in enumerate(settings.methods):
                curve = cells[method.name]["regulariser_curve"]
                epochs = [point["epoch"] for point in curve]
                style = {"marker": ".", "label": method.name, "color": f"C{index}"}
                axes[0].plot(epochs, [point["trace_v_mean"] for point in curve], **style)
                if curve and curve[0]["regulariser_mean"] is not None:
                    axes[1].plot(epochs, [point["regulariser_mean"] for point in curve], **style)
            axes[0].set_yscale("log")
            axes[0].set_ylabel(f"tr(V) on (at most) the first {settings.sample} training examples")
            axes[1].set_yscale("log")
            axes[1].set_ylabel("(rho / 2m) tr(V), rho as chosen")
            for axis in axes:
                axis.set_xlabel("epoch")
                axis.legend(fontsize=7)
        figures.append(regulariser)
    return figures


def _tuning_text(result: MSharpnessResult) -> str:
    lines = ["| method | grid: validation accuracy % (tuning seeds' mean) | chosen |", "|---|---|---|"]
    for name, tuning in result.tuning.items():
        points = "; ".join(
            f"{_words(s)}: {100 * score:.1f}" for s, score in zip(tuning.settings, tuning.validation_scores)
        )
        lines.append(f"| {name} | {points} | {_words(tuning.chosen)} |")
    return "\n".join(lines)


def _correlation_text(result: MSharpnessResult) -> str:
    found = correlations(result)
    if not found:
        return "Too few trained models for a correlation."
    lines = ["| m | Spearman [95 % bootstrap] | Pearson |", "|---:|---|---:|"]
    for c in found:
        lines.append(f"| {c.m} | {c.spearman:.3f} [{c.low:.3f}, {c.high:.3f}] | {c.pearson:.3f} |")
    return "\n".join(lines)


def _commentary(result: MSharpnessResult) -> str:
    settings = result.settings
    base = settings.base
    epochs = settings.epochs
    seeds = ", ".join(str(s) for s in settings.seeds)
    tuning_seeds = ", ".join(str(s) for s in settings.tuning_seeds)
    labels = (
        f"the held-out half carries the data's own label flips ({100 * settings.problem.flip_prob:g} %), like the "
        "training half"
        if settings.problem is not None
        else "clean labels"
    )
    extended = (
        "; ".join(f"{name} (for {', '.join(asked)})" for name, asked in result.extended.items())
        if result.extended
        else "none"
    )
    text = f"""
**Setting.** {settings.describe()}; batch {settings.batch}, SGD momentum {base.momentum:g} with a
{base.lr_schedule} learning rate, {epochs} epochs for the SAM family and SGD, {2 * epochs} for "sgd-2x"
(equal gradient evaluations). m-SAM is the library's `--optimizer sam --group-size m` (m = {settings.batch}, the
batch, is SAM); RW-SAM `--optimizer rwsam`; n-SAM `--optimizer nsam` with an ascent sample of 8 batches.

**Protocol.** A validation split ({base.validation_fraction:g} of the training draw; {labels}) is held out of
every run. Every method has a grid of {len(settings.methods[0].grid)} settings: SGD learning rate x weight decay
(at {epochs} and at {2 * epochs} epochs, each its own choice), each m-SAM rho x f x sqrt(m / {settings.batch}),
RW-SAM lambda x rho, n-SAM rho; the SAM family trains at SGD's chosen learning rate and weight decay. Each point is
trained on seeds {tuning_seeds}, and the point with the best mean validation accuracy at the last epoch is chosen
(ties to the earlier point); the test set plays no part. The chosen settings are then trained afresh on seeds {seeds}
(the tuning seeds are never reported). Seeds added for close calls (a paired difference within two standard errors of
zero): {extended}.

**Measured.** Test accuracy at the last epoch, mean and Student-t 95 % interval over the seeds; training accuracy
of the final weights on the labels as trained, and the gap (training minus test accuracy). The m-sharpness of
every trained model's final weights (grid points too): the mean over consecutive groups of m of the first
{settings.sample} training examples (all of them where there are fewer; labels as trained) of the largest loss
increase found within an L2 ball of radius
{settings.sharpness_rho:g} (the same radius for every m) by {settings.sharpness_steps} projected gradient ascent
steps from the group's own SAM step (a lower bound of the maximum). tr(V) = mean_i ||g_i - g_bar||^2 of the
per-example cross-entropy gradients on the same examples, after the first step, every {settings.every} epochs and
at the end; the regulariser (rho / 2m) tr(V) at each method's chosen rho. Cost: the median training seconds per
epoch (evaluation and measurements out) in {workers_phrase(settings.workers, base.threads)}, against SAM's.

**Tuning** (every grid point, and the choice):

{_tuning_text(result)}

**m-sharpness against the generalisation gap**, over every trained model:

{_correlation_text(result)}
"""
    if not result.trace_measured:
        text += """
tr(V) was not measured: the model has BatchNorm, whose per-example gradients are not defined in training mode (one
example has no batch statistics).
"""
    return text


def outcome(result: MSharpnessResult, ctx: Context) -> Outcome:
    """The table (one row per method), results.json, the commentary, the claims and the figures."""
    settings = result.settings
    cells = summary(result)
    figures = _plot(ctx, result, cells)
    epochs = settings.epochs
    return Outcome(
        headers=[
            "method",
            "m",
            "chosen on validation",
            "val acc %",
            "test acc % [95 %]",
            "train acc %",
            "gap",
            "cost vs SAM",
            "tr(V), end",
            "(rho/2m) tr(V), end",
        ],
        rows=_rows(result, cells),
        results={
            "setting": settings.describe(),
            "problem": dataclasses.asdict(settings.problem) if settings.problem is not None else None,
            "model": settings.base.model,
            "batch_size": settings.batch,
            "epochs": epochs,
            "ms": list(settings.ms),
            "methods": [m.name for m in settings.methods],
            "protocol": {
                "validation_fraction": settings.base.validation_fraction,
                "validation_labels": "flipped like the training labels" if settings.problem else "clean",
                "selection": "best mean validation accuracy at the last epoch over the tuning seeds; ties to the "
                "earlier setting",
                "grid_sizes": {m.name: len(m.grid) for m in settings.methods},
                "tuning_seeds": list(settings.tuning_seeds),
                "seeds": list(settings.seeds),
                "more_seeds": list(settings.more_seeds),
                "budgets": {
                    Budget.EQUAL_EPOCHS.value: {"sam_epochs": epochs, "sgd": "sgd", "sgd_epochs": epochs},
                    Budget.EQUAL_EVALUATIONS.value: {
                        "sam_epochs": epochs,
                        "sgd": "sgd-2x",
                        "sgd_epochs": sgd_epochs(epochs, Budget.EQUAL_EVALUATIONS),
                    },
                },
                "m_sharpness": {
                    "rho": settings.sharpness_rho,
                    "ascent_steps": settings.sharpness_steps,
                    "examples": settings.sample,
                },
            },
            "tuning": {name: dataclasses.asdict(tuning) for name, tuning in result.tuning.items()},
            "extended": result.extended,
            "summary": cells,
            "correlations": [dataclasses.asdict(c) for c in correlations(result)],
            "runs": [dataclasses.asdict(run) for run in result.runs],
        },
        report=_commentary(result),
        figures=figures,
        caption="Each method at its setting chosen on validation: test accuracy over the seeds, the gap, the cost and "
        "the measured regulariser (rho / 2m) tr(V).",
        claims=claims(result),
    )
