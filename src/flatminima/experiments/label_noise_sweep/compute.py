"""The sweep itself, by the protocol of ``flatminima.experiments.protocol``: at each noise level, tune SGD (lr and
weight decay, at both budgets) and SAM (rho, on SGD's chosen pair) on a validation split, then train the tuned
settings over the seeds on the whole training set.

``compute`` trains and measures and returns a ``LabelNoiseResult``; it writes nothing and formats nothing
(the report does, ``flatminima.experiments.label_noise_sweep.report``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatminima.experiments.label_noise_sweep.settings import (
    EPOCHS,
    NOISE_LEVELS,
    PAPER_RHO,
    QUICK_EPOCHS,
    QUICK_NOISE_LEVELS,
    TUNED_FIELDS,
    base_config,
    grids,
    run_config,
)
from flatminima.experiments.label_noise_sweep.training import TrainingOutput, run_trainings
from flatminima.experiments.protocol import (
    MORE_SEEDS,
    SEEDS,
    Budget,
    Grid,
    choose,
    equal_sizes,
    needs_more_seeds,
    sgd_epochs,
)
from flatminima.experiments.reproduce import Context
from flatminima.train import TrainConfig, prepare_data

__all__ = ["ROLES", "LabelNoiseResult", "RunRecord", "Tuning", "compute"]

#: the runs at each noise level: SGD at both budgets, SAM at the validated rho, and SAM at the paper's rho where
#: that differs from every validated one (the 60 % and 80 % rows' second line)
ROLES: dict[str, str] = {
    "sgd": "SGD, equal epochs",
    "sgd-2x": "SGD, equal gradient evaluations",
    "sam": "SAM, validated rho",
    "sam-paper": "SAM, the paper's rho",
}
_PAPER_ROW_NOISES = (0.6, 0.8)


@dataclass(frozen=True)
class RunRecord:
    """One run over the seeds: its role (``ROLES``), noise level, seed, epochs and settings, and what it
    measured (fractions in [0, 1]; ``noisy_fitted`` is NaN without noise)."""

    role: str
    noise: float
    seed: int
    epochs: int
    lr: float
    weight_decay: float
    rho: float | None
    test_accuracy: float
    best_test_accuracy: float
    noisy_fitted: float
    clean_fitted: float
    train_loss: float
    seconds_per_epoch: float
    test_accuracy_curve: list[float]


@dataclass(frozen=True)
class Tuning:
    """One tuning grid run at one noise level (the selection seed, validation split held out): the settings tried,
    their final validation accuracies (noisy labels, like the training labels), and the one chosen."""

    noise: float
    role: str
    epochs: int
    settings: list[dict[str, float]]
    val_accuracy: list[float]
    chosen: dict[str, float]


@dataclass(frozen=True)
class LabelNoiseResult:
    """Everything the sweep measured, with the settings that made it.

    ``tuning`` holds the grids run per noise level and role (empty when settings were given on the command line);
    ``seeds`` the seeds each noise level was run over (more where the first ones left the gap too close to call).
    """

    base: TrainConfig
    epochs: int
    noise_levels: tuple[float, ...]
    seeds: dict[float, tuple[int, ...]]
    tuned: bool
    selection_seed: int
    tuning: list[Tuning]
    validation_examples: int
    train_examples: int
    test_examples: int
    runs: list[RunRecord]

    def cell(self, noise: float, role: str) -> list[RunRecord]:
        """The runs of one role at one noise level, in the order of the seeds."""
        return sorted((r for r in self.runs if r.noise == noise and r.role == role), key=lambda r: r.seed)

    def tuned_at(self, noise: float, role: str) -> Tuning | None:
        return next((t for t in self.tuning if t.noise == noise and t.role == role), None)


def _optimizer(role: str) -> str:
    return "sgd" if role.startswith("sgd") else "sam"


def _epochs(role: str, epochs: int) -> int:
    return sgd_epochs(epochs, Budget.EQUAL_EVALUATIONS if role == "sgd-2x" else Budget.EQUAL_EPOCHS)


def _role_config(
    base: TrainConfig,
    role: str,
    noise: float,
    seed: int,
    epochs: int,
    output: Path,
    setting: dict[str, Any],
    validation: bool = False,
) -> TrainConfig:
    """One run of ``role`` (``ROLES``): its optimiser and budget follow from the role, and SGD's roles carry
    no rho (their config keeps its default, unread)."""
    own = {k: v for k, v in setting.items() if role.startswith("sam") or k != "rho"}
    return run_config(base, _optimizer(role), noise, seed, _epochs(role, epochs), output, own, validation)


def _tune(
    base: TrainConfig,
    noises: Sequence[float],
    plan: Sequence[tuple[str, Grid, Callable[[float], dict[str, float]]]],
    epochs: int,
    seed: int,
    folder: Path,
    train: Callable[[list[TrainConfig]], list[TrainingOutput]],
) -> list[Tuning]:
    """Run each (role, grid, fixed settings per noise) of ``plan`` at every noise level with the validation split
    held out, and choose each grid's best setting on validation accuracy."""
    jobs = [(noise, role, grid, fixed(noise)) for noise in noises for role, grid, fixed in plan]
    configs = [
        _role_config(
            base, role, noise, seed, epochs, folder / f"tune-{role}-noise{noise:g}-{index}", {**fixed, **setting}, True
        )
        for noise, role, grid, fixed in jobs
        for index, setting in enumerate(grid.settings)
    ]
    outputs = iter(train(configs))
    tuning = []
    for noise, role, grid, fixed in jobs:
        scores = [next(outputs)[0]["val_accuracy"] for _ in grid.settings]
        settings = [{**fixed, **setting} for setting in grid.settings]
        tuning.append(Tuning(noise, role, _epochs(role, epochs), settings, scores, {**fixed, **choose(grid, scores)}))
    return tuning


