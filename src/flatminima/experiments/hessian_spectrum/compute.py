"""The computation: the tuning (``.tuning``), then per seed SGD, SAM at the paper's rho and SAM at the validated
rho trained to the common loss and measured there (each run a job of a worker pool); the typed result the report is
made from."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from flatminima.experiments.hessian_spectrum.measure import Spectrum, measure_spectrum
from flatminima.experiments.hessian_spectrum.problem import digits_tensors, loss_and_accuracy
from flatminima.experiments.hessian_spectrum.setting import (
    CHUNK,
    FULL,
    PAPER_RHO,
    QUICK,
    SAM_GRID,
    SGD_GRID,
    Recipe,
    Setting,
    key,
    label,
    paper_scale,
    recipe_from,
)
from flatminima.experiments.hessian_spectrum.training import train_to_loss
from flatminima.experiments.hessian_spectrum.tuning import Tuning, TuningRun, tuning_run
from flatminima.experiments.protocol import MORE_SEEDS, SEEDS, choose, needs_more_seeds
from flatminima.experiments.reproduce import Context
from flatminima.sharpness import SpectralDensity
from flatminima.worker_pool import worker_pool

__all__ = ["HessianSpectrumResult", "RunRecord", "compute", "log_ratios", "measured_run"]


@dataclass
class RunRecord:
    """One optimiser on one seed: where its training stopped, the Hessian there, and the path to it.

    ``train_loss_step_before``: the full training loss one step (without replay: one check) before the stop;
    ``gradient_evaluations``: batch gradients spent (SAM: two a step); ``tracked``: ``(step, full training loss,
    lambda_max, products)`` along training; ``loss_checks``: ``(step, full training loss)`` of every check;
    ``steps_to_loss_below_2``: the first check below 2 (None if none was).
    """

    seed: int
    optimizer: str
    rho: float | None
    reached: bool
    step: int
    epochs: float
    gradient_evaluations: int
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
    """Everything the reproduction computed: the setting and the recipe used (after ``paper_scale``, with SGD's
    chosen learning rate and weight decay), the measured seeds, one ``RunRecord`` per seed and optimiser, the
    SLQ densities by optimiser key (one per seed), the number of classes (the uniform prediction's loss is
    ``ln classes``), the second radius and where it came from (``rho_source``: "validation", "command line" or
    "none"), the tuning (None when the command line gave the settings), whether a claim's difference over the
    first seeds was within two standard errors of zero (``close_call``), and whether the seeds were extended to
    ``MORE_SEEDS`` for it (a full run on the default seeds only)."""

    setting: Setting
    recipe: Recipe
    seeds: tuple[int, ...]
    records: list[RunRecord]
    densities: dict[str, list[SpectralDensity]]
    classes: int
    validated_rho: float | None = None
    rho_source: str = "none"
    tuning: Tuning | None = None
    close_call: bool = False
    seeds_extended: bool = False
    workers: int = 1

    @property
    def rhos(self) -> tuple[float, ...]:
        """The SAM radii measured: the paper's first (the headline), then the validated one if it differs."""
        second = () if self.validated_rho in (None, PAPER_RHO) else (self.validated_rho,)
        return (PAPER_RHO, *second)

    @property
    def keys(self) -> list[str]:
        """The optimisers' keys: SGD, then each radius."""
        return [key(rho) for rho in (None, *self.rhos)]

    def runs(self, optimizer: str) -> list[RunRecord]:
        """The records of one optimiser, in seed order."""
        return sorted((r for r in self.records if r.optimizer == optimizer), key=lambda r: self.seeds.index(r.seed))

    def by_seed(self) -> dict[tuple[int, str], RunRecord]:
        """The records by ``(seed, optimiser key)``."""
        return {(r.seed, r.optimizer): r for r in self.records}


