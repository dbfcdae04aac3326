"""The tuning: SGD's learning rate and weight decay, then SAM's rho on top of SGD's choice, each chosen by the
validation accuracy of a run trained to the common training loss on the training set less a validation split.

Both grids have the same size (``SGD_GRID``, ``SAM_GRID``); every point is trained once,
on the first seed, with the same stopping rule as the measured runs (the first step whose full training loss is
below the threshold), and scored by its accuracy on the held-out split there. A run that never reaches the threshold
scores NaN (it could not be compared at matched loss) and is never chosen. The size of the sharpness effect plays no
part: no Hessian is computed here, and the test set is not looked at.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from flatminima.experiments.hessian_spectrum.problem import digits_tensors, loss_and_accuracy, tuning_split
from flatminima.experiments.hessian_spectrum.setting import Recipe, Setting, paper_scale
from flatminima.experiments.hessian_spectrum.training import train_to_loss

__all__ = ["Tuning", "TuningRun", "tuning_run"]


@dataclass
class TuningRun:
    """One point of a tuning grid: its settings, where its run stopped, and its validation accuracy there."""

    optimizer: str
    settings: dict[str, float]
    reached: bool
    step: int
    epochs: float
    train_loss: float
    val_accuracy: float
    train_examples: int
    validation_examples: int
    seconds: float

    @property
    def score(self) -> float:
        """The validation accuracy, NaN when the run never reached the threshold (so ``choose`` skips it)."""
        return self.val_accuracy if self.reached else math.nan


@dataclass
class Tuning:
    """Both grids' runs (in the grids' order) and the settings chosen from their scores, on ``seed``'s split."""

    seed: int
    sgd: list[TuningRun]
    sam: list[TuningRun]
    sgd_choice: dict[str, Any]
    sam_choice: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """results.json's ``tuning``: the split, each grid's runs with their scores, and the choices."""
        return {
            "seed": self.seed,
            "train_examples": self.sgd[0].train_examples,
            "validation_examples": self.sgd[0].validation_examples,
            "validation_labels": "clean",
            "criterion": "final validation accuracy at the common training loss (ties: the earlier setting)",
            "sgd": [dataclasses.asdict(r) | {"score": r.score} for r in self.sgd],
            "sam": [dataclasses.asdict(r) | {"score": r.score} for r in self.sam],
            "sgd_choice": self.sgd_choice,
            "sam_choice": self.sam_choice,
        }


def tuning_run(seed: int, rho: float | None, recipe: Recipe, setting: Setting, threads: int | None) -> TuningRun:
    """Train SGD (``rho=None``) or SAM with ``recipe``'s learning rate and weight decay on ``seed``'s training set
    less its validation split, to the threshold (no tracking), and score it on the split. Runs in a worker."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if recipe.is_digits else previous))
    try:
        started = time.perf_counter()
        images, labels, _, _ = digits_tensors(seed, recipe)
        train_x, train_y, val_x, val_y = tuning_split(images, labels, seed)
        run_setting = paper_scale(setting, recipe, len(train_y))
        trained = train_to_loss(seed, rho, train_x, train_y, [], run_setting, recipe, track=False)
        _, accuracy = loss_and_accuracy(trained.model, val_x, val_y)
    finally:
        torch.set_num_threads(previous)
    settings = {"lr": recipe.lr, "weight_decay": recipe.weight_decay} | ({} if rho is None else {"rho": rho})
    return TuningRun(
        optimizer="sgd" if rho is None else "sam",
        settings=settings,
        reached=trained.reached,
        step=trained.step,
        epochs=trained.epochs,
        train_loss=trained.train_loss,
        val_accuracy=accuracy,
        train_examples=len(train_y),
        validation_examples=len(val_y),
        seconds=time.perf_counter() - started,
    )