def _record(role: str, config: TrainConfig, output: TrainingOutput) -> RunRecord:
    record, history = output
    return RunRecord(
        role=role,
        noise=config.label_noise,
        seed=config.seed,
        epochs=config.epochs,
        lr=config.lr,
        weight_decay=config.weight_decay,
        rho=config.rho if role.startswith("sam") else None,
        test_accuracy=record["test_accuracy"],
        best_test_accuracy=record["best_test_accuracy"],
        noisy_fitted=record["noisy_fitted"],
        clean_fitted=record["clean_fitted"],
        train_loss=record["train_loss"],
        seconds_per_epoch=record["seconds_per_epoch"],
        test_accuracy_curve=[round(r["test_accuracy"], 4) for r in history],
    )


def compute(ctx: Context) -> LabelNoiseResult:
    """Tune on validation (unless lr, weight decay or rho is given), then train every role over the seeds at every
    noise level; a noise level whose SAM - SGD difference is within two standard errors of zero at either budget
    gets ``MORE_SEEDS`` (when the seeds are the default ones)."""
    base = base_config(dict(ctx.overrides))
    epochs = int(ctx.overrides.get("epochs", QUICK_EPOCHS if ctx.quick else EPOCHS))
    noise_levels = QUICK_NOISE_LEVELS if ctx.quick else NOISE_LEVELS
    tuned = not any(name in ctx.overrides for name in TUNED_FIELDS)
    workers = 1 if base.device == "cuda" else None  # one GPU: one training at a time
    selection_seed = ctx.seeds[0]
    with tempfile.TemporaryDirectory(prefix="label-noise-") as scratch:  # the runs' checkpoints are not kept
        folder = Path(scratch)

        def train(configs: list[TrainConfig]) -> list[TrainingOutput]:
            return run_trainings(configs, workers, ctx.progress)

        tuning: list[Tuning] = []
        chosen: dict[tuple[float, str], dict[str, float]] = {}
        fixed = {"lr": base.lr, "weight_decay": base.weight_decay, "rho": base.rho}
        if tuned:
            sgd_grid, sam_grid = grids(ctx.quick)
            equal_sizes(sgd_grid, sam_grid)
            ctx.progress(
                f"label-noise: tuning on a validation split at noise {list(noise_levels)}: SGD over lr x weight decay "
                f"at both budgets, then SAM over rho ({len(sgd_grid)} settings each)"
            )
            tuning += _tune(
                base,
                noise_levels,
                [("sgd", sgd_grid, lambda _: {}), ("sgd-2x", sgd_grid, lambda _: {})],
                epochs,
                selection_seed,
                folder,
                train,
            )
            sgd_choice = {t.noise: t.chosen for t in tuning if t.role == "sgd"}
            tuning += _tune(
                base, noise_levels, [("sam", sam_grid, sgd_choice.__getitem__)], epochs, selection_seed, folder, train
            )
            chosen = {(t.noise, t.role): t.chosen for t in tuning}
        roles = {noise: [r for r in ROLES if r != "sam-paper"] for noise in noise_levels}
        for noise in noise_levels:
            sam = chosen.get((noise, "sam"), fixed)
            if tuned and noise in _PAPER_ROW_NOISES and sam["rho"] != PAPER_RHO[noise]:
                chosen[(noise, "sam-paper")] = {**sam, "rho": PAPER_RHO[noise]}
                roles[noise].append("sam-paper")

        def finals(jobs: list[tuple[float, int]]) -> list[RunRecord]:
            configs = [
                (
                    role,
                    _role_config(
                        base,
                        role,
                        noise,
                        seed,
                        epochs,
                        folder / f"{role}-noise{noise:g}-seed{seed}",
                        chosen.get((noise, role), fixed),
                    ),
                )
                for noise, seed in jobs
                for role in roles[noise]
            ]
            ctx.progress(f"label-noise: training the chosen settings ({len(configs)} runs)")
            outputs = train([config for _, config in configs])
            return [_record(role, config, output) for (role, config), output in zip(configs, outputs)]

        seeds = {noise: tuple(ctx.seeds) for noise in noise_levels}
        runs = finals([(noise, seed) for noise in noise_levels for seed in ctx.seeds])
        if tuple(ctx.seeds) == SEEDS:
            close = [noise for noise in noise_levels if _too_close(runs, noise)]
            extra = [seed for seed in MORE_SEEDS if seed not in SEEDS]
            if close:
                ctx.progress(f"label-noise: noise {close}: SAM - SGD within two standard errors; seeds {extra} too")
                runs += finals([(noise, seed) for noise in close for seed in extra])
                seeds.update({noise: MORE_SEEDS for noise in close})
    selection = prepare_data(run_config(base, "sgd", noise_levels[0], selection_seed, epochs, folder, {}, True))
    whole = prepare_data(run_config(base, "sgd", noise_levels[0], selection_seed, epochs, folder, {}))
    return LabelNoiseResult(
        base=base,
        epochs=epochs,
        noise_levels=tuple(noise_levels),
        seeds=seeds,
        tuned=tuned,
        selection_seed=selection_seed,
        tuning=tuning,
        validation_examples=selection.val_labels.numel() if selection.val_labels is not None else 0,
        train_examples=whole.train_labels.numel(),
        test_examples=whole.test_labels.numel(),
        runs=runs,
    )


def _too_close(runs: Sequence[RunRecord], noise: float) -> bool:
    """Whether SAM - SGD (test accuracy, seed by seed) is within two standard errors of zero at either budget."""

    def accuracies(role: str) -> list[float]:
        return [r.test_accuracy for r in sorted(runs, key=lambda r: r.seed) if r.noise == noise and r.role == role]

    sam = accuracies("sam")
    return any(
        needs_more_seeds([a - b for a, b in zip(sam, accuracies(role), strict=True)]) for role in ("sgd", "sgd-2x")
    )
