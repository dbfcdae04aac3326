"""``flatminima reproduce``: the output convention, and each reproduction's claim checked on its quick run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flatminima.cli import main
from flatminima.experiments.reproduce import available, markdown_table
from flatminima.experiments.sam_cycle import RunRecord, decay_factor
from flatminima.experiments.sam_cycle.report import beyond_the_theorem, slowest_sentence


def _quick(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """Run ``flatminima reproduce NAME --quick`` and check the convention: a table on stdout, results.json with the
    command, report.md that links its figures, and the figures on disk."""
    out = tmp_path / name
    assert main(["reproduce", name, "--quick", "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.lstrip().startswith("|") and "---:" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["reproduction"] == name and results["quick"] is True
    assert results["command"] == f"flatminima reproduce {name} --quick --output {out}"
    report = (out / "report.md").read_text()
    figures = sorted(out.glob("*.png"))
    assert figures, "a reproduction draws at least one figure"
    for figure in figures:
        assert f"]({figure.name})" in report
    return results


def test_list_names_every_reproduction(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in available():
        assert name in listed
    assert "sam-cycle" in available()


def test_unknown_reproduction_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "no-such-claim"]) == 2
    err = capsys.readouterr().err
    assert "unknown reproduction 'no-such-claim'" in err and "--list" in err
    assert main(["reproduce"]) == 2
    assert "name a reproduction" in capsys.readouterr().err


def test_output_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    assert main(["reproduce", "sam-cycle", "--quick", "--output", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_markdown_table_formats_floats_and_nan() -> None:
    table = markdown_table(["a", "b"], [["x", 0.123456], ["y", math.nan]])
    assert table.splitlines() == ["| a | b |", "|---|---:|", "| x | 0.1235 |", "| y | n/a |"]


def test_sam_cycle_quick_matches_the_closed_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _quick("sam-cycle", tmp_path, capsys)
    assert results["max_amplitude_rel_error"] <= 1e-6
    assert results["max_others_norm_final"] <= 1e-9
    for run in results["runs"]:
        assert run["sign_alternates"]
        assert run["amplitude_measured"] == pytest.approx(run["c_predicted"], rel=1e-6)
        assert run["decay_coordinates_measured"] >= 1
        assert run["decay_max_abs_error"] <= 1e-3  # the linearised rate f_i, measured on the run


def test_decay_factor_is_a_contraction_inside_the_stable_range() -> None:
    for x in (0.1, 1.0, 1.9):
        for r in (0.01, 0.5, 0.99):
            assert abs(decay_factor(x, r, 1.0)) < 1.0
    assert decay_factor(1.0, 1.0, 1.0) == pytest.approx(-1.0)  # the cycle's own direction is neutral


def _cycle_record(x: float, error: float, alternates: bool = True, slowest: int = 10) -> RunRecord:
    """A hand-made sam-cycle record at eta lambda_1 = x: amplitude error, sign, slowest coordinate as given."""
    return RunRecord(0, x, 0.05, 0.05, 0.05, error, alternates, 1e-17, slowest, 0.9, 0.9, 3, 1e-5)


def test_sam_cycle_sentences_follow_the_records() -> None:
    """sam-cycle's report sentences flip when the records behind them do."""
    within = [_cycle_record(0.2, 1e-15), _cycle_record(1.0, 1e-15)]
    assert "this run has no step size past" in beyond_the_theorem(within[:1])
    assert "settle into the same cycle" in beyond_the_theorem(within)
    assert "not all settle" in beyond_the_theorem([*within, _cycle_record(1.5, 1e-2)])
    assert "not all settle" in beyond_the_theorem([_cycle_record(1.0, 1e-15, alternates=False)])
    assert slowest_sentence(within, 10).endswith("not lambda_2.")
    mixed = slowest_sentence([*within, _cycle_record(1.5, 1e-15, slowest=2)], 10)
    assert "in 2 of 3 runs, but not in the others (coordinate 2 at eta lambda_1 = 1.5" in mixed


def test_a_module_cannot_overwrite_the_runners_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flatminima.experiments import reproduce

    def clashing(ctx: reproduce.Context) -> reproduce.Outcome:
        return reproduce.Outcome(headers=["a"], rows=[[1]], results={"paper": "mine"})

    fake = reproduce.Reproduction(name="fake", summary="s", paper="p", run=clashing)
    monkeypatch.setattr(reproduce, "available", lambda: {"fake": fake})
    with pytest.raises(RuntimeError, match="runner writes itself"):
        reproduce.run_reproduction("fake", output=tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()