def log_ratios(records: Sequence[RunRecord], seeds: Sequence[int], sam: str, field_name: str) -> list[float]:
    """Per seed, ``log(SGD's value / SAM's)`` of ``field_name`` (``lambda_max`` or ``ratio``): the paired difference
    of the logs, the scale-free comparison (the paper's numbers differ by factors). NaN where a value is not
    positive (an early model at a saddle): its verdict is then INCONCLUSIVE."""
    found = {(r.seed, r.optimizer): getattr(r.spectrum, field_name) for r in records}
    pairs = [(found[(s, "sgd")], found[(s, sam)]) for s in seeds]
    return [math.log(a / b) if a > 0 and b > 0 else math.nan for a, b in pairs]


def measured_run(
    seed: int, rho: float | None, recipe: Recipe, setting: Setting, threads: int | None
) -> tuple[RunRecord, SpectralDensity | None, Setting, int]:
    """Train SGD (``rho=None``) or SAM on the seed's whole training set to the threshold and measure the Hessian
    there: the record, its SLQ density, the setting used (``paper_scale``) and the number of classes. Runs in
    a worker."""
    previous = torch.get_num_threads()
    # small matrices: on a shared machine a second thread per run mostly waits
    torch.set_num_threads(threads or (1 if recipe.is_digits else previous))
    try:
        images, labels, test_images, test_labels = digits_tensors(seed, recipe)
        setting = paper_scale(setting, recipe, len(labels))
        examples = min(setting.examples, len(labels))
        subset = list(zip(images[:examples].split(CHUNK), labels[:examples].split(CHUNK)))
        trained = train_to_loss(seed, rho, images, labels, subset, setting, recipe)
        measured, density = measure_spectrum(trained.model, subset, setting, seed, density=setting.density_runs > 0)
        subset_loss, _ = loss_and_accuracy(trained.model, images[:examples], labels[:examples])
        _, test_accuracy = loss_and_accuracy(trained.model, test_images, test_labels)
    finally:
        torch.set_num_threads(previous)
    record = RunRecord(
        seed=seed,
        optimizer=key(rho),
        rho=rho,
        reached=trained.reached,
        step=trained.step,
        epochs=trained.epochs,
        gradient_evaluations=trained.gradient_evaluations,
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
    return record, density, setting, int(labels.max()) + 1


Jobs = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]], Sequence[str]], list[Any]]


def _jobs(pool: Executor | None, say: Callable[[str], None]) -> Jobs:
    """A function that runs ``function(*arguments)`` for each of a list of argument tuples (the longest first:
    the caller lists them so) in ``pool``, or in this process when there is none, and returns the results in
    order (they do not depend on the pool: every run seeds itself)."""

    def run(function: Callable[..., Any], arguments: Sequence[tuple[Any, ...]], names: Sequence[str]) -> list[Any]:
        if pool is None:
            results = []
            for name, args in zip(names, arguments, strict=True):
                results.append(function(*args))
                say(f"hessian-spectrum: {name} done")
            return results
        futures = [pool.submit(function, *args) for args in arguments]
        done = []
        for name, future in zip(names, futures, strict=True):
            done.append(future.result())
            say(f"hessian-spectrum: {name} done")
        return done

    return run


def tune(seed: int, recipe: Recipe, setting: Setting, threads: int | None, jobs: Jobs) -> Tuning:
    """SGD's grid, then SAM's on top of SGD's choice (``.tuning``), on ``seed``'s split."""
    sgd_recipes = [dataclasses.replace(recipe, **point) for point in SGD_GRID.settings]
    sgd: list[TuningRun] = jobs(
        tuning_run,
        [(seed, None, r, setting, threads) for r in sgd_recipes],
        [f"tuning SGD lr {r.lr:g} weight decay {r.weight_decay:g}" for r in sgd_recipes],
    )
    sgd_choice = choose(SGD_GRID, [r.score for r in sgd])
    chosen = dataclasses.replace(recipe, **sgd_choice)
    rhos = [point["rho"] for point in SAM_GRID.settings][::-1]  # the largest (slowest) first
    sam: list[TuningRun] = jobs(
        tuning_run, [(seed, rho, chosen, setting, threads) for rho in rhos], [f"tuning {label(rho)}" for rho in rhos]
    )[::-1]
    sam_choice = choose(SAM_GRID, [r.score for r in sam])
    return Tuning(seed, sgd, sam, sgd_choice, sam_choice)


