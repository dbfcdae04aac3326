"""The sweep's settings: noise levels, the tuning grids, the paper's numbers, and the config of each training run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flatminima.experiments.label_noise import DEMO_CONFIG
from flatminima.experiments.protocol import Budget, Grid, sgd_epochs
from flatminima.train import TrainConfig

__all__ = [
    "CHANCE",
    "EPOCHS",
    "NOISE_LEVELS",
    "PAPER_RHO",
    "PAPER_TEST_ACCURACY",
    "QUICK_EPOCHS",
    "QUICK_NOISE_LEVELS",
    "TUNED_FIELDS",
    "VALIDATION_FRACTION",
    "base_config",
    "describe_setting",
    "grids",
    "run_config",
]

NOISE_LEVELS = (0.2, 0.4, 0.6, 0.8)  # the paper's Table 4
QUICK_NOISE_LEVELS = (0.4,)
VALIDATION_FRACTION = 0.15
EPOCHS = 30  # SAM's and equal-epochs SGD's; equal-evaluations SGD trains twice as many
QUICK_EPOCHS = 8

#: the settings tuning may set; one given on the command line fixes it, and then nothing is tuned (the paper's way)
TUNED_FIELDS = ("lr", "weight_decay", "rho")

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


def grids(quick: bool) -> tuple[Grid, Grid]:
    """SGD's grid (learning rate x weight decay) and SAM's (rho, on top of SGD's chosen pair), of the same size; the
    first point of each is the demo's setting, so a tie keeps the smallest change."""
    if quick:
        sgd = [{"lr": 0.05, "weight_decay": 5e-4}, {"lr": 0.05, "weight_decay": 5e-3}]
        return Grid("sgd", tuple(sgd)), Grid("sam", ({"rho": 0.05}, {"rho": 0.1}))
    sgd = [{"lr": lr, "weight_decay": wd} for lr in (0.05, 0.1) for wd in (5e-4, 5e-3)]
    return Grid("sgd", tuple(sgd)), Grid("sam", tuple({"rho": rho} for rho in (0.05, 0.1, 0.2, 0.3)))


def run_config(
    base: TrainConfig,
    optimizer: str,
    noise: float,
    seed: int,
    epochs: int,
    output: str | Path,
    setting: dict[str, Any],
    validation: bool = False,
) -> TrainConfig:
    """``base`` with one run's optimiser, noise level, seed, epochs and tuned ``setting`` (lr, weight decay, rho);
    ``validation`` holds out ``VALIDATION_FRACTION`` of the training set, its labels corrupted like the
    training labels (``validation_labels="noisy"``)."""
    return dataclasses.replace(
        base,
        optimizer=optimizer,
        label_noise=noise,
        seed=seed,
        epochs=epochs,
        validation_fraction=VALIDATION_FRACTION if validation else 0.0,
        validation_labels="noisy" if validation and noise > 0 else "clean",
        output=str(output),
        progress=False,
        overwrite=True,
        **setting,
    )


def base_config(overrides: dict[str, Any]) -> TrainConfig:
    """The demo's config with the training settings given to ``flatminima reproduce`` (epochs is the sweep's own:
    ``compute`` reads it)."""
    fields = {k: v for k, v in overrides.items() if k != "epochs"}
    if "dataset" in fields and "model" not in fields and fields["dataset"] != "digits":
        raise ValueError("label-noise with --dataset needs --model too (the paper's: --model resnet32)")
    if fields.get("device") == "cuda" and "threads" not in fields:
        fields["threads"] = 0
    return dataclasses.replace(DEMO_CONFIG, **fields)


def describe_setting(config: TrainConfig, epochs: int) -> str:
    """One phrase naming the model, data and the untuned optimiser settings of the sweep's runs."""
    return (
        f"{config.model} on {config.dataset}, {epochs} epochs (equal-evaluations SGD: "
        f"{sgd_epochs(epochs, Budget.EQUAL_EVALUATIONS)}), batch "
        f"{config.batch_size}, SGD with a {config.lr_schedule} schedule and momentum {config.momentum:g}"
        + (", random crop and flip" if config.augment else "")
        + (f", cutout {config.cutout}" if config.cutout else "")
    )
