"""Shared fixtures: small deterministic models and data."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def make_tiny_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Conv(1->4, 3x3) + BatchNorm + ReLU + Linear, for 1x5x5 inputs: small enough for dense Hessians."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).to(dtype)


def make_batch(seed: int = 0, n: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


# torch.compile's inductor keeps generated kernels in one cache whose keys leave out ATEN_CPU_CAPABILITY: code made
# for AVX512 by an earlier run then fails to compile under ATEN_CPU_CAPABILITY=default. One cache per capability.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"),
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the tests marked slow (end-to-end runs; .ci/run runs them all)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the tests marked slow, unless --slow is given, a -m or -k expression selects, or the test is named
    on the command line (``path::test``, ``path::test[param]``, ``path::Class``, from any folder)."""
    if config.getoption("--slow") or config.getoption("markexpr") or config.getoption("keyword"):
        return
    kept, slow = [], []
    for item in items:
        named = any(_names(arg, item, config.invocation_params.dir) for arg in config.args if "::" in arg)
        (slow if item.get_closest_marker("slow") and not named else kept).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = kept
        config.stash[_LEFT_OUT] = len(slow)


def _names(arg: str, item: pytest.Item, folder: Path) -> bool:
    """Whether the command-line argument ``path::name...`` names ``item`` (or a class or test it belongs to)."""
    path, _, name = arg.partition("::")
    if (folder / path).resolve() != item.path.resolve():
        return False
    own = item.nodeid.partition("::")[2]
    return own == name or own.startswith((name + "[", name + "::"))


_LEFT_OUT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left_out = config.stash.get(_LEFT_OUT, 0)
    if left_out:
        plural = "s" if left_out != 1 else ""
        terminalreporter.write_line(f"{left_out} slow test{plural} left out; add --slow to run them too (CI does)")


# Threads each test runs with. One by default: tiny float64 ops run far slower with 2 threads on a busy 2-core box.
# FLATMINIMA_TEST_THREADS=2 runs the suite multi-threaded, to check that no assertion depends on the thread count.
TEST_THREADS = int(os.environ.get("FLATMINIMA_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Deterministic kernels and TEST_THREADS threads for every test."""
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


def small_batch(n: int, seed: int = 1, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 inputs (n, 6), or (n, 1, 5, 5) images for the tiny CNN, and 3-class targets."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 5, 5) if image else (n, 6)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def per_example_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every parameter and buffer, to check later that a measurement left the model untouched."""
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def assert_identical(model: nn.Module, saved: list[torch.Tensor]) -> None:
    for a, b in zip([*model.parameters(), *model.buffers()], saved, strict=True):
        assert torch.equal(a.detach(), b)


def resumed_equals_straight(tmp_path, monkeypatch, config) -> bool:
    """Train ``config`` straight; train it again but die right after the first checkpoint, then resume.
    True when both runs end with the same weights, bit for bit."""
    import dataclasses

    from flatminima.train import loop as training_loop
    from flatminima.train import train

    straight = train(dataclasses.replace(config, output=str(tmp_path / "straight"))).model
    save = training_loop.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(training_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(config, output=str(tmp_path / "killed")))
    monkeypatch.undo()
    resumed = train(dataclasses.replace(config, output=str(tmp_path / "killed"), resume=True)).model
    return all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def quick_train_args(tmp_path, *extra: str, batch_size: int = 128) -> list[str]:
    """``flatminima train`` arguments for a one-epoch run on digits in ``tmp_path / "run"``, then ``extra``."""
    fast = ["--epochs", "1", "--batch-size", str(batch_size), "--threads", "1", "--no-progress", "--lr", "0.05"]
    return ["train", *fast, "--output", str(tmp_path / "run"), *extra]
