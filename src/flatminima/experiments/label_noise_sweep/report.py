"""The sweep's report: from a :class:`~flatminima.experiments.label_noise_sweep.compute.LabelNoiseResult` to the
table, the text (every outcome in it read off the result), ``results.json`` and the figure."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from flatminima.experiments.figures import pyplot, saved_figure
from flatminima.experiments.label_noise_sweep.compute import LabelNoiseResult, RunRecord, Validation
from flatminima.experiments.label_noise_sweep.settings import (
    CHANCE,
    PAPER_RHO,
    PAPER_TEST_ACCURACY,
    SELECTION_NOISE,
    VALIDATION_FRACTION,
    describe_setting,
)
from flatminima.experiments.protocol import Interval, paired_difference, verdict
from flatminima.experiments.reproduce import Context, Outcome, markdown_table
from flatminima.experiments.summary import cell, mean, mean_std

__all__ = ["best_rho_sentence", "report", "stuck_note"]


def _percent(values: Sequence[float], sign: bool = False) -> str:
    """A table cell in percent with one decimal: ``mean ± std`` over seeds (the value alone for one seed)."""
    return cell(values, 1, fixed=True, scale=100, sign=sign)


def _summary(records: Sequence[RunRecord]) -> dict[str, Any]:
    """One optimiser at one noise level, over seeds: the means and standard deviations, in percent."""
    out: dict[str, Any] = {}
    for key in ("test_accuracy", "best_test_accuracy", "noisy_fitted", "clean_fitted"):
        out[f"{key}_pct_mean"], out[f"{key}_pct_std"] = mean_std([100.0 * getattr(r, key) for r in records])
    out["train_loss_mean"] = mean([r.train_loss for r in records])
    return out


def _per_noise(result: LabelNoiseResult) -> dict[str, dict[str, Any]]:
    """Each noise level's summary (``results.json``'s ``per_noise``), keyed ``f"{noise:g}"``."""
    per_noise: dict[str, dict[str, Any]] = {}
    for noise in result.noise_levels:
        sgd, sam = result.cell(noise, "sgd"), result.cell(noise, "sam")
        gap = mean_std([100 * (b.test_accuracy - a.test_accuracy) for a, b in zip(sgd, sam)])
        paired = _paired(sgd, sam)
        paper = PAPER_TEST_ACCURACY.get(noise)
        per_noise[f"{noise:g}"] = {
            "noise": noise,
            "sgd": _summary(sgd),
            "sam": _summary(sam),
            "sam_minus_sgd_test_accuracy_pct_mean": gap[0],
            "sam_minus_sgd_test_accuracy_pct_std": gap[1],
            "sam_minus_sgd_test_accuracy_pct_interval95": [paired.low, paired.high],
            "verdict": verdict(paired, paper_says_positive=True).value,
            "rho": result.rho,
            "paper_sgd_test_accuracy_pct": paper["sgd"] if paper else None,
            "paper_sam_test_accuracy_pct": paper["sam"] if paper else None,
            "paper_rho": PAPER_RHO.get(noise),
        }
    return per_noise


def _rows(result: LabelNoiseResult) -> list[list[str]]:
    """One table row per noise level: test accuracies, their gap, the memorised fractions, the paper's numbers."""
    rows = []
    for noise in result.noise_levels:
        sgd, sam = result.cell(noise, "sgd"), result.cell(noise, "sam")
        paper = PAPER_TEST_ACCURACY.get(noise)
        rows.append(
            [
                f"{100 * noise:g} %",
                _percent([r.test_accuracy for r in sgd]),
                _percent([r.test_accuracy for r in sam]),
                _percent([b.test_accuracy - a.test_accuracy for a, b in zip(sgd, sam)], sign=True),
                _percent([r.noisy_fitted for r in sgd]),
                _percent([r.noisy_fitted for r in sam]),
                f"{paper['sgd']:g}" if paper else "",
                f"{paper['sam']:g}" if paper else "",
                verdict(_paired(sgd, sam), paper_says_positive=True).value,
            ]
        )
    return rows


