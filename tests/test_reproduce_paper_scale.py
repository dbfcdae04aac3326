"""The training reproductions at another scale: ``flatminima reproduce NAME --dataset cifar10 --data-root ... --model
...`` runs the same experiment on that data and model (a tiny CIFAR-10 in the real binary format here), records the
settings, and refuses a setting it would not honour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flatminima.cli import main
from flatminima.experiments.reproduce import TRAINING_FIELDS, available

CIFAR10_FILES = [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10's binary files with 16 random images each: 80 training and 16 test images."""
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        labels = np.arange(16, dtype=np.uint8)[:, None] % 10
        images = rng.integers(0, 256, size=(16, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, images], axis=1).tobytes())
    return folder.parent


def _run(name: str, out: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    assert main(["reproduce", name, "--quick", "--output", str(out), *flags]) == 0
    assert capsys.readouterr().out.lstrip().startswith("|")
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _flags(root: Path, model: str) -> list[str]:
    return ["--dataset", "cifar10", "--data-root", str(root), "--model", model, "--epochs", "1", "--batch-size", "16"]


def test_every_training_reproduction_gives_the_paper_command() -> None:
    for name in ("label-noise", "m-sharpness", "hessian-spectrum"):
        reproduction = available()[name]
        assert reproduction.paper_command.startswith(f"flatminima reproduce {name} --dataset cifar10")
        assert reproduction.overridable <= set(TRAINING_FIELDS) and "model" in reproduction.overridable


@pytest.mark.slow
def test_label_noise_on_cifar10_files(tiny_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [*_flags(tiny_cifar10, "mlp"), "--rho", "0.1"]
    results, report = _run("label-noise", tmp_path / "ln", flags, capsys)
    assert results["overrides"] == {
        "dataset": "cifar10",
        "data_root": str(tiny_cifar10),
        "model": "mlp",
        "epochs": 1,
        "batch_size": 16,
        "rho": 0.1,
    }
    assert results["tuned"] is False and results["tuning"] == []  # a given rho replaces the tuning
    assert {r["rho"] for r in results["runs"] if r["role"] == "sam"} == {0.1}
    assert results["setting"].startswith("mlp on cifar10, 1 epochs (equal-evaluations SGD: 2), batch 16")
    assert results["epochs"] == 1 and {r["noise"] for r in results["runs"]} == {0.4}
    assert {r["epochs"] for r in results["runs"] if r["role"] == "sgd-2x"} == {2}
    assert "Settings given on the command line" in report and results["paper_command"] in report
    assert "--dataset cifar10" in results["command"] and "--rho 0.1" in results["command"]


@pytest.mark.slow
def test_m_sharpness_on_cifar10_files(tiny_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, _ = _run("m-sharpness", tmp_path / "ms", _flags(tiny_cifar10, "mlp"), capsys)
    assert results["batch_size"] == 16 and results["epochs"] == 1
    assert results["ms"] == [1, 4, 16]
    assert results["methods"] == ["sgd", "sgd-2x", "msam-1", "msam-4", "sam", "rwsam"]
    cells = results["summary"]
    assert cells["sam"]["m"] == 16 and cells["msam-4"]["m"] == 4
    assert cells["sam"]["trace_v_final"] > 0  # an MLP has no BatchNorm: tr(V) is measured


@pytest.mark.slow
def test_hessian_spectrum_on_cifar10_files(
    tiny_cifar10: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [*_flags(tiny_cifar10, "mlp"), "--rho", "0.05"]
    results, report = _run("hessian-spectrum", tmp_path / "hs", flags, capsys)
    setting = results["setting"]
    assert setting["dataset"] == "cifar10 (clean labels)" and setting["model"] == "mlp"
    assert setting["batch_size"] == 16 and setting["max_epochs"] == 1 and setting["rhos"] == [0.05]
    assert setting["exact_crossing"] is False and setting["check_every"] == 80 // 16
    assert {r["optimizer"] for r in results["runs"]} == {"sgd", "sam_rho0.05"}
    assert all(len(r["eigenvalues"]) == 5 for r in results["runs"])
    assert "once per epoch" in report


def test_a_setting_a_reproduction_does_not_honour_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "sam-cycle", "--quick", "--dataset", "cifar10"]) == 2
    assert "trains no network, so it takes no training settings" in capsys.readouterr().err
    assert main(["reproduce", "hessian-spectrum", "--quick", "--augment"]) == 2
    err = capsys.readouterr().err
    assert "does not take --augment" in err and "--data-root" in err


def test_hessian_spectrum_refuses_a_model_with_batch_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", "hessian-spectrum", "--quick", "--model", "resnet20", "--output", str(tmp_path)]) == 2
    assert "without BatchNorm" in capsys.readouterr().err
