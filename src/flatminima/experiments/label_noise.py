"""SAM resists label noise (Foret et al. 2021, Table 4), on the embedded digits: the ``flatminima demo`` job.

The same small CNN is trained from the same initialisation and batch order with SGD and with SAM around the same
SGD (and, with ``variants=``, with any of :data:`VARIANTS`: m-SAM, n-SAM, RW-SAM, Ahn et al.'s algorithms), on
digits whose training labels are 40 % wrong (symmetric noise); test labels are clean.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.sharpness import hessian_eigenvalues
from flatminima.train import TrainConfig, train
from flatminima.train.prepare import prepare_data
from flatminima.train.summary import plot_curves

__all__ = ["DEMO_CONFIG", "VARIANTS", "format_table", "run_label_noise_demo"]

DEMO_CONFIG = TrainConfig(
    dataset="digits",
    model="small_cnn",
    label_noise=0.4,
    epochs=60,
    batch_size=32,
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    lr_schedule="cosine",
    rho=0.3,
    threads=1,
)

# name -> the fields it changes in DEMO_CONFIG (every other setting, rho = 0.3 included, is the demo's)
VARIANTS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    "sam": {"optimizer": "sam"},
    "msam-4": {"optimizer": "sam", "group_size": 4},
    "msam-16": {"optimizer": "sam", "group_size": 16},
    "nsam": {"optimizer": "nsam", "nsam_sample_size": 128},
    "rwsam": {"optimizer": "rwsam"},  # lambda 0.01, the default
    "rwsam-0.1": {"optimizer": "rwsam", "rwsam_lambda": 0.1},
    "rwsam-1": {"optimizer": "rwsam", "rwsam_lambda": 1.0},
    "ahn-rs": {"optimizer": "ahn-rs"},
    "ahn-sa": {"optimizer": "ahn-sa"},
}


def run_label_noise_demo(
    output: str | Path = "runs/demo",
    seeds: tuple[int, ...] = (0,),
    epochs: int | None = None,
    progress: bool = True,
    variants: tuple[str, ...] = ("sgd", "sam"),
    workers: int = 1,
    **overrides: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Train each variant for each seed; returns each run's final record, and writes a figure and a table.

    ``workers`` > 1 runs that many trainings at once, in separate processes (one thread each by the demo's
    config); the results do not depend on it.
    """
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    output = Path(output)
    jobs = []
    for seed in seeds:
        for name in variants:
            config = dataclasses.replace(
                DEMO_CONFIG,
                **VARIANTS[name],
                seed=seed,
                output=str(output / f"{name}-seed{seed}"),
                epochs=epochs or DEMO_CONFIG.epochs,
                progress=progress and workers == 1,
                overwrite=True,  # the demo's own run folders: running the demo again replaces them
                **overrides,
            )
            jobs.append((name, seed, config))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run, [config for _, _, config in jobs]))
    else:
        results = [_run(config) for _, _, config in jobs]
    finals: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    histories = {}
    for (name, seed, _), (record, history) in zip(jobs, results):
        finals[name].append(record)
        histories[f"{name.upper()} seed {seed}"] = history
    figure = plot_curves(histories, output / "test_accuracy.png")
    table = format_table(finals)
    (output / "results.md").write_text(table + f"\n\n![clean test accuracy]({figure.name})\n")
    return finals


def _run(config: TrainConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training run: its final record (with the best test accuracy, lambda_max, seconds) and its history."""
    result = train(config)
    record = dict(result.final)
    record["best_test_accuracy"] = max(r["test_accuracy"] for r in result.history)
    record["lambda_max"] = _lambda_max(config, result.model)
    record["seconds_per_epoch"] = statistics.mean(r["seconds"] - r["eval_seconds"] for r in result.history)
    return record, result.history


def _lambda_max(config: TrainConfig, model: torch.nn.Module, examples: int = 512) -> float:
    """Top Hessian eigenvalue of the training loss (noisy labels, as trained) on the first ``examples`` examples."""
    data = prepare_data(config)
    images = normalize(to_float(data.train_images[:examples]), data.dataset.mean, data.dataset.std)
    mean_loss = lambda outputs, targets: F.cross_entropy(outputs, targets)  # noqa: E731
    return (
        hessian_eigenvalues(model, mean_loss, (images, data.train_labels[:examples]), k=1, tol=1e-4)
        .eigenvalues[0]
        .item()
    )


def format_table(finals: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: final train loss (noisy labels), clean test accuracy, best test accuracy; mean ± std."""

    def cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        values = [scale * v for v in values]
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    columns = [
        ("train loss (noisy labels)", "train_loss", 1.0, 3),
        ("clean test acc %", "test_accuracy", 100.0, 2),
        ("best test acc %", "best_test_accuracy", 100.0, 2),
        ("lambda_max (train loss)", "lambda_max", 1.0, 3),
        ("s / epoch (training)", "seconds_per_epoch", 1.0, 2),
    ]
    lines = ["| optimiser | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, runs in finals.items():
        lines.append(
            f"| {name.upper()} | " + " | ".join(cell([r[k] for r in runs], s, d) for _, k, s, d in columns) + " |"
        )
    if "sgd" in finals and "sam" in finals:
        gaps = [[b[k] - a[k] for a, b in zip(finals["sgd"], finals["sam"])] for _, k, _, _ in columns]
        lines.append("| SAM - SGD | " + " | ".join(cell(g, s, d) for g, (_, _, s, d) in zip(gaps, columns)) + " |")
    return "\n".join(lines)
