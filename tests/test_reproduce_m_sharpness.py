"""``flatminima reproduce m-sharpness``: the grids and the budgets, the claims' rules on made-up results, the tr(V)
measurement, and (slow) the quick run once for the module: its protocol fields, a choice made on validation only,
and claims with valid verdicts."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from flatminima.cli import main
from flatminima.experiments.m_sharpness import (
    MSharpnessResult,
    RunRecord,
    Tuning,
    claims,
    correlations,
    gradient_variance_trace,
    m_values,
    methods_for,
    more_seeds_for,
    rho_grid,
    settings_for,
)
from flatminima.experiments.m_sharpness.report import workers_phrase
from flatminima.experiments.protocol import Budget, Verdict, sgd_epochs


def test_gradient_variance_trace_matches_a_loop_over_examples() -> None:
    """The vmap-over-grad trace equals mean_i ||g_i - g_bar||^2 from one backward pass per example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    inputs, targets = torch.randn(70, 5), torch.randint(0, 3, (70,))  # 70: more than one chunk of 64
    grads = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    stacked = torch.stack(grads)
    expected = (stacked - stacked.mean(dim=0)).pow(2).sum(dim=1).mean().item()
    measured = gradient_variance_trace(model, dict(model.named_parameters()), inputs, targets)
    assert measured == pytest.approx(expected, rel=1e-4)


def test_the_report_says_how_the_trainings_shared_the_machine() -> None:
    """The seconds are read against how the trainings ran: two single-thread CPU workers, or one GPU training."""
    assert workers_phrase(2, 1) == "2 concurrent single-thread workers"
    assert workers_phrase(1, 0) == "one default-threaded worker, one training at a time"
    assert workers_phrase(2, 4) == "2 concurrent 4-thread workers"


def test_m_runs_from_the_smallest_power_of_two_to_the_batch() -> None:
    assert m_values(16) == (1, 2, 4, 8, 16)
    assert m_values(256, smallest=4) == (4, 8, 16, 32, 64, 128, 256)
    assert m_values(256, smallest=4, step=4) == (4, 16, 64, 256)  # the SAM paper's Fig. 3, from m = 4
    assert m_values(12) == (1, 2, 4, 12)  # the powers of two that divide it, then the batch


def test_every_grid_has_the_same_size_and_rho_shrinks_with_m() -> None:
    for quick, size in ((False, 4), (True, 2)):
        ms = (1, 4, 16) if quick else (1, 2, 4, 8, 16)
        methods = methods_for(16, 0.4, 0.1, 0.01, ms, quick, train_size=160)
        assert {len(method.grid) for method in methods} == {size}
        names = [method.name for method in methods]
        assert names[:2] == ["sgd", "sgd-2x"] and "sam" in names and "rwsam" in names
        assert ("nsam" in names) is not quick
    methods = {method.name: method for method in methods_for(16, 0.4, 0.1, 0.01, (1, 2, 4, 8, 16), False, 160)}
    # SGD: learning rate x weight decay; the equal-evaluations budget trains twice the epochs, on its own grid
    assert {(s["lr"], s["weight_decay"]) for s in methods["sgd"].grid.settings} == {
        (0.1, 0.01),
        (0.1, 0.001),
        (0.05, 0.01),
        (0.05, 0.001),
    }
    assert methods["sgd-2x"].epochs_factor == sgd_epochs(1, Budget.EQUAL_EVALUATIONS) == 2
    assert methods["sgd"].epochs_factor == 1 and not methods["sgd"].after_sgd and methods["sam"].after_sgd
    # m-SAM's radii: rho f sqrt(m / batch), the same factors at every m; SAM (m = batch) is rho f
    sam = [s["rho"] for s in methods["sam"].grid.settings]
    one = [s["rho"] for s in methods["msam-1"].grid.settings]
    assert sam == [0.4, 0.2, 0.8, 0.1] and one == pytest.approx([r / 4 for r in sam])
    assert rho_grid(0.4, 4, 16, (1.0,)) == (0.2,)
    assert methods["msam-4"].fields == {"optimizer": "sam", "group_size": 4} and methods["msam-4"].m == 4
    assert methods["sam"].fields == {"optimizer": "sam"} and methods["sam"].m == 16
    assert methods["nsam"].fields["nsam_sample_size"] == 128  # 8 batches, within the 160 training examples


