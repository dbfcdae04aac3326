"""``flatminima reproduce hessian-spectrum``: SAM's Hessian against SGD's at matched training loss (Foret et al. 2021,
sec. 4.2): the quick run's protocol (tuning on validation, the paper's rho as the headline, claims with verdicts,
error bounds), the stopping rule that makes the losses match, the verdicts' rule, and the Lanczos error bounds
against a dense spectrum."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_reproduce import _quick
from torch import nn

from flatminima.experiments.hessian_spectrum import (
    PAPER,
    PAPER_RHO,
    QUICK,
    SAM_GRID,
    SGD_GRID,
    HessianSpectrumResult,
    Recipe,
    RunRecord,
    Spectrum,
    Tuning,
    TuningRun,
    digits_tensors,
    measure_spectrum,
    train_to_loss,
)
from flatminima.experiments.hessian_spectrum.claims import claims, compare, comparisons, ratio_bounds
from flatminima.experiments.hessian_spectrum.report import caption, commentary, summaries
from flatminima.experiments.protocol import Verdict, choose
from flatminima.sharpness import HessianOperator

VERDICTS = {v.value for v in Verdict}


def _argmax(scores: list[float]) -> int:
    """The index of the best score, the first on a tie, NaN never (the rule :func:`choose` implements)."""
    finite = [i for i, s in enumerate(scores) if not math.isnan(s)]
    return min(finite, key=lambda i: (-scores[i], i))


@pytest.mark.slow
def test_hessian_spectrum_quick_follows_the_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _quick("hessian-spectrum", tmp_path, capsys)
    setting = results["setting"]
    threshold = setting["threshold"]
    assert results["paper_numbers"] == PAPER and results["paper"].startswith("Foret")
    assert results["paper_network"].startswith("WideResNet-40-10 without BatchNorm")
    # the headline is the paper's rho; the second radius is the argmax of the recorded validation scores
    assert setting["headline_rho"] == PAPER_RHO == setting["rhos"][0] and setting["rho_source"] == "validation"
    tuning = results["tuning"]
    assert len(tuning["sgd"]) == len(tuning["sam"]) == len(SGD_GRID) == len(SAM_GRID)
    sam_scores = [math.nan if isinstance(r["score"], str) else r["score"] for r in tuning["sam"]]
    sgd_scores = [math.nan if isinstance(r["score"], str) else r["score"] for r in tuning["sgd"]]
    assert setting["validated_rho"] == tuning["sam"][_argmax(sam_scores)]["settings"]["rho"]
    assert tuning["sam_choice"] == {"rho": setting["validated_rho"]}
    best_sgd = tuning["sgd"][_argmax(sgd_scores)]["settings"]
    assert (setting["lr"], setting["weight_decay"]) == (best_sgd["lr"], best_sgd["weight_decay"])
    assert all(r["settings"]["lr"] == setting["lr"] for r in tuning["sam"])  # SAM tuned on SGD's choice
    assert 0 < tuning["validation_examples"] < tuning["train_examples"]
    # the claims: the paper's rho first, then the validated one, each with a computed verdict
    claimed = results["claims"]
    assert len(claimed) == 4 and all(c["verdict"] in VERDICTS for c in claimed)
    assert all("the paper's rho = 0.05" in c["statement"] for c in claimed[:2])
    assert all(f"the validated rho = {setting['validated_rho']:g}" in c["statement"] for c in claimed[2:])
    assert "lambda_max is smaller" in claimed[0]["statement"] and "lambda_5" in claimed[1]["statement"]
    for comparison in results["comparisons"]:
        mean, low, high = comparison["interval"]
        _, wide_low, wide_high = comparison["widened_interval"]
        assert wide_low <= low <= mean <= high <= wide_high and comparison["lanczos_error"] >= 0
        expected = "SUPPORTS" if wide_low > 0 else "CONTRADICTS" if wide_high < 0 else "INCONCLUSIVE"
        assert comparison["verdict"] == expected
    # fairness: every run stopped at the first step below the common threshold, from the same initialisation
    runs = results["runs"]
    assert {r["optimizer"] for r in runs} == {"sgd", "sam_rho0.05", f"sam_rho{setting['validated_rho']:g}"}
    assert {r["seed"] for r in runs} == set(results["seeds_measured"]) == {0, 1, 2}
    for run in runs:
        assert run["reached"] and run["train_loss"] < threshold <= run["train_loss_step_before"]
        assert run["gradient_evaluations"] == run["step"] * (1 if run["rho"] is None else 2)
        # the measurements carry their errors: top-5 eigenvalues with non-negative bounds within 0.1 %
        values, bounds = run["eigenvalues"], run["error_bounds"]
        assert len(values) == len(bounds) == 5 and values == sorted(values, reverse=True)
        assert run["lanczos_converged"] and all(0 <= b <= 1e-3 * abs(v) for b, v in zip(bounds, values))
        assert run["ratio"] == pytest.approx(values[0] / values[4])
        assert math.isfinite(run["trace_stderr"]) and run["trace_stderr"] >= 0
    assert results["measured"]["sgd"]["paper_lambda_max"] == 24.0


@pytest.mark.slow
def test_stopping_point_does_not_depend_on_how_often_the_loss_is_checked() -> None:
    """The run stops at the first step below the threshold whether the loss is checked every 10 or every 7 steps:
    the replay from the last check reproduces the steps bit for bit."""
    images, labels, _, _ = digits_tensors(0)
    subset = [(images[:64], labels[:64])]
    setting = dataclasses.replace(QUICK, threshold=0.5, max_epochs=5, examples=64, track_every=1000)
    first = train_to_loss(0, None, images, labels, subset, dataclasses.replace(setting, check_every=10))
    second = train_to_loss(0, None, images, labels, subset, dataclasses.replace(setting, check_every=7))
    assert first.reached and second.reached
    assert first.step == second.step
    assert first.train_loss == second.train_loss < 0.5 <= first.loss_before == second.loss_before
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_lanczos_error_bounds_hold_against_the_dense_hessian() -> None:
    """The bounds the reproduction reports are true: each of the top-5 eigenvalues of a tiny network's dense
    cross-entropy Hessian (float64) lies within its bound of the Lanczos value, and the true lambda_max /
    lambda_5 within :func:`ratio_bounds`."""
    torch.manual_seed(0)
    images, labels, _, _ = digits_tensors(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    subset = [(images[:128].double(), labels[:128])]
    setting = dataclasses.replace(QUICK, trace_probes=2)
    spectrum, _ = measure_spectrum(model, subset, setting, seed=0, density=False)
    op = HessianOperator(model, nn.functional.cross_entropy, subset)
    dense = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    exact = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:5].tolist()
    assert spectrum.error_bounds is not None and all(b >= 0 for b in spectrum.error_bounds)
    for value, bound, true in zip(spectrum.eigenvalues, spectrum.error_bounds, exact):
        assert abs(true - value) <= bound + 1e-12 * abs(true)
    low, high = ratio_bounds(_record("sgd", None, 1.0, spectrum=spectrum))
    assert low <= exact[0] / exact[4] <= high


def _spectrum(lambda_max: float, ratio: float, bound: float = 1e-7) -> Spectrum:
    """A hand-made top-5 spectrum with the given lambda_max and lambda_max / lambda_5."""
    lambda_5 = lambda_max / ratio
    values = [lambda_max, *torch.linspace(lambda_max * 0.9, lambda_5 * 1.01, 3).tolist(), lambda_5]
    return Spectrum(
        eigenvalues=values,
        residuals=[1e-6] * 5,
        relative_residuals=[1e-5] * 5,
        error_bounds=[bound] * 5,
        lanczos_converged=True,
        lanczos_hvp=20,
        lambda_max=lambda_max,
        lambda_5=lambda_5,
        ratio=ratio,
        trace=10 * lambda_max,
        trace_stderr=0.1,
        trace_probes=16,
        density_hvp=0,
        seconds_measuring=1.0,
    )


def _record(
    optimizer: str,
    rho: float | None,
    lambda_max: float,
    ratio: float = 2.0,
    seed: int = 0,
    reached: bool = True,
    spectrum: Spectrum | None = None,
    bound: float = 1e-7,
) -> RunRecord:
    """A hand-made run, stopped at loss 0.02 (0.04 a step before when ``reached``), starting at 2.31."""
    return RunRecord(
        seed=seed,
        optimizer=optimizer,
        rho=rho,
        reached=reached,
        step=100,
        epochs=2.0,
        gradient_evaluations=100 if rho is None else 200,
        train_loss=0.02 if reached else 0.05,
        train_loss_step_before=0.04 if reached else math.nan,
        subset_loss=0.01,
        train_accuracy=1.0,
        test_accuracy=0.95,
        spectrum=spectrum or _spectrum(lambda_max, ratio, bound),
        tracked=[(0, 2.31, 0.5, 10)],
        loss_checks=[(0, 2.31), (10, 1.5)],
        steps_to_loss_below_2=10,
    )


def _tuning(sam_scores: list[float]) -> Tuning:
    """Hand-made tuning runs: SGD's scores favour the third setting, SAM's are ``sam_scores``."""

    def run(optimizer: str, settings: dict[str, float], score: float) -> TuningRun:
        reached = not math.isnan(score)
        return TuningRun(optimizer, settings, reached, 100, 2.0, 0.02, score if reached else 0.1, 1000, 250, 1.0)

    sgd = [run("sgd", dict(p), s) for p, s in zip(SGD_GRID.settings, (0.9, 0.9, 0.95, 0.9))]
    sam = [run("sam", {**SGD_GRID.settings[2], **p}, s) for p, s in zip(SAM_GRID.settings, sam_scores)]
    sgd_choice = choose(SGD_GRID, [r.score for r in sgd])
    return Tuning(0, sgd, sam, sgd_choice, choose(SAM_GRID, [r.score for r in sam]))


def test_tuning_keeps_the_best_validation_score_and_skips_runs_that_never_reached_the_loss() -> None:
    tuning = _tuning([0.97, math.nan, 0.97, 0.96])  # rho 0.05 never reached the threshold; 0.02 and 0.1 tie
    assert tuning.sgd_choice == SGD_GRID.settings[2]
    assert tuning.sam_choice == {"rho": 0.02}  # the tie goes to the smaller radius
    assert _tuning([0.9, 0.9, 0.95, math.nan]).sam_choice == {"rho": 0.1}
    assert math.isnan(tuning.sam[1].score) and tuning.as_json()["sam"][0]["score"] == 0.97


def _result(
    sgd: list[float], sam: list[float], validated: list[float], sgd_ratio: float = 2.0
) -> HessianSpectrumResult:
    """Three seeds of SGD, SAM at the paper's rho and SAM at a validated rho of 0.2, with these lambda_max."""
    records = []
    for seed in range(3):
        records += [
            _record("sgd", None, sgd[seed], sgd_ratio * (1 + 0.1 * seed), seed),
            _record("sam_rho0.05", 0.05, sam[seed], 2.0, seed),
            _record("sam_rho0.2", 0.2, validated[seed], 2.0, seed),
        ]
    return HessianSpectrumResult(
        setting=QUICK,
        recipe=Recipe(),
        seeds=(0, 1, 2),
        records=records,
        densities={},
        classes=10,
        validated_rho=0.2,
        rho_source="validation",
        tuning=_tuning([0.9, 0.9, 0.9, 0.95]),
    )


