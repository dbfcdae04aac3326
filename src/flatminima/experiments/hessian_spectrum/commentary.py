"""The report's text: the tuning and detail tables, the commentary's statements (each chosen from the runs) and the
caption, for ``outcome``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from flatminima.experiments.hessian_spectrum.claims import (
    RULE,
    Comparison,
    ratio_bounds,
)
from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult, RunRecord
from flatminima.experiments.hessian_spectrum.setting import (
    PAPER,
    PAPER_NETWORK,
    PAPER_RHO,
    SAM_GRID,
    SGD_GRID,
    TOP_K,
    VALIDATION_FRACTION,
    VALUE_TOL,
    WIDTH,
    key,
    label,
)
from flatminima.experiments.protocol import MORE_SEEDS, SEEDS, interval
from flatminima.experiments.reproduce import markdown_table
from flatminima.experiments.summary import cell, mean

__all__ = ["caption", "commentary", "interval_text", "optimizer_title", "per_seed", "run_value", "seconds_by_name"]


def _tuning_table(result: HessianSpectrumResult) -> str:
    """The tuning runs: each grid point, where it stopped, its validation accuracy, and the choice."""
    tuning = result.tuning
    assert tuning is not None
    rows = []
    for runs, choice in ((tuning.sgd, tuning.sgd_choice), (tuning.sam, tuning.sam_choice)):
        for run in runs:
            point = {k: v for k, v in run.settings.items() if run.optimizer == "sgd" or k == "rho"}
            chosen = all(run.settings.get(k) == v for k, v in choice.items())
            rows.append(
                [
                    run.optimizer.upper(),
                    ", ".join(f"{k} {v:g}" for k, v in point.items()),
                    f"{run.train_loss:.3g} at step {run.step}" + ("" if run.reached else " (NOT reached)"),
                    f"{100 * run.val_accuracy:.2f}" if run.reached else "n/a (not at the threshold)",
                    "chosen" if chosen else "",
                ]
            )
    headers = ["optimiser", "setting", "training loss at the stop", "validation acc %", ""]
    return markdown_table(headers, rows)


def _detail_table(result: HessianSpectrumResult) -> str:
    """Per seed and optimiser: the stopping point, the top-5 eigenvalues, lambda_max and lambda_5 with their error
    bounds, the range of the ratio the bounds allow, and the trace with its standard error."""
    before = "a step before" if result.setting.replay else "at the check before"
    rows = []
    for r in sorted(result.records, key=lambda r: (result.seeds.index(r.seed), result.keys.index(r.optimizer))):
        s = r.spectrum
        bounds = s.error_bounds if s.error_bounds is not None else [math.nan] * len(s.eigenvalues)
        low, high = ratio_bounds(r)
        rows.append(
            [
                r.seed,
                label(r.rho),
                f"{r.train_loss:.4g} at step {r.step} ({r.train_loss_step_before:.4g} {before})",
                ", ".join(f"{v:.4g}" for v in s.eigenvalues),
                f"{s.lambda_max:.4g} ± {bounds[0]:.1e}",
                f"{s.lambda_5:.4g} ± {bounds[TOP_K - 1]:.1e}",
                f"{s.ratio:.4g} [{low:.5g}, {high:.5g}]",
                f"{max(s.relative_residuals):.1e}",
                f"{s.trace:.4g} ± {s.trace_stderr:.2g}",
                s.lanczos_hvp,
            ]
        )
    headers = [
        "seed",
        "optimiser",
        "training loss at the measured point",
        "top-5 eigenvalues",
        "lambda_max ± bound",
        "lambda_5 ± bound",
        "lambda_max / lambda_5 [bounds]",
        "max rel. residual",
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


def _tuning_text(result: HessianSpectrumResult) -> str:
    """How SGD's settings and the second radius were chosen (or that the command line gave them)."""
    tuning = result.tuning
    if tuning is None:
        extra = result.rhos[1:]
        second = f" SAM is measured at the paper's rho = {PAPER_RHO:g}" + "".join(
            f" and at the given rho = {rho:g}" for rho in extra
        )
        return (
            "**Tuning: none.** The command line gave the learning rate, the weight decay or rho, so no grid was "
            f"trained: SGD uses lr {result.recipe.lr:g} and weight decay {result.recipe.weight_decay:g}.{second}."
        )
    first = tuning.sgd[0]
    sgd = ", ".join(f"(lr {p['lr']:g}, wd {p['weight_decay']:g})" for p in SGD_GRID.settings)
    rhos = ", ".join(f"{p['rho']:g}" for p in SAM_GRID.settings)
    return f"""**Tuning** (on seed {tuning.seed}'s training set: {first.validation_examples} examples, \
{VALIDATION_FRACTION:.0%} stratified, held out as a validation split with clean labels like the rest, since the claim
is not about label noise; the tuning runs train on the other {first.train_examples}). SGD's grid: {len(SGD_GRID)}
settings of learning rate x weight decay, {sgd}; SAM's: {len(SAM_GRID)} radii, {rhos} (the four middle radii of
the paper's grid, fixed before any run), each on SGD's chosen pair: the same tuning budget for both. Every point is
trained once to the same stopping rule as the measured runs and scored by its validation accuracy there (a point
that never reaches the threshold scores nothing); the best is kept, a tie going to the earlier setting (the
default, the smaller radius). No Hessian is computed and the test set is not looked at: the size of the sharpness
effect plays no part in the choice. Chosen: SGD lr {tuning.sgd_choice["lr"]:g}, weight decay \
{tuning.sgd_choice["weight_decay"]:g}; rho = {tuning.sam_choice["rho"]:g}. The measured runs then train on the whole
training set of each seed.

{_tuning_table(result)}"""