def _paired(sgd: Sequence[Any], sam: Sequence[Any]) -> Interval:
    """SAM's clean test accuracy minus SGD's, seed by seed, in percent: its 95 % interval (the paper: above 0)."""
    return paired_difference([100 * b.test_accuracy for b in sam], [100 * a.test_accuracy for a in sgd])


def _short_setting(result: LabelNoiseResult) -> str:
    """The data and model in a few words, for the legend and the caption."""
    base = result.base
    default = base.dataset == "digits" and base.model == "small_cnn"
    return "digits, SmallCNN" if default else f"{base.dataset}, {base.model}"


def _plot(ctx: Context, result: LabelNoiseResult, per_noise: dict[str, dict[str, Any]]) -> Any:
    """Clean test accuracy (left) and the memorised fraction of the noisy labels (middle) against the noise level;
    SAM's validation accuracy against rho at each noise level (right)."""
    noise_levels, rho, validation = result.noise_levels, result.rho, result.validation
    setting = _short_setting(result)
    path = ctx.figure_path("accuracy_and_memorisation.png")
    with saved_figure(path, 1, 3, size=(13, 3.8)) as (_, (left, right, grid)):
        x = [100 * n for n in noise_levels]
        for name, label, colour in (("sgd", "SGD", "tab:blue"), ("sam", f"SAM, rho {rho:g}", "tab:orange")):
            cells = [per_noise[f"{n:g}"][name] for n in noise_levels]
            left.errorbar(
                x,
                [c["test_accuracy_pct_mean"] for c in cells],
                yerr=[c["test_accuracy_pct_std"] for c in cells],
                marker="o",
                capsize=3,
                color=colour,
                label=f"{label} ({setting})",
            )
            noisy = [(n, c) for n, c in zip(x, cells) if not math.isnan(c["noisy_fitted_pct_mean"])]
            right.errorbar(
                [n for n, _ in noisy],
                [c["noisy_fitted_pct_mean"] for _, c in noisy],
                yerr=[c["noisy_fitted_pct_std"] for _, c in noisy],
                marker="o",
                capsize=3,
                color=colour,
                label=label,
            )
            paper = [(100 * n, PAPER_TEST_ACCURACY[n][name]) for n in noise_levels if n in PAPER_TEST_ACCURACY]
            if paper:
                left.plot(
                    *zip(*paper), linestyle="--", marker="x", color=colour, alpha=0.6, label=f"{name.upper()} (paper)"
                )
        span = (100 * min(noise_levels) - 5, 100 * max(noise_levels) + 5)
        for axis, label, top in (
            (left, "clean test accuracy (%)", 100),
            (right, "noisy training labels fitted (%)", 103),
        ):
            axis.set_xlim(*span)
            axis.set_xlabel("label noise (%)")
            axis.set_ylabel(label)
            axis.set_ylim(0, top)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        if not validation:
            grid.text(0.5, 0.5, f"rho {rho:g} given:\nno selection runs", ha="center", va="center")
            grid.set_axis_off()
        viridis = pyplot().cm.viridis
        for index, (noise, found) in enumerate(sorted(validation.items())):
            colour = viridis(0.85 * index / max(1, len(validation) - 1))  # not SGD's and SAM's colours
            rhos = sorted(found.sam_val_accuracy)
            grid.plot(
                rhos,
                [100 * found.sam_val_accuracy[r] for r in rhos],
                marker="o",
                color=colour,
                label=f"{100 * noise:g} %",
            )
            grid.axhline(100 * found.sgd_val_accuracy, color=colour, linestyle=":", linewidth=0.8)
        if validation:
            _rho_axes(grid, rho, validation, result.selection_seed)
    return path