def test_the_full_run_tunes_on_two_seeds_and_extends_close_calls_to_five() -> None:
    full = settings_for(False, (0, 1, 2), {})
    assert full.tuning_seeds == (100, 101) and full.more_seeds == (3, 4) and full.ms == (1, 2, 4, 8, 16)
    assert full.base.model == "two_layer_cnn" and full.base.validation_fraction == 0.5 and full.epochs == 30
    quick = settings_for(True, (0,), {})
    assert quick.tuning_seeds == (100,) and quick.more_seeds == () and quick.ms == (1, 4, 16)
    assert settings_for(False, (0, 1, 2, 3), {}).more_seeds == ()  # seeds given: no more are added
    with pytest.raises(ValueError, match=r"seeds \[100\] choose"):  # a selection seed is never reported
        settings_for(False, (0, 100), {})
    other = settings_for(True, (0,), {"dataset": "cifar10", "data_root": "DATA", "batch_size": 256})
    assert other.problem is None and other.base.model == "small_cnn" and other.ms == (4, 64, 256)


def _record(method: str, seed: int, accuracy: float, gap: float, sharpness: dict[str, float]) -> RunRecord:
    return RunRecord(
        method=method,
        seed=seed,
        index=0,
        setting={},
        epochs=30,
        validation_accuracy=accuracy,
        test_accuracy=accuracy,
        test_loss=0.1,
        train_accuracy=accuracy + gap,
        train_loss=0.1,
        seconds_per_epoch=1.0,
        trace_v=[],
        m_sharpness=sharpness,
    )


def _made_up() -> MSharpnessResult:
    """Made-up final runs (the chosen setting is index 0): test accuracy falls with m, SGD below SAM at equal
    epochs, SGD at 2x epochs level with SAM (a close call), RW-SAM below SAM; the 1-sharpness ranks the models by
    their gap, the 16-sharpness does not."""
    settings = settings_for(False, (0, 1, 2), {})
    accuracy = {"msam-1": 0.99, "msam-2": 0.985, "msam-4": 0.98, "msam-8": 0.97, "sam": 0.96, "nsam": 0.95}
    accuracy |= {"sgd": 0.85, "rwsam": 0.90}
    jitter = (0.0, -0.005, 0.004)
    sgd_2x = (0.962, 0.953, 0.966)  # SAM minus it: -0.2, +0.2, -0.2 points: within two standard errors of 0
    runs = []
    for i, method in enumerate(settings.methods):
        for seed in (0, 1, 2, 3) if method.name == "rwsam" else (0, 1, 2):
            value = sgd_2x[seed] if method.name == "sgd-2x" else accuracy[method.name] + jitter[seed % 3]
            gap = 0.02 * i + 0.003 * seed
            scrambled = ((7 * (3 * i + seed)) % 11) / 100  # unrelated to the gap
            runs.append(_record(method.name, seed, value, gap, {"1": gap + 0.5, "16": scrambled}))
    tuning = {m.name: Tuning(m.name, [dict(s) for s in m.grid.settings], [0.5] * 4, 0, {}) for m in settings.methods}
    return MSharpnessResult(settings, runs, tuning, {})


def test_the_claims_follow_their_rules_on_made_up_results() -> None:
    result = _made_up()
    found = claims(result)
    assert [c.verdict for c in found] == [
        Verdict.SUPPORTS,  # m = 1 above SAM on every seed
        Verdict.SUPPORTS,  # accuracy falls with log m
        Verdict.SUPPORTS,  # SAM above SGD at equal epochs
        Verdict.INCONCLUSIVE,  # SAM level with SGD at 2x epochs
        Verdict.SUPPORTS,  # the 1-sharpness ranks the gap, the 16-sharpness does not
        Verdict.CONTRADICTS,  # RW-SAM below SAM
    ]
    assert found[0].measured.startswith("3 [") and "3 seeds" in found[0].measured
    assert "3 seeds" in found[5].measured  # RW-SAM's fourth seed has no SAM partner: paired over the common three
    by_m = {c.m: c for c in correlations(result)}
    assert by_m[1].spearman == pytest.approx(1.0) and by_m[1].n == len(result.runs)
    assert abs(by_m[16].spearman) < 0.5
    # the close call asks for more seeds of its two methods, and nothing else does
    assert more_seeds_for(result) == {"sgd-2x": ["sam vs sgd-2x"], "sam": ["sam vs sgd-2x"]}