def _budget_text(result: HessianSpectrumResult) -> str:
    """The budget each optimiser spent: every run to the same training loss, so neither equal epochs nor equal
    gradient evaluations; the epochs and evaluations each needed."""
    spent = "; ".join(
        f"{label(rho)}: {mean([r.epochs for r in result.runs(key(rho))]):.2f} epochs, "
        f"{mean([float(r.gradient_evaluations) for r in result.runs(key(rho))]):.0f} gradient evaluations"
        for rho in (None, *result.rhos)
    )
    return (
        "**Budget.** Every run trains until its full training loss reaches the threshold, so the two budgets of the "
        "protocol (equal epochs; equal gradient evaluations, SGD at twice SAM's epochs) do not apply: each optimiser "
        "gets what it needs to reach the same training loss, which is what a sharpness comparison must hold fixed. "
        f"Spent on average: {spent} (SAM: two gradients a step)."
    )


def _seeds_text(result: HessianSpectrumResult) -> str:
    """Which seeds were measured, and why seeds 3-4 were added (or not)."""
    seeds, more = list(result.seeds), list(MORE_SEEDS[len(SEEDS) :])
    if result.seeds_extended:
        return (
            f"**Seeds** {seeds}: after seeds {list(SEEDS)} a claim's paired difference (a log ratio) was within two "
            f"standard errors of zero, so seeds {more} were added (the protocol's rule)."
        )
    if not result.close_call:
        return f"**Seeds** {seeds}: every claim's paired difference was beyond two standard errors of zero."
    if tuple(seeds) == SEEDS:
        return (
            f"**Seeds** {seeds}: a claim's paired difference was within two standard errors of zero; a full run adds "
            f"seeds {more} then, this quick one does not."
        )
    return f"**Seeds** {seeds}, as asked (seeds {more} are added only to a full run on the default seeds)."


def _other_statements(result: HessianSpectrumResult) -> dict[str, str]:
    """The computed clauses of the commentary, by name."""
    records, keys = result.records, result.keys
    converged = [r.spectrum.lanczos_converged for r in records]
    start = mean([r.loss_checks[0][1] for r in result.runs("sgd")])  # every optimiser of a seed starts alike
    uniform = math.log(result.classes)
    near = "near" if abs(start - uniform) < 0.1 else "away from"
    rho_of = {key(rho): rho for rho in (None, *result.rhos)}
    tracking = (
        f"lambda_max along training every {result.setting.track_every} steps by `SharpnessTracker` (warm-started "
        "power iteration, relative tolerance 1e-3)"
        if result.setting.track_every
        else "lambda_max is not tracked along training in this run (the quick one)"
    )
    return {
        "tracking": tracking,
        "matched": "At matched training loss"
        if all(r.reached for r in records)
        else "At the stopping points (not every run reached the threshold, so the losses are not matched)",
        "converged": "" if all(converged) else f" (reached in {sum(converged)} of {len(converged)} runs only)",
        "start": f"it starts at {start:.3g}{' on average' if len(result.seeds) > 1 else ''}, {near} ln "
        f"{result.classes} = {uniform:.2f}, the uniform prediction",
        "plateau": "; ".join(
            f"{label(rho_of[k])} "
            + cell(
                [math.nan if r.steps_to_loss_below_2 is None else r.steps_to_loss_below_2 for r in result.runs(k)], 4
            )
            for k in keys
        ),
        "negative": "not tracked in this run"
        if not result.setting.track_every
        else "; ".join(
            f"{label(rho_of[k])} {sum(t[2] <= 0 for r in result.runs(k) for t in r.tracked)}"
            f" of {sum(len(r.tracked) for r in result.runs(k))}"
            for k in keys
        ),
        "timing": "; ".join(
            f"{label(rho_of[k])}: {s['training']:.0f} s training, {s['tracking']:.0f} s tracking "
            f"lambda_max, {s['measuring']:.0f} s measuring"
            for k, s in seconds_by_name(result).items()
        ),
    }


