"""``label-noise``: SAM resists label noise, SGD memorises it (Foret et al. 2021, Table 4), over noise levels.

The paper trains ResNet-32 on CIFAR-10 with a fraction of the training labels replaced at random and reports clean
test accuracy, SGD against SAM: 84.8 / 68.8 / 48.2 / 26.2 against 95.1 / 93.4 / 90.5 / 77.9 at 20 / 40 / 60 / 80 %
noise. Here the setting is the ``flatminima demo``'s (:data:`~flatminima.experiments.label_noise.DEMO_CONFIG`:
SmallCNN on the embedded digits, batch 32, SGD lr 0.05 cosine, momentum 0.9, wd 5e-4), swept over the noise levels
0 to 80 % and several seeds, SGD against SAM around the same SGD from the same initialisation and batch order. Each
run reports the clean test accuracy at the end and the fraction of the corrupted training labels the final model
predicts (:func:`~flatminima.experiments.label_noise.fitted_fractions`): SGD's accuracy falls because it memorises
them, and SAM's holds as long as it does not.

SAM's radius is chosen once, before the sweep and without the test set: SAM is trained at 40 % noise (the first
seed) for each rho of :data:`RHO_GRID` with :data:`VALIDATION_FRACTION` of the training set held out with its clean
labels (``TrainConfig.validation_fraction``: the split is made before the noise, so its labels are never
corrupted), and the rho with the best final validation accuracy is used at every noise level. The sweep's runs then
train on the whole training set, as the demo does. The same validation runs are repeated at the sweep's other noise
levels (first seed only); they choose nothing, and show how the best radius moves with the noise level.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import statistics
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from flatminima.experiments.label_noise import DEMO_CONFIG, train_and_measure
from flatminima.experiments.reproduce import TRAINING_FIELDS, Context, Outcome, Reproduction, markdown_table
from flatminima.train import TrainConfig, prepare_data

__all__ = [
    "EPOCHS",
    "NOISE_LEVELS",
    "PAPER_RHO",
    "PAPER_TEST_ACCURACY",
    "QUICK_EPOCHS",
    "QUICK_NOISE_LEVELS",
    "QUICK_RHO_GRID",
    "REPRODUCTION",
    "RHO_GRID",
    "SELECTION_NOISE",
    "VALIDATION_FRACTION",
    "base_config",
    "choose_rho",
    "describe_setting",
    "run",
    "run_trainings",
    "sweep_config",
]

NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8)
QUICK_NOISE_LEVELS = (0.0, 0.4)
RHO_GRID = (0.05, 0.1, 0.3, 0.5)
QUICK_RHO_GRID = (0.1, 0.3)
SELECTION_NOISE = 0.4
VALIDATION_FRACTION = 0.15
EPOCHS = 60  # the demo's
QUICK_EPOCHS = 20

#: Foret et al. (2021), Table 4: ResNet-32 on CIFAR-10, clean test accuracy (%) at each noise level, SGD and SAM.
PAPER_TEST_ACCURACY: dict[float, dict[str, float]] = {
    0.2: {"sgd": 84.8, "sam": 95.1},
    0.4: {"sgd": 68.8, "sam": 93.4},
    0.6: {"sgd": 48.2, "sam": 90.5},
    0.8: {"sgd": 26.2, "sam": 77.9},
}
#: The paper's radius for each noise level.
PAPER_RHO: dict[float, float] = {0.2: 0.1, 0.4: 0.1, 0.6: 0.1, 0.8: 0.05}

CHANCE = 0.2  # a run whose best clean test accuracy stays below this never left chance level (10 classes)


def sweep_config(
    optimizer: str,
    noise: float,
    seed: int,
    epochs: int,
    output: str | Path,
    rho: float = DEMO_CONFIG.rho,
    validation_fraction: float = 0.0,
    base: TrainConfig = DEMO_CONFIG,
) -> TrainConfig:
    """``base`` (the demo's config by default) with the optimiser, noise level, seed, epochs and (for SAM) rho of
    one run of the sweep."""
    return dataclasses.replace(
        base,
        optimizer=optimizer,
        label_noise=noise,
        seed=seed,
        epochs=epochs,
        rho=rho,
        validation_fraction=validation_fraction,
        output=str(output),
        progress=False,
        overwrite=True,
    )


def run_trainings(
    configs: Sequence[TrainConfig],
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Train every config (:func:`~flatminima.experiments.label_noise.train_and_measure`): ``(record, history)``
    each, in the order given.

    ``workers`` processes run at once (default: one per CPU core; each training uses one thread, as the demo's
    config says); the results do not depend on it.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, len(configs)))
    describe = [
        f"{c.optimizer} noise {c.label_noise:g} seed {c.seed}"
        + (f" rho {c.rho:g}" if c.optimizer != "sgd" else "")
        + (", validation split held out" if c.validation_fraction else "")
        for c in configs
    ]
    if workers == 1:
        results = []
        for index, config in enumerate(configs):
            results.append(train_and_measure(config))
            if progress:
                progress(f"label-noise: {index + 1}/{len(configs)} done ({describe[index]})")
        return results
    found: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # SAM's runs (two passes a step) first, so that the last runs to finish are short ones
        order = sorted(range(len(configs)), key=lambda index: configs[index].optimizer == "sgd")
        futures = {pool.submit(train_and_measure, configs[index]): index for index in order}
        for future in as_completed(futures):
            index = futures[future]
            found[index] = future.result()
            if progress:
                progress(f"label-noise: {len(found)}/{len(configs)} done ({describe[index]})")
    return [found[index] for index in range(len(configs))]


def choose_rho(val_accuracy: dict[float, float]) -> float:
    """The rho with the best validation accuracy; a tie goes to the smaller rho (the smaller change to SGD)."""
    best = max(val_accuracy.values())
    return min(rho for rho, accuracy in val_accuracy.items() if accuracy == best)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for both when any value is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float], digits: int = 1, sign: str = "") -> str:
    """``mean ± std`` in percent (just the value for one seed), ``n/a`` when undefined."""
    mean, std = _mean_std([100.0 * v for v in values])
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{sign}.{digits}f}" if len(values) == 1 else f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimiser at one noise level, over seeds: the means and standard deviations, in percent."""
    out: dict[str, Any] = {}
    for key in ("test_accuracy", "best_test_accuracy", "noisy_fitted", "clean_fitted"):
        mean, std = _mean_std([100.0 * r[key] for r in records])
        out[f"{key}_pct_mean"], out[f"{key}_pct_std"] = mean, std
    out["train_loss_mean"] = statistics.mean(r["train_loss"] for r in records)
    return out


def _plot(
    ctx: Context,
    noise_levels: Sequence[float],
    per_noise: dict[str, dict[str, Any]],
    rho: float,
    validation: dict[float, dict[str, Any]],
    seed: int,
    setting: str = "digits, SmallCNN",
) -> Path:
    """Clean test accuracy (left) and the memorised fraction of the noisy labels (middle) against the noise level;
    SAM's validation accuracy against rho at each noise level (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right, grid) = plt.subplots(1, 3, figsize=(13, 3.8))
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
    left.set_xlim(*span)
    right.set_xlim(*span)
    left.set_xlabel("label noise (%)")
    left.set_ylabel("clean test accuracy (%)")
    left.set_ylim(0, 100)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.set_xlabel("label noise (%)")
    right.set_ylabel("noisy training labels fitted (%)")
    right.set_ylim(0, 103)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    if not validation:
        grid.text(0.5, 0.5, f"rho {rho:g} given:\nno selection runs", ha="center", va="center")
        grid.set_axis_off()
    for index, (noise, found) in enumerate(sorted(validation.items())):
        colour = plt.cm.viridis(0.85 * index / max(1, len(validation) - 1))  # not SGD's and SAM's colours
        rhos = sorted(found["sam_val_accuracy"])
        values = [100 * found["sam_val_accuracy"][r] for r in rhos]
        grid.plot(rhos, values, marker="o", color=colour, label=f"{100 * noise:g} %")
        grid.axhline(100 * found["sgd_val_accuracy"], color=colour, linestyle=":", linewidth=0.8)
    if validation:
        _rho_axes(grid, rho, validation, seed)
    figure.tight_layout()
    path = ctx.figure_path("accuracy_and_memorisation.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rho_axes(grid: Any, rho: float, validation: dict[float, dict[str, Any]], seed: int) -> None:
    """The axes of the right panel: validation accuracy against rho (log scale)."""
    grid.axvline(rho, color="grey", linestyle="--", linewidth=0.8)
    rhos = sorted({r for found in validation.values() for r in found["sam_val_accuracy"]})
    grid.set_xscale("log")
    grid.set_xticks(rhos, [f"{r:g}" for r in rhos])
    grid.minorticks_off()
    grid.set_xlabel("SAM's rho (dotted: SGD; dashed: the chosen rho)")
    grid.set_ylabel(f"clean validation accuracy (%), seed {seed}")
    grid.set_ylim(0, 100)
    grid.grid(alpha=0.3)
    grid.legend(fontsize=7, title="noise", title_fontsize=7)


def _stuck_note(runs: Sequence[dict[str, Any]]) -> str:
    """A sentence naming the runs that never left chance level (best clean test accuracy below :data:`CHANCE`),
    which the means and spreads of the table mix with the others; empty when there are none."""
    stuck = [r for r in runs if r["best_test_accuracy"] < CHANCE]
    if not stuck:
        return ""
    named = "; ".join(f"{r['optimizer'].upper()} at {100 * r['noise']:g} % noise, seed {r['seed']}" for r in stuck)
    return (
        f"\n**Runs that never left chance level** (best clean test accuracy over the epochs below {100 * CHANCE:g} "
        f"%; they are included in the means above): {named}.\n"
    )


def _validation_runs(
    noise: float, seed: int, epochs: int, rho_grid: Sequence[float], folder: Path, base: TrainConfig = DEMO_CONFIG
) -> list[TrainConfig]:
    """SAM at each rho of the grid, then SGD, at one noise level, with the clean validation split held out."""
    configs = [
        sweep_config(
            "sam", noise, seed, epochs, folder / f"val-noise{noise:g}-rho{rho:g}", rho, VALIDATION_FRACTION, base
        )
        for rho in rho_grid
    ]
    configs.append(
        sweep_config(
            "sgd", noise, seed, epochs, folder / f"val-noise{noise:g}-sgd", base.rho, VALIDATION_FRACTION, base
        )
    )
    return configs


def base_config(overrides: dict[str, Any]) -> TrainConfig:
    """The demo's config with the training settings given to ``flatminima reproduce`` (rho and epochs are the
    sweep's own: :func:`run` reads them)."""
    fields = {k: v for k, v in overrides.items() if k not in ("rho", "epochs")}
    if "dataset" in fields and "model" not in fields and fields["dataset"] != "digits":
        raise ValueError("label-noise with --dataset needs --model too (the paper's: --model resnet32)")
    if fields.get("device") == "cuda" and "threads" not in fields:
        fields["threads"] = 0
    return dataclasses.replace(DEMO_CONFIG, **fields)


def describe_setting(config: TrainConfig, epochs: int) -> str:
    """One phrase naming the model, data and optimiser settings of the sweep's runs."""
    return (
        f"{config.model} on {config.dataset}, {epochs} epochs, batch {config.batch_size}, SGD lr {config.lr:g} with "
        f"a {config.lr_schedule} schedule, momentum {config.momentum:g}, weight decay {config.weight_decay:g}"
        + (", random crop and flip" if config.augment else "")
        + (f", cutout {config.cutout}" if config.cutout else "")
    )


def _validation_accuracies(
    configs: Sequence[TrainConfig], results: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> dict[str, Any]:
    """The final validation accuracies of :func:`_validation_runs`' runs: SAM's per rho, SGD's, and the best rho."""
    sam = {config.rho: record["val_accuracy"] for config, (record, _) in zip(configs[:-1], results[:-1])}
    return {"sam_val_accuracy": sam, "sgd_val_accuracy": results[-1][0]["val_accuracy"], "best_rho": choose_rho(sam)}


def run(ctx: Context) -> Outcome:
    """Choose rho on the clean validation split, then sweep the noise levels with SGD and SAM (module docstring).

    The same validation runs are made at the other noise levels too (the first seed only): they are not used to
    choose anything, and show how the best radius moves with the noise level.
    """
    base = base_config(dict(ctx.overrides))
    epochs = ctx.overrides.get("epochs", QUICK_EPOCHS if ctx.quick else EPOCHS)
    noise_levels = QUICK_NOISE_LEVELS if ctx.quick else NOISE_LEVELS
    rho_grid = QUICK_RHO_GRID if ctx.quick else RHO_GRID
    given_rho = ctx.overrides.get("rho")  # a radius given on the command line replaces the selection
    selection_seed = ctx.seeds[0]
    others = [] if given_rho is not None else [n for n in noise_levels if n > 0 and n != SELECTION_NOISE]
    workers = 1 if base.device == "cuda" else None  # one GPU: one training at a time
    validation: dict[float, dict[str, Any]] = {}
    selection: list[TrainConfig] = []
    with tempfile.TemporaryDirectory(prefix="label-noise-") as scratch:  # the runs' checkpoints are not kept
        folder = Path(scratch)
        if given_rho is None:
            selection = _validation_runs(SELECTION_NOISE, selection_seed, epochs, rho_grid, folder, base)
            ctx.progress(
                f"label-noise: choosing rho among {list(rho_grid)} at {100 * SELECTION_NOISE:g} % noise on a clean "
                f"validation split ({len(selection)} runs)"
            )
            found = run_trainings(selection, workers=workers, progress=ctx.progress)
            validation[SELECTION_NOISE] = _validation_accuracies(selection, found)
            rho = validation[SELECTION_NOISE]["best_rho"]
        else:
            rho = float(given_rho)
        jobs = [(noise, seed, name) for noise in noise_levels for seed in ctx.seeds for name in ("sgd", "sam")]
        configs = [
            sweep_config(name, noise, seed, epochs, folder / f"{name}-noise{noise:g}-seed{seed}", rho, base=base)
            for noise, seed, name in jobs
        ]
        sensitivity = [_validation_runs(noise, selection_seed, epochs, rho_grid, folder, base) for noise in others]
        ctx.progress(
            f"label-noise: rho {rho:g} {'given' if given_rho is not None else 'chosen'}; sweeping noise "
            f"{list(noise_levels)}, seeds {list(ctx.seeds)} ({len(configs)} runs) and the rho grid at the other "
            f"noise levels ({sum(map(len, sensitivity))} runs)"
        )
        results = run_trainings(
            configs + [c for group in sensitivity for c in group], workers=workers, progress=ctx.progress
        )
        offset = len(configs)
        for noise, group in zip(others, sensitivity):
            validation[noise] = _validation_accuracies(group, results[offset : offset + len(group)])
            offset += len(group)
    runs = [
        {
            "optimizer": name,
            "noise": noise,
            "seed": seed,
            "rho": rho if name == "sam" else None,
            "test_accuracy": record["test_accuracy"],
            "best_test_accuracy": record["best_test_accuracy"],
            "noisy_fitted": record["noisy_fitted"],
            "clean_fitted": record["clean_fitted"],
            "train_loss": record["train_loss"],
            "seconds_per_epoch": record["seconds_per_epoch"],
            "test_accuracy_curve": [round(r["test_accuracy"], 4) for r in history],
        }
        for (noise, seed, name), (record, history) in zip(jobs, results)
    ]
    per_noise: dict[str, dict[str, Any]] = {}
    rows = []
    for noise in noise_levels:
        cell = {name: [r for r in runs if r["noise"] == noise and r["optimizer"] == name] for name in ("sgd", "sam")}
        gap = [b["test_accuracy"] - a["test_accuracy"] for a, b in zip(cell["sgd"], cell["sam"])]
        paper = PAPER_TEST_ACCURACY.get(noise)
        per_noise[f"{noise:g}"] = {
            "noise": noise,
            "sgd": _summary(cell["sgd"]),
            "sam": _summary(cell["sam"]),
            "sam_minus_sgd_test_accuracy_pct_mean": _mean_std([100 * g for g in gap])[0],
            "sam_minus_sgd_test_accuracy_pct_std": _mean_std([100 * g for g in gap])[1],
            "rho": rho,
            "paper_sgd_test_accuracy_pct": paper["sgd"] if paper else None,
            "paper_sam_test_accuracy_pct": paper["sam"] if paper else None,
            "paper_rho": PAPER_RHO.get(noise),
        }
        rows.append(
            [
                f"{100 * noise:g} %",
                _cell([r["test_accuracy"] for r in cell["sgd"]]),
                _cell([r["test_accuracy"] for r in cell["sam"]]),
                _cell(gap, sign="+"),
                _cell([r["noisy_fitted"] for r in cell["sgd"]]),
                _cell([r["noisy_fitted"] for r in cell["sam"]]),
                f"{paper['sgd']:g}" if paper else "",
                f"{paper['sam']:g}" if paper else "",
            ]
        )
    validated = sorted(validation)
    setting = describe_setting(base, epochs)
    default = base.dataset == "digits" and base.model == "small_cnn"
    short = "digits, SmallCNN" if default else f"{base.dataset}, {base.model}"
    figure = _plot(ctx, noise_levels, per_noise, rho, {n: validation[n] for n in validated}, selection_seed, short)
    selection_examples = prepare_data(selection[0]).val_labels.numel() if selection else 0  # type: ignore[union-attr]
    whole = prepare_data(configs[0])
    sizes = f"{whole.train_labels.numel():,} training and {whole.test_labels.numel():,} test images"
    report = f"""
Each row: {len(ctx.seeds)} seed(s) ({", ".join(map(str, ctx.seeds))}); the seed fixes the train/test split (digits),
the noisy labels, the initialisation and the batch order, the same for SGD and SAM. Setting: {setting}
({sizes}; SAM around the same SGD), symmetric noise (each corrupted label replaced by one of the other classes).
Accuracy is the clean test accuracy after the last epoch (mean ± standard deviation over seeds, in %); "noisy fitted"
is the fraction of the corrupted training examples the final model assigns their corrupted label (memorised), on the
training images without augmentation. The paper's columns are Foret et al.'s Table 4 (ResNet-32 on CIFAR-10, 200
epochs, rho 0.1, 0.05 at 80 % noise).
"""
    if given_rho is not None:
        report += f"""
**rho** = {rho:g}, given on the command line (--rho): no selection runs were made.
"""
    else:
        grid_table = markdown_table(
            ["noise", *(f"SAM rho {r:g}" for r in rho_grid), "SGD", "best rho"],
            [
                [
                    f"{100 * noise:g} %" + (" (chooses)" if noise == SELECTION_NOISE else ""),
                    *(f"{100 * validation[noise]['sam_val_accuracy'][r]:.1f}" for r in rho_grid),
                    f"{100 * validation[noise]['sgd_val_accuracy']:.1f}",
                    f"{validation[noise]['best_rho']:g}",
                ]
                for noise in validated
            ],
        )
        chosen_line = ", ".join(
            f"rho {r:g}: {100 * a:.1f} %" for r, a in validation[SELECTION_NOISE]["sam_val_accuracy"].items()
        )
        report += f"""
**How rho was chosen.** Once, before the sweep, without the test set: SAM was trained at {100 * SELECTION_NOISE:g} %
noise with seed {selection_seed} for {epochs} epochs, for each rho in {list(rho_grid)}, with
{100 * VALIDATION_FRACTION:g} % of the training set ({selection_examples} examples, stratified) held out with its
clean labels (the split is made before the noise, so its labels are never corrupted), and the rho with the best
final validation accuracy was kept for every noise level and seed: {chosen_line} (SGD:
{100 * validation[SELECTION_NOISE]["sgd_val_accuracy"]:.1f} %). **rho = {rho:g}**. The sweep's runs train on the
whole training set.

**The same validation runs at every noise level** (seed {selection_seed}, final validation accuracy in %, clean
labels; only the {100 * SELECTION_NOISE:g} % row chose rho, the others show how the best radius moves with the noise):

{grid_table}
"""
    report = "\n\n".join(
        part if part.lstrip().startswith("|") else textwrap.fill(" ".join(part.split()), width=118)
        for part in (report + _stuck_note(runs)).strip().split("\n\n")
    )
    return Outcome(
        headers=[
            "noise",
            "SGD test acc %",
            f"SAM (rho {rho:g}) test acc %",
            "SAM - SGD",
            "SGD noisy fitted %",
            "SAM noisy fitted %",
            "paper SGD %",
            "paper SAM %",
        ],
        rows=rows,
        results={
            "epochs": epochs,
            "noise_levels": list(noise_levels),
            "rho": rho,
            "setting": setting,
            "rho_given": given_rho is not None,
            "rho_selection": None
            if given_rho is not None
            else {
                "noise": SELECTION_NOISE,
                "seed": selection_seed,
                "validation_fraction": VALIDATION_FRACTION,
                "validation_examples": selection_examples,
                "rho_grid": list(rho_grid),
                "val_accuracy": {f"{r:g}": a for r, a in validation[SELECTION_NOISE]["sam_val_accuracy"].items()},
                "sgd_val_accuracy": validation[SELECTION_NOISE]["sgd_val_accuracy"],
                "chosen_rho": rho,
            },
            "rho_sensitivity": {
                f"{noise:g}": {
                    "sam_val_accuracy": {f"{r:g}": a for r, a in validation[noise]["sam_val_accuracy"].items()},
                    "sgd_val_accuracy": validation[noise]["sgd_val_accuracy"],
                    "best_rho": validation[noise]["best_rho"],
                }
                for noise in validated
            },
            "per_noise": per_noise,
            "runs": runs,
        },
        report=report,
        figures=[figure],
        caption=f"SGD vs SAM ({short}) with symmetric label noise: clean test accuracy and memorised noisy labels.",
    )


REPRODUCTION = Reproduction(
    name="label-noise",
    summary="SAM resists label noise: clean test accuracy and memorised noisy labels, SGD vs SAM, noise 0-80 %",
    paper="Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization (ICLR 2021), Table 4",
    run=run,
    overridable=frozenset(TRAINING_FIELDS),
    # the paper's rho is 0.1 (0.05 at 80 % noise: rerun that level alone with --rho 0.05)
    paper_command=(
        "flatminima reproduce label-noise --dataset cifar10 --data-root DATA --model resnet32 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.1 --device cuda"
    ),
)
