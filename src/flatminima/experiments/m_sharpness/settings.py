"""What a run of the reproduction trains: the task, the methods and their grids, the seeds (those the grids are
tuned on, the rest, and the extra seeds a close call gets), and how the final weights are measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flatminima.experiments.m_sharpness.methods import SAMPLE, Method, m_values, methods_for
from flatminima.experiments.m_sharpness.problem import SignalNoise, problem_for
from flatminima.experiments.protocol import MORE_SEEDS, SEEDS, SELECTION_SEEDS, disjoint_seeds
from flatminima.train import TrainConfig

__all__ = ["QUICK_EPOCHS", "SHARPNESS_STEPS", "TUNING_SEEDS", "Settings", "settings_for"]

#: the grids are trained on this many of the run's first seeds, and chosen on their mean validation accuracy
TUNING_SEEDS = 2  # how many of the selection seeds the full run tunes on
QUICK_EPOCHS = 20
#: gradient steps of the m-sharpness ascent (the first is SAM's own step; the maximum over the iterates is kept)
SHARPNESS_STEPS = 2


@dataclass(frozen=True)
class Settings:
    """The training settings and the design.

    ``base``: the shared TrainConfig (SGD's grid replaces its lr and weight decay, the SAM family's its rho);
    ``problem``: the patch data drawn per seed, or None for a dataset given on the command line; ``ms``: the m of
    m-SAM, the last the batch (SAM); ``seeds``: the reported seeds; ``tuning_seeds``: the grids' (selection seeds,
    never reported); ``more_seeds``: trained for a claim whose paired difference is within two standard errors of zero;
    ``sharpness_rho``: the radius the m-sharpness of every final model is measured at, for every m."""

    base: TrainConfig
    problem: SignalNoise | None
    ms: tuple[int, ...]
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    tuning_seeds: tuple[int, ...]
    more_seeds: tuple[int, ...]
    epochs: int
    sharpness_rho: float
    sharpness_steps: int
    sample: int
    every: int  # tr(V) is measured after every this many epochs (and the last, and the first step)
    workers: int
    quick: bool
    overridden: bool

    @property
    def batch(self) -> int:
        return self.base.batch_size

    def method(self, name: str) -> Method:
        return next(method for method in self.methods if method.name == name)

    def describe(self) -> str:
        """The task in words, for the report."""
        if self.problem is not None:
            return f"The two-layer CNN (10 filters per class) on {self.problem.describe()}"
        base = self.base
        return f"Model {base.model} on {base.dataset} (clean labels, {base.validation_fraction:g} held out)"


def settings_for(quick: bool, seeds: Sequence[int], overrides: Mapping[str, Any]) -> Settings:
    """The full run: m = 1, 2, 4, 8, 16 (the batch), 30 epochs, every method, grids of 4 tuned on the two selection
    seeds; the quick run: m = 1, 4, 16, 20 epochs, no n-SAM, grids of 2 tuned on one selection seed. The command
    line's overrides replace the task's settings (another dataset: m = batch / 64, then x 4 up to the batch)."""
    given = dict(overrides)
    if quick and "epochs" not in given:
        given["epochs"] = QUICK_EPOCHS
    if given.get("device") == "cuda" and "threads" not in given:
        given["threads"] = 0
    base, problem = problem_for(given)
    batch = base.batch_size
    # the patch task: every power of two; another dataset: the paper's powers of four from batch / 64 (4 at 256)
    ms = m_values(batch) if problem is not None else m_values(batch, max(1, batch // 64), step=4)
    if quick and len(ms) > 3:
        ms = (ms[0], ms[len(ms) // 2], ms[-1])
    train_size = problem.train_size if problem is not None else None
    methods = methods_for(batch, base.rho, base.lr, base.weight_decay, ms, quick, train_size)
    seeds = tuple(seeds)
    disjoint_seeds(seeds)
    extend = not quick and seeds == SEEDS
    return Settings(
        base=base,
        problem=problem,
        ms=ms,
        methods=methods,
        seeds=seeds,
        tuning_seeds=SELECTION_SEEDS[: 1 if quick else TUNING_SEEDS],
        more_seeds=tuple(s for s in MORE_SEEDS if s not in seeds) if extend else (),
        epochs=base.epochs,
        sharpness_rho=base.rho,
        sharpness_steps=SHARPNESS_STEPS,
        sample=SAMPLE,
        every=max(1, base.epochs // 4),
        workers=1 if base.device == "cuda" else 2,  # one GPU: one training at a time
        quick=quick,
        overridden=bool(overrides),
    )
