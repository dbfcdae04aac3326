"""SIGTERM on a command that trains in worker processes: one line, exit 143, no worker left running, no temporary
file left behind, the output folder free again.

Synchronised on events, not timers: the signal goes out once every worker has written a checkpoint (so each is
training), and the runs are far too long (2,000 epochs) to end by themselves first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatminima.output_folder import OutputFolder


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting to be reaped by whoever adopted it, has stopped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, process: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the command exited ({process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.05)  # polling for the event; no assertion depends on how long this takes


def _terminate_and_check(process: subprocess.Popen, command: str) -> str:
    workers = _children(process.pid)
    assert workers, "the command started no worker process"
    process.send_signal(signal.SIGTERM)
    try:
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"flatminima {command}: terminated (SIGTERM).")
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the command"
    return err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists the process tree through /proc")
def test_sigterm_on_the_demo_stops_its_workers(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--workers", "2", "--epochs", "2000", "--no-progress", "--output", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "flatminima", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    runs = [out / "sgd-seed0" / "checkpoint.pt", out / "sam-seed0" / "checkpoint.pt"]
    _wait_until(lambda: all(path.exists() for path in runs), process, "checkpoint of both runs")
    _terminate_and_check(process, "demo")
    assert all(path.exists() for path in runs)  # the finished epochs' checkpoints are kept
    with OutputFolder(out, "demo"):  # and the folder is free again, its files the demo's own
        pass


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists the process tree through /proc")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the sweep trains in worker processes only on 2+ cores")
def test_sigterm_on_a_reproduction_removes_its_temporary_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = ["reproduce", "label-noise", "--quick", "--epochs", "2000", "--output", str(tmp_path / "out")]
    process = subprocess.Popen(
        [sys.executable, "-m", "flatminima", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    _wait_until(lambda: len(list(scratch.rglob("checkpoint.pt"))) >= 2, process, "checkpoint of two runs")
    _terminate_and_check(process, "reproduce")
    assert list(scratch.iterdir()) == []
