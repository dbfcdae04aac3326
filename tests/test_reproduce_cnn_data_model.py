"""``flatminima reproduce cnn-data-model``: settings chosen on held-out seeds, SAM's benign region against SGD's on the
patch data model and how SAM treats the flipped labels (Chen et al., NeurIPS 2023), checked on the quick run; and
its parts, on runs made by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_reproduce import _quick

from flatminima.experiments.cnn_data_model import (
    BENIGN_MARGIN,
    LR_GRID,
    RHO_GRID,
    SELECTION_SEEDS,
    TRACKED,
    Arm,
    CnnDataModelResult,
    Decided,
    Fit,
    Setting,
    TrainedCNN,
    benign_cells,
    benign_threshold,
    compute,
    fit_class,
    held_out_labels,
    make_data,
    noise_patches,
    report,
    train_checkpoints,
    train_cnn,
)
from flatminima.experiments.cnn_data_model.selection import select
from flatminima.experiments.cnn_data_model.verdicts import region_verdict
from flatminima.experiments.protocol import Budget, Verdict, equal_sizes
from flatminima.experiments.reproduce import Context


@pytest.mark.slow
def test_cnn_data_model_quick_chooses_on_held_out_seeds_and_judges_the_claims(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _quick("cnn-data-model", tmp_path, capsys)
    selection = results["selection"]
    # the held-out seeds choose; the reported ones are others
    assert set(selection["seeds"]) == set(SELECTION_SEEDS)
    assert not set(selection["seeds"]) & set(results["reported_seeds"])
    assert not set(selection["seeds"]) & set(results["seeds"])
    assert len(results["reported_seeds"]) >= 3
    # grids of the same size, and each choice the argmin of the recorded held-out errors (a tie: the earlier)
    assert len(selection["lr_grid"]) == len(selection["rho_grid"]) == len(LR_GRID) == len(RHO_GRID)
    equal_sizes(LR_GRID, RHO_GRID)
    scores = selection["sam_held_out_error"]
    assert selection["rho"] == results["rho"] == selection["rho_grid"][scores.index(min(scores))]
    for budget, errors in selection["sgd_held_out_error"].items():
        assert selection["lr"][budget] == selection["lr_grid"][errors.index(min(errors))]
    # SGD is harmful where its held-out mean clean test error exceeds the margin, as recorded
    for budget, cells in selection["sgd_harmful_cells"].items():
        errors = selection["sgd_test_error_mean"][budget]
        expected = [[i, j] for i, row in enumerate(errors) for j, e in enumerate(row) if e > results["benign_margin"]]
        assert cells == expected
    arms = results["arms"]
    assert set(arms) == {"sgd_equal_steps", "sgd_equal_evaluations"} | {f"sam_rho{r:g}" for r in selection["rho_grid"]}
    assert arms["sgd_equal_evaluations"]["steps"] == 2 * arms["sgd_equal_steps"]["steps"] == 2 * results["steps"]
    for key, arm in arms.items():
        assert arm["fit"] in {f.value for f in Fit}
        if not math.isnan(arm["flipped_fitted_where_benign"]):
            assert arm["fit"] == fit_class(arm["flipped_fitted_where_benign"]).value
        if key.startswith("sam"):
            assert arm["lr"] == selection["lr"]["equal_steps"] and arm["steps"] == results["steps"]
    # the claims, each with a verdict; where SGD is harmful (the weak-signal column) SAM's error is far below
    claims = results["claims"]
    assert len(claims) == 6 and len({c["statement"] for c in claims}) == 6
    assert all(c["verdict"] in {v.value for v in Verdict} and c["measured"] and c["rule"] for c in claims)
    first = claims[0]["statement"]
    assert first.startswith("SAM's clean test error is below SGD's") and "equal steps" in first
    assert claims[0]["verdict"] == "SUPPORTS"
    chosen = arms[f"sam_rho{selection['rho']:g}"]
    assert chosen["fit"] in claims[-1]["measured"]
    # the same data and initialisation for every optimiser in the tracked cell
    curves = results["trajectory_mean"]
    assert curves["sgd_equal_steps"][0][1] == pytest.approx(curves[f"sam_rho{selection['rho']:g}"][0][1])
    assert curves["sgd_equal_evaluations"][-1][0] == 2 * results["steps"]


def test_noise_patches_picks_the_patch_orthogonal_to_the_signal() -> None:
    data = make_data(signal_norm=3.0, dim=50, seed=4)
    xi = noise_patches(data.train_images)
    assert xi.shape == (len(data.train_images), 50)
    assert torch.all(xi[:, 0] == 0)  # the noise has no component along mu = ||mu|| e_1
    assert torch.all(xi.norm(dim=1) > 1.0)
    signal = data.train_images.sum(dim=1) - xi  # the other patch: +-mu
    assert torch.allclose(signal.abs()[:, 0], torch.full((len(xi),), 3.0))
    assert torch.all(signal[:, 1:] == 0)


def test_held_out_labels_flip_like_the_training_labels_and_are_shared_by_a_row() -> None:
    weak, strong = make_data(1.0, 40, 7), make_data(5.0, 40, 7)
    labels = held_out_labels(weak, 7)
    flipped = float((labels != weak.test_labels).float().mean())
    assert 0.06 < flipped < 0.14  # p = 0.1 over 1000 points
    assert torch.equal(labels, held_out_labels(strong, 7))  # the same flips for every ||mu|| of the row
    assert not torch.equal(labels, held_out_labels(make_data(1.0, 40, 8), 8))


def test_sam_with_zero_radius_trains_exactly_as_gradient_descent() -> None:
    sgd = train_cnn(Setting(2.0, 60, 0, None, steps=15), track_every=5)
    sam = train_cnn(Setting(2.0, 60, 0, 0.0, steps=15), track_every=5)
    # exact: with rho = 0 the ascent adds +-0, so the second gradient is taken at w's bits by the same forward and
    # backward; SAM gives w back exactly and its step is the same torch.optim.SGD step on the same tensors
    assert sgd == sam


def test_a_checkpoint_of_a_longer_run_is_the_shorter_run() -> None:
    """SGD's two budgets come from one run: its measure after k steps must be a k-step run's, trajectory and all."""
    half, full = train_checkpoints(Setting(2.0, 60, 1, None, lr=0.2, steps=20), track_every=5, checkpoints=(10,))
    assert (half.steps, full.steps) == (10, 20)
    assert half == train_cnn(Setting(2.0, 60, 1, None, lr=0.2, steps=10), track_every=5)
    assert [record[0] for record in full.trajectory] == [0, 5, 10, 15, 20]
    assert full.train_loss < half.train_loss


def test_benign_cells_and_threshold() -> None:
    errors = [[0.3, 0.04, 0.0], [0.3, 0.2, 0.01], [0.1, 0.06, 0.2]]
    benign = benign_cells(errors, margin=0.05)
    assert benign == [[False, True, True], [False, False, True], [False, False, False]]
    norms = [1.0, 2.0, 4.0]
    assert benign_threshold(benign[0], norms) == 2.0
    assert benign_threshold(benign[1], norms) == 4.0
    assert math.isnan(benign_threshold(benign[2], norms))
    assert benign_threshold([True, False, True], norms) == 4.0  # only an unbroken run up to the strongest signal


def test_fit_class_thresholds() -> None:
    assert fit_class(0.0) is Fit.NEVER_OVERFITS and fit_class(0.1) is Fit.NEVER_OVERFITS
    assert fit_class(0.3) is Fit.PARTLY_OVERFITS
    assert fit_class(0.5) is Fit.OVERFITS_BENIGNLY and fit_class(1.0) is Fit.OVERFITS_BENIGNLY
    assert fit_class(math.nan) is Fit.UNKNOWN


def _run(error: float, fitted: int = 1, flipped: int = 2, held_out: float | None = None) -> TrainedCNN:
    held = 0.1 + 0.8 * error if held_out is None else held_out
    return TrainedCNN(200, error, held, 0.0, 0.1, flipped, fitted, 1.0, 0.5, [(0, 0.4, 0.0), (200, 1.0, 0.5)])


def _arm(cells: list[list[list[float]]], rho: float | None = None, fitted: int = 1, lr: float = 0.1) -> Arm:
    """An arm made by hand: ``cells[i][j]`` the seeds' clean test errors."""
    return Arm(rho, lr, 200, [[[_run(e, fitted) for e in seeds] for seeds in row] for row in cells])


