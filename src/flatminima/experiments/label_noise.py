"""SAM resists label noise (Foret et al. 2021, Table 4), on the embedded digits: the ``flatminima demo`` job.

The same small CNN is trained from the same initialisation and batch order with SGD and with SAM around the same
SGD (and, with ``variants=``, with any of ``VARIANTS``: m-SAM, n-SAM, RW-SAM, Ahn et al.'s algorithms), on
digits whose training labels are 40 % wrong (symmetric noise); test labels are clean.

What the table shows is what the job demonstrates: the clean test accuracy each model ends with, beside the fraction
of the corrupted training labels it has fitted (memorised), measured at the end on the training images without
augmentation. It used to show the top Hessian eigenvalue of the training loss as well; that column misled (SGD,
having memorised the noisy labels, sits at near-zero loss where the Hessian is small, so SAM looked the sharper), and
sharpness is the subject of ``flatminima reproduce hessian-spectrum``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatminima.output_folder import OutputFolder, write_atomically
from flatminima.train import BatchPipeline, TrainConfig, train
from flatminima.train.loop import run_folder_foreign_files
from flatminima.train.prepare import prepare_data
from flatminima.train.summary import plot_curves
from flatminima.worker_pool import worker_pool

__all__ = [
    "DEMO_CONFIG",
    "QUICK_EPOCHS",
    "VARIANTS",
    "fitted_fractions",
    "format_table",
    "run_label_noise_demo",
    "train_and_measure",
]

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

# epochs per run of the quick demo (flatminima demo --quick): seconds, to check that everything runs; SAM at the
# demo's rho needs more epochs than this to get going, so its numbers are not the comparison's
QUICK_EPOCHS = 3

# name -> the fields it changes in DEMO_CONFIG (every other setting is the demo's; rho is 0.3 unless the name
# says otherwise)
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
    # the SAM family (docs/variants.md), each with its own default options and the demo's rho
    "gsam": {"optimizer": "gsam"},
    "looksam": {"optimizer": "looksam"},
    "looksam-0.1": {"optimizer": "looksam", "looksam_alpha": 0.1},
    "looksam-per-tensor": {"optimizer": "looksam", "looksam_per_tensor": True},
    # at rho 0.05 rather than the demo's 0.3, where LookSAM's global form stays at chance level (docs/variants.md)
    "looksam-rho0.05": {"optimizer": "looksam", "rho": 0.05},
    "sam-rho0.05": {"optimizer": "sam", "rho": 0.05},
    "momentum-sam": {"optimizer": "momentum-sam"},
    "friendly-sam": {"optimizer": "friendly-sam"},
    "periodic-sam": {"optimizer": "periodic-sam"},
    "random-sam": {"optimizer": "random-sam"},
}


def run_label_noise_demo(
    output: str | Path = "runs/demo",
    seeds: tuple[int, ...] = (0,),
    epochs: int | None = None,
    progress: bool = True,
    variants: tuple[str, ...] = ("sgd", "sam"),
    workers: int = 1,
    quick: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Train each variant for each seed; returns each run's final record, and writes a figure and a table.

    ``epochs`` defaults to the demo's 60, or to ``QUICK_EPOCHS`` with ``quick`` (the same comparison, short).

    ``workers`` > 1 runs that many trainings at once, in separate processes (one thread each by the demo's
    config); the results do not depend on it. The output folder is checked before any training (see
    ``flatminima.output_folder``; ``overwrite`` replaces files of the demo's names that it did not write) and
    held for the demo's lifetime.
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
                epochs=epochs or (QUICK_EPOCHS if quick else DEMO_CONFIG.epochs),
                progress=progress and workers == 1,
                overwrite=True,  # the demo's own run folders: running the demo again replaces them
                **overrides,
            )
            jobs.append((name, seed, config))
    with OutputFolder(output, "demo", overwrite=overwrite):
        for _, _, config in jobs:  # each run's own folder, before any run starts (train would refuse it late)
            foreign = run_folder_foreign_files(Path(config.output))
            if foreign:
                raise FileExistsError(
                    f"{config.output} holds files that are not a flatminima run ({', '.join(foreign[:3])}); move "
                    "them, or choose another --output."
                )
        return _run_jobs(output, jobs, variants, workers)


def _run_jobs(
    output: Path, jobs: list[tuple[str, int, TrainConfig]], variants: tuple[str, ...], workers: int
) -> dict[str, list[dict[str, Any]]]:
    """Train every job, then write the figure and the table."""
    if workers > 1:
        with worker_pool(workers) as pool:
            results = list(pool.map(train_and_measure, [config for _, _, config in jobs]))
    else:
        results = [train_and_measure(config) for _, _, config in jobs]
    finals: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    histories = {}
    for (name, seed, _), (record, history) in zip(jobs, results):
        finals[name].append(record)
        histories[f"{name.upper()} seed {seed}"] = history
    figure = plot_curves(histories, output / "test_accuracy.png")
    table = format_table(finals)
    write_atomically(output / "results.md", table + f"\n\n![clean test accuracy]({figure.name})\n")
    return finals


def train_and_measure(config: TrainConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training run: its final record and its history.

    The record is the last epoch's, with the best test accuracy over the epochs, the fractions of the noisy and of
    the clean training labels the final model fits (``fitted_fractions``), and the mean training seconds per
    epoch. A module-level function, so that worker processes can run it.
    """
    result = train(config)
    record = dict(result.final)
    record["best_test_accuracy"] = max(r["test_accuracy"] for r in result.history)
    record["noisy_fitted"], record["clean_fitted"] = fitted_fractions(config, result.model)
    record["seconds_per_epoch"] = statistics.mean(r["seconds"] - r["eval_seconds"] for r in result.history)
    return record, result.history


