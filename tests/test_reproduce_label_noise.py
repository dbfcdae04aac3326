"""``flatminima reproduce label-noise``: the tuning protocol and its verdicts (on the quick run, and on stand-in
trainings whose outcome is known); and the demo's measure of how many noisy
labels a model has fitted, checked on models that predict exactly the noisy or the clean labels."""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_reproduce import _quick
from torch import Tensor, nn

from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.experiments.label_noise import DEMO_CONFIG, fitted_fractions, format_table
from flatminima.experiments.label_noise_sweep import (
    EPOCHS,
    NOISE_LEVELS,
    PAPER_RHO,
    PAPER_TEST_ACCURACY,
    QUICK_NOISE_LEVELS,
    VALIDATION_FRACTION,
    claims,
    grids,
    report,
)
from flatminima.experiments.reproduce import Context
from flatminima.train import TrainConfig, prepare_data


@pytest.mark.slow
def test_label_noise_quick_follows_the_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _quick("label-noise", tmp_path, capsys)
    assert results["noise_levels"] == list(QUICK_NOISE_LEVELS) and results["tuned"] is True
    assert results["validation"]["labels"] == "noisy" and results["validation"]["fraction"] == VALIDATION_FRACTION
    sgd_grid, sam_grid = grids(quick=True)
    tuning = {t["role"]: t for t in results["tuning"]}
    assert set(tuning) == {"sgd", "sgd-2x", "sam"}
    assert all(len(t["settings"]) == len(sgd_grid) == len(sam_grid) for t in tuning.values())
    assert tuning["sgd-2x"]["epochs"] == 2 * tuning["sgd"]["epochs"] == 2 * results["epochs"]
    for found in tuning.values():  # the chosen setting is the first of the best validation accuracies
        best = max(found["val_accuracy"])
        assert found["chosen"] == found["settings"][found["val_accuracy"].index(best)]
    # SAM was tuned on SGD's chosen pair; every final run uses its role's chosen setting and budget
    assert {k: tuning["sam"]["chosen"][k] for k in ("lr", "weight_decay")} == tuning["sgd"]["chosen"]
    for run in results["runs"]:
        chosen = tuning[run["role"]]["chosen"]
        assert run["lr"] == chosen["lr"] and run["weight_decay"] == chosen["weight_decay"]
        assert run["epochs"] == tuning[run["role"]]["epochs"]
        assert run["rho"] == chosen.get("rho")
    # a claim per budget, with a verdict computed from the interval written beside it
    noisy = results["per_noise"]["0.4"]
    assert [c["verdict"] for c in results["claims"]] == [
        noisy["sam_minus_sgd_test_accuracy_pct"]["verdict"],
        noisy["sam_minus_sgd-2x_test_accuracy_pct"]["verdict"],
    ]
    for key in ("sam_minus_sgd_test_accuracy_pct", "sam_minus_sgd-2x_test_accuracy_pct"):
        low, high = noisy[key]["interval95"]
        assert low <= noisy[key]["mean"] <= high
        assert noisy[key]["verdict"] == ("SUPPORTS" if low > 0 else "CONTRADICTS" if high < 0 else "INCONCLUSIVE")
    assert noisy["paper_sgd_test_accuracy_pct"] == PAPER_TEST_ACCURACY[0.4]["sgd"]


def _fake_trainings(accuracy: dict[str, float], spread: float) -> Any:
    """A stand-in for the worker pool: each run's accuracies from its optimiser, budget and settings alone (no
    training), so that the protocol's bookkeeping is checked in milliseconds."""

    def run(configs: list[TrainConfig], workers: int | None, progress: Any) -> list[Any]:
        outputs = []
        for config in configs:
            role = "sam" if config.optimizer == "sam" else "sgd-2x" if config.epochs == 2 * EPOCHS else "sgd"
            # validation prefers lr 0.1 / wd 5e-3 for SGD and rho 0.2 for SAM; the test accuracy is the role's
            val = 0.5 + (config.lr == 0.1) * 0.1 + (config.weight_decay == 5e-3) * 0.05
            if role == "sam":
                val += 0.2 - abs(config.rho - 0.2)
            test = accuracy[role] + spread * (config.seed % 3 - 1) * (1 if role == "sam" else -1)
            record = {"val_accuracy": val, "test_accuracy": test, "best_test_accuracy": test, "noisy_fitted": 0.1}
            record |= {"clean_fitted": 0.9, "train_loss": 0.2, "seconds_per_epoch": 0.1}
            outputs.append((record, [{"test_accuracy": test}]))
        return outputs

    return run


