"""What the hessian-spectrum reproduction trains and measures: the paper's numbers, the tuning grids, the training
recipe (the digits defaults or the command line's), and the sizes of the full and the quick run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from flatminima.experiments.protocol import Grid, equal_sizes

__all__ = [
    "BATCH_SIZE",
    "CHUNK",
    "DEFAULT_RECIPE",
    "FULL",
    "LR",
    "MOMENTUM",
    "PAPER",
    "PAPER_NETWORK",
    "PAPER_RHO",
    "QUICK",
    "SAM_GRID",
    "SGD_GRID",
    "TOP_K",
    "VALIDATION_FRACTION",
    "VALUE_TOL",
    "WEIGHT_DECAY",
    "WIDTH",
    "Recipe",
    "Setting",
    "key",
    "label",
    "paper_scale",
    "recipe_from",
]

WIDTH = 32  # SmallCNN's default width: 151,306 parameters, no BatchNorm
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 32
PAPER_RHO = 0.05  # the paper's default radius: the headline comparison
TOP_K = 5
VALUE_TOL = 1e-3  # Lanczos stops when every top-5 eigenvalue is within 0.1 % (error bound)
CHUNK = 256  # examples per batch of the Hessian's data
VALIDATION_FRACTION = 0.2  # of the training set, held out (stratified, clean labels) by the tuning runs only

#: The network of the paper's Hessian-spectrum figure (sec. 4.2): not the WideResNet-28-10 of its main tables.
PAPER_NETWORK = "WideResNet-40-10 without BatchNorm, CIFAR-10"

# Foret et al. 2021, sec. 4.2 (WideResNet-40-10 without BatchNorm, CIFAR-10, end of training)
PAPER: dict[str, dict[str, float]] = {
    "sgd": {"lambda_max": 24.0, "ratio": 11.4},
    "sam": {"lambda_max": 1.0, "ratio": 2.6},
}

#: SGD's tuning grid: learning rate x weight decay, the digits default first (a tie keeps it). lr 0.1 is not in it:
#: with momentum 0.9 this network stays on the ln 10 plateau for all 60 epochs at lr 0.1 (seed 0, both decays).
SGD_GRID = Grid(
    "sgd",
    tuple({"lr": lr, "weight_decay": wd} for wd in (WEIGHT_DECAY, 1e-4) for lr in (LR, 0.02)),
)
#: SAM's tuning grid, on top of SGD's chosen pair: the four middle radii of the paper's grid {0.01, 0.02, 0.05,
#: 0.1, 0.2, 0.5}, smallest first (a tie keeps the smaller change). Fixed before any run, never by the effect size.
SAM_GRID = Grid("sam", tuple({"rho": rho} for rho in (0.02, 0.05, 0.1, 0.2)))
equal_sizes(SGD_GRID, SAM_GRID)


@dataclass(frozen=True)
class Recipe:
    """What is trained: the data, the network and SGD's settings. The default is the digits setting of the package
    docstring; ``flatminima reproduce hessian-spectrum --dataset ... --model ...`` replaces fields (see
    ``recipe_from``), and the tuning replaces ``lr`` and ``weight_decay`` by SGD's chosen pair."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "small_cnn"
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    batch_size: int = BATCH_SIZE
    device: str = "cpu"

    @property
    def is_digits(self) -> bool:
        """The digits setting (whatever its learning rate and weight decay): small, one thread per run."""
        return self.dataset == "digits" and self.model == "small_cnn" and self.device == "cpu"


#: The digits setting of the package docstring (every function's default recipe).
DEFAULT_RECIPE = Recipe()


def recipe_from(overrides: dict[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with the command line's training settings, and the settings that are not the recipe's
    (``epochs``, ``rho``, ``threads``)."""
    given = dict(overrides)
    fields = {name: given.pop(name) for name in list(given) if name in Recipe.__dataclass_fields__}
    if fields.get("device") == "auto":
        fields["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if fields.get("dataset", "digits") != "digits" and "model" not in fields:
        raise ValueError("hessian-spectrum with --dataset needs --model too (the paper's: wrn40_10_nobn)")
    return Recipe(**fields), given


@dataclass(frozen=True)
class Setting:
    """The sizes of one run of the reproduction (full or quick).

    ``threshold``: the full training loss every run is stopped at; ``max_epochs``: the cap if a run never gets
    there; ``check_every``: steps between two computations of the full training loss (a crossing is then located
    exactly by replaying); ``track_every``: steps between two tracked lambda_max (a multiple of ``check_every``;
    0: none tracked); ``examples``: the fixed training subset the Hessian is taken over; ``trace_probes``:
    Hutchinson probes;
    ``density_runs`` and ``density_steps``: SLQ's start vectors and Lanczos steps; ``replay``: locate the crossing
    step exactly by replaying the steps since the last check (one full training loss per step; off at the paper's
    scale, where the run stops at the first check below the threshold).
    """

    threshold: float
    max_epochs: int
    check_every: int
    track_every: int
    examples: int
    trace_probes: int
    density_runs: int
    density_steps: int
    replay: bool = True


FULL = Setting(
    threshold=0.01,
    max_epochs=60,
    check_every=10,
    track_every=60,
    examples=512,
    trace_probes=24,
    density_runs=1,
    density_steps=40,
)
QUICK = Setting(
    threshold=0.03,
    max_epochs=30,
    check_every=10,
    track_every=0,
    examples=256,
    trace_probes=8,
    density_runs=1,
    density_steps=20,
)


def paper_scale(setting: Setting, recipe: Recipe, train_examples: int) -> Setting:
    """The setting for a dataset other than digits: the full training loss checked (and lambda_max tracked, unless
    the setting tracks nothing) once per epoch, and no replay: the run stops at the first epoch whose full training
    loss is below the threshold."""
    if recipe.dataset == "digits":
        return setting
    per_epoch = max(1, train_examples // recipe.batch_size)
    track_every = per_epoch if setting.track_every else 0
    return dataclasses.replace(setting, check_every=per_epoch, track_every=track_every, replay=False)


def label(rho: float | None) -> str:
    """The optimiser's name in tables and text: ``SGD`` or ``SAM rho=...``."""
    return "SGD" if rho is None else f"SAM rho={rho:g}"


def key(rho: float | None) -> str:
    """The optimiser's key in results.json: ``sgd`` or ``sam_rho...``."""
    return "sgd" if rho is None else f"sam_rho{rho:g}"
