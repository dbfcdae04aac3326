"""Run a function on several gloo processes on this machine: the harness of the distributed tests."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, body: Callable[[int, Path], None], port: int, out_dir: str, world_size: int) -> None:
    faulthandler.enable(all_threads=True)  # a worker that aborts in C++ prints its Python stack to stderr
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        body(rank, Path(out_dir))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and shut down: leave as a forked worker does, without the interpreter's teardown. In that teardown, after
    # Python's last frame, a C++ destructor of what Accelerate's FSDP2 runs leave alive aborted rank 0 now and then
    # (2 of 176 runs of tests/test_integration_huggingface_fsdp.py here, and once in CI: "terminate called without
    # an active exception"), failing tests whose results were already saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_gloo(
    body: Callable[[int, Path], None], out_dir: Path, world_size: int = WORLD_SIZE, timeout_s: float = 120
) -> None:
    """Run ``body(rank, out_dir)`` on ``world_size`` processes (a module-level function, so it can be pickled).

    A worker's exception is re-raised here with its traceback; a hang fails the test after ``timeout_s``.
    """
    context = mp.spawn(_worker, args=(body, _free_port(), str(out_dir), world_size), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def ddp_mlp() -> torch.nn.Module:
    """The float64 MLP the distributed tests train (6 -> 16 -> 3), initialised alike on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def ddp_data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (steps, batch, 6) and class targets (steps, batch): different data at each step, same on all ranks."""
    gen = torch.Generator().manual_seed(1234)
    inputs = torch.randn(steps, batch, 6, dtype=torch.float64, generator=gen)
    return inputs, torch.randint(0, 3, (steps, batch), generator=gen)
