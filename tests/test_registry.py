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
    """Exactly what the built-in "sam" builds, under another name: the documented way, request.sam()."""
    return request.sam()


def _random_direction(request: OptimizerRequest) -> torch.optim.Optimizer:
    generator = torch.Generator().manual_seed(request.config.seed)
    return request.sam(perturbation=RandomDirection(generator))


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
    register_optimizer("toy", "again, from the same module", _sam_clone, sharpness_aware=True)  # replaces
    assert optimizer_spec("toy").help == "again, from the same module"
    elsewhere = {"__name__": "another.module", "register_optimizer": register_optimizer, "build": _sam_clone}
    with pytest.raises(ValueError, match=r"already registered \(by (tests\.)?test_registry\)"):
        exec("register_optimizer('toy', 'from elsewhere', build, sharpness_aware=True)", elsewhere)
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


def test_the_documented_build_gives_every_common_setting(registered: list[str]) -> None:
    """request.sam() (docs/architecture.md's way) hands SAM the run's rho, p, model, non-finite policy and base
    optimiser options: each flag given reaches the optimiser."""
    from flatminima.train.builders import build_optimizer

    _register(registered, "toy-documented", _random_direction, True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    config = TrainConfig(optimizer="toy-documented", rho=0.07, p=3.0, nonfinite="skip", lr=0.03, momentum=0.5,
                         weight_decay=1e-3)  # fmt: skip
    opt = build_optimizer(config, model)
    group = opt.param_groups[0]
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert (group["rho"], group["p"], group["lr"], group["momentum"], group["weight_decay"]) == (
        0.07, 3.0, 0.03, 0.5, 1e-3
    )  # fmt: skip
    assert opt.nonfinite == "skip" and isinstance(opt.perturbation, RandomDirection)
    assert opt._running_stats.watching  # the model's BatchNorm is kept from the first pass


def test_an_installed_plugin_is_found_listed_and_trained(tmp_path: Path) -> None:
    """A variant in a package of its own, found through the flatminima.variants entry-point group: listed by
    `flatminima variants` and trained by `flatminima train --optimizer`, from the shell."""
    import os
    import subprocess
    import sys

    package = tmp_path / "site" / "toyplugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from dataclasses import dataclass\n"
        "from flatminima.optim import register_optimizer\n"
        "from flatminima.optim.registry import option\n"
        "from flatminima.optim.rules import EveryKSteps\n\n"
        "@dataclass(frozen=True)\n"
        "class ToyOptions:\n"
        "    toy_every: int = option(2, 'toy-plugin: SAM every k-th step', check=lambda k: k >= 1,\n"
        "                            why='must be >= 1')\n\n"
        "def build(request):\n"
        "    return request.sam(cadence=EveryKSteps(request.options.toy_every))\n\n"
        "register_optimizer('toy-plugin', 'SAM every k-th step, from a plugin', build, sharpness_aware=True,\n"
        "                   passes='1 + 1/k', options=ToyOptions)\n"
    )
    info = tmp_path / "site" / "toyplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flatminima.variants]\ntoy-plugin = toyplugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flatminima", *argv], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)  # fmt: skip

    listed = run("variants")
    assert listed.returncode == 0, listed.stderr
    assert "toy-plugin" in listed.stdout and "toyplugin" in listed.stdout and "1 + 1/k" in listed.stdout
    assert "--toy-every 2" in listed.stdout
    trained = run("train", "--optimizer", "toy-plugin", "--toy-every", "3", "--model", "mlp", "--epochs", "1",
                  "--batch-size", "256", "--no-progress", "--threads", "1",
                  "--output", str(tmp_path / "run"))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "toy_every: 3" in (tmp_path / "run" / "config.yaml").read_text()
    refused = run("train", "--optimizer", "toy-plugin", "--toy-every", "0", "--output", str(tmp_path / "bad"))
    assert refused.returncode == 2 and "toy_every must be >= 1" in refused.stderr + refused.stdout
