"""The sweep's training runs, in parallel worker processes: each one the demo's run through the library's loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from typing import Any

from flatminima.experiments.label_noise import train_and_measure
from flatminima.train import TrainConfig
from flatminima.worker_pool import worker_pool

__all__ = ["TrainingOutput", "run_trainings"]

#: What one run returns: its final record and its per-epoch history (``train_and_measure``).
TrainingOutput = tuple[dict[str, Any], list[dict[str, Any]]]


def run_trainings(
    configs: Sequence[TrainConfig],
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[TrainingOutput]:
    """Train every config (``train_and_measure``, which trains with
    ``flatminima.train``): ``(record, history)`` each, in the order given.

    ``workers`` processes run at once (default: one per CPU core; each training uses one thread, as the demo's
    config says); the results do not depend on it.
    """
    workers = max(1, min(workers or os.cpu_count() or 1, len(configs)))
    describe = [
        f"{c.optimizer} noise {c.label_noise:g} seed {c.seed}"
        + (f" rho {c.rho:g}" if c.optimizer != "sgd" else "")
        + (", validation split held out" if c.validation_fraction else "")
        for c in configs
    ]
    if workers == 1:
        results = []
        for index, config in enumerate(configs):
            results.append(train_and_measure(config))
            if progress:
                progress(f"label-noise: {index + 1}/{len(configs)} done ({describe[index]})")
        return results
    found: dict[int, TrainingOutput] = {}
    with worker_pool(workers) as pool:
        # SAM's runs (two passes a step) first, so that the last runs to finish are short ones
        order = sorted(range(len(configs)), key=lambda index: configs[index].optimizer == "sgd")
        futures = {pool.submit(train_and_measure, configs[index]): index for index in order}
        for future in as_completed(futures):
            index = futures[future]
            found[index] = future.result()
            if progress:
                progress(f"label-noise: {len(found)}/{len(configs)} done ({describe[index]})")
    return [found[index] for index in range(len(configs))]