@torch.no_grad()
def fitted_fractions(config: TrainConfig, model: nn.Module, batch_size: int = 512) -> tuple[float, float]:
    """How much of its training labels ``model`` fits: ``(noisy, clean)``.

    ``noisy`` is the fraction of the training examples whose label the noise changed for which the model predicts
    the changed (wrong) label: the memorised fraction, NaN when no label was changed. ``clean`` is the fraction of
    the other training examples predicted as their (correct) label. The training split and its noise are rebuilt
    from ``config`` as ``prepare_data`` made them for the run (the seed fixes both), and the
    images are fed without augmentation, in eval mode.
    """
    data = prepare_data(config)
    clean = prepare_data(dataclasses.replace(config, label_noise=0.0), data.dataset).train_labels
    device = next(model.parameters()).device
    pipeline = BatchPipeline(data.dataset, config, device)
    was_training = model.training
    model.eval()
    predictions = torch.cat(
        [
            model(pipeline(data.train_images[start : start + batch_size], None)).argmax(dim=1).cpu()
            for start in range(0, data.train_images.shape[0], batch_size)
        ]
    )
    model.train(was_training)
    noisy = data.train_labels.cpu()
    flipped = noisy != clean.cpu()
    kept = ~flipped
    noisy_fit = (predictions[flipped] == noisy[flipped]).double().mean().item() if flipped.any() else math.nan
    clean_fit = (predictions[kept] == noisy[kept]).double().mean().item() if kept.any() else math.nan
    return noisy_fit, clean_fit


def format_table(finals: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table, one row per optimiser and a SAM - SGD row: clean test accuracy (final and best), the
    fractions of the noisy and of the clean training labels fitted, the final training loss (on the noisy labels)
    and the seconds per epoch; mean ± std over seeds."""

    def cell(values: list[float], scale: float = 1.0, digits: int = 2, sign: str = "") -> str:
        values = [scale * v for v in values]
        if any(math.isnan(v) for v in values):
            return "n/a"
        if len(values) == 1:
            return f"{values[0]:{sign}.{digits}f}"
        return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    columns = [
        ("clean test acc %", "test_accuracy", 100.0, 2),
        ("best test acc %", "best_test_accuracy", 100.0, 2),
        ("noisy labels fitted %", "noisy_fitted", 100.0, 1),
        ("clean labels fitted %", "clean_fitted", 100.0, 1),
        ("train loss (noisy labels)", "train_loss", 1.0, 3),
        ("s / epoch (training)", "seconds_per_epoch", 1.0, 2),
    ]
    lines = ["| optimiser | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, runs in finals.items():
        lines.append(
            f"| {name.upper()} | " + " | ".join(cell([r[k] for r in runs], s, d) for _, k, s, d in columns) + " |"
        )
    if "sgd" in finals and "sam" in finals:
        gaps = [[b[k] - a[k] for a, b in zip(finals["sgd"], finals["sam"])] for _, k, _, _ in columns]
        lines.append("| SAM - SGD | " + " | ".join(cell(g, s, d, "+") for g, (_, _, s, d) in zip(gaps, columns)) + " |")
    return "\n".join(lines)
