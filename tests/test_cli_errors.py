"""Bad input and faults at the command line: one line naming the problem and the fix, exit code 2, nothing lost.

Each case here is a row of the table in docs/errors.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatminima.cli import main
from flatminima.train.checkpoint import load_checkpoint, save_checkpoint

FAST = ["--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress", "--optimizer", "sgd", "--lr", "0.05"]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def _assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def _train(tmp_path: Path, *extra: str, name: str = "run") -> list[str]:
    return ["train", *FAST, "--output", str(tmp_path / name), *extra]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dataset", "foo"], "invalid choice: 'foo'"),
        (["--model", "foo"], "invalid choice: 'foo'"),
        (["--model", "two_layer_cnn"], "use it with --dataset signal_noise"),
        (["--batch-size", "100000"], "batch_size 100000 exceeds the 1347 training examples; lower --batch-size"),
        (["--validation-fraction", "0.99", "--batch-size", "64"], "left after the 0.99 validation split"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
        (["--dataset", "mnist", "--data-root", "/nonexistent"], "/nonexistent"),
        (["--dataset", "svhn", "--data-root", "/nonexistent"], "/nonexistent"),
        (["--threads", "-1"], "threads must be >= 0"),
        (["--device", "foo"], "invalid choice: 'foo'"),
        (["--momentum", "-1"], "momentum must be a finite number >= 0"),
        (["--seed", "-5"], "seed must be >= 0"),
        (["--lr", "inf"], "lr must be a finite number > 0"),
        (["--rho", "nan", "--optimizer", "sam"], "rho must be a finite number >= 0"),
        (["--cutout", "1000", "--augment"], "cutout 1000 exceeds the 8x8 images"),
        (["--optimizer", "sam", "--group-size", "1000"], "group_size 1000 exceeds batch_size 64"),
        (["--optimizer", "sam", "--lr", "1e6"], "--nonfinite skip"),
        (["--optimizer", "sam", "--rho", "1e6"], "Lower --lr (now 0.05) or --rho (now 1e+06)"),
        (["--lr", "1e6"], "the loss is nan, so no step was taken; no checkpoint was written"),
        # settings the chosen optimiser would ignore (FAST trains with sgd)
        (["--group-size", "8"], "--group-size is a setting of the SAM family, and --optimizer sgd does not read it"),
        (["--rho", "0.3"], "--rho is a setting of the SAM family"),
        (["--base-optimizer", "adamw"], "--base-optimizer is a setting of the SAM family"),
        (["--gsam-alpha", "0.5"], "--gsam-alpha is an option of gsam, and --optimizer sgd does not read it"),
        (["--optimizer", "sam", "--sam-every", "3"], "--sam-every is an option of periodic-sam"),
        (["--optimizer", "ahn-rs", "--looksam-k", "3"], "use --optimizer looksam"),
        (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum is SGD's, and AdamW (the optimiser)"),
        (["--optimizer", "sam", "--base-optimizer", "adamw", "--momentum", "0"], "AdamW (the base optimiser)"),
    ],
)
def test_bad_flags_give_one_line(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    code, err = _run(capsys, _train(tmp_path, *extra))
    _assert_one_line(code, err, expected)
    assert not (tmp_path / "run" / "model.pt").exists()  # nothing written that looks like a result


def test_only_flags_are_refused_and_an_option_is_read_by_every_optimiser_that_declares_it(
    tmp_path: Path, capsys
) -> None:
    """ahn-rs and ahn-sa share their options. A YAML file may hold settings another optimiser reads (a run's saved
    config.yaml holds every field: the demo's SGD run records rho 0.3), so only flags are refused."""
    (tmp_path / "ahn.yaml").write_text("optimizer: ahn-sa\nahn_epsilon: 3.0\nrho: 0.1\n")
    assert main(_train(tmp_path, "--config", str(tmp_path / "ahn.yaml"), "--optimizer", "ahn-sa")) == 0
    assert main(_train(tmp_path, "--config", str(tmp_path / "ahn.yaml"), "--ahn-epsilon", "2", name="rs")) == 2
    assert main(_train(tmp_path, "--config", str(tmp_path / "ahn.yaml"), name="sgd")) == 0  # FAST: --optimizer sgd
    capsys.readouterr()
    code, err = _run(capsys, _train(tmp_path, "--config", str(tmp_path / "ahn.yaml"), "--rho", "0.1", name="flag"))
    _assert_one_line(code, err, "--rho is a setting of the SAM family, and --optimizer sgd does not read it")


def test_device_cuda_without_a_gpu(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _assert_one_line(*_run(capsys, _train(tmp_path, "--device", "cuda")), "device cuda was asked for")
    assert main(_train(tmp_path)) == 0
    measure = ["sharpness", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--device", "cuda"]
    _assert_one_line(*_run(capsys, measure), "device=cuda was asked for but torch sees no CUDA device")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epochs: [1\n", "is not valid YAML at line"),
        ("epochs: 1.7\n", "epochs must be an integer, got 1.7"),
        ("lr: true\n", "lr must be a number, got True"),
        ("lr: .inf\n", "lr must be a finite number > 0"),
        ("model: 5\n", "model must be a str, got 5"),
        ("- 1\n- 2\n", "must hold a mapping of field: value"),
        ("learning_rate: 0.1\n", "unknown config field(s) 'learning_rate'; flatminima train --help lists"),
        # values of any size or shape: quoted short, never formatted whole
        ("1: 2\nlr: 0.1\n", "unknown config field(s) 1;"),
        ("lr: [" + ",".join(["1"] * 5000) + "]\n", "lr must be a number, got [1, 1, 1, 1, ...]"),
        ("\n".join(f"k{i}{'z' * 100}: 1" for i in range(50)) + "\n", "unknown config field(s) 'k0zz"),
        ("model: " + "m" * 20000 + "\n", "model must be one of"),
        ("data_root: /" + "y" * 5000 + "\ndataset: cifar10\n", "File name too long"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
            "epochs: *f\n",
            "unknown config field(s) 'a', 'b', 'c' ...",
        ),
        ("# " + "c" * 70000 + "\nlr: 0.1\n", "a training config is a few hundred bytes"),
    ],
)
def test_bad_yaml_gives_one_line(tmp_path: Path, capsys, text: str, expected: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"), "--no-progress"]
    code, err = _run(capsys, argv)
    _assert_one_line(code, err, expected)
    assert len(err.strip()) <= 300, err


def test_config_that_is_binary_a_folder_or_missing(tmp_path: Path, capsys) -> None:
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    _assert_one_line(*_run(capsys, _train(tmp_path, "--config", str(tmp_path / "bin.yaml"))), "bin.yaml is not text")
    _assert_one_line(*_run(capsys, _train(tmp_path, "--config", str(tmp_path))), "is a folder")
    _assert_one_line(*_run(capsys, _train(tmp_path, "--config", str(tmp_path / "no.yaml"))), "does not exist")


def test_output_that_is_a_file_or_under_one(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, err = _run(capsys, ["train", *FAST, "--output", str(tmp_path / "file")])
    _assert_one_line(code, err, "is a file, not a folder")
    code, err = _run(capsys, ["train", *FAST, "--output", str(tmp_path / "file" / "run")])
    _assert_one_line(code, err, "cannot create --output")


def test_existing_run_and_foreign_folders_are_never_overwritten(tmp_path: Path, capsys) -> None:
    assert main(_train(tmp_path)) == 0
    before = (tmp_path / "run" / "model.pt").read_bytes()
    _assert_one_line(*_run(capsys, _train(tmp_path)), "already holds a run (checkpoint.pt): pass --resume")
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    # the user's own files with a run's names, no checkpoint: refused unless --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my notes\n")
    (mine / "metrics.jsonl").write_text("not json\n")
    _assert_one_line(*_run(capsys, _train(tmp_path, name="mine")), "pass --overwrite to replace them")
    assert (mine / "config.yaml").read_text() == "my notes\n"
    assert main(_train(tmp_path, "--overwrite", name="mine")) == 0
    assert "my notes" not in (mine / "config.yaml").read_text()
    # any other file: refused even with --overwrite
    (mine / "thesis.tex").write_text("x")
    _assert_one_line(*_run(capsys, _train(tmp_path, "--overwrite", name="mine")), "not a flatminima run (thesis.tex)")


def test_resume_with_nothing_corrupt_or_changed(tmp_path: Path, capsys) -> None:
    _assert_one_line(*_run(capsys, _train(tmp_path, "--resume")), "nothing to resume")
    assert main(_train(tmp_path)) == 0
    code, err = _run(capsys, ["train", "--output", str(tmp_path / "run"), "--resume", "--lr", "0.01"])
    _assert_one_line(code, err, "cannot resume: the config differs from the checkpoint's in lr: 0.05 -> 0.01")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"garbage")
    _assert_one_line(*_run(capsys, ["train", "--output", str(tmp_path / "run"), "--resume"]), "is corrupt")


def test_resume_as_the_readme_says_and_extend_a_finished_run(tmp_path: Path, capsys) -> None:
    """`flatminima train --output X --resume` needs no other flag; `--epochs` may grow to extend the run."""
    run = tmp_path / "run"
    assert main(_train(tmp_path)) == 0
    (run / "checkpoint.pt.x1y2.tmp").write_bytes(b"left by a kill mid-write")
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"epoch": 2, "train_lo')  # a torn last line
    assert main(["train", "--output", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert not list(run.glob("*.tmp"))
    assert load_checkpoint(run / "checkpoint.pt")["config"]["optimizer"] == "sgd"  # the run's own config


def test_resume_under_another_world_size_is_refused_unless_asked(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(_train(tmp_path, "--epochs", "1")) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    state["world_size"] = 2
    save_checkpoint(state, run / "checkpoint.pt")
    code, err = _run(capsys, ["train", "--output", str(run), "--resume", "--epochs", "2"])
    _assert_one_line(code, err, "written by 2 process(es), resumed with 1")
    assert main(["train", "--output", str(run), "--resume", "--epochs", "2", "--allow-world-size-change"]) == 0


def test_nonfinite_skip_still_never_writes_broken_weights(tmp_path: Path, capsys) -> None:
    """lr 1e6 with --nonfinite skip: the NaN steps are skipped, but the finite ones blow the weights up; the run
    stops before any checkpoint or model.pt holds them, and does not suggest the flag already given."""
    code, err = _run(capsys, _train(tmp_path, "--lr", "1e6", "--nonfinite", "skip"))
    _assert_one_line(code, err, "the weights became inf/NaN in epoch 1 (no checkpoint was written); lower --lr")
    assert "--nonfinite skip" not in err
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_plain_step_skips_a_nonfinite_loss_exactly() -> None:
    """PlainStep(nonfinite="skip") leaves weights and momentum untouched on a NaN batch; "raise" raises."""
    from flatminima.step import PlainStep

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    reference = torch.nn.Linear(4, 3).double()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(4)]  # fmt: skip
    bad = (torch.full((8, 4), math.nan, dtype=torch.float64), batches[0][1])
    step = PlainStep(model, loss_fn, opt, nonfinite="skip")
    for x, y in [batches[0], bad, *batches[1:]]:
        step(x, y)
    for x, y in batches:
        ref_opt.zero_grad()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
    # same code path: the same loss (the mean of a scalar is itself), backward and SGD step on the good batches
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    with pytest.raises(FloatingPointError, match="the loss is nan, so no step was taken"):
        PlainStep(model, loss_fn, opt, nonfinite="raise")(*bad)


@pytest.mark.slow
def test_sigint_stops_with_a_resume_hint(tmp_path: Path) -> None:
    """Ctrl-C in a real process: one line with the resume command, exit code 130.

    Synchronised on an event, not on a timer: the signal goes out once the run has written its first checkpoint (so
    a step has run and Python's SIGINT handler is long installed), and the run is far too long to end by itself
    first (2,000 epochs, minutes), so the signal cannot arrive after the run ended, however slow or busy the machine
    (and a run orphaned by a killed test session still ends by itself)."""
    run = tmp_path / "run"
    argv = ["train", "--epochs", "2000", "--batch-size", "32", "--threads", "1", "--no-progress"]
    command = [sys.executable, "-m", "flatminima", *argv, "--optimizer", "sam", "--output", str(run)]
    # A child inherits an ignored SIGINT (from a test run started in the background, as `cmd &` and some CI harnesses
    # do), and Python then installs no KeyboardInterrupt handler. Catching SIGINT here while the child starts gives it
    # the default disposition that a terminal's Ctrl-C meets (a caught signal is reset to the default by exec).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        if previous is not None:  # None: a handler installed from C, which Python cannot put back
            signal.signal(signal.SIGINT, previous)
    try:
        _wait_for_file(run / "checkpoint.pt", process)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"continue with: flatminima train --output {run} --resume" in err


def _wait_for_file(path: Path, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Block until ``process`` has written ``path``; fail at once if it exits first, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the process exited ({process.returncode}) before {path.name}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} after {timeout_s:.0f} s")
        time.sleep(0.02)  # polling for the event; no assertion depends on how long this takes


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--m", "0"], "--m must be >= 1"),
        (["--trace-probes", "0"], "--trace-probes must be >= 1"),
        (["--rho", "-1"], "--rho must be a finite number >= 0"),
    ],
)
def test_sharpness_bad_flags(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    code, err = _run(capsys, ["sharpness", "--checkpoint", str(tmp_path / "model.pt"), *extra])
    _assert_one_line(code, err, expected)


def test_sharpness_bad_checkpoints(tmp_path: Path, capsys) -> None:
    code, err = _run(capsys, ["sharpness", "--checkpoint", "/nonexistent/model.pt"])
    _assert_one_line(code, err, "no checkpoint at /nonexistent/model.pt; give the model.pt")
    assert "--resume" not in err
    assert main(_train(tmp_path)) == 0
    state = load_checkpoint(tmp_path / "run" / "model.pt")
    state["config"]["model"] = "mlp"
    save_checkpoint(state, tmp_path / "other.pt")
    code, err = _run(capsys, ["sharpness", "--checkpoint", str(tmp_path / "other.pt")])
    _assert_one_line(code, err, "do not fit the mlp its config names")
    state["config"]["model"] = "small_cnn"
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    save_checkpoint(state, tmp_path / "nan.pt")
    code, err = _run(capsys, ["sharpness", "--checkpoint", str(tmp_path / "nan.pt")])
    _assert_one_line(code, err, f"the weights in {tmp_path / 'nan.pt'} hold inf or NaN ({name})")
    state["config"] = 5
    save_checkpoint(state, tmp_path / "five.pt")
    _assert_one_line(
        *_run(capsys, ["sharpness", "--checkpoint", str(tmp_path / "five.pt")]), "holds no training config"
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed must be >= 0"):
        main(_train(tmp_path, "--seed", "-5", "--debug"))


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_reported_once(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "flatminima", *_train(tmp_path, "--batch-size", "100000")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert result.stderr.count("batch_size 100000 exceeds the 1347 training examples") == 1, result.stderr


def _damage(state: dict, field: str) -> None:
    if field == "negative epoch":
        state["epoch"] = -4
    elif field == "epoch past the run":
        state["epoch"] = 99
    elif field == "epoch as text":
        state["epoch"] = "1"
    elif field == "short history":
        state["history"] = state["history"][:1]
    elif field == "history out of order":
        state["history"] = list(reversed(state["history"]))
    elif field == "rng of floats":
        state["rng"] = torch.zeros(5056)
    elif field == "rng cut short":
        state["rng"] = state["rng"][:100]
    elif field == "rng missing":
        del state["rng"]
    elif field == "world size zero":
        state["world_size"] = 0
    elif field == "schedule ahead":
        state["scheduler"]["last_epoch"] += 7


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("negative epoch", "its epoch is -4, not a whole number in [1, 2]"),
        ("epoch past the run", "its epoch is 99, not a whole number in [1, 2]"),
        ("epoch as text", "its epoch is 1, not a whole number"),
        ("short history", "its history has 1 records for 2 epochs"),
        ("history out of order", "record 1 of its history is not epoch 1's"),
        ("rng of floats", "its RNG state is a float32 tensor (5056,), not a uint8 tensor (5056,)"),
        ("rng cut short", "its RNG state is a uint8 tensor (100,), not a uint8 tensor (5056,)"),
        ("rng missing", "its RNG state is NoneType"),
        ("world size zero", "its world size is 0, not a whole number >= 1"),
        ("schedule ahead", "its learning-rate schedule is at step 49, but 2 epochs of 21 steps make 42"),
    ],
)
def test_a_damaged_checkpoint_is_refused_before_anything_is_written(
    tmp_path: Path, capsys, field: str, expected: str
) -> None:
    """Field by field: the metrics log and the checkpoint are left exactly as they were."""
    assert main(_train(tmp_path, "--epochs", "2")) == 0
    run = tmp_path / "run"
    state = load_checkpoint(run / "checkpoint.pt")
    _damage(state, field)
    save_checkpoint(state, run / "checkpoint.pt")
    files = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "config.yaml")}
    code, err = _run(capsys, ["train", "--output", str(run), "--resume", "--epochs", "3"])
    _assert_one_line(code, err, expected)
    assert "is damaged or edited" in err and "start over with --overwrite" in err
    assert {name: (run / name).read_bytes() for name in files} == files


def test_out_of_memory_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A MemoryError (a decompression, a config, a batch too large for this machine) names the cause and the fix."""
    import flatminima.train.loop as loop

    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(loop, "prepare_data", exhausted)
    code, err = _run(capsys, _train(tmp_path))
    _assert_one_line(code, err, "out of memory (an allocation failed); lower --batch-size")


def test_a_thread_that_cannot_start_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import flatminima.train.loop as loop

    def refused(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(loop, "prepare_data", refused)
    code, err = _run(capsys, _train(tmp_path))
    _assert_one_line(code, err, "the system refused a new thread or process (can't start new thread): a limit")


def test_a_changed_batch_size_on_resume_is_a_changed_setting_not_damage(tmp_path: Path, capsys) -> None:
    """The steps per epoch follow the batch size: the schedule's step count is checked only once the config is
    known to be the checkpoint's, so the message names the setting (and does not advise starting over)."""
    assert main(_train(tmp_path)) == 0
    code, err = _run(capsys, ["train", "--output", str(tmp_path / "run"), "--resume", "--batch-size", "32"])
    _assert_one_line(code, err, "cannot resume: the config differs from the checkpoint's in batch_size: 64 -> 32")


def test_extending_a_run_says_that_the_schedule_stretches(tmp_path: Path, capsys) -> None:
    """--resume --epochs 2 after a 1-epoch cosine run differs from a straight 2-epoch run (the first epoch decayed
    the lr to 0): one warning line with the numbers. A constant schedule, or the run's own --epochs, says nothing."""
    assert main(_train(tmp_path)) == 0
    capsys.readouterr()
    assert main(["train", "--output", str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == [
        "flatminima train: warning: resuming with 2 epochs a run started for 1: the lr schedule stretches to the new "
        "length (the learning rate at step 21 goes from 0 to 0.025), so the run differs from a straight 2-epoch run; "
        "to continue a run exactly, resume with its own --epochs"
    ]
    assert main(_train(tmp_path, "--lr-schedule", "constant", name="flat")) == 0
    assert main(["train", "--output", str(tmp_path / "flat"), "--resume", "--epochs", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_internal_error_of_python_is_one_line_and_exit_1(tmp_path: Path, capsys, monkeypatch) -> None:
    """SystemError (CPython failing inside an import under ulimit -v, seen in CI) is not the user's: exit 1."""
    import flatminima.train.loop as loop

    def broken(*args, **kwargs):
        raise SystemError("error return without exception set")

    monkeypatch.setattr(loop, "prepare_data", broken)
    code, err = _run(capsys, _train(tmp_path))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "internal error of Python or an extension (error return without exception set)" in err
