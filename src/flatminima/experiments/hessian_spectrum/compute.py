"""The computation: per seed, SGD and SAM (each radius) trained to the common loss and measured there; the typed
result the report is made from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flatminima.experiments.hessian_spectrum.measure import Spectrum, measure_spectrum
from flatminima.experiments.hessian_spectrum.problem import digits_tensors, loss_and_accuracy
from flatminima.experiments.hessian_spectrum.setting import (
    CHUNK,
    DEFAULT_RECIPE,
    FULL,
    QUICK,
    Recipe,
    Setting,
    key,
    label,
    paper_scale,
    recipe_from,
)
from flatminima.experiments.hessian_spectrum.training import train_to_loss
from flatminima.experiments.reproduce import Context
from flatminima.sharpness import SpectralDensity

__all__ = ["HessianSpectrumResult", "RunRecord", "compute", "one_seed"]


@dataclass
class RunRecord:
    """One optimiser on one seed: where its training stopped, the Hessian there, and the path to it.

    ``train_loss_step_before``: the full training loss one step (without replay: one check) before the stop;
    ``tracked``: ``(step, full training loss, lambda_max, products)`` along training; ``loss_checks``:
    ``(step, full training loss)`` of every check; ``steps_to_loss_below_2``: the first check below 2 (None if
    none was).
    """

    seed: int
    optimizer: str
    rho: float | None
    reached: bool
    step: int
    epochs: float
    train_loss: float
    train_loss_step_before: float
    subset_loss: float
    train_accuracy: float
    test_accuracy: float
    spectrum: Spectrum
    tracked: list[tuple[int, float, float, int]] = field(default_factory=list)
    loss_checks: list[tuple[int, float]] = field(default_factory=list)
    steps_to_loss_below_2: int | None = None
    seconds_training: float = 0.0
    seconds_tracking: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """The record as results.json's ``runs`` holds it: the spectrum's fields in line, tuples as lists."""
        out: dict[str, Any] = {}
        for name in (f.name for f in dataclasses.fields(self)):
            if name == "spectrum":
                out.update(dataclasses.asdict(self.spectrum))
            elif name in ("tracked", "loss_checks"):
                out[name] = [list(t) for t in getattr(self, name)]
            else:
                out[name] = getattr(self, name)
        return out


@dataclass
class HessianSpectrumResult:
    """Everything the reproduction computed: the setting and recipe used (after :func:`paper_scale`), the seeds,
    one :class:`RunRecord` per seed and optimiser (SGD first, then each radius), the SLQ densities by optimiser
    key (SGD and the first radius, one per seed) and the number of classes (the uniform prediction's loss is
    ``ln classes``)."""

    setting: Setting
    recipe: Recipe
    seeds: tuple[int, ...]
    records: list[RunRecord]
    densities: dict[str, list[SpectralDensity]]
    classes: int

    @property
    def rhos(self) -> tuple[float | None, ...]:
        """None (SGD), then the SAM radii."""
        return (None, *self.setting.rhos)

    @property
    def keys(self) -> list[str]:
        """The optimisers' keys, SGD first; ``keys[1]`` is the main comparison's SAM."""
        return [key(rho) for rho in self.rhos]

    def runs(self, optimizer: str) -> list[RunRecord]:
        """The records of one optimiser, in seed order."""
        return [r for r in self.records if r.optimizer == optimizer]

    def by_seed(self) -> dict[tuple[int, str], RunRecord]:
        """The records by ``(seed, optimiser key)``."""
        return {(r.seed, r.optimizer): r for r in self.records}


def one_seed(
    seed: int, setting: Setting, say: Callable[[str], None], recipe: Recipe = DEFAULT_RECIPE
) -> tuple[list[RunRecord], dict[str, SpectralDensity], Setting, int]:
    """SGD and SAM (each radius) trained on the seed's split to the threshold, and measured there; the setting
    used (:func:`paper_scale`) and the number of classes."""
    images, labels, test_images, test_labels = digits_tensors(seed, recipe)
    setting = paper_scale(setting, recipe, len(labels))
    examples = min(setting.examples, len(labels))
    subset = list(zip(images[:examples].split(CHUNK), labels[:examples].split(CHUNK)))
    records, densities = [], {}
    for rho in (None, *setting.rhos):
        trained = train_to_loss(seed, rho, images, labels, subset, setting, recipe)
        density = rho is None or rho == setting.rhos[0]
        measured, spectrum = measure_spectrum(trained.model, subset, setting, seed, density)
        if spectrum is not None:
            densities[key(rho)] = spectrum
        subset_loss, _ = loss_and_accuracy(trained.model, images[:examples], labels[:examples])
        _, test_accuracy = loss_and_accuracy(trained.model, test_images, test_labels)
        record = RunRecord(
            seed=seed,
            optimizer=key(rho),
            rho=rho,
            reached=trained.reached,
            step=trained.step,
            epochs=trained.epochs,
            train_loss=trained.train_loss,
            train_loss_step_before=trained.loss_before,
            subset_loss=subset_loss,
            train_accuracy=trained.train_accuracy,
            test_accuracy=test_accuracy,
            spectrum=measured,
            tracked=list(trained.tracked),
            loss_checks=list(trained.losses),
            steps_to_loss_below_2=next((c for c, loss in trained.losses if loss < 2.0), None),
            seconds_training=trained.seconds_training,
            seconds_tracking=trained.seconds_tracking,
        )
        records.append(record)
        say(
            f"hessian-spectrum: seed {seed} {label(rho)}: loss {trained.train_loss:.4g} at step {trained.step} "
            f"({trained.epochs:.1f} epochs{'' if trained.reached else ', threshold NOT reached'}), lambda_max "
            f"{measured.lambda_max:.4g}, lambda_max/lambda_5 {measured.ratio:.3g}, tr(H) {measured.trace:.4g} "
            f"({trained.seconds_training + trained.seconds_tracking + measured.seconds_measuring:.0f} s)"
        )
    return records, densities, setting, int(labels.max()) + 1


def compute(ctx: Context) -> HessianSpectrumResult:
    """Train and measure every seed of ``ctx`` (quick or full, with the command line's settings)."""
    setting = QUICK if ctx.quick else FULL
    recipe, rest = recipe_from(dict(ctx.overrides))
    if "epochs" in rest:
        setting = dataclasses.replace(setting, max_epochs=rest["epochs"])
    if "rho" in rest:
        setting = dataclasses.replace(setting, rhos=(rest["rho"],))
    threads = torch.get_num_threads()
    # small matrices: on a shared 2-core machine a second thread mostly waits
    torch.set_num_threads(rest.get("threads") or (1 if recipe.is_default else threads))
    records: list[RunRecord] = []
    densities: dict[str, list[SpectralDensity]] = {}
    classes = 10
    try:
        for seed in ctx.seeds:
            seed_records, seed_densities, setting, classes = one_seed(seed, setting, ctx.progress, recipe)
            records += seed_records
            for name, density in seed_densities.items():
                densities.setdefault(name, []).append(density)
    finally:
        torch.set_num_threads(threads)
    return HessianSpectrumResult(setting, recipe, tuple(ctx.seeds), records, densities, classes)
