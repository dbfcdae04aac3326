"""The sweep's settings: noise levels, the rho grid, the paper's numbers, and the config of each training run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatminima.experiments.label_noise import DEMO_CONFIG
from flatminima.train import TrainConfig

__all__ = [
    "CHANCE",
    "EPOCHS",
    "NOISE_LEVELS",
    "PAPER_RHO",
    "PAPER_TEST_ACCURACY",
    "QUICK_EPOCHS",
    "QUICK_NOISE_LEVELS",
    "QUICK_RHO_GRID",
    "RHO_GRID",
    "SELECTION_NOISE",
    "VALIDATION_FRACTION",
    "base_config",
    "choose_rho",
    "describe_setting",
    "sweep_config",
    "validation_runs",
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


def validation_runs(
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


def choose_rho(val_accuracy: dict[float, float]) -> float:
    """The rho with the best validation accuracy; a tie goes to the smaller rho (the smaller change to SGD)."""
    best = max(val_accuracy.values())
    return min(rho for rho, accuracy in val_accuracy.items() if accuracy == best)


def base_config(overrides: dict[str, Any]) -> TrainConfig:
    """The demo's config with the training settings given to ``flatminima reproduce`` (rho and epochs are the
    sweep's own: :func:`~flatminima.experiments.label_noise_sweep.compute.compute` reads them)."""
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