def test_cells_are_decided_by_their_interval_and_the_region_claim_counts_them() -> None:
    arm = _arm([[[0.0, 0.0, 0.0], [0.3, 0.3, 0.31], [0.0, 0.1, 0.0]]])
    assert arm.decided() == [[Decided.BENIGN, Decided.HARMFUL, Decided.UNDECIDED]]
    assert arm.benign == [[True, False, True]] and arm.benign_count == 2  # by the mean, 0.033 is benign
    wide = _arm([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.31]]], rho=0.5)
    narrow = _arm([[[0.0, 0.0, 0.0], [0.3, 0.3, 0.31], [0.3, 0.3, 0.31]]])
    assert region_verdict(wide, narrow)[0] is Verdict.SUPPORTS
    assert region_verdict(narrow, wide)[0] is Verdict.CONTRADICTS
    # SAM's 2 decided cells do not outnumber SGD's 1 decided and 1 undecided
    assert region_verdict(wide, arm)[0] is Verdict.INCONCLUSIVE
    assert "SAM 2/3" in region_verdict(wide, arm)[1]


def test_select_takes_the_smallest_held_out_error_and_fixes_the_harmful_cells() -> None:
    def held(score: float, errors: list[float], rho: float | None = None) -> Arm:
        return Arm(rho, 0.1, 200, [[[_run(e, held_out=score)] * 2 for e in errors]])

    sgd = [held(s, [0.3, 0.0]) for s in (0.3, 0.2, 0.25, 0.2, 0.4, 0.5)]  # a tie: the earlier lr
    sgd[1] = held(0.2, [0.3, 0.01])
    longer = [held(s, [0.2, 0.2]) for s in (0.3, 0.3, 0.3, 0.3, 0.3, 0.1)]
    sam = [held(s, [0.0, 0.0], rho=0.1) for s in (0.3, 0.2, 0.1, 0.05, 0.06, 0.07)]
    selection = select({Budget.EQUAL_EPOCHS: sgd, Budget.EQUAL_EVALUATIONS: longer}, sam, SELECTION_SEEDS)
    assert selection.lr == {Budget.EQUAL_EPOCHS: LR_GRID.settings[1]["lr"], Budget.EQUAL_EVALUATIONS: 0.8}
    assert selection.rho == RHO_GRID.settings[3]["rho"] and selection.chosen_rho_index == 3
    assert selection.sgd_harmful == {Budget.EQUAL_EPOCHS: [(0, 0)], Budget.EQUAL_EVALUATIONS: [(0, 0), (0, 1)]}
    assert selection.sam_scores == pytest.approx([0.3, 0.2, 0.1, 0.05, 0.06, 0.07])