def _rho_axes(grid: Any, rho: float, validation: Mapping[float, Validation], seed: int) -> None:
    """The axes of the right panel: validation accuracy against rho (log scale)."""
    grid.axvline(rho, color="grey", linestyle="--", linewidth=0.8)
    rhos = sorted({r for found in validation.values() for r in found.sam_val_accuracy})
    grid.set_xscale("log")
    grid.set_xticks(rhos, [f"{r:g}" for r in rhos])
    grid.minorticks_off()
    grid.set_xlabel("SAM's rho (dotted: SGD; dashed: the chosen rho)")
    grid.set_ylabel(f"clean validation accuracy (%), seed {seed}")
    grid.set_ylim(0, 100)
    grid.grid(alpha=0.3)
    grid.legend(fontsize=7, title="noise", title_fontsize=7)


def stuck_note(runs: Sequence[RunRecord]) -> str:
    """A sentence naming the runs that never left chance level (best clean test accuracy below :data:`CHANCE`),
    which the means and spreads of the table mix with the others; empty when there are none."""
    stuck = [r for r in runs if r.best_test_accuracy < CHANCE]
    if not stuck:
        return ""
    named = "; ".join(f"{r.optimizer.upper()} at {100 * r.noise:g} % noise, seed {r.seed}" for r in stuck)
    return (
        f"\n**Runs that never left chance level** (best clean test accuracy over the epochs below {100 * CHANCE:g} "
        f"%; they are included in the means above): {named}.\n"
    )


def best_rho_sentence(validation: Mapping[float, Validation], seed: int) -> str:
    """The heading of the validation grid, with what it shows of the best rho across noise levels: read off the
    runs when there are rows other than the selection's, and said to be unmeasured when there are none."""
    others = {noise: found.best_rho for noise, found in sorted(validation.items()) if noise != SELECTION_NOISE}
    where = f"seed {seed}, final validation accuracy in %, clean labels"
    chose = f"{100 * SELECTION_NOISE:g} %"
    if not others:
        return (
            f"**The validation runs** ({where}; they were made at {chose} noise only, where they chose rho: the "
            "sweep has no other noise level above 0 %, so how the best radius moves with the noise is not measured "
            "here):"
        )
    best = {noise: found.best_rho for noise, found in sorted(validation.items())}
    if len(set(best.values())) == 1:
        moves = f"it does not move, the best rho is {next(iter(best.values())):g} at every one of them"
    else:
        moves = "the best rho is " + ", ".join(f"{r:g} at {100 * n:g} %" for n, r in best.items())
    return (
        f"**The same validation runs at every noise level above 0 %** ({where}; only the {chose} row chose rho, the "
        f"others show how the best radius moves with the noise: {moves}):"
    )


