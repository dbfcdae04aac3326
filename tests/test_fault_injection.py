"""Every command that writes, under faults injected from outside: a file size limit (a disk that fills up), a
memory limit, and SIGTERM at a random moment. Whatever happens, the command ends in one line (no traceback), and
what it leaves behind is whole: no half-written file, no temporary file, no process.

The file size limit (``ulimit -f``, with SIGXFSZ ignored, so a write fails with EFBIG as it would with ENOSPC on a
full disk) needs no privileges, unlike a small tmpfs; ``tests/test_output_folder.py`` and ``test_cli_errors.py``
check the messages of a full disk through the same code path."""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resource limits and /proc are Linux's"),
]

PNG_END = b"IEND\xaeB`\x82"


def _commands(base: Path) -> dict[str, list[str]]:
    quick = ["--no-progress"]
    return {
        "train": ["train", "--epochs", "2", "--optimizer", "sgd", *quick, "--output", str(base / "train")],
        "demo": ["demo", "--quick", "--epochs", "1", *quick, "--output", str(base / "demo")],
        "sharpness": [
            "sharpness", "--checkpoint", str(base / "trained" / "model.pt"), "--examples", "32", "--k", "1",
            "--trace-probes", "1", "--density-runs", "1", "--m", "8", "--output", str(base / "sharpness"),
        ],
        "reproduce": ["reproduce", "sam-cycle", "--quick", "--output", str(base / "reproduce")],
    }  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A trained model for sharpness, and every command's folder holding a finished earlier run (the results a
    failed run must not damage)."""
    base = tmp_path_factory.mktemp("faults")
    trained = _run(["train", "--epochs", "1", "--optimizer", "sgd", "--no-progress", "--output", str(base / "trained")])
    assert trained.returncode == 0, trained.stderr
    for argv in _commands(base).values():
        done = _run(argv)
        assert done.returncode == 0, done.stderr
    return base


def _run(argv: list[str], limit=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flatminima", *argv], capture_output=True, text=True, preexec_fn=limit, timeout=600
    )


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def _memory_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1_000_000_000, 1_000_000_000))


def _assert_whole(folder: Path) -> None:
    """Every file complete: JSON parses, a PNG ends with its IEND chunk, a checkpoint loads, text decodes (a
    metrics log may end in one torn line, which resume drops); no temporary file is left."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name == ".flatminima.lock":
            continue
        assert not path.name.endswith(".tmp"), path
        data = path.read_bytes()
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".png":
            assert data.endswith(PNG_END), path
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".jsonl":
            for line in data.decode().splitlines()[:-1]:
                json.loads(line)
        else:
            data.decode()


def _assert_one_line(done: subprocess.CompletedProcess, command: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flatminima {command}: "), done.stderr
    assert len(last) <= 300, last
    return last


@pytest.mark.parametrize("command", ["train", "demo", "sharpness", "reproduce"])
def test_a_file_size_limit_ends_in_one_line_and_leaves_whole_files(base: Path, command: str) -> None:
    argv = _commands(base)[command]
    if command == "train":
        argv = [*argv, "--overwrite"]
    done = _run(argv, _file_size_limit)
    assert done.returncode == 2, done.stderr
    line = _assert_one_line(done, command)
    assert "cannot write" in line and "file size limit" in line, line
    _assert_whole(base / Path(argv[argv.index("--output") + 1]).name)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a disk that fills up for real (ENOSPC). Mounting needs root, as CI and this project's
    machines run the tests; elsewhere the file size limit above covers the same code path."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]}); needs root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("command", ["train", "demo", "sharpness", "reproduce"])
def test_a_full_disk_ends_in_one_line_and_spares_the_user_s_files(base: Path, small_disk: Path, command: str) -> None:
    notes = small_disk / "notes.txt"
    notes.write_bytes(bytes(range(256)) * 400)  # 100 KiB of the user's, on the same disk
    argv = _commands(base)[command]
    output = small_disk / "out"
    argv = [*argv[: argv.index("--output") + 1], str(output)]
    done = _run(argv)
    assert done.returncode in (0, 2), done.stderr
    if done.returncode == 2:  # what fits in 1 MiB does not fail: sharpness's and sam-cycle's figures may
        line = _assert_one_line(done, command)
        assert "cannot write" in line and "the disk is full" in line, line
    assert notes.read_bytes() == bytes(range(256)) * 400
    _assert_whole(output)


@pytest.mark.parametrize("command", ["train", "demo", "sharpness", "reproduce"])
def test_a_memory_limit_ends_in_one_line_and_leaves_whole_files(base: Path, command: str) -> None:
    """1 GB of address space: enough to start, too little for some commands' work. OpenBLAS (numpy's) cannot
    report a failed allocation to Python: it prints its own line and exits 1; and CPython can fail inside an import
    (SystemError), which the command reports as an internal error, exit 1 (docs/errors.md)."""
    argv = _commands(base)[command]
    if command == "train":
        argv = [*argv, "--overwrite"]
    done = _run(argv, _memory_limit)
    if done.returncode == 1:  # OpenBLAS's own exit, or Python failing inside (an import under the limit)
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr, done.stderr
        assert last.startswith(("OpenBLAS error: Memory allocation", f"flatminima {command}: internal error")), last
    elif done.returncode == 2:
        assert "out of memory (" in _assert_one_line(done, command)
    else:
        assert done.returncode == 0, done.stderr
    _assert_whole(base / Path(argv[argv.index("--output") + 1]).name)


@pytest.mark.parametrize("command", ["train", "demo", "sharpness", "reproduce"])
def test_sigterm_at_a_random_moment_leaves_whole_files(base: Path, command: str) -> None:
    """The moment is random (seeded per command, within the command's first seconds), which is the point: the
    checks hold wherever it lands, finished or not."""
    argv = _commands(base)[command]
    if command == "train":
        argv = [*argv, "--overwrite"]
    moment = random.Random(command).uniform(0.5, 4.0)
    process = subprocess.Popen(
        [sys.executable, "-m", "flatminima", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    time.sleep(moment)  # the injected fault's moment, not a synchronisation: any moment must do
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=300)[1]
    # -15: killed by the signal's default action outside the command proper, while Python still imported torch
    # (nothing written yet) or after the command returned (everything written); a shell reports 143 too
    assert process.returncode in (0, 143, -signal.SIGTERM), err
    assert "Traceback" not in err, err
    if process.returncode == 143:
        assert err.strip().splitlines()[-1].startswith(f"flatminima {command}: terminated (SIGTERM)."), err
    _assert_whole(base / Path(argv[argv.index("--output") + 1]).name)
