"""RhoScheduler: rho over param_groups like LambdaLR, the same numbers as rho_at, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatminima.optim import SAM, RhoScheduler
from flatminima.train import TrainConfig
from flatminima.train.builders import build_rho_scheduler, rho_at
from tests.conftest import resumed_equals_straight


def _sam(rho: float = 0.2) -> SAM:
    model = torch.nn.Linear(3, 2)
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)


def test_same_numbers_as_rho_at_for_every_step() -> None:
    config = TrainConfig(rho=0.07, rho_schedule="linear", warmup_epochs=3)
    per_epoch = 7
    optimizer = _sam(config.rho)
    scheduler = build_rho_scheduler(config, optimizer, per_epoch)
    for step in range(40):
        expected = rho_at(config, step / per_epoch)
        assert optimizer.param_groups[0]["rho"] == expected == scheduler.get_last_rho()[0]
        scheduler.step()
    assert optimizer.param_groups[0]["rho"] == config.rho  # warm-up over
    assert optimizer.param_groups[0]["initial_rho"] == config.rho


def test_per_group_factors_and_state_dict() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].parameters(), "rho": 0.1}, {"params": model[1].parameters(), "rho": 0.4}]
    optimizer = SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1)
    scheduler = RhoScheduler(optimizer, [lambda s: 1.0 / (1 + s), lambda s: 2.0**-s])
    assert scheduler.get_last_rho() == [0.1, 0.4]
    scheduler.step()
    scheduler.step()
    assert scheduler.get_last_rho() == [0.1 / 3, 0.1]
    fresh = RhoScheduler(optimizer, [lambda s: 1.0 / (1 + s), lambda s: 2.0**-s])  # restarts at step 0
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.get_last_rho() == [0.1 / 3, 0.1]


def test_refuses_an_optimizer_without_rho_and_bad_factors() -> None:
    with pytest.raises(ValueError, match=r"no 'rho'.*SGD"):
        RhoScheduler(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), lambda s: 1.0)
    with pytest.raises(ValueError, match="one per parameter group"):
        RhoScheduler(_sam(), [lambda s: 1.0, lambda s: 1.0])


def test_resume_mid_warm_up_continues_the_rho_schedule_exactly(tmp_path: Path, monkeypatch) -> None:
    """A run that dies after its first checkpoint, inside the rho warm-up, resumes to the same weights."""
    config = TrainConfig(
        epochs=3, batch_size=64, threads=1, progress=False, rho=0.2, lr=0.05, warmup_epochs=2, rho_schedule="linear"
    )
    assert resumed_equals_straight(tmp_path, monkeypatch, config)