def test_verdicts_follow_the_paired_log_ratios() -> None:
    """SUPPORTS when SGD's lambda_max is larger on every seed by a steady factor, CONTRADICTS when smaller,
    INCONCLUSIVE when the factor straddles 1; the paper's rho comes first, the validated one second."""
    result = _result(sgd=[4.0, 4.4, 3.6], sam=[1.0, 1.2, 0.9], validated=[8.0, 8.5, 7.6], sgd_ratio=1.0)
    found = claims(result)
    assert [c.verdict for c in found] == [
        Verdict.SUPPORTS,  # lambda_max, paper's rho: SGD ~4x SAM
        Verdict.CONTRADICTS,  # lambda_max / lambda_5, paper's rho: SGD's ratio 1.0-1.2 against SAM's 2.0
        Verdict.CONTRADICTS,  # lambda_max, validated rho: SAM ~2x SGD
        Verdict.CONTRADICTS,
    ]
    assert "the paper's rho = 0.05" in found[0].statement and "the validated rho = 0.2" in found[2].statement
    assert "SGD / SAM = 3.89x [" in found[0].measured and "log(SGD / SAM)" in found[0].rule
    mixed = _result(sgd=[2.0, 1.0, 1.5], sam=[1.0, 2.0, 1.4], validated=[1.0, 1.0, 1.0])
    assert claims(mixed)[0].verdict is Verdict.INCONCLUSIVE
    # validation chose the paper's rho itself: the two claims once, not twice over the same runs
    same = dataclasses.replace(result, validated_rho=0.05)
    assert [c.verdict for c in claims(same)] == [Verdict.SUPPORTS, Verdict.CONTRADICTS]
    assert "the paper's rho = 0.05 (also the validated one)" in claims(same)[0].statement


