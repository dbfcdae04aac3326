"""SAM resists label noise (Foret et al. 2021, Table 4), on the embedded digits: the ``flatminima demo`` job.

The same small CNN is trained twice from the same initialisation and batch order, with SGD and with SAM around
the same SGD, on digits whose training labels are 40 % wrong (symmetric noise); test labels are clean.
"""

from __future__ import annotations

import dataclasses
import statistics
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

__all__ = ["DEMO_CONFIG", "format_table", "run_label_noise_demo"]

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


def run_label_noise_demo(
    output: str | Path = "runs/demo",
    seeds: tuple[int, ...] = (0,),
    epochs: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Train SGD and SAM for each seed; returns each run's final record, and writes a figure and a table."""
    output = Path(output)
    finals: dict[str, list[dict[str, Any]]] = {"sgd": [], "sam": []}
    histories = {}
    for seed in seeds:
        for name in ("sgd", "sam"):
            config = dataclasses.replace(
                DEMO_CONFIG,
                optimizer=name,
                seed=seed,
                output=str(output / f"{name}-seed{seed}"),
                epochs=epochs or DEMO_CONFIG.epochs,
                progress=progress,
                **overrides,
            )
            result = train(config)
            record = dict(result.final)
            record["best_test_accuracy"] = max(r["test_accuracy"] for r in result.history)
            record["lambda_max"] = _lambda_max(config, result.model)
            finals[name].append(record)
            histories[f"{name.upper()} seed {seed}"] = result.history
    figure = plot_curves(histories, output / "test_accuracy.png")
    table = format_table(finals)
    (output / "results.md").write_text(table + f"\n\n![clean test accuracy]({figure.name})\n")
    return finals


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
    ]
    lines = ["| optimiser | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in ("sgd", "sam"):
        lines.append(
            f"| {name.upper()} | "
            + " | ".join(cell([r[k] for r in finals[name]], s, d) for _, k, s, d in columns)
            + " |"
        )
    gaps = [[b[k] - a[k] for a, b in zip(finals["sgd"], finals["sam"])] for _, k, _, _ in columns]
    lines.append("| SAM - SGD | " + " | ".join(cell(g, s, d) for g, (_, _, s, d) in zip(gaps, columns)) + " |")
    return "\n".join(lines)