def _text(result: LabelNoiseResult) -> str:
    """The report's markdown: the setting, how rho was chosen (or that it was given), the validation grid."""
    seeds, rho, validation = result.seeds, result.rho, result.validation
    sizes = f"{result.train_examples:,} training and {result.test_examples:,} test images"
    text = f"""
Each row: {len(seeds)} seed(s) ({", ".join(map(str, seeds))}); the seed fixes the train/test split (digits),
the noisy labels, the initialisation and the batch order, the same for SGD and SAM. Setting:
{describe_setting(result.base, result.epochs)} ({sizes}; SAM around the same SGD), symmetric noise (each corrupted
label replaced by one of the other classes). Accuracy is the clean test accuracy after the last epoch (mean ±
standard deviation over seeds, in %); "noisy fitted" is the fraction of the corrupted training examples the final
model assigns their corrupted label (memorised), on the training images without augmentation. The paper's columns
are Foret et al.'s Table 4 (ResNet-32 on CIFAR-10, 200 epochs, rho 0.1, 0.05 at 80 % noise).
"""
    if result.rho_given:
        text += f"""
**rho** = {rho:g}, given on the command line (--rho): no selection runs were made.
"""
    else:
        selection = validation[SELECTION_NOISE]
        grid_table = markdown_table(
            ["noise", *(f"SAM rho {r:g}" for r in result.rho_grid), "SGD", "best rho"],
            [
                [
                    f"{100 * noise:g} %" + (" (chooses)" if noise == SELECTION_NOISE else ""),
                    *(f"{100 * found.sam_val_accuracy[r]:.1f}" for r in result.rho_grid),
                    f"{100 * found.sgd_val_accuracy:.1f}",
                    f"{found.best_rho:g}",
                ]
                for noise, found in sorted(validation.items())
            ],
        )
        chosen_line = ", ".join(f"rho {r:g}: {100 * a:.1f} %" for r, a in selection.sam_val_accuracy.items())
        text += f"""
**How rho was chosen.** Once, before the sweep, without the test set: SAM was trained at {100 * SELECTION_NOISE:g} %
noise with seed {result.selection_seed} for {result.epochs} epochs, for each rho in {list(result.rho_grid)}, with
{100 * VALIDATION_FRACTION:g} % of the training set ({result.validation_examples} examples, stratified) held out
with its clean labels (the split is made before the noise, so its labels are never corrupted), and the rho with the
best final validation accuracy was kept for every noise level and seed: {chosen_line} (SGD:
{100 * selection.sgd_val_accuracy:.1f} %). **rho = {rho:g}**. The sweep's runs train on the whole training set.

{best_rho_sentence(validation, result.selection_seed)}

{grid_table}
"""
    return "\n\n".join(
        part if part.lstrip().startswith("|") else textwrap.fill(" ".join(part.split()), width=118)
        for part in (text + stuck_note(result.runs)).strip().split("\n\n")
    )


def _results(result: LabelNoiseResult, per_noise: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``results.json``'s own part: the settings, how rho was chosen, the validation grid, the summaries, the runs."""
    validation = result.validation
    selection = validation.get(SELECTION_NOISE)
    return {
        "epochs": result.epochs,
        "noise_levels": list(result.noise_levels),
        "rho": result.rho,
        "setting": describe_setting(result.base, result.epochs),
        "rho_given": result.rho_given,
        "rho_selection": None
        if result.rho_given or selection is None
        else {
            "noise": SELECTION_NOISE,
            "seed": result.selection_seed,
            "validation_fraction": VALIDATION_FRACTION,
            "validation_examples": result.validation_examples,
            "rho_grid": list(result.rho_grid),
            "val_accuracy": {f"{r:g}": a for r, a in selection.sam_val_accuracy.items()},
            "sgd_val_accuracy": selection.sgd_val_accuracy,
            "chosen_rho": result.rho,
        },
        "rho_sensitivity": {
            f"{noise:g}": {
                "sam_val_accuracy": {f"{r:g}": a for r, a in found.sam_val_accuracy.items()},
                "sgd_val_accuracy": found.sgd_val_accuracy,
                "best_rho": found.best_rho,
            }
            for noise, found in sorted(validation.items())
        },
        "per_noise": per_noise,
        "runs": [dataclasses.asdict(run) for run in result.runs],
    }


def report(result: LabelNoiseResult, ctx: Context) -> Outcome:
    """The :class:`Outcome` of the sweep: the table by noise level, the text, ``results.json`` and the figure."""
    per_noise = _per_noise(result)
    return Outcome(
        headers=[
            "noise",
            "SGD test acc %",
            f"SAM (rho {result.rho:g}) test acc %",
            "SAM - SGD",
            "SGD noisy fitted %",
            "SAM noisy fitted %",
            "paper SGD %",
            "paper SAM %",
            "verdict (SAM > SGD)",
        ],
        rows=_rows(result),
        results=_results(result, per_noise),
        report=_text(result),
        figures=[_plot(ctx, result, per_noise)],
        caption=f"SGD vs SAM ({_short_setting(result)}) with symmetric label noise: clean test accuracy and "
        "memorised noisy labels.",
    )