def test_a_lanczos_error_as_large_as_the_effect_makes_the_verdict_inconclusive() -> None:
    records = []
    for seed in range(3):
        records += [
            _record("sgd", None, 1.10 + 0.001 * seed, seed=seed, bound=0.2),
            _record("sam_rho0.05", 0.05, 1.0, seed=seed, bound=0.2),
        ]
    tight = compare(
        [dataclasses.replace(r, spectrum=_spectrum(r.spectrum.lambda_max, 2.0)) for r in records],
        (0, 1, 2),
        0.05,
        "lambda_max",
    )
    loose = compare(records, (0, 1, 2), 0.05, "lambda_max")
    assert tight.verdict is Verdict.SUPPORTS and tight.lanczos_error < 1e-6
    assert loose.interval == tight.interval and loose.lanczos_error > 0.3
    assert loose.verdict is Verdict.INCONCLUSIVE


def test_hessian_spectrum_report_states_what_the_runs_show() -> None:
    """The commentary's sentences follow the records and the protocol: the headline radius, the tuning table, the
    budget, the seeds rule, matched losses only when every run reached the threshold."""
    result = _result(sgd=[4.0, 4.4, 3.6], sam=[1.0, 1.2, 0.9], validated=[0.5, 0.6, 0.4])
    measured = summaries(result)
    text = commentary(result, measured, comparisons(result))
    assert "Chosen: SGD lr 0.05, weight decay 0.0001; rho = 0.2." in text
    assert "| SAM | rho 0.2 |" in text and text.count("| chosen |") == 2
    assert "SGD: 2.00 epochs, 100 gradient evaluations" in text and "the two budgets of the protocol" in text
    assert "every claim's paired difference was beyond two standard errors" in text
    assert "At matched training loss" not in text  # the sentence is lower-cased into the per-radius clause
    assert "at matched training loss SGD's lambda_max is 3.89x [" in text
    assert "WideResNet-40-10 without BatchNorm" in text and "`wrn40_10_nobn`" in text
    assert "The headline is SAM at the paper's rho = 0.05" in caption(result)
    # the largest bound relative to its eigenvalue: 1e-7 over the smallest lambda_5 (0.9 / 2)
    assert measured["sam_rho0.05"]["max_relative_error_bound"] == pytest.approx(1e-7 / 0.45)

    unmatched = _result(sgd=[4.0, 4.4, 3.6], sam=[1.0, 1.2, 0.9], validated=[0.5, 0.6, 0.4])
    unmatched.records[1] = _record("sam_rho0.05", 0.05, 1.0, reached=False)
    unmatched.close_call = True
    text = commentary(unmatched, summaries(unmatched), comparisons(unmatched))
    assert "at the stopping points (not every run reached the threshold" in text
    assert "a full run adds seeds [3, 4] then, this quick one does not" in text
    assert "(or after 30 epochs if never)" in caption(unmatched)