def test_the_selection_seeds_runs_are_never_reported() -> None:
    """The tuning runs of the chosen setting (seeds 100, 101) chose it: they are in the pool of the second panel but
    never among the reported runs, whatever they measured."""
    result = _made_up()
    lucky = [
        _record(m.name, seed, 1.0, 0.0, {"1": 0.5, "16": 0.1}) for m in result.settings.methods for seed in (100, 101)
    ]
    with_tuning = dataclasses.replace(result, runs=result.runs + lucky)
    assert {r.seed for r in with_tuning.finals("sam")} == {0, 1, 2}
    assert [c.measured for c in claims(with_tuning)][:4] == [c.measured for c in claims(result)][:4]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``flatminima reproduce m-sharpness --quick``, once for the module: its results.json and report.md."""
    out = tmp_path_factory.mktemp("m-sharpness")
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert main(["reproduce", "m-sharpness", "--quick", "--output", str(out)]) == 0
    assert stdout.getvalue().lstrip().startswith("|") and "---:" in stdout.getvalue()
    report = (out / "report.md").read_text()
    for figure in ("accuracy_vs_m.png", "m_sharpness_gap.png", "regulariser.png"):
        assert (out / figure).is_file() and f"]({figure})" in report
    return json.loads((out / "results.json").read_text()), report


@pytest.mark.slow
def test_quick_run_records_the_protocol(quick: tuple[dict, str]) -> None:
    results, report = quick
    assert results["reproduction"] == "m-sharpness" and results["quick"] is True and results["seeds"] == [0]
    assert results["ms"] == [1, 4, 16] and results["batch_size"] == 16
    assert results["methods"] == ["sgd", "sgd-2x", "msam-1", "msam-4", "sam", "rwsam"]
    protocol = results["protocol"]
    assert set(protocol["grid_sizes"]) == set(results["methods"]) and set(protocol["grid_sizes"].values()) == {2}
    assert protocol["validation_fraction"] == 0.5 and protocol["tuning_seeds"] == [100]
    budgets = protocol["budgets"]
    assert budgets["equal epochs"]["sgd_epochs"] == budgets["equal epochs"]["sam_epochs"] == results["epochs"]
    assert budgets["equal gradient evaluations"]["sgd_epochs"] == 2 * results["epochs"]
    assert {r["epochs"] for r in results["runs"] if r["method"] == "sgd-2x"} == {2 * results["epochs"]}
    assert "## Verdicts" in report and "**Tuning**" in report


@pytest.mark.slow
def test_quick_run_chose_on_validation_only(quick: tuple[dict, str]) -> None:
    """Each choice is the first argmax of the validation scores recorded, and those scores are the tuning runs'
    validation accuracies (no test accuracy enters); the final rows are at the chosen settings."""
    results, _ = quick
    runs = results["runs"]
    tuning_seeds, reported = set(results["protocol"]["tuning_seeds"]), set(results["seeds"])
    assert not tuning_seeds & reported  # the selection seeds are never reported
    for name, tuning in results["tuning"].items():
        scores = tuning["validation_scores"]
        assert len(scores) == len(tuning["settings"]) == results["protocol"]["grid_sizes"][name]
        assert tuning["chosen_index"] == scores.index(max(scores))
        assert tuning["chosen"] == tuning["settings"][tuning["chosen_index"]]
        for index, score in enumerate(scores):
            own = [
                r["validation_accuracy"]
                for r in runs
                if r["method"] == name and r["index"] == index and r["seed"] in tuning_seeds
            ]
            assert own and score == pytest.approx(sum(own) / len(own))
        assert results["summary"][name]["chosen"] == tuning["chosen"]
        finals = [
            r for r in runs if r["method"] == name and r["index"] == tuning["chosen_index"] and r["seed"] in reported
        ]
        assert results["summary"][name]["test_accuracies"] == [r["test_accuracy"] for r in finals]


@pytest.mark.slow
def test_quick_run_claims_and_measurements(quick: tuple[dict, str]) -> None:
    results, _ = quick
    found = results["claims"]
    assert len(found) == 6 and all(c["verdict"] in {v.value for v in Verdict} for c in found)
    assert all(c["measured"] and c["rule"] for c in found)
    # one seed: every seed-paired claim is INCONCLUSIVE, whatever its mean
    for index in (0, 1, 2, 3, 5):
        assert found[index]["verdict"] == "INCONCLUSIVE" and "1 seed" in found[index]["measured"]
    assert "Spearman" in found[4]["statement"] and "trained models" in found[4]["measured"]
    # every model's final weights are measured at every m (the loss increase is the maximum over the ascent's
    # iterates, the unperturbed weights included, so never below 0), and correlated with its gap per m
    for run in results["runs"]:
        assert set(run["m_sharpness"]) == {"1", "4", "16"}
        assert all(value >= 0 and math.isfinite(value) for value in run["m_sharpness"].values())
        assert 0 <= run["train_accuracy"] <= 1 and 0 <= run["validation_accuracy"] <= 1
    assert [c["m"] for c in results["correlations"]] == [1, 4, 16]
    assert all(c["n"] == len(results["runs"]) and -1 <= c["spearman"] <= 1 for c in results["correlations"])
    # tr(V) along training for the final runs, and the regulariser (rho / 2m) tr(V) at the chosen rho
    for cell in results["summary"].values():
        curve = cell["regulariser_curve"]
        assert curve[0]["epoch"] == 0 and curve[-1]["epoch"] == cell["epochs"]
        assert all(p["trace_v_mean"] > 0 for p in curve)
        if cell["m"] is not None:
            rho = cell["chosen"]["rho"]
            assert cell["regulariser_final"] == pytest.approx(rho / (2 * cell["m"]) * cell["trace_v_final"])
