"""The sweep's report: from a ``LabelNoiseResult`` to the
table, the verdicts, the text (every outcome in it read off the result), ``results.json`` and the figure."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Sequence
from typing import Any

from flatminima.experiments.figures import pyplot, saved_figure
from flatminima.experiments.label_noise_sweep.compute import ROLES, LabelNoiseResult, RunRecord, Tuning
from flatminima.experiments.label_noise_sweep.settings import (
    CHANCE,
    PAPER_RHO,
    PAPER_TEST_ACCURACY,
    VALIDATION_FRACTION,
    describe_setting,
)
from flatminima.experiments.protocol import (
    Budget,
    Claim,
    Interval,
    interval,
    paired_difference,
    sgd_epochs,
    verdict,
)
from flatminima.experiments.reproduce import Context, Outcome, markdown_table
from flatminima.experiments.summary import cell, mean_std

__all__ = ["claims", "difference", "report", "stuck_note"]

_BUDGETS = {"sgd": "equal epochs", "sgd-2x": "equal gradient evaluations"}
_RULE = (
    "paired difference over the seeds, Student-t 95 % interval; SUPPORTS if it lies above 0, CONTRADICTS if below, "
    "INCONCLUSIVE otherwise"
)


def _percent(values: Sequence[float], sign: bool = False) -> str:
    """A table cell in percent with one decimal: ``mean ± std`` over seeds (the value alone for one seed)."""
    return cell(values, 1, fixed=True, scale=100, sign=sign)


def difference(sam: Sequence[RunRecord], sgd: Sequence[RunRecord]) -> Interval:
    """SAM's clean test accuracy minus SGD's, seed by seed, in percentage points: its 95 % interval."""
    return paired_difference([100 * r.test_accuracy for r in sam], [100 * r.test_accuracy for r in sgd])


def _interval_text(found: Interval) -> str:
    return f"{found.mean:+.1f} [{found.low:+.1f}, {found.high:+.1f}]"


def _sam_rows(result: LabelNoiseResult, noise: float) -> list[str]:
    """The SAM roles at one noise level that were run: the validated rho, and the paper's where it differs."""
    return [role for role in ("sam", "sam-paper") if result.cell(noise, role)]


def _rho_of(runs: Sequence[RunRecord]) -> float:
    return runs[0].rho if runs and runs[0].rho is not None else math.nan


def _rows(result: LabelNoiseResult) -> list[list[str]]:
    """One row per noise level and SAM role: the accuracies of SGD at both budgets and of SAM, SAM - SGD at each
    budget with its interval and verdict, the memorised fractions, the paper's numbers."""
    rows = []
    for noise in result.noise_levels:
        sgd, sgd2 = result.cell(noise, "sgd"), result.cell(noise, "sgd-2x")
        paper = PAPER_TEST_ACCURACY.get(noise)
        for role in _sam_rows(result, noise):
            sam = result.cell(noise, role)
            label = f"{100 * noise:g} %" + (" (paper's rho)" if role == "sam-paper" else "")
            budgets = []
            for other in (sgd, sgd2):
                found = difference(sam, other)
                budgets += [_interval_text(found), verdict(found, paper_says_positive=True).value]
            rows.append(
                [
                    label,
                    _percent([r.test_accuracy for r in sgd]),
                    _percent([r.test_accuracy for r in sgd2]),
                    f"{_percent([r.test_accuracy for r in sam])} (rho {_rho_of(sam):g})",
                    *budgets,
                    f"{_percent([r.noisy_fitted for r in sgd])} / {_percent([r.noisy_fitted for r in sam])}",
                    f"{paper['sgd']:g} / {paper['sam']:g}" if paper else "",
                ]
            )
    return rows


def claims(result: LabelNoiseResult) -> list[Claim]:
    """The paper's claim at every noise level, budget and SAM role: SAM's clean test accuracy exceeds SGD's."""
    found = []
    for noise in result.noise_levels:
        for role in _sam_rows(result, noise):
            sam = result.cell(noise, role)
            for sgd_role, budget in _BUDGETS.items():
                gap = difference(sam, result.cell(noise, sgd_role))
                which = "the paper's" if role == "sam-paper" else "validated"
                found.append(
                    Claim(
                        statement=f"label noise {100 * noise:g} %: SAM ({which} rho {_rho_of(sam):g}) has a higher "
                        f"clean test accuracy than SGD ({budget})",
                        measured=f"SAM - SGD {_interval_text(gap)} points over {gap.n} seeds",
                        rule=_RULE,
                        verdict=verdict(gap, paper_says_positive=True),
                    )
                )
    return found


