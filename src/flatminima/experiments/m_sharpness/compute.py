"""The reproduction's trainings: each grid tuned on validation, then the chosen settings over the seeds, and more seeds
where a claim's paired difference is too close to call; gathered in an ``MSharpnessResult`` (no text, no figures,
no verdicts: ``.analysis`` draws those from it).

Stages, all in the same worker processes: (1) SGD's grid; (2) the SAM family's grids at SGD's chosen learning rate and
weight decay, with SGD's grid at twice the epochs (its own choice); each grid point on the tuning seeds, and each
method's setting chosen by ``choose`` on the mean validation accuracy at the last
epoch; (3) each chosen setting on the reported seeds, fresh runs (the tuning seeds are
``SELECTION_SEEDS``, never reported); (4)
``MORE_SEEDS`` for the methods of a claim whose paired difference is within two
standard errors of zero (full run with the default seeds only).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatminima.experiments.m_sharpness.methods import Method
from flatminima.experiments.m_sharpness.settings import Settings
from flatminima.experiments.m_sharpness.tracking import Job, Measurement, TrackedRun, train_and_track
from flatminima.experiments.protocol import choose
from flatminima.experiments.summary import mean
from flatminima.train import TrainConfig
from flatminima.worker_pool import worker_pool

__all__ = ["MSharpnessResult", "RunRecord", "Tuning", "compute"]


@dataclass(frozen=True)
class RunRecord:
    """One training: the method, seed, grid index and setting, its epochs, and what ``train_and_track``
    measured."""

    method: str
    seed: int
    index: int
    setting: dict[str, float]
    epochs: int
    validation_accuracy: float
    test_accuracy: float
    test_loss: float
    train_accuracy: float
    train_loss: float
    seconds_per_epoch: float
    trace_v: list[Measurement]
    m_sharpness: dict[str, float]

    @property
    def gap(self) -> float:
        """The generalisation gap: training accuracy (labels as trained) minus test accuracy."""
        return self.train_accuracy - self.test_accuracy


@dataclass(frozen=True)
class Tuning:
    """One method's tuning: its grid, the validation accuracy of each point (mean over the tuning seeds), and the
    point chosen from those scores alone."""

    method: str
    settings: list[dict[str, float]]
    validation_scores: list[float]
    chosen_index: int
    chosen: dict[str, float]


@dataclass(frozen=True)
class MSharpnessResult:
    """The settings, every training (grid points and final seeds), each method's tuning, and the methods that got
    ``Settings.more_seeds`` (and which claim asked for them)."""

    settings: Settings
    runs: list[RunRecord]
    tuning: dict[str, Tuning]
    extended: dict[str, list[str]]

    def finals(self, name: str) -> list[RunRecord]:
        """The method's reported runs at its chosen setting, by seed: never the tuning seeds' runs, which chose it."""
        index = self.tuning[name].chosen_index
        tuning_seeds = set(self.settings.tuning_seeds)
        return sorted(
            (r for r in self.runs if r.method == name and r.index == index and r.seed not in tuning_seeds),
            key=lambda r: r.seed,
        )

    @property
    def trace_measured(self) -> bool:
        """Whether tr(V) was measured (not for a model with BatchNorm)."""
        return bool(self.runs[0].trace_v)


_Key = tuple[str, int, int]  # method, grid index, seed
_FIELDS = dataclasses.fields(TrackedRun)


def _config(
    settings: Settings, method: Method, setting: dict[str, Any], sgd: dict[str, Any], seed: int, scratch: Path
) -> TrainConfig:
    fields = {**method.fields, **(sgd if method.after_sgd else {}), **setting}
    return dataclasses.replace(
        settings.base,
        **fields,
        epochs=settings.epochs * method.epochs_factor,
        seed=seed,
        output=str(scratch / f"{method.name}-{seed}-{'-'.join(f'{v:g}' for v in setting.values())}"),
        progress=False,
        overwrite=True,
    )


def _cost(settings: Settings, method: Method) -> float:
    """A rough relative cost, to start the longest trainings first (m-SAM: one pass pair per group)."""
    passes = 1 if not method.sharpness_aware else 2 * (settings.batch // method.m if method.m else 1)
    return method.epochs_factor * passes


class _Trainer:
    """Submits trainings to the pool and keeps their records by (method, index, seed)."""

    def __init__(self, settings: Settings, pool: Executor, scratch: Path, progress: Callable[[str], None]) -> None:
        self.settings, self.pool, self.scratch, self.progress = settings, pool, scratch, progress
        self.records: dict[_Key, RunRecord] = {}

    def run(self, wanted: Sequence[tuple[Method, int, int]], sgd: dict[str, Any]) -> None:
        """Train each (method, grid index, seed) not trained yet, longest first."""
        settings = self.settings
        todo = [w for w in dict.fromkeys((m.name, i, s) for m, i, s in wanted) if w not in self.records]
        by_name = {method.name: method for method, _, _ in wanted}
        todo.sort(key=lambda key: -_cost(settings, by_name[key[0]]))
        jobs = {}
        for name, index, seed in todo:
            method = by_name[name]
            setting = method.grid.settings[index]
            config = _config(settings, method, setting, sgd, seed, self.scratch)
            job = Job(
                config,
                settings.problem,
                settings.ms,
                settings.sharpness_rho,
                settings.sharpness_steps,
                settings.sample,
                settings.every,
            )
            jobs[(name, index, seed)] = (self.pool.submit(train_and_track, job), config)
        for (name, index, seed), (future, config) in jobs.items():
            tracked: TrackedRun = future.result()
            setting = dict(by_name[name].grid.settings[index])
            self.records[(name, index, seed)] = RunRecord(
                name, seed, index, setting, config.epochs, **{f.name: getattr(tracked, f.name) for f in _FIELDS}
            )
            self.progress(
                f"m-sharpness: {name} {_words(setting)} seed {seed}: validation "
                f"{100 * tracked.validation_accuracy:.1f} %, test {100 * tracked.test_accuracy:.1f} %"
            )


def _words(setting: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in setting.items())


def _tune(trainer: _Trainer, methods: Sequence[Method], sgd: dict[str, Any]) -> dict[str, Tuning]:
    """Train every grid point of ``methods`` on the tuning seeds; choose each method's point on validation."""
    seeds = trainer.settings.tuning_seeds
    trainer.run([(m, i, s) for m in methods for i in range(len(m.grid)) for s in seeds], sgd)
    tuning = {}
    for method in methods:
        scores = [
            mean([trainer.records[(method.name, i, s)].validation_accuracy for s in seeds])
            for i in range(len(method.grid))
        ]
        chosen = choose(method.grid, scores)
        index = list(method.grid.settings).index(chosen)
        tuning[method.name] = Tuning(method.name, [dict(s) for s in method.grid.settings], scores, index, chosen)
    return tuning