def _measure(
    seeds: Sequence[int], rhos: Sequence[float], recipe: Recipe, setting: Setting, threads: int | None, jobs: Jobs
) -> list[tuple[RunRecord, SpectralDensity | None, Setting, int]]:
    """Every seed's SGD and SAM runs (each radius), the largest radius first (the slowest)."""
    order = [(seed, rho) for rho in sorted(rhos, reverse=True) for seed in seeds] + [(seed, None) for seed in seeds]
    return jobs(
        measured_run,
        [(seed, rho, recipe, setting, threads) for seed, rho in order],
        [f"seed {seed} {label(rho)}" for seed, rho in order],
    )


def _close_call(records: Sequence[RunRecord], seeds: Sequence[int], rhos: Sequence[float]) -> bool:
    """Whether any claim's paired difference (log SGD/SAM of lambda_max or of lambda_max / lambda_5, each radius) is
    within two standard errors of zero (``needs_more_seeds``)."""
    return any(
        needs_more_seeds(log_ratios(records, seeds, key(rho), name)) for rho in rhos for name in ("lambda_max", "ratio")
    )


def compute(ctx: Context) -> HessianSpectrumResult:
    """Tune (unless the command line gives the settings), then train and measure every seed of ``ctx``, and seeds
    3-4 too when the default seeds leave a difference within two standard errors of zero (full run only)."""
    setting = QUICK if ctx.quick else FULL
    recipe, rest = recipe_from(dict(ctx.overrides))
    if "epochs" in rest:
        setting = dataclasses.replace(setting, max_epochs=rest["epochs"])
    given = sorted({"lr", "weight_decay", "rho"} & set(ctx.overrides))
    threads = rest.get("threads")
    seeds = tuple(ctx.seeds)
    # the digits runs are small and single-threaded: one worker process per core; anything else runs here
    workers = min(os.cpu_count() or 1, 3 * len(seeds)) if recipe.is_digits else 1
    with worker_pool(workers) if workers > 1 else _no_pool() as pool:
        jobs = _jobs(pool, ctx.progress)
        tuning, rho, source = None, rest.get("rho"), "command line" if "rho" in rest else "none"
        if not given:
            tuning = tune(seeds[0], recipe, setting, threads, jobs)
            recipe = dataclasses.replace(recipe, **tuning.sgd_choice)
            rho, source = tuning.sam_choice["rho"], "validation"
        rhos = (PAPER_RHO,) if rho in (None, PAPER_RHO) else (PAPER_RHO, rho)
        done = _measure(seeds, rhos, recipe, setting, threads, jobs)
        close = _close_call([d[0] for d in done], seeds, rhos)
        extended = close and not ctx.quick and seeds == SEEDS
        if extended:
            ctx.progress(f"hessian-spectrum: a difference is within two standard errors of 0: seeds {MORE_SEEDS}")
            done += _measure(MORE_SEEDS[len(SEEDS) :], rhos, recipe, setting, threads, jobs)
            seeds = MORE_SEEDS
    densities: dict[str, list[SpectralDensity]] = {}
    for record, density, _, _ in sorted(done, key=lambda d: seeds.index(d[0].seed)):
        if density is not None:
            densities.setdefault(record.optimizer, []).append(density)
    return HessianSpectrumResult(
        setting=done[0][2],
        recipe=recipe,
        seeds=seeds,
        records=[d[0] for d in done],
        densities=densities,
        classes=done[0][3],
        validated_rho=rho,
        rho_source=source,
        tuning=tuning,
        close_call=close,
        seeds_extended=extended,
        workers=workers,
    )


@contextlib.contextmanager
def _no_pool() -> Iterator[None]:
    """No worker pool: the jobs run in this process."""
    yield None