@pytest.mark.parametrize(
    ("accuracy", "spread", "verdicts", "seeds"),
    [
        ({"sgd": 0.70, "sgd-2x": 0.72, "sam": 0.90}, 0.01, {"SUPPORTS"}, 3),
        ({"sgd": 0.90, "sgd-2x": 0.91, "sam": 0.70}, 0.01, {"CONTRADICTS"}, 3),
        ({"sgd": 0.80, "sgd-2x": 0.80, "sam": 0.801}, 0.05, {"INCONCLUSIVE"}, 5),  # too close: five seeds
    ],
)
def test_compute_tunes_on_validation_then_trains_the_chosen_settings_over_the_seeds(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    accuracy: dict[str, float],
    spread: float,
    verdicts: set[str],
    seeds: int,
) -> None:
    module = importlib.import_module("flatminima.experiments.label_noise_sweep.compute")

    monkeypatch.setattr(module, "run_trainings", _fake_trainings(accuracy, spread))
    result = module.compute(Context(output=tmp_path, quick=False, seeds=(0, 1, 2), progress=lambda _: None))
    assert result.tuned and result.noise_levels == NOISE_LEVELS
    for noise in NOISE_LEVELS:
        assert result.tuned_at(noise, "sgd").chosen == {"lr": 0.1, "weight_decay": 5e-3}  # type: ignore[union-attr]
        assert result.tuned_at(noise, "sam").chosen == {"lr": 0.1, "weight_decay": 5e-3, "rho": 0.2}  # type: ignore[union-attr]
        assert len(result.seeds[noise]) == seeds and [r.seed for r in result.cell(noise, "sam")] == list(range(seeds))
        assert {r.epochs for r in result.cell(noise, "sgd-2x")} == {2 * EPOCHS}
        # the paper's rho gets its own rows at 60 and 80 % (validation chose 0.2, not the paper's)
        paper = result.cell(noise, "sam-paper")
        assert (noise in (0.6, 0.8)) == bool(paper)
        assert all(r.rho == PAPER_RHO[noise] for r in paper)
    found = claims(result)
    assert {c.verdict.value for c in found} == verdicts
    assert len(found) == 2 * (len(NOISE_LEVELS) + 2)  # two budgets, at every level and the two paper rows
    outcome = report(result, Context(output=tmp_path, quick=False, seeds=(0, 1, 2)))
    assert len(outcome.rows) == len(NOISE_LEVELS) + 2 and outcome.claims == found
    text = " ".join(outcome.report.split())
    assert "at 60 % validation chose 0.2, so SAM also ran at the paper's 0.1" in text
    assert "at 80 % validation chose 0.2, so SAM also ran at the paper's 0.05" in text


def test_settings_given_on_the_command_line_tune_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = importlib.import_module("flatminima.experiments.label_noise_sweep.compute")

    monkeypatch.setattr(module, "run_trainings", _fake_trainings({"sgd": 0.7, "sgd-2x": 0.7, "sam": 0.9}, 0.01))
    ctx = Context(output=tmp_path, quick=True, seeds=(0, 1), progress=lambda _: None, overrides={"rho": 0.1})
    result = module.compute(ctx)
    assert not result.tuned and result.tuning == []
    assert {r.rho for r in result.cell(0.4, "sam")} == {0.1}
    assert {(r.lr, r.weight_decay) for r in result.runs} == {(DEMO_CONFIG.lr, DEMO_CONFIG.weight_decay)}


def test_a_noisy_validation_split_is_corrupted_like_the_training_labels() -> None:
    config = dataclasses.replace(DEMO_CONFIG, label_noise=0.4, validation_fraction=0.15, seed=1)
    clean = prepare_data(config)
    noisy = prepare_data(dataclasses.replace(config, validation_labels="noisy"))
    assert torch.equal(clean.train_labels, noisy.train_labels)  # the training noise is the same draw
    assert clean.val_labels is not None and noisy.val_labels is not None
    changed = (clean.val_labels != noisy.val_labels).double().mean().item()
    assert changed == pytest.approx(0.4, abs=0.01)
    with pytest.raises(ValueError, match="--validation-labels"):
        from flatminima.train.config import refuse_unused_settings

        refuse_unused_settings(dataclasses.replace(DEMO_CONFIG, validation_labels="noisy"), {"validation_labels"})


