"""flatminima train end to end: config, output files, atomic checkpoints, resume after a kill, torchrun."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatminima.cli import main
from flatminima.train import TrainConfig, train
from flatminima.train.checkpoint import load_checkpoint, save_checkpoint
from flatminima.train.config import add_arguments, config_from_args

FAST = [
    "--dataset",
    "digits",
    "--model",
    "small_cnn",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--threads",
    "1",
    "--no-progress",
]


def _cli(tmp_path: Path, *extra: str, name: str = "run") -> list[str]:
    return ["train", *FAST, "--output", str(tmp_path / name), *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_yaml_config_with_flag_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optimizer: asam\nrho: 0.5\nepochs: 7\naugment: true\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--rho", "0.2"]))
    assert (config.optimizer, config.rho, config.epochs, config.augment) == ("asam", 0.2, 7, True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rho: -1\n", "rho must be a finite number >= 0"),
        ("learning_rate: 0.1\n", "unknown config field"),
        ("epochs: many\n", "int"),
    ],
)
def test_bad_config_gives_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match=match):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml")]))


def test_train_writes_its_files_and_learns(tmp_path: Path, capsys) -> None:
    assert main(_cli(tmp_path, "--epochs", "3", "--optimizer", "sam", "--rho", "0.05")) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "model.pt", "summary.md", "test_accuracy.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["test_accuracy"] > 0.8  # clean digits: a few epochs suffice
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "test accuracy" in capsys.readouterr().out


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path, capsys) -> None:
    assert main(_cli(tmp_path, "--epochs", "1", "--optimizer", "sgd")) == 0
    assert main(_cli(tmp_path, "--epochs", "1", "--optimizer", "sgd")) == 2
    assert "--resume" in capsys.readouterr().err


def test_checkpoints_are_atomic_and_corruption_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_refuses_a_changed_config(tmp_path: Path, capsys) -> None:
    assert main(_cli(tmp_path, "--epochs", "1", "--optimizer", "sgd")) == 0
    assert main(_cli(tmp_path, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01", "--resume")) == 2
    assert "lr: 0.05 -> 0.01" in capsys.readouterr().err


# Runs `flatminima train` and SIGKILLs itself as the third checkpoint is about to be written: a real process killed
# mid-run at a point fixed by the program (epoch 3 trained, its checkpoint not written), not by a timer.
_KILL_BEFORE_THIRD_CHECKPOINT = """
import os, signal, sys
from flatminima import cli
from flatminima.train import loop
save, written = loop.save_checkpoint, []
def save_or_die(state, path):
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    save(state, path)
    written.append(path)
loop.save_checkpoint = save_or_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_resumed_ends_with_the_same_weights(tmp_path: Path) -> None:
    """A real process is killed (SIGKILL) after its second checkpoint, in its third epoch, and resumed: same weights,
    bit for bit (the resume replays the same code path from the saved state and generators)."""
    common = ["--epochs", "6", "--optimizer", "sam", "--rho", "0.1", "--augment"]
    assert main(_cli(tmp_path, *common, name="straight")) == 0
    run = tmp_path / "killed"
    command = [sys.executable, "-c", _KILL_BEFORE_THIRD_CHECKPOINT, *_cli(tmp_path, *common, name="killed")]
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert not (run / "model.pt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    metrics = run / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 3  # epoch 3's line was written before the kill
    assert main(_cli(tmp_path, *common, "--resume", name="killed")) == 0
    straight, resumed = _weights(tmp_path / "straight" / "model.pt"), _weights(run / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process_msam(tmp_path: Path) -> None:
    """DDP with per-rank perturbation == m-SAM with m = per-rank batch in one process (docs/papers.md, sec. 1)."""
    common = ["--epochs", "1", "--optimizer", "sam", "--rho", "0.1", "--batch-size", "64"]
    ddp = subprocess.run(
        _torchrun(
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "flatminima",
            *_cli(tmp_path, *common, name="ddp")[0:],
            "--device",
            "cpu",
        ),
        env=TORCHRUN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(_cli(tmp_path, *common, "--group-size", "32", name="single")) == 0
    a, b = _weights(tmp_path / "ddp" / "model.pt"), _weights(tmp_path / "single" / "model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 wrote, once


@pytest.mark.slow
def test_torchrun_multi_node_rendezvous_on_localhost(tmp_path: Path) -> None:
    """Two torchrun 'nodes' (one process each) rendezvous over TCP on 127.0.0.1 and train together."""
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    args = [*_cli(tmp_path, "--epochs", "1", "--optimizer", "sam", name="nodes"), "--device", "cpu"]
    nodes = [
        subprocess.Popen(
            _torchrun(*common, "--node_rank", str(rank), "-m", "flatminima", *args),
            env=TORCHRUN_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert (tmp_path / "nodes" / "model.pt").is_file()


def test_train_api_returns_history(tmp_path: Path) -> None:
    config = TrainConfig(
        epochs=1,
        batch_size=64,
        threads=1,
        progress=False,
        output=str(tmp_path / "api"),
        optimizer="usam",
        rho=0.01,
        label_noise=0.2,
        validation_fraction=0.1,
    )
    result = train(config)
    assert result.final["epoch"] == 1 and "val_accuracy" in result.final


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "sam", "--amp", "bf16"],
        ["--optimizer", "sgd", "--label-noise", "0.3", "--label-noise-kind", "asymmetric", "--weight-decay-in-loss"],
        [
            "--optimizer",
            "asam",
            "--rho",
            "0.5",
            "--lr-schedule",
            "step",
            "--warmup-epochs",
            "1",
            "--rho-schedule",
            "linear",
            "--label-smoothing",
            "0.1",
            "--augment",
            "--cutout",
            "2",
        ],
        ["--optimizer", "sam", "--base-optimizer", "adamw", "--lr", "0.003", "--group-size", "16"],
        ["--dataset", "signal_noise", "--model", "two_layer_cnn", "--batch-size", "10", "--optimizer", "usam"],
    ],
)
def test_config_variants_run(tmp_path: Path, extra: list[str]) -> None:
    assert main(_cli(tmp_path, "--epochs", "2", *extra)) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0.0 <= r["test_accuracy"] <= 1.0 for r in records)


def test_help_documents_every_field(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--rho", "--group-size", "--weight-decay-in-loss", "--label-noise-kind", "--resume", "--amp"):
        assert flag in out
