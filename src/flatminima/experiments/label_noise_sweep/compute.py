"""The sweep itself: choose rho on a clean validation split, then train SGD and SAM at every noise level and seed.

:func:`compute` trains and measures and returns a :class:`LabelNoiseResult`; it writes nothing and formats nothing
(the report does, :mod:`flatminima.experiments.label_noise_sweep.report`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flatminima.experiments.label_noise_sweep.settings import (
    EPOCHS,
    NOISE_LEVELS,
    QUICK_EPOCHS,
    QUICK_NOISE_LEVELS,
    QUICK_RHO_GRID,
    RHO_GRID,
    SELECTION_NOISE,
    base_config,
    choose_rho,
    sweep_config,
    validation_runs,
)
from flatminima.experiments.label_noise_sweep.training import TrainingOutput, run_trainings
from flatminima.experiments.reproduce import Context
from flatminima.train import TrainConfig, prepare_data

__all__ = ["LabelNoiseResult", "RunRecord", "Validation", "compute"]


@dataclass(frozen=True)
class RunRecord:
    """One run of the sweep: which optimiser, noise level, seed and rho (None for SGD), and what it measured
    (fractions in [0, 1]; ``noisy_fitted`` is NaN without noise)."""

    optimizer: str
    noise: float
    seed: int
    rho: float | None
    test_accuracy: float
    best_test_accuracy: float
    noisy_fitted: float
    clean_fitted: float
    train_loss: float
    seconds_per_epoch: float
    test_accuracy_curve: list[float]


@dataclass(frozen=True)
class Validation:
    """The validation runs at one noise level (first seed): SAM's final clean validation accuracy for each rho of
    the grid (in the grid's order), SGD's, and the rho :func:`choose_rho` takes from them."""

    sam_val_accuracy: dict[float, float]
    sgd_val_accuracy: float
    best_rho: float


@dataclass(frozen=True)
class LabelNoiseResult:
    """Everything the sweep measured, with the settings that made it.

    ``validation`` maps each noise level with validation runs to them (none when rho was given); the selection's,
    at :data:`SELECTION_NOISE`, chose ``rho``. ``runs`` are the sweep's, noise level by noise level, seed by seed,
    SGD then SAM.
    """

    base: TrainConfig
    epochs: int
    seeds: tuple[int, ...]
    noise_levels: tuple[float, ...]
    rho_grid: tuple[float, ...]
    rho: float
    rho_given: bool
    selection_seed: int
    validation: dict[float, Validation]
    validation_examples: int
    train_examples: int
    test_examples: int
    runs: list[RunRecord]

    def cell(self, noise: float, optimizer: str) -> list[RunRecord]:
        """The runs of one optimiser at one noise level, in the order of the seeds."""
        return [r for r in self.runs if r.noise == noise and r.optimizer == optimizer]


def _validation(configs: Sequence[TrainConfig], results: Sequence[TrainingOutput]) -> Validation:
    """The final validation accuracies of :func:`validation_runs`' runs: SAM's per rho, SGD's, and the best rho."""
    sam = {config.rho: record["val_accuracy"] for config, (record, _) in zip(configs[:-1], results[:-1])}
    return Validation(sam, results[-1][0]["val_accuracy"], choose_rho(sam))


def compute(ctx: Context) -> LabelNoiseResult:
    """Choose rho on the clean validation split (unless ``--rho`` gives it), then sweep the noise levels with SGD
    and SAM over the seeds (the package docstring).

    The same validation runs are made at the other noisy levels too (the first seed only): they choose nothing, and
    show how the best radius moves with the noise level.
    """
    base = base_config(dict(ctx.overrides))
    epochs = ctx.overrides.get("epochs", QUICK_EPOCHS if ctx.quick else EPOCHS)
    noise_levels = QUICK_NOISE_LEVELS if ctx.quick else NOISE_LEVELS
    rho_grid = QUICK_RHO_GRID if ctx.quick else RHO_GRID
    given_rho = ctx.overrides.get("rho")  # a radius given on the command line replaces the selection
    selection_seed = ctx.seeds[0]
    others = [] if given_rho is not None else [n for n in noise_levels if n > 0 and n != SELECTION_NOISE]
    workers = 1 if base.device == "cuda" else None  # one GPU: one training at a time
    validation: dict[float, Validation] = {}
    selection: list[TrainConfig] = []
    with tempfile.TemporaryDirectory(prefix="label-noise-") as scratch:  # the runs' checkpoints are not kept
        folder = Path(scratch)
        if given_rho is None:
            selection = validation_runs(SELECTION_NOISE, selection_seed, epochs, rho_grid, folder, base)
            ctx.progress(
                f"label-noise: choosing rho among {list(rho_grid)} at {100 * SELECTION_NOISE:g} % noise on a clean "
                f"validation split ({len(selection)} runs)"
            )
            validation[SELECTION_NOISE] = _validation(selection, run_trainings(selection, workers, ctx.progress))
            rho = validation[SELECTION_NOISE].best_rho
        else:
            rho = float(given_rho)
        jobs = [(noise, seed, name) for noise in noise_levels for seed in ctx.seeds for name in ("sgd", "sam")]
        configs = [
            sweep_config(name, noise, seed, epochs, folder / f"{name}-noise{noise:g}-seed{seed}", rho, base=base)
            for noise, seed, name in jobs
        ]
        sensitivity = [validation_runs(noise, selection_seed, epochs, rho_grid, folder, base) for noise in others]
        ctx.progress(
            f"label-noise: rho {rho:g} {'given' if given_rho is not None else 'chosen'}; sweeping noise "
            f"{list(noise_levels)}, seeds {list(ctx.seeds)} ({len(configs)} runs) and the rho grid at the other "
            f"noise levels ({sum(map(len, sensitivity))} runs)"
        )
        results = run_trainings(configs + [c for group in sensitivity for c in group], workers, ctx.progress)
        offset = len(configs)
        for noise, group in zip(others, sensitivity):
            validation[noise] = _validation(group, results[offset : offset + len(group)])
            offset += len(group)
    runs = [
        RunRecord(
            optimizer=name,
            noise=noise,
            seed=seed,
            rho=rho if name == "sam" else None,
            test_accuracy=record["test_accuracy"],
            best_test_accuracy=record["best_test_accuracy"],
            noisy_fitted=record["noisy_fitted"],
            clean_fitted=record["clean_fitted"],
            train_loss=record["train_loss"],
            seconds_per_epoch=record["seconds_per_epoch"],
            test_accuracy_curve=[round(r["test_accuracy"], 4) for r in history],
        )
        for (noise, seed, name), (record, history) in zip(jobs, results)
    ]
    whole = prepare_data(configs[0])
    return LabelNoiseResult(
        base=base,
        epochs=epochs,
        seeds=tuple(ctx.seeds),
        noise_levels=tuple(noise_levels),
        rho_grid=tuple(rho_grid),
        rho=rho,
        rho_given=given_rho is not None,
        selection_seed=selection_seed,
        validation=dict(sorted(validation.items())),
        validation_examples=prepare_data(selection[0]).val_labels.numel() if selection else 0,  # type: ignore[union-attr]
        train_examples=whole.train_labels.numel(),
        test_examples=whole.test_labels.numel(),
        runs=runs,
    )