def _against_paper(result: HessianSpectrumResult, compared: list[Comparison], matched: str) -> str:
    """The comparison with the paper's numbers, per radius, computed."""
    by_seed = result.by_seed()
    parts = []
    for rho in result.rhos:
        c_max = next(c for c in compared if c.rho == rho and c.quantity == "lambda_max")
        c_ratio = next(c for c in compared if c.rho == rho and c.quantity == "ratio")
        runs = result.runs(key(rho))
        smaller = _count(runs, lambda r: r.spectrum.lambda_max < by_seed[(r.seed, "sgd")].spectrum.lambda_max)
        flatter = _count(runs, lambda r: r.spectrum.ratio < by_seed[(r.seed, "sgd")].spectrum.ratio)
        trace = _count(runs, lambda r: r.spectrum.trace < by_seed[(r.seed, "sgd")].spectrum.trace)
        parts.append(
            f"{optimizer_title(result, rho)}: {matched.lower()} SGD's lambda_max is {c_max.ratio_text()} times SAM's "
            f"(smaller with SAM on {smaller} seeds; verdict {c_max.verdict.value}), SGD's lambda_max / lambda_5 "
            f"{c_ratio.ratio_text()} times SAM's (smaller with SAM on {flatter}; {c_ratio.verdict.value}), tr(H) "
            f"smaller with SAM on {trace}."
        )
    paper = PAPER["sgd"]["ratio"] / PAPER["sam"]["ratio"]
    return (
        " ".join(parts)
        + f" The paper ({PAPER_NETWORK}, 200 epochs, a cosine schedule, measured at the end of training, not at a "
        f"matched loss): 24 times for lambda_max and {paper:.3g} times for lambda_max / lambda_5 (11.4 against 2.6)."
    )


def commentary(result: HessianSpectrumResult, measured: dict[str, dict[str, Any]], compared: list[Comparison]) -> str:
    """The commentary that follows the table and the verdicts: the protocol, the budget, the per-seed details and
    the comparison with the paper, each statement computed from the runs."""
    setting, recipe = result.setting, result.recipe
    largest_gap = max(max(per_seed(result, "train_loss", k, "gap")) for k in result.keys[1:])
    stop, earlier = _fairness(result)
    said = _other_statements(result)
    digits = recipe.model == "small_cnn"
    model = f"SmallCNN width {WIDTH} on digits" if digits else f"{recipe.model} on {recipe.dataset}"
    stderr = "; ".join(f"{label(measured[k]['rho'])} {measured[k]['trace_stderr']:.2g}" for k in result.keys)
    return f"""
**Verdicts' rule**, fixed before the run: {RULE}. The paired difference is of the logs, seed by seed (SGD's value
over SAM's; the paper's numbers differ by factors), and the widening is the largest error on a seed's log ratio that
the Lanczos error bounds allow (here at most {max(c.lanczos_error for c in compared):.1g}). The table's SGD / SAM rows
give the geometric mean of SGD / SAM with its 95 % interval (before the widening).

{_tuning_text(result)}

{_budget_text(result)}

**How the comparison was made fair.** Every optimiser of a seed starts from the same initialisation and sees the
same batches ({model}; SGD: lr {recipe.lr:g}, momentum {recipe.momentum:g}, weight decay {recipe.weight_decay:g},
batch {recipe.batch_size}, constant lr; SAM: the library's `SAM` around that same SGD). {stop} The per-seed table
below gives {earlier}. The largest SGD-SAM difference in training loss at the measured points is {largest_gap:.2g}.
The cross-entropy Hessian shrinks as the loss goes to zero, so lambda_max is plotted against the training loss too
(figure, right), over the whole runs.

{_seeds_text(result)}

**Measurements**, on the first {setting.examples} training examples of each seed: the top-{TOP_K} eigenvalues by
Lanczos with full reorthogonalisation, stopped when every eigenvalue's error bound (`min(r, r^2 / gap)` from the
verified residual r = ||H y - theta y||) is within {VALUE_TOL:g} of it relatively (`value_tol`, one guard
value){said["converged"]}; the per-seed table gives lambda_max and lambda_5 with their bounds and the range of
lambda_max / lambda_5 the bounds allow. tr(H) by Hutchinson with {setting.trace_probes} Rademacher probes (± its
standard error per seed below; the standard error of each optimiser's mean from the probes alone: {stderr}); the
spectral density by SLQ ({setting.density_runs} start vector(s) x {setting.density_steps} Lanczos steps per model,
pooled over seeds); {said["tracking"]}.

{_detail_table(result)}

**Against the paper.** {_against_paper(result, compared, said["matched"])} The paper-scale command below uses
the paper's network, `wrn40_10_nobn` (a WideResNet-40-10 with `batch_norm=False`).

**On the way.** Steps until the full training loss first fell below 2 ({said["start"]}; checked every \
{setting.check_every} steps): {said["plateau"]}. Tracked points where the eigenvalue of largest
magnitude, which power iteration finds, was negative (a saddle; drawn as x in the figure): {said["negative"]}.

Time per run (mean over seeds; {result.workers} worker process(es)): {said["timing"]}.
"""