def _summary(records: Sequence[RunRecord]) -> dict[str, Any]:
    """One role at one noise level, over seeds: its settings, the means and standard deviations, in percent."""
    first = records[0]
    out: dict[str, Any] = {"epochs": first.epochs, "lr": first.lr, "weight_decay": first.weight_decay}
    out["rho"] = first.rho
    for key in ("test_accuracy", "best_test_accuracy", "noisy_fitted", "clean_fitted"):
        out[f"{key}_pct_mean"], out[f"{key}_pct_std"] = mean_std([100.0 * getattr(r, key) for r in records])
    values = [100.0 * r.test_accuracy for r in records]
    found = interval(values)
    out["test_accuracy_pct_interval95"] = [found.low, found.high]
    return out


def _per_noise(result: LabelNoiseResult) -> dict[str, dict[str, Any]]:
    """Each noise level's summary (``results.json``'s ``per_noise``), keyed ``f"{noise:g}"``."""
    per_noise: dict[str, dict[str, Any]] = {}
    for noise in result.noise_levels:
        entry: dict[str, Any] = {"noise": noise, "seeds": list(result.seeds[noise])}
        for role in ROLES:
            if result.cell(noise, role):
                entry[role] = _summary(result.cell(noise, role))
        for role in _sam_rows(result, noise):
            for sgd_role, budget in _BUDGETS.items():
                gap = difference(result.cell(noise, role), result.cell(noise, sgd_role))
                entry[f"{role}_minus_{sgd_role}_test_accuracy_pct"] = {
                    "budget": budget,
                    "mean": gap.mean,
                    "interval95": [gap.low, gap.high],
                    "verdict": verdict(gap, paper_says_positive=True).value,
                }
        paper = PAPER_TEST_ACCURACY.get(noise)
        entry["paper_sgd_test_accuracy_pct"] = paper["sgd"] if paper else None
        entry["paper_sam_test_accuracy_pct"] = paper["sam"] if paper else None
        entry["paper_rho"] = PAPER_RHO.get(noise)
        per_noise[f"{noise:g}"] = entry
    return per_noise


def _short_setting(result: LabelNoiseResult) -> str:
    """The data and model in a few words, for the legend and the caption."""
    base = result.base
    default = base.dataset == "digits" and base.model == "small_cnn"
    return "digits, SmallCNN" if default else f"{base.dataset}, {base.model}"


def _plot(ctx: Context, result: LabelNoiseResult) -> Any:
    """Clean test accuracy (left) and the memorised fraction of the noisy labels (middle) against the noise level,
    for SGD at both budgets and SAM; SAM's validation accuracy against rho at each noise level (right)."""
    levels = result.noise_levels
    path = ctx.figure_path("accuracy_and_memorisation.png")
    x = [100 * n for n in levels]
    styles = {"sgd": "tab:blue", "sgd-2x": "tab:cyan", "sam": "tab:orange"}
    with saved_figure(path, 1, 3, size=(13, 3.8)) as (_, (left, middle, right)):
        for role, colour in styles.items():
            cells = [result.cell(n, role) for n in levels]
            for axis, key in ((left, "test_accuracy"), (middle, "noisy_fitted")):
                stats = [mean_std([100 * getattr(r, key) for r in runs]) for runs in cells]
                axis.errorbar(
                    x,
                    [s[0] for s in stats],
                    yerr=[s[1] for s in stats],
                    marker="o",
                    capsize=3,
                    color=colour,
                    label=ROLES[role],
                )
        for name, colour in (("sgd", "tab:blue"), ("sam", "tab:orange")):
            paper = [(100 * n, PAPER_TEST_ACCURACY[n][name]) for n in levels if n in PAPER_TEST_ACCURACY]
            if paper:
                left.plot(
                    *zip(*paper),
                    linestyle="--",
                    marker="x",
                    color=colour,
                    alpha=0.6,
                    label=f"{name.upper()} (paper, ResNet-32 CIFAR-10)",
                )
        for axis, label, top in ((left, "clean test accuracy (%)", 100), (middle, "noisy labels fitted (%)", 103)):
            axis.set_xlim(min(x) - 5, max(x) + 5)
            axis.set_xlabel(f"label noise (%), {_short_setting(result)}")
            axis.set_ylabel(label)
            axis.set_ylim(0, top)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        sam_tuning = [t for t in result.tuning if t.role == "sam"]
        if not sam_tuning:
            right.text(0.5, 0.5, "settings given:\nno tuning runs", ha="center", va="center")
            right.set_axis_off()
        viridis = pyplot().cm.viridis
        for index, found in enumerate(sam_tuning):
            colour = viridis(0.85 * index / max(1, len(sam_tuning) - 1))
            rhos = [s["rho"] for s in found.settings]
            right.plot(
                rhos,
                [100 * a for a in found.val_accuracy],
                marker="o",
                color=colour,
                label=f"{100 * found.noise:g} % (chose {found.chosen['rho']:g})",
            )
        if sam_tuning:
            right.set_xscale("log")
            rhos = sorted({s["rho"] for t in sam_tuning for s in t.settings})
            right.set_xticks(rhos, [f"{r:g}" for r in rhos])
            right.minorticks_off()
            right.set_xlabel("SAM's rho")
            right.set_ylabel(f"validation accuracy (%), noisy labels, seed {result.selection_seed}")
            right.set_ylim(0, 100)
            right.grid(alpha=0.3)
            right.legend(fontsize=7, title="noise", title_fontsize=7)
    return path


