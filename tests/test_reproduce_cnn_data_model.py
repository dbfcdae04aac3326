"""``flatminima reproduce cnn-data-model``: SAM's benign region on the patch data model is larger than SGD's, and SGD
memorises the noise where SAM does not (Chen et al., NeurIPS 2023), checked on the quick run; and its helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_reproduce import _quick

from flatminima.experiments.cnn_data_model import (
    SAM_RHO,
    TRACKED,
    CnnDataModelResult,
    OptimiserGrid,
    Setting,
    TrainedCNN,
    benign_cells,
    benign_threshold,
    make_data,
    noise_patches,
    report,
    train_cnn,
)
from flatminima.experiments.cnn_data_model.compute import boundary_constant
from flatminima.experiments.reproduce import Context


@pytest.mark.slow
def test_cnn_data_model_quick_sam_is_benign_where_sgd_memorises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = _quick("cnn-data-model", tmp_path, capsys)
    assert results["rho"] == SAM_RHO
    cells = results["grid_cells"]
    assert cells == len(results["signal_norms"]) * len(results["dims"])
    assert results["benign_area_sgd"] == results["benign_cells_sgd"] / cells
    # the claim's direction: SAM's region contains SGD's and is strictly larger (the quick grid has a weak-signal
    # row where SGD memorises and SAM does not, and a strong-signal row where both are benign)
    sgd, sam = results["optimisers"]["sgd"], results["optimisers"][f"sam_rho{SAM_RHO:g}"]
    for sgd_row, sam_row in zip(sgd["benign"], sam["benign"]):
        for sgd_ok, sam_ok in zip(sgd_row, sam_row):
            assert sam_ok or not sgd_ok
    assert results["benign_area_sam"] > results["benign_area_sgd"] > 0
    # in the tracked cell SGD is harmful (error well above the margin) and SAM benign
    i, j = results["dims"].index(TRACKED[1]), results["signal_norms"].index(TRACKED[0])
    assert sgd["test_error_mean"][i][j] >= 0.1
    assert sam["test_error_mean"][i][j] <= results["benign_margin"]
    # SGD memorises the noise there, SAM hardly does and learns the signal instead
    assert results["noise_memorisation_final_sgd"] > 3 * results["noise_memorisation_final_sam"]
    assert results["signal_learning_final_sam"] > 2 * results["signal_learning_final_sgd"]
    start_sgd, end_sgd = sgd["trajectory_mean"][0][1], sgd["trajectory_mean"][-1][1]
    start_sam, end_sam = sam["trajectory_mean"][0][1], sam["trajectory_mean"][-1][1]
    assert start_sgd == pytest.approx(start_sam)  # same initialisation and data
    assert end_sgd - start_sgd > 5 * max(end_sam - start_sam, 0.0)
    assert end_sgd > 5 * start_sgd


def test_noise_patches_picks_the_patch_orthogonal_to_the_signal() -> None:
    data = make_data(signal_norm=3.0, dim=50, seed=4)
    xi = noise_patches(data.train_images)
    assert xi.shape == (len(data.train_images), 50)
    assert torch.all(xi[:, 0] == 0)  # the noise has no component along mu = ||mu|| e_1
    assert torch.all(xi.norm(dim=1) > 1.0)
    signal = data.train_images.sum(dim=1) - xi  # the other patch: +-mu
    assert torch.allclose(signal.abs()[:, 0], torch.full((len(xi),), 3.0))
    assert torch.all(signal[:, 1:] == 0)


def test_sam_with_zero_radius_trains_exactly_as_gradient_descent() -> None:
    sgd = train_cnn(Setting(2.0, 60, 0, None, epochs=15), track_every=5)
    sam = train_cnn(Setting(2.0, 60, 0, 0.0, epochs=15), track_every=5)
    # exact: with rho = 0 the ascent adds +-0, so the second gradient is taken at w's bits by the same forward and
    # backward; SAM gives w back exactly and its step is the same torch.optim.SGD step on the same tensors
    assert sgd == sam


def test_benign_cells_and_threshold() -> None:
    errors = [[0.3, 0.04, 0.0], [0.3, 0.2, 0.01], [0.1, 0.06, 0.2]]
    benign = benign_cells(errors, margin=0.05)
    assert benign == [[False, True, True], [False, False, True], [False, False, False]]
    norms = [1.0, 2.0, 4.0]
    assert benign_threshold(benign[0], norms) == 2.0
    assert benign_threshold(benign[1], norms) == 4.0
    assert math.isnan(benign_threshold(benign[2], norms))
    assert benign_threshold([True, False, True], norms) == 4.0  # only an unbroken run up to the strongest signal


def _made_result(errors: dict[float | None, list[list[float]]], signal_norms: tuple[float, ...]) -> CnnDataModelResult:
    """A grid's result made by hand from each optimiser's test errors (d = 300 and 900, one seed)."""
    dims = (300, TRACKED[1])
    grids = {}
    for rho, rows in errors.items():
        runs = [[[TrainedCNN(e, 0.0, 0.1, 2, 1, 1.0, 0.5)] for e in row] for row in rows]
        curves = [[(0, 0.1, 0.0), (200, 1.0, 0.5)]]
        benign = benign_cells(rows)
        thresholds = [benign_threshold(row, signal_norms) for row in benign]
        grids[rho] = OptimiserGrid(rho, runs, curves, rows, benign, thresholds)
    return CnnDataModelResult((0,), signal_norms, dims, grids, boundary_constant(grids[None].thresholds, dims))


def test_report_says_what_the_tracked_cell_and_the_boundary_show(tmp_path: Path) -> None:
    ctx = Context(output=tmp_path, quick=False, seeds=(0,))
    norms = (1.0, TRACKED[0], 7.0)
    sgd = [[0.3, 0.2, 0.0], [0.3, 0.2, 0.0]]  # benign only at the strongest signal
    sam = [[0.3, 0.0, 0.0], [0.3, 0.0, 0.0]]
    differ = report(_made_result({None: sgd, SAM_RHO: sam, 0.1: sgd}, norms), ctx)
    assert differ.caption.endswith("in one cell where they differ.")
    assert "C = 107, draws the dashed curve" in differ.report  # the median of n 7^4 / d: 160 and 53.4
    assert [path.name for path in differ.figures] == [
        "test_error_maps.png",
        "rho_ablation.png",
        "noise_memorisation.png",
    ]
    assert differ.rows[0][1] == "2/6" and differ.rows[1][1] == "4/6" and differ.rows[2][0] == "SAM rho=0.1"
    both = report(_made_result({None: sam, SAM_RHO: sam}, norms), ctx)
    assert both.caption.endswith("in one cell where both are benign.")
    harmful = [[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]
    neither = report(_made_result({None: harmful, SAM_RHO: harmful}, norms), ctx)
    assert neither.caption.endswith("in one cell where neither is benign.")
    assert "C is undefined and no curve is drawn" in neither.report and "dashed curve" not in neither.report
    two = report(_made_result({None: [row[1:] for row in sgd], SAM_RHO: [row[1:] for row in sam]}, norms[1:]), ctx)
    assert "no curve is drawn on a grid of 2 signal strengths" in two.report and "dashed curve" not in two.report
