"""What the hessian-spectrum reproduction trains and measures: the paper's numbers, the training recipe (the digits
defaults or the command line's), and the sizes of the full and the quick run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BATCH_SIZE",
    "CHUNK",
    "DEFAULT_RECIPE",
    "FULL",
    "LR",
    "MOMENTUM",
    "PAPER",
    "PAPER_RHO",
    "QUICK",
    "SAM_RHO",
    "TOP_K",
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
SAM_RHO = 0.3  # the main comparison's radius (the package docstring)
PAPER_RHO = 0.05  # the paper's default radius: the full run's ablation
TOP_K = 5
VALUE_TOL = 1e-3  # Lanczos stops when every top-5 eigenvalue is within 0.1 % (error bound)
CHUNK = 256  # examples per batch of the Hessian's data

# Foret et al. 2021, sec. 4.2 (WideResNet without BatchNorm, CIFAR-10, end of training)
PAPER: dict[str, dict[str, float]] = {
    "sgd": {"lambda_max": 24.0, "ratio": 11.4},
    "sam": {"lambda_max": 1.0, "ratio": 2.6},
}


@dataclass(frozen=True)
class Recipe:
    """What is trained: the data, the network and SGD's settings. The default is the digits setting of the package
    docstring; ``flatminima reproduce hessian-spectrum --dataset ... --model ...`` replaces fields (see
    :func:`recipe_from`)."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "small_cnn"
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    batch_size: int = BATCH_SIZE
    device: str = "cpu"

    @property
    def is_default(self) -> bool:
        return self == Recipe()


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
        raise ValueError("hessian-spectrum with --dataset needs --model too (the paper's: --model wrn28_10_nobn)")
    return Recipe(**fields), given


@dataclass(frozen=True)
class Setting:
    """The sizes of one run of the reproduction (full or quick).

    ``threshold``: the full training loss both optimisers are stopped at; ``max_epochs``: the cap if a run never
    gets there; ``check_every``: steps between two computations of the full training loss (a crossing is then
    located exactly by replaying); ``track_every``: steps between two tracked lambda_max (a multiple of
    ``check_every``); ``examples``: the fixed training subset the Hessian is taken over; ``trace_probes``:
    Hutchinson probes; ``density_runs`` and ``density_steps``: SLQ's start vectors and Lanczos steps;
    ``rhos``: the SAM radii trained besides SGD; ``replay``: locate the crossing step exactly by replaying the
    steps since the last check (one full training loss per step; off at the paper's scale, where the run stops
    at the first check below the threshold).
    """

    threshold: float
    max_epochs: int
    check_every: int
    track_every: int
    examples: int
    trace_probes: int
    density_runs: int
    density_steps: int
    rhos: tuple[float, ...]
    replay: bool = True


FULL = Setting(
    threshold=0.01,
    max_epochs=60,
    check_every=10,
    track_every=30,
    examples=512,
    trace_probes=48,
    density_runs=3,
    density_steps=40,
    rhos=(SAM_RHO, PAPER_RHO),
)
QUICK = Setting(
    threshold=0.03,
    max_epochs=30,
    check_every=10,
    track_every=60,
    examples=256,
    trace_probes=16,
    density_runs=1,
    density_steps=20,
    rhos=(SAM_RHO,),
)


def paper_scale(setting: Setting, recipe: Recipe, train_examples: int) -> Setting:
    """The setting for a dataset other than digits: the full training loss checked (and lambda_max tracked) once
    per epoch, and no replay: the run stops at the first epoch whose full training loss is below the threshold."""
    if recipe.dataset == "digits":
        return setting
    per_epoch = max(1, train_examples // recipe.batch_size)
    return dataclasses.replace(setting, check_every=per_epoch, track_every=per_epoch, replay=False)


def label(rho: float | None) -> str:
    """The optimiser's name in tables and text: ``SGD`` or ``SAM rho=...``."""
    return "SGD" if rho is None else f"SAM rho={rho:g}"


def key(rho: float | None) -> str:
    """The optimiser's key in results.json: ``sgd`` or ``sam_rho...``."""
    return "sgd" if rho is None else f"sam_rho{rho:g}"
