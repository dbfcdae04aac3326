"""The README's main job runs end to end (a short run: the full one is in the docs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_label_noise.py"


def _load():
    spec = importlib.util.spec_from_file_location("digits_label_noise", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_main_job_runs_and_prints_the_table(capsys) -> None:
    example = _load()
    example.main(["--epochs", "2", "--threads", "1", "--log-every", "1"])
    out = capsys.readouterr().out
    assert "SAM - SGD" in out and "clean test acc %" in out
    for name in ("SGD", "SAM"):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        accuracy = float(row.split()[-2])
        assert 0.0 <= accuracy <= 100.0


@pytest.mark.parametrize("argv", [["--noise", "1.5"], ["--epochs", "0"], ["--rho", "-1"]])
def test_main_job_rejects_nonsense(argv) -> None:
    with pytest.raises(SystemExit):
        _load().parse_args(argv)
