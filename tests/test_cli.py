"""The command line: demo and sharpness, run for real on the embedded digits (short runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flatminima import __version__
from flatminima.cli import main
from flatminima.experiments.label_noise import QUICK_EPOCHS


def test_sharpness_command_measures_a_trained_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress", "--output", str(run)]
    assert main(args) == 0
    code = main(
        [
            "sharpness",
            "--checkpoint",
            str(run / "model.pt"),
            "--examples",
            "128",
            "--k",
            "3",
            "--trace-probes",
            "10",
            "--density-runs",
            "2",
            "--m",
            "32",
            "--output",
            str(tmp_path / "sharp"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "128 training examples, measured on cpu" in out
    for row in ("top-3 eigenvalues (Lanczos)", "trace (Hutchinson)", "32-sharpness, worst case", "average case"):
        assert row in out
    assert "converged" in out
    for figure in ("spectral_density.png", "landscape_top_eigenvector.png"):
        assert (tmp_path / "sharp" / figure).stat().st_size > 1000


def test_sharpness_command_reports_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["sharpness", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_demo_prints_table_with_noisy_labels_fitted(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--epochs", "1", "--no-progress", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "noisy labels fitted %" in out and "clean test acc %" in out and "SAM - SGD" in out
    assert "lambda_max" not in out  # sharpness is hessian-spectrum's subject, not the demo's
    assert (tmp_path / "demo" / "test_accuracy.png").is_file() and (tmp_path / "demo" / "results.md").is_file()


def test_demo_quick_runs_three_epochs_and_writes_table_and_figure(tmp_path: Path, capsys) -> None:
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--variants", "sgd", "--no-progress", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "clean test acc %" in out and "--quick" in out
    lines = (output / "sgd-seed0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == QUICK_EPOCHS == 3
    assert (output / "test_accuracy.png").is_file() and (output / "results.md").is_file()


def test_version_flag_prints_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flatminima {__version__}"


def test_python_m_flatminima_runs_in_a_process_of_its_own() -> None:
    """The entry a user types (``python3 -m flatminima``), in a real process: the quick run's one such test."""
    result = subprocess.run(
        [sys.executable, "-m", "flatminima", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"flatminima {__version__}"
