"""From an :class:`MSharpnessResult` to the runner's :class:`Outcome`: the table, the commentary, results.json and
the figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flatminima.experiments.figures import saved_figure
from flatminima.experiments.m_sharpness.compute import MSharpnessResult, Settings
from flatminima.experiments.m_sharpness.methods import SAMPLE
from flatminima.experiments.reproduce import Context, Outcome

__all__ = ["outcome", "workers_phrase"]


def workers_phrase(workers: int, threads: int) -> str:
    """How the trainings ran side by side, for reading the seconds: ``"2 concurrent single-thread workers"``."""
    kind = {0: "default-threaded", 1: "single-thread"}.get(threads, f"{threads}-thread")
    return f"{workers} concurrent {kind} workers" if workers > 1 else f"one {kind} worker, one training at a time"


def _rows(result: MSharpnessResult) -> list[list[str]]:
    """One row per (noise, method): accuracy mean ± std over seeds (the ± shown for one seed too), cost, tr(V)."""
    rows = []
    for noise in result.settings.noises:
        for name in result.settings.names:
            cell = result.summary[f"{noise:g}"][name]
            rows.append(
                [
                    f"{100 * noise:.0f} %",
                    name,
                    "-" if cell.m is None else str(cell.m),
                    f"{100 * cell.test_accuracy_mean:.2f} ± {100 * cell.test_accuracy_std:.2f}",
                    f"{cell.seconds_per_epoch:.2f}",
                    f"{cell.cost_relative_to_sam:.2f}",
                    "n/a" if cell.trace_v_final is None else f"{cell.trace_v_final:.3g}",
                    "n/a" if cell.regulariser_final is None else f"{cell.regulariser_final:.3g}",
                ]
            )
    return rows


def _plot(ctx: Context, result: MSharpnessResult) -> list[Path]:
    """Clean test accuracy against m (SGD, n-SAM and RW-SAM as lines), and the regulariser along training."""
    settings = result.settings
    noises, names, methods, batch = settings.noises, settings.names, settings.methods, settings.batch
    accuracy = ctx.figure_path("accuracy_vs_m.png")
    with saved_figure(accuracy, 1, len(noises), size=(5 * len(noises), 4), squeeze=False) as (_, axes):
        ms = [name for name in names if methods[name][1] is not None and name != "rwsam"]
        for axis, noise in zip(axes[0], noises):
            cells = result.summary[f"{noise:g}"]
            xs = [methods[name][1] for name in ms]
            ys = [100 * cells[name].test_accuracy_mean for name in ms]
            es = [100 * cells[name].test_accuracy_std for name in ms]
            axis.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"m-SAM (m = {batch} is SAM)")
            for name, style in (("sgd", "k--"), ("nsam", "g:"), ("rwsam", "r-.")):
                if name in cells:
                    axis.axhline(100 * cells[name].test_accuracy_mean, color=style[0], linestyle=style[1:], label=name)
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.set_xlabel(f"m (batch {batch})")
            axis.set_ylabel("clean test accuracy %")
            axis.set_title(f"label noise {100 * noise:.0f} %")
            axis.legend(fontsize=8)

    regulariser = ctx.figure_path("regulariser.png")
    with saved_figure(regulariser, 2, len(noises), size=(5 * len(noises), 7), squeeze=False) as (_, axes):
        for column, noise in enumerate(noises):
            cells = result.summary[f"{noise:g}"]
            for index, name in enumerate(names):
                curve = cells[name].regulariser_curve
                epochs = [point.epoch for point in curve]
                style = {"marker": ".", "label": name, "color": f"C{index}"}  # one colour per method in both rows
                axes[0][column].plot(epochs, [point.trace_v_mean for point in curve], **style)
                if methods[name][1] is not None:
                    axes[1][column].plot(epochs, [point.regulariser_mean for point in curve], **style)
            axes[0][column].set_yscale("log")
            axes[0][column].set_ylabel("tr(V) on the fixed sample")
            axes[0][column].set_title(f"label noise {100 * noise:.0f} %")
            axes[1][column].set_yscale("log")
            axes[1][column].set_ylabel("(rho / 2m) tr(V)")
            axes[1][column].set_xlabel("epoch")
            axes[0][column].legend(fontsize=7)
            axes[1][column].legend(fontsize=7)
    return [accuracy, regulariser]


def _commentary(result: MSharpnessResult) -> str:
    """What was trained and how each column is measured; a note when tr(V) could not be measured."""
    settings: Settings = result.settings
    base, batch, rho = settings.base, settings.batch, settings.rho
    model = f"{base.model} on {base.dataset}" if settings.overridden else "the demo's small CNN on the embedded digits"
    noises = ", ".join(f"{100 * n:.0f} %" for n in settings.noises)
    report = f"""
Each row: {len(settings.seeds)} seed(s) of {model}, {settings.epochs} epochs, batch
{batch}, SGD momentum {base.momentum:g}, lr {base.lr:g} ({base.lr_schedule}), weight decay {base.weight_decay:g}, rho
{rho} for every SAM variant; the labels of the training set {noises} wrong
(symmetric noise), test labels clean. m-SAM is `--optimizer sam --group-size m`; SAM is m = {batch} (the batch).
n-SAM takes its perturbation from an independent sample of 128 training examples; RW-SAM weights the examples
of the batch by softmax(lambda s_i), lambda 1. Accuracy is the clean test accuracy at the last epoch, mean ± std
over seeds. s / epoch is the median training time of an epoch (evaluation and the tr(V) measurement taken out),
in {workers_phrase(settings.workers, base.threads)}, so relative cost is what to read, not the seconds. tr(V) is
mean_i ||g_i - g_bar||^2 of the per-example cross-entropy gradients on the first {SAMPLE} training examples (as
trained, noisy labels included), at the last epoch; the regulariser is (rho / 2m) tr(V) with each method's own m
(n/a for SGD and n-SAM, which have no such term in Luo et al.'s drift).
"""
    if not result.trace_measured:
        report += """
tr(V) was not measured: the model has BatchNorm, whose per-example gradients are not defined in training mode (one
example has no batch statistics); the accuracy columns stand alone.
"""
    return report


def outcome(result: MSharpnessResult, ctx: Context) -> Outcome:
    """The table (one row per noise and method), results.json, the commentary and the two figures."""
    settings = result.settings
    figures = _plot(ctx, result)
    return Outcome(
        headers=[
            "label noise",
            "method",
            "m",
            "clean test acc %",
            "s / epoch",
            "cost vs SAM",
            "tr(V), end",
            "(rho/2m) tr(V), end",
        ],
        rows=_rows(result),
        results={
            "batch_size": settings.batch,
            "rho": settings.rho,
            "epochs": settings.epochs,
            "measure_every_epochs": settings.every,
            "trace_sample": SAMPLE,
            "noises": list(settings.noises),
            "methods": settings.names,
            "summary": {
                noise: {name: dataclasses.asdict(cell) for name, cell in cells.items()}
                for noise, cells in result.summary.items()
            },
            "runs": [dataclasses.asdict(run) for run in result.runs],
        },
        report=_commentary(result),
        figures=figures,
        caption="Clean test accuracy, cost per epoch and the measured regulariser (rho / 2m) tr(V), per method.",
    )