class _Oracle(nn.Module):
    """Predicts, for each input, the label of the nearest stored (normalised) image: a model that fits exactly the
    labels it is given."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.images = nn.Parameter(images.flatten(1), requires_grad=False)
        self.labels = labels

    def forward(self, inputs: Tensor) -> Tensor:
        nearest = torch.cdist(inputs.flatten(1), self.images).argmin(dim=1)
        return nn.functional.one_hot(self.labels[nearest], 10).float()


def test_fitted_fractions_count_the_flipped_labels_the_model_predicts() -> None:
    config = dataclasses.replace(DEMO_CONFIG, label_noise=0.4, seed=3)
    data = prepare_data(config)
    clean = prepare_data(dataclasses.replace(config, label_noise=0.0)).train_labels
    flipped = data.train_labels != clean
    assert flipped.double().mean().item() == pytest.approx(0.4, abs=1e-3)
    images = normalize(to_float(data.train_images), data.dataset.mean, data.dataset.std)
    assert fitted_fractions(config, _Oracle(images, data.train_labels)) == (1.0, 1.0)  # memorised everything
    assert fitted_fractions(config, _Oracle(images, clean)) == (0.0, 1.0)  # ignores the noise
    half = data.train_labels.clone()
    first_flipped = torch.nonzero(flipped).flatten()[: int(flipped.sum()) // 2]
    half[first_flipped] = clean[first_flipped]
    noisy_fit, clean_fit = fitted_fractions(config, _Oracle(images, half))
    assert noisy_fit == pytest.approx(1 - len(first_flipped) / int(flipped.sum())) and clean_fit == 1.0
    # without noise there is no memorised fraction to measure
    no_noise = dataclasses.replace(config, label_noise=0.0)
    noisy_fit, clean_fit = fitted_fractions(no_noise, _Oracle(images, clean))
    assert math.isnan(noisy_fit) and clean_fit == 1.0


def test_demo_table_shows_fitted_noisy_labels_and_no_lambda_max() -> None:
    def record(accuracy: float, noisy: float) -> dict[str, float]:
        return {
            "test_accuracy": accuracy,
            "best_test_accuracy": 0.98,
            "noisy_fitted": noisy,
            "clean_fitted": 1.0,
            "train_loss": 0.5,
            "seconds_per_epoch": 0.2,
        }

    table = format_table(
        {"sgd": [record(0.72, 1.0), record(0.74, 0.98)], "sam": [record(0.94, 0.06), record(0.92, 0.1)]}
    )
    header, _, sgd, sam, gap = table.splitlines()
    assert "noisy labels fitted %" in header and "clean test acc %" in header and "lambda_max" not in table
    assert sgd.startswith("| SGD | 73.00 ± 1.41 |") and "| 99.0 ± 1.4 |" in sgd
    assert sam.startswith("| SAM | 93.00 ± 1.41 |") and "| 8.0 ± 2.8 |" in sam
    assert gap.startswith("| SAM - SGD | +20.00 ± 2.83 |") and "| -91.0 ± 4.2 |" in gap
    one_seed = format_table({"sgd": [record(0.99, math.nan)]})
    assert "| n/a |" in one_seed.splitlines()[2]


def test_every_demo_variant_builds_its_optimiser() -> None:
    """Each name `flatminima demo --variants` takes is a valid config whose optimiser builds, with its options."""
    from flatminima.experiments.label_noise import VARIANTS
    from flatminima.optim.rules import EveryKSteps
    from flatminima.train.builders import build_optimizer
    from flatminima.variants.looksam import LookSAMDescent

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    built = {}
    for name, changes in VARIANTS.items():
        config = dataclasses.replace(DEMO_CONFIG, **changes)
        config.validate()
        built[name] = build_optimizer(config, model)
    assert built["looksam-per-tensor"].descent.per_tensor and not built["looksam"].descent.per_tensor
    assert isinstance(built["looksam-rho0.05"].descent, LookSAMDescent)
    assert isinstance(built["looksam-rho0.05"].cadence, EveryKSteps)
    assert built["looksam-rho0.05"].param_groups[0]["rho"] == built["sam-rho0.05"].param_groups[0]["rho"] == 0.05
