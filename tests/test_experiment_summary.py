"""The reports' shared numbers and figures: cells over seeds, and figures that are saved and closed."""

from __future__ import annotations

import math

import pytest

from flatminima.experiments.figures import pyplot, saved_figure
from flatminima.experiments.summary import cell, mean, mean_std, spread


def test_mean_and_spread_over_seeds() -> None:
    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert spread([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))  # sample deviation: sum of squares 14 over 2
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert all(math.isnan(v) for v in mean_std([1.0, math.nan]))


def test_cell_formats_digits_units_and_sign() -> None:
    assert cell([1.23456]) == "1.23"
    assert cell([1.2345, 1.3], 4, spread_digits=1) == "1.267 ± 0.05"
    assert cell([0.5, 0.52], 1, fixed=True, scale=100) == "51.0 ± 1.4"
    assert cell([0.01], 1, fixed=True, scale=100, sign=True) == "+1.0"
    assert cell([-0.02, -0.04], 1, fixed=True, scale=100, sign=True) == "-3.0 ± 1.4"
    assert cell([]) == "n/a"
    assert cell([math.nan, 1.0]) == "n/a"


def test_saved_figure_writes_the_file_and_closes_it(tmp_path) -> None:
    plt = pyplot()
    before = len(plt.get_fignums())
    path = tmp_path / "curve.png"
    with saved_figure(path, 1, 2, title="two panels") as (_figure, (left, right)):
        left.plot([0, 1], [1, 0])
        right.plot([0, 1], [0, 1])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plt.get_fignums()) == before


def test_saved_figure_closes_on_error_and_writes_nothing(tmp_path) -> None:
    plt = pyplot()
    before = len(plt.get_fignums())
    path = tmp_path / "broken.png"
    with pytest.raises(RuntimeError, match="drawing failed"), saved_figure(path):
        raise RuntimeError("drawing failed")
    assert not path.exists()
    assert len(plt.get_fignums()) == before
