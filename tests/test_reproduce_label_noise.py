"""``flatminima reproduce label-noise``: SAM fits fewer of the corrupted training labels than SGD and keeps a higher
clean test accuracy (Foret et al. 2021, Table 4), checked on the quick run; and the demo's measure of how many noisy
labels a model has fitted, checked on models that predict exactly the noisy or the clean labels."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_reproduce import _quick
from torch import Tensor, nn

from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.experiments.label_noise import DEMO_CONFIG, fitted_fractions, format_table
from flatminima.experiments.label_noise_sweep import (
    PAPER_TEST_ACCURACY,
    QUICK_NOISE_LEVELS,
    QUICK_RHO_GRID,
    SELECTION_NOISE,
    VALIDATION_FRACTION,
    LabelNoiseResult,
    RunRecord,
    Validation,
    choose_rho,
    report,
)
from flatminima.experiments.reproduce import Context
from flatminima.train import prepare_data


@pytest.mark.slow
def test_label_noise_quick_sam_memorises_less_and_generalises_better(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _quick("label-noise", tmp_path, capsys)
    selection = results["rho_selection"]
    assert selection["noise"] == SELECTION_NOISE and selection["validation_fraction"] == VALIDATION_FRACTION
    assert selection["rho_grid"] == list(QUICK_RHO_GRID)
    # rho is the one with the best validation accuracy, and every SAM run of the sweep uses it
    assert selection["chosen_rho"] == results["rho"]
    assert selection["val_accuracy"][f"{results['rho']:g}"] == max(selection["val_accuracy"].values())
    assert all(r["rho"] == results["rho"] for r in results["runs"] if r["optimizer"] == "sam")
    assert results["noise_levels"] == list(QUICK_NOISE_LEVELS)
    assert len(results["runs"]) == 2 * len(QUICK_NOISE_LEVELS) * len(results["seeds"])

    clean, noisy = results["per_noise"]["0"], results["per_noise"]["0.4"]
    # without noise there is nothing to memorise, and both models learn the digits
    assert clean["sgd"]["noisy_fitted_pct_mean"] == "nan" and clean["paper_sgd_test_accuracy_pct"] is None
    assert clean["sgd"]["test_accuracy_pct_mean"] > 95 and clean["sam"]["test_accuracy_pct_mean"] > 95
    # the claim's direction at 40 % noise: SGD memorises a large share of the corrupted labels, SAM few of them,
    # and SAM's clean test accuracy is higher (seeds 0, 1, 2 of the quick run: SGD fits 40 to 50 %, SAM under 5 %)
    assert noisy["sgd"]["noisy_fitted_pct_mean"] > 25
    assert noisy["sam"]["noisy_fitted_pct_mean"] < noisy["sgd"]["noisy_fitted_pct_mean"] / 3
    assert noisy["sam"]["test_accuracy_pct_mean"] > noisy["sgd"]["test_accuracy_pct_mean"] + 3
    assert noisy["sam"]["clean_fitted_pct_mean"] > 90  # SAM still fits the clean labels: it is not at chance
    assert noisy["paper_sgd_test_accuracy_pct"] == PAPER_TEST_ACCURACY[0.4]["sgd"]
    assert noisy["paper_sam_test_accuracy_pct"] == PAPER_TEST_ACCURACY[0.4]["sam"]


def test_choose_rho_takes_the_best_validation_accuracy_and_the_smaller_rho_on_a_tie() -> None:
    assert choose_rho({0.05: 0.8, 0.1: 0.9, 0.3: 0.85}) == 0.1
    assert choose_rho({0.05: 0.8, 0.1: 0.9, 0.3: 0.9}) == 0.1


def _made_result(validation: dict[float, Validation], rho_given: bool = False) -> LabelNoiseResult:
    """A sweep's result made by hand: noise 0 and 40 %, one seed, SGD memorising and SAM not."""

    def run(optimizer: str, noise: float, accuracy: float, noisy: float) -> RunRecord:
        rho = 0.1 if optimizer == "sam" else None
        return RunRecord(optimizer, noise, 0, rho, accuracy, accuracy, noisy, 1.0, 0.1, 0.2, [accuracy])

    return LabelNoiseResult(
        base=DEMO_CONFIG,
        epochs=20,
        seeds=(0,),
        noise_levels=(0.0, 0.4),
        rho_grid=(0.1, 0.3),
        rho=0.1,
        rho_given=rho_given,
        selection_seed=0,
        validation=validation,
        validation_examples=202,
        train_examples=1347,
        test_examples=450,
        runs=[
            run("sgd", 0.0, 0.99, math.nan),
            run("sam", 0.0, 0.98, math.nan),
            run("sgd", 0.4, 0.85, 0.44),
            run("sam", 0.4, 0.97, 0.03),
        ],
    )


def test_report_says_how_the_best_rho_moves_only_where_it_was_measured(tmp_path: Path) -> None:
    ctx = Context(output=tmp_path, quick=True, seeds=(0,))
    chosen = Validation({0.1: 0.98, 0.3: 0.2}, 0.88, 0.1)
    alone = report(_made_result({SELECTION_NOISE: chosen}), ctx)
    text = " ".join(alone.report.split())  # the report is wrapped at 118 characters
    assert "how the best radius moves with the noise is not measured here" in text and "the others show" not in text
    assert alone.rows[1][:4] == ["40 %", "85.0", "97.0", "+12.0"]
    # one seed: the paired difference's interval is unbounded, so no verdict either way
    assert alone.rows[1][-1] == "INCONCLUSIVE"
    assert alone.results["per_noise"]["0.4"]["sam_minus_sgd_test_accuracy_pct_interval95"] == [-math.inf, math.inf]
    same = {0.2: Validation({0.1: 0.99, 0.3: 0.5}, 0.9, 0.1), SELECTION_NOISE: chosen}
    text = " ".join(report(_made_result(same), ctx).report.split())
    assert "it does not move, the best rho is 0.1 at every one of them" in text and "not measured" not in text
    moving = {**same, 0.6: Validation({0.1: 0.6, 0.3: 0.7}, 0.5, 0.3)}
    text = " ".join(report(_made_result(moving), ctx).report.split())
    assert "the best rho is 0.1 at 20 %, 0.1 at 40 %, 0.3 at 60 %" in text and "does not move" not in text
    given = report(_made_result({}, rho_given=True), ctx)
    assert "given on the command line" in given.report and "validation runs" not in given.report
    assert given.results["rho_selection"] is None and given.results["rho_sensitivity"] == {}


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
