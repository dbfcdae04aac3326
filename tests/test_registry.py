"""The optimiser registry: a variant registers its name once; the CLI, the config and the loop read it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flatminima.cli import main
from flatminima.optim import SAM, RandomDirection, optimizer_names, optimizer_spec, register_optimizer
from flatminima.optim.registry import OptimizerRequest, optimizer_help, unregister_optimizer
from flatminima.train import TrainConfig, train


def _sam_clone(request: OptimizerRequest) -> torch.optim.Optimizer:
    """Exactly what the built-in "sam" builds, under another name."""
    return SAM(
        request.model.parameters(), request.base_class, rho=request.rho, p=request.p, model=request.model,
        **request.base_options,
    )  # fmt: skip


def _random_direction(request: OptimizerRequest) -> torch.optim.Optimizer:
    generator = torch.Generator().manual_seed(request.config.seed)
    return SAM(
        request.model.parameters(), request.base_class, rho=request.rho, model=request.model,
        perturbation=RandomDirection(generator), **request.base_options,
    )  # fmt: skip


@pytest.fixture
def registered() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        unregister_optimizer(name)


def _register(names: list[str], name: str, build, sharpness_aware: bool) -> None:
    register_optimizer(name, f"test variant {name}", build, sharpness_aware=sharpness_aware)
    names.append(name)


def _config(tmp_path: Path, optimizer: str, **changes) -> TrainConfig:
    values = dict(epochs=1, batch_size=64, threads=1, progress=False, rho=0.1, lr=0.05, seed=0)
    values.update(changes)
    return TrainConfig(optimizer=optimizer, output=str(tmp_path / optimizer), **values)


def test_built_in_names_and_their_steps() -> None:
    assert optimizer_names()[:5] == ("sgd", "adamw", "sam", "asam", "usam")
    assert [optimizer_spec(n).sharpness_aware for n in ("sgd", "adamw", "sam", "asam", "usam")] == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"unknown optimizer 'no-such'.*registered: sgd, adamw, sam"):
        optimizer_spec("no-such")


def test_bad_registrations_are_refused(registered: list[str]) -> None:
    _register(registered, "toy", _sam_clone, True)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("toy", "again", _sam_clone, sharpness_aware=True)
    with pytest.raises(ValueError, match="lower-case"):
        register_optimizer("Bad Name", "x", _sam_clone, sharpness_aware=True)
    with pytest.raises(TypeError, match="callable"):
        register_optimizer("notcallable", "x", None, sharpness_aware=True)  # type: ignore[arg-type]


def test_a_registered_name_reaches_config_and_help(registered: list[str], capsys) -> None:
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw, sam, asam, usam"):
        TrainConfig(optimizer="toy-random").validate()
    _register(registered, "toy-random", _random_direction, True)
    TrainConfig(optimizer="toy-random").validate()
    assert "toy-random (test variant toy-random)" in optimizer_help()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy-random" in capsys.readouterr().out


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def test_the_loop_drives_a_registered_name_by_its_spec(tmp_path: Path, registered: list[str]) -> None:
    """A clone of "sam" under a new name trains bit for bit like "sam" (the loop picked the two-pass step and the
    rho schedule from the spec, not from the name); a clone of "sgd" marked plain trains like "sgd"."""
    _register(registered, "sam-clone", _sam_clone, True)
    _register(registered, "sgd-clone", optimizer_spec("sgd").build, False)
    linear = dict(rho_schedule="linear", warmup_epochs=1, epochs=2)
    sam = _weights(train(_config(tmp_path, "sam", **linear)).model)
    clone = _weights(train(_config(tmp_path, "sam-clone", **linear)).model)
    # exact: same code path, the clones build the same optimiser, so the runs replay the same ops in the same order
    assert all(torch.equal(a, b) for a, b in zip(sam, clone))
    sgd = _weights(train(_config(tmp_path, "sgd")).model)
    sgd_clone = _weights(train(_config(tmp_path, "sgd-clone")).model)
    assert all(torch.equal(a, b) for a, b in zip(sgd, sgd_clone))
    assert not all(torch.equal(a, b) for a, b in zip(sam, sgd))


def test_a_toy_variant_trains_from_the_command_line(tmp_path: Path, registered: list[str]) -> None:
    _register(registered, "toy-random", _random_direction, True)
    argv = ["train", "--optimizer", "toy-random", "--epochs", "1", "--batch-size", "64", "--threads", "1"]
    assert main([*argv, "--no-progress", "--output", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.pt").exists()
