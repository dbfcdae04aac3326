"""The reproduction's trainings and their summary: every (noise, method, seed) trained in worker processes, then
per (noise, method) the accuracy over seeds, the cost against SAM and the regulariser along training, gathered in
an :class:`MSharpnessResult` (no text, no figures)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatminima.experiments.label_noise import DEMO_CONFIG
from flatminima.experiments.m_sharpness.methods import BATCH, RHO, Methods, methods_for
from flatminima.experiments.m_sharpness.tracking import Measurement, train_and_track
from flatminima.experiments.summary import mean, mean_std
from flatminima.train import TrainConfig
from flatminima.worker_pool import worker_pool

__all__ = ["CurvePoint", "MSharpnessResult", "MethodCell", "RunRecord", "Settings", "compute", "settings_for"]


@dataclass(frozen=True)
class Settings:
    """What is trained: the label noises, the methods (by name, in table order) and seeds, and the shared training
    settings (the demo config with the command line's overrides); ``overridden``: any setting came from there."""

    noises: tuple[float, ...]
    names: list[str]
    methods: Methods
    seeds: tuple[int, ...]
    batch: int
    rho: float
    epochs: int
    every: int  # tr(V) is measured after every this many epochs (and the last)
    workers: int  # concurrent training processes
    base: TrainConfig
    overridden: bool


@dataclass(frozen=True)
class RunRecord:
    """One training: its noise, method and seed, and what :func:`train_and_track` measured."""

    noise: float
    method: str
    seed: int
    test_accuracy: float
    train_loss: float
    test_accuracy_curve: list[float]
    seconds_per_epoch: float
    measured: list[Measurement]


@dataclass(frozen=True)
class CurvePoint:
    """tr(V) after ``epoch`` epochs, mean over seeds, and the regulariser ``(rho / 2m) tr(V)`` (None without an m)."""

    epoch: int
    trace_v_mean: float
    regulariser_mean: float | None


@dataclass(frozen=True)
class MethodCell:
    """One method at one noise, over its seeds: accuracy, cost and the regulariser (None where not measured)."""

    m: int | None
    test_accuracy_mean: float
    test_accuracy_std: float
    seconds_per_epoch: float
    cost_relative_to_sam: float
    trace_v_final: float | None
    regulariser_final: float | None
    regulariser_mean_second_half: float | None
    regulariser_curve: list[CurvePoint]


@dataclass(frozen=True)
class MSharpnessResult:
    """The settings, every training (job order), and the summary: noise (``f"{noise:g}"``) -> method -> cell."""

    settings: Settings
    runs: list[RunRecord]
    summary: dict[str, dict[str, MethodCell]]

    @property
    def trace_measured(self) -> bool:
        """Whether tr(V) was measured (not for a model with BatchNorm)."""
        return bool(self.runs[0].measured)


def settings_for(quick: bool, seeds: Sequence[int], overrides: Mapping[str, Any]) -> Settings:
    """The quick run: 40 % noise, SGD / the smallest m-SAM / SAM, 3 epochs, tr(V) every epoch; the full run: 0 and
    40 % noise, every method, 12 epochs, tr(V) four times. Batch, rho and epochs may come from the command line."""
    given = dict(overrides)
    batch = given.pop("batch_size", BATCH)
    rho = given.pop("rho", RHO)
    epochs = given.pop("epochs", 3 if quick else 12)
    if given.get("device") == "cuda" and "threads" not in given:
        given["threads"] = 0
    base = dataclasses.replace(DEMO_CONFIG, **given)
    methods = methods_for(batch)
    smallest = next((name for name in methods if name.startswith("msam-")), None)
    return Settings(
        noises=(0.4,) if quick else (0.0, 0.4),
        names=["sgd", *([smallest] if smallest else []), "sam"] if quick else list(methods),
        methods=methods,
        seeds=tuple(seeds),
        batch=batch,
        rho=rho,
        epochs=epochs,
        every=1 if quick else max(1, epochs // 4),
        workers=1 if base.device == "cuda" else 2,  # one GPU: one training at a time
        base=base,
        overridden=bool(overrides),
    )


def _train_all(settings: Settings, progress: Callable[[str], None]) -> list[RunRecord]:
    """Every (noise, method, seed), in ``settings.workers`` spawned processes; records in job order."""
    scratch = tempfile.TemporaryDirectory(prefix="m-sharpness-")
    jobs = []
    for noise in settings.noises:
        for name in settings.names:
            for seed in settings.seeds:
                config = dataclasses.replace(
                    settings.base,
                    **settings.methods[name][0],
                    batch_size=settings.batch,
                    rho=settings.rho,
                    label_noise=noise,
                    epochs=settings.epochs,
                    seed=seed,
                    output=str(Path(scratch.name) / f"{noise:g}-{name}-{seed}"),
                    progress=False,
                    overwrite=True,
                )
                jobs.append((noise, name, seed, config))
    progress(f"m-sharpness: {len(jobs)} trainings of {settings.epochs} epochs in {settings.workers} worker process(es)")
    with scratch, worker_pool(settings.workers) as pool:
        futures = [pool.submit(train_and_track, config, settings.every) for *_, config in jobs]
        runs = []
        for (noise, name, seed, _), future in zip(jobs, futures):
            tracked = future.result()
            runs.append(RunRecord(noise, name, seed, **vars(tracked)))
            progress(f"m-sharpness: noise {noise:g} {name} seed {seed}: {100 * tracked.test_accuracy:.2f} %")
    return runs


def _cell(settings: Settings, cell: list[RunRecord], m: int | None, sam_seconds: float) -> MethodCell:
    """One method's seeds at one noise, summarised; the curve's points are the measurements' means over seeds."""
    accuracy, accuracy_std = mean_std([r.test_accuracy for r in cell])
    seconds = mean([r.seconds_per_epoch for r in cell])
    curve = []
    for index, point in enumerate(cell[0].measured):
        trace = mean([r.measured[index].trace_v for r in cell])
        regulariser = settings.rho / (2 * m) * trace if m is not None else None
        curve.append(CurvePoint(epoch=point.epoch, trace_v_mean=trace, regulariser_mean=regulariser))
    late = curve[len(curve) // 2 :]  # the second half of training
    return MethodCell(
        m=m,
        test_accuracy_mean=accuracy,
        test_accuracy_std=accuracy_std,
        seconds_per_epoch=seconds,
        cost_relative_to_sam=seconds / sam_seconds,
        trace_v_final=curve[-1].trace_v_mean if curve else None,
        regulariser_final=curve[-1].regulariser_mean if curve else None,
        regulariser_mean_second_half=mean([p.regulariser_mean for p in late]) if m is not None and curve else None,
        regulariser_curve=curve,
    )


def compute(settings: Settings, progress: Callable[[str], None] = print) -> MSharpnessResult:
    """Train every (noise, method, seed) and summarise each (noise, method) over its seeds."""
    runs = _train_all(settings, progress)
    summary: dict[str, dict[str, MethodCell]] = {}
    for noise in settings.noises:
        at_noise = [r for r in runs if r.noise == noise]
        sam_seconds = mean([r.seconds_per_epoch for r in at_noise if r.method == "sam"])
        summary[f"{noise:g}"] = {
            name: _cell(settings, [r for r in at_noise if r.method == name], settings.methods[name][1], sam_seconds)
            for name in settings.names
        }
    return MSharpnessResult(settings=settings, runs=runs, summary=summary)