def compute(
    settings: Settings,
    progress: Callable[[str], None] = print,
    more_seeds_for: Callable[[MSharpnessResult], dict[str, list[str]]] | None = None,
) -> MSharpnessResult:
    """Tune, train the chosen settings over the seeds, and (``more_seeds_for``: which methods a close call needs
    more seeds for, and the claims asking) train ``Settings.more_seeds`` for those."""
    methods = settings.methods
    sgd_method = settings.method("sgd")
    rest = [m for m in methods if m.name != "sgd"]
    grid_runs = sum(len(m.grid) for m in methods) * len(settings.tuning_seeds)
    progress(
        f"m-sharpness: {grid_runs} tuning runs, then {len(methods)} methods over seeds {list(settings.seeds)}, "
        f"in {settings.workers} worker process(es)"
    )
    scratch = tempfile.TemporaryDirectory(prefix="m-sharpness-")
    with scratch, worker_pool(settings.workers) as pool:
        trainer = _Trainer(settings, pool, Path(scratch.name), progress)
        tuning = _tune(trainer, [sgd_method], {})
        sgd = tuning["sgd"].chosen
        tuning.update(_tune(trainer, rest, sgd))
        tuning = {m.name: tuning[m.name] for m in methods}  # table order
        trainer.run([(m, tuning[m.name].chosen_index, s) for m in methods for s in settings.seeds], sgd)
        result = MSharpnessResult(settings, list(trainer.records.values()), tuning, {})
        extended = more_seeds_for(result) if more_seeds_for is not None and settings.more_seeds else {}
        if extended:
            progress(f"m-sharpness: seeds {list(settings.more_seeds)} for {', '.join(extended)} (close calls)")
            wanted = [
                (settings.method(name), tuning[name].chosen_index, s) for name in extended for s in settings.more_seeds
            ]
            trainer.run(wanted, sgd)
    return MSharpnessResult(settings, list(trainer.records.values()), tuning, extended)