def stuck_note(runs: Sequence[RunRecord]) -> str:
    """A sentence naming the runs that never left chance level (best clean test accuracy below ``CHANCE``),
    which the means and spreads of the table mix with the others; empty when there are none."""
    stuck = [r for r in runs if r.best_test_accuracy < CHANCE]
    if not stuck:
        return ""
    named = "; ".join(f"{ROLES[r.role]} at {100 * r.noise:g} % noise, seed {r.seed}" for r in stuck)
    return (
        f"\n**Runs that never left chance level** (best clean test accuracy over the epochs below {100 * CHANCE:g} "
        f"%; they are included in the means above): {named}.\n"
    )


def _setting_text(setting: dict[str, float]) -> str:
    return ", ".join(f"{'wd' if k == 'weight_decay' else k} {v:g}" for k, v in setting.items())


def _tuning_table(result: LabelNoiseResult) -> str:
    """Per noise level and role: each grid point's validation accuracy, and the point chosen."""
    rows = []
    for found in result.tuning:
        tried = "; ".join(
            f"{_setting_text({k: v for k, v in s.items() if k in _grid_keys(found)})}: {100 * a:.1f}"
            for s, a in zip(found.settings, found.val_accuracy)
        )
        rows.append(
            [f"{100 * found.noise:g} %", ROLES[found.role], f"{found.epochs}", tried, _setting_text(found.chosen)]
        )
    return markdown_table(["noise", "run", "epochs", "validation accuracy % per setting", "chosen"], rows)


def _grid_keys(found: Tuning) -> set[str]:
    """The keys the grid varied (the others were fixed for it)."""
    return {k for k in found.settings[0] if len({s[k] for s in found.settings}) > 1}


def _paper_rho_sentence(result: LabelNoiseResult) -> str:
    """Whether the 60 % and 80 % levels got a second SAM row at the paper's rho: only where validation chose
    another radius."""
    levels = [n for n in result.noise_levels if n in (0.6, 0.8)]
    if not levels:
        return ""
    parts = []
    for noise in levels:
        sam = result.cell(noise, "sam")
        chosen, paper = _rho_of(sam), PAPER_RHO[noise]
        if result.cell(noise, "sam-paper"):
            parts.append(f"at {100 * noise:g} % validation chose {chosen:g}, so SAM also ran at the paper's {paper:g}")
        else:
            parts.append(
                f"at {100 * noise:g} % validation chose the paper's own rho, {paper:g}, so there is no second row"
            )
    return (
        "At 60 % and 80 % noise SAM runs at the paper's rho too where validation chose another: "
        + "; ".join(parts)
        + "."
    )