def caption(result: HessianSpectrumResult) -> str:
    """The table's caption: what the cells are, and where each run stopped."""
    setting = result.setting
    where = "step" if setting.replay else "check"
    capped = "" if all(r.reached for r in result.records) else f" (or after {setting.max_epochs} epochs if never)"
    return (
        f"Seeds {list(result.seeds)}; every run stopped at the first {where} whose full training loss is below "
        f"{setting.threshold:g}{capped}; Hessian of the cross-entropy on the first {setting.examples} training "
        "examples. lambda_max and lambda_max / lambda_5: mean [95 % interval] over seeds; the rest mean ± std. The "
        f"headline is SAM at the paper's rho = {PAPER_RHO:g}. The last row(s): SGD's value over SAM's, per seed "
        "(lambda_max and the ratio: geometric mean [95 % interval]). The paper's numbers are a "
        f"{PAPER_NETWORK}."
    )


def run_value(record: RunRecord, name: str) -> float:
    """A record's number by name, from the record or its spectrum."""
    return float(getattr(record.spectrum if hasattr(record.spectrum, name) else record, name))


def interval_text(values: list[float], digits: int = 3) -> str:
    """``mean [low, high]``: the mean over seeds and its 95 % Student-t interval (the value alone for one seed)."""
    found = interval(values)
    if found.n == 1:
        return f"{found.mean:.{digits}g}"
    return f"{found.mean:.{digits}g} [{found.low:.{digits}g}, {found.high:.{digits}g}]"


def optimizer_title(result: HessianSpectrumResult, rho: float | None) -> str:
    """An optimiser's row title: SGD with its settings, SAM with where its radius came from."""
    if rho is None:
        return f"SGD (lr {result.recipe.lr:g}, wd {result.recipe.weight_decay:g})"
    names = []
    if rho == PAPER_RHO:
        names.append("paper's rho")
    if rho == result.validated_rho:
        names.append("validated" if result.rho_source == "validation" else "given")
    return f"{label(rho)} ({', '.join(names)})"


def per_seed(result: HessianSpectrumResult, name: str, of: str, how: str = "over") -> list[float]:
    """Per seed, SGD's ``name`` over SAM ``of``'s (``how="over"``) or their absolute difference (``"gap"``)."""
    by_seed = result.by_seed()
    pairs = [(run_value(by_seed[(s, "sgd")], name), run_value(by_seed[(s, of)], name)) for s in result.seeds]
    return [a / b if how == "over" else abs(b - a) for a, b in pairs]


def seconds_by_name(result: HessianSpectrumResult) -> dict[str, dict[str, float]]:
    """Mean seconds per run of each phase, per optimiser."""
    return {
        name: {
            "training": statistics.fmean(r.seconds_training for r in result.runs(name)),
            "tracking": statistics.fmean(r.seconds_tracking for r in result.runs(name)),
            "measuring": statistics.fmean(r.spectrum.seconds_measuring for r in result.runs(name)),
        }
        for name in result.keys
    }