def test_compute_refuses_to_report_a_selection_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose this reproduction's settings"):
        compute(Context(output=tmp_path, quick=True, seeds=(0, SELECTION_SEEDS[0])))


def _made_result(sgd: Arm, sam: dict[float, Arm], rho: float) -> CnnDataModelResult:
    """A result made by hand on a 2 x 3 grid (d = 300, 900; ||mu|| = 1, 2, 7), three seeds."""
    norms, dims = (1.0, TRACKED[0], 7.0), (300, TRACKED[1])
    sgd_arms = {Budget.EQUAL_EPOCHS: sgd, Budget.EQUAL_EVALUATIONS: Arm(None, sgd.lr, 400, sgd.runs)}
    scores = [0.3 - 0.01 * k for k in range(len(RHO_GRID))]  # the largest radius scores best
    held = [
        Arm(
            float(s["rho"]),
            0.1,
            200,
            [[[_run(r.test_error, held_out=score) for r in cell] for cell in row] for row in sgd.runs],
        )
        for s, score in zip(RHO_GRID.settings, scores)
    ]
    selection = select({b: [sgd] * len(LR_GRID) for b in sgd_arms}, held, SELECTION_SEEDS)
    return CnnDataModelResult((0, 1, 2), False, norms, dims, selection, sgd_arms, sam, math.nan)


def test_report_gives_the_claims_the_tables_and_the_figures(tmp_path: Path) -> None:
    ctx = Context(output=tmp_path, quick=False, seeds=(0, 1, 2))
    weak = [[0.3, 0.32, 0.28], [0.2, 0.22, 0.18], [0.0, 0.0, 0.0]]  # SGD: benign only at the strongest signal
    sgd = _arm([weak, weak])
    good = [[0.0, 0.01, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    sam = {float(s["rho"]): _arm([good, good], rho=float(s["rho"]), fitted=0) for s in RHO_GRID.settings}
    outcome = report(_made_result(sgd, sam, 0.5), ctx)
    assert [path.name for path in outcome.figures] == [
        "test_error_maps.png",
        "rho_ablation.png",
        "noise_memorisation.png",
        "selection.png",
    ]
    assert all(path.exists() for path in outcome.figures)
    assert len(outcome.rows) == 2 + len(RHO_GRID) and outcome.rows[-1][0].endswith("(chosen)")
    verdicts = {c.statement.split(" (")[0]: c.verdict for c in outcome.claims}
    assert verdicts["SAM's clean test error is below SGD's where SGD overfits harmfully"] is Verdict.SUPPORTS
    assert verdicts["SAM's benign region is larger than SGD's"] is Verdict.SUPPORTS
    # SAM fits none of the flipped labels where it is benign: it never overfits, against the paper's picture
    assert outcome.claims[-1].verdict is Verdict.CONTRADICTS and "never overfits" in outcome.claims[-1].measured
    assert outcome.results["arms"]["sam_rho0.5"]["fit"] == Fit.NEVER_OVERFITS.value
    assert outcome.results["arms"]["sgd_equal_steps"]["fit"] == Fit.OVERFITS_BENIGNLY.value
    assert "At an end of its grid: SAM's rho 0.5" in outcome.report
    assert outcome.results["selection"]["rho"] == 0.5 and outcome.results["benign_margin"] == BENIGN_MARGIN