def _text(result: LabelNoiseResult) -> str:
    """The report's markdown: the setting, the protocol, the tuning grids and what they chose."""
    sizes = f"{result.train_examples:,} training and {result.test_examples:,} test images"
    seeds = sorted({s for found in result.seeds.values() for s in found})
    more = [f"{100 * n:g} %" for n, found in result.seeds.items() if len(found) > min(map(len, result.seeds.values()))]
    text = f"""
Setting: {describe_setting(result.base, result.epochs)} ({sizes}), symmetric noise (each corrupted label replaced
by one of the other classes); SAM wraps the same SGD. Seeds {seeds}; the seed fixes the train/test split (digits), the
noisy labels, the initialisation and the batch order, the same for every optimiser{
        f" (the noise levels {', '.join(more)} got the extra seeds: their gap was within two standard errors)"
        if more
        else ""
    }.
Accuracy is the clean test accuracy after the last epoch (mean ± standard deviation over seeds, in %); "noisy fitted"
is the fraction of the corrupted training labels the final model predicts (memorised), on the training images
without augmentation. SAM - SGD is the paired difference seed by seed in points, with its Student-t 95 % interval;
the verdict is SUPPORTS when that interval lies above 0, CONTRADICTS when below, INCONCLUSIVE otherwise (rule fixed
before the runs). The paper's columns are Foret et al.'s Table 4 (ResNet-32 on CIFAR-10, 200 epochs, rho 0.1, 0.05
at 80 % noise).
"""
    if not result.tuned:
        text += """
**Settings given on the command line** (--lr, --weight-decay or --rho): nothing was tuned; every optimiser ran
with them, as the paper's own setting does.
"""
    else:
        text += f"""
**How the settings were chosen** (the protocol of every training reproduction, without the test set): at each noise
level, with seed {result.selection_seed} and {100 * VALIDATION_FRACTION:g} % of the training set
({result.validation_examples} examples, stratified) held out with its labels corrupted like the training labels
(the paper does not say how it validated under noise; a practitioner with noisy data has only noisy labels), SGD
was tuned over its learning rate and weight decay at each budget, then SAM over rho on SGD's chosen pair, with grids
of the same size; the best final validation accuracy wins, a tie goes to the first setting listed (the demo's).
{_paper_rho_sentence(result)} The tuned settings were then trained on the whole training set over the seeds.

{_tuning_table(result)}
"""
    return "\n\n".join(
        part if part.lstrip().startswith("|") else textwrap.fill(" ".join(part.split()), width=118)
        for part in (text + stuck_note(result.runs)).strip().split("\n\n")
    )


def _results(result: LabelNoiseResult) -> dict[str, Any]:
    """``results.json``'s own part: the settings, the tuning, the summaries per noise level, the runs."""
    return {
        "epochs": result.epochs,
        "sgd_equal_evaluations_epochs": sgd_epochs(result.epochs, Budget.EQUAL_EVALUATIONS),
        "noise_levels": list(result.noise_levels),
        "setting": describe_setting(result.base, result.epochs),
        "tuned": result.tuned,
        "validation": {
            "fraction": VALIDATION_FRACTION,
            "labels": "noisy",
            "examples": result.validation_examples,
            "seed": result.selection_seed,
        },
        "tuning": [dataclasses.asdict(found) for found in result.tuning],
        "per_noise": _per_noise(result),
        "runs": [dataclasses.asdict(run) for run in result.runs],
    }


def report(result: LabelNoiseResult, ctx: Context) -> Outcome:
    """The ``Outcome`` of the sweep: the table by noise level, the verdicts, the text, the results, the
    figure."""
    epochs = result.epochs
    return Outcome(
        headers=[
            "noise",
            f"SGD {epochs} ep. %",
            f"SGD {sgd_epochs(epochs, Budget.EQUAL_EVALUATIONS)} ep. %",
            f"SAM {epochs} ep. %",
            "SAM - SGD, equal epochs",
            "verdict",
            "SAM - SGD, equal evaluations",
            "verdict",
            "noisy fitted % SGD / SAM",
            "paper % SGD / SAM",
        ],
        rows=_rows(result),
        results=_results(result),
        report=_text(result),
        figures=[_plot(ctx, result)],
        caption=f"SGD vs SAM ({_short_setting(result)}) with symmetric label noise: clean test accuracy, the paired "
        "difference at both budgets with its 95 % interval, and the memorised noisy labels.",
        claims=claims(result),
    )
