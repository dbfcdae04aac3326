"""RhoScheduler: rho over param_groups like LambdaLR, the same numbers as rho_at, resumable."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import flatminima.variants.periodic  # noqa: F401  (registers periodic-sam)
from flatminima.optim import SAM, RhoScheduler
from flatminima.optim.rho_scheduler import constant_rho, cosine_rho, linear_warmup_rho, lr_proportional_rho, step_rho
from flatminima.train import TrainConfig
from flatminima.train.builders import build_rho_scheduler, build_scheduler, rho_at
from tests.conftest import resumed_equals_straight

# the schedules are stepped here without optimiser steps, which torch's LR schedulers warn about
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")


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
        # exact: both are the same Python float expression, rho_min + (rho - rho_min) * rho_factor(...)
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
    rhos = scheduler.get_last_rho()
    assert rhos == pytest.approx([0.1 / 3, 0.1], rel=1e-15)  # 0.1 * (1 / 3) rounds twice, 0.1 / 3 once
    fresh = RhoScheduler(optimizer, [lambda s: 1.0 / (1 + s), lambda s: 2.0**-s])  # restarts at step 0
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.get_last_rho() == rhos  # exact: the same factors at the same step


def test_refuses_an_optimizer_without_rho_and_bad_factors() -> None:
    with pytest.raises(ValueError, match=r"no 'rho'.*SGD"):
        RhoScheduler(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), lambda s: 1.0)
    with pytest.raises(ValueError, match="one per parameter group"):
        RhoScheduler(_sam(), [lambda s: 1.0, lambda s: 1.0])


@pytest.mark.slow
def test_resume_mid_warm_up_continues_the_rho_schedule_exactly(tmp_path: Path, monkeypatch) -> None:
    """A run that dies after its first checkpoint, inside the rho warm-up, resumes to the same weights."""
    config = TrainConfig(
        epochs=3, batch_size=64, threads=1, progress=False, rho=0.2, lr=0.05, warmup_epochs=2, rho_schedule="linear"
    )
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


# ---------------------------------------------------------------- the schedules: constant, linear, cosine, step, lr

RHOS, RHO_MIN = (0.1, 0.4), 0.02


def _two_groups(lrs: tuple[float, float] = (0.1, 0.1)) -> SAM:
    """SAM with two parameter groups of different rho (and lr)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [
        {"params": model[0].parameters(), "rho": RHOS[0], "lr": lrs[0]},
        {"params": model[1].parameters(), "rho": RHOS[1], "lr": lrs[1]},
    ]
    return SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1)


def _closed_forms(total: int = 20, warmup: int = 4) -> dict[str, tuple[Callable, Callable[[int, float], float]]]:
    """Each factory with its closed form rho_t(rho_max), written from the definitions."""

    def cosine(t: int, rho: float) -> float:
        if t < warmup:
            return rho
        return RHO_MIN + (rho - RHO_MIN) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / (total - warmup))))

    return {
        "constant": (lambda opt: constant_rho(opt), lambda t, rho: rho),
        "linear": (
            lambda opt: linear_warmup_rho(opt, 5, rho_min=RHO_MIN),
            lambda t, rho: RHO_MIN + (rho - RHO_MIN) * min(1.0, t / 5),
        ),
        "cosine": (
            lambda opt: cosine_rho(opt, total, rho_min=RHO_MIN),
            lambda t, rho: RHO_MIN + (rho - RHO_MIN) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / total))),
        ),
        "cosine after warm-up": (lambda opt: cosine_rho(opt, total, rho_min=RHO_MIN, warmup_steps=warmup), cosine),
        "step": (
            lambda opt: step_rho(opt, [6, 12, 15], gamma=0.5, rho_min=RHO_MIN),
            lambda t, rho: RHO_MIN + (rho - RHO_MIN) * 0.5 ** ((t >= 6) + (t >= 12) + (t >= 15)),
        ),
    }


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "cosine after warm-up", "step"])
def test_each_schedule_follows_its_closed_form_in_every_group(name: str) -> None:
    build, closed_form = _closed_forms()[name]
    optimizer = _two_groups()
    scheduler = build(optimizer)
    for t in range(26):  # past the end of training: rho stays at its last value
        expected = [closed_form(t, rho) for rho in RHOS]
        assert scheduler.get_last_rho() == pytest.approx(expected, rel=1e-14, abs=0), t
        scheduler.step()
    if name.startswith("cosine"):
        assert scheduler.get_last_rho() == pytest.approx([RHO_MIN, RHO_MIN], rel=1e-14)


def test_rho_proportional_to_a_cosine_learning_rate() -> None:
    """GSAM's rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min), per group, stepped after a
    CosineAnnealingLR (lr_min = its eta_min), the two groups with different lr and rho."""
    total, eta_min = 15, 0.001
    optimizer = _two_groups(lrs=(0.1, 0.03))
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=eta_min)
    scheduler = lr_proportional_rho(optimizer, lr_min=eta_min, rho_min=RHO_MIN)  # lr_max: each group's initial_lr
    for t in range(total + 1):
        lrs = [eta_min + (lr_max - eta_min) * (1 + math.cos(math.pi * t / total)) / 2 for lr_max in (0.1, 0.03)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(lrs, rel=1e-12)
        expected = [
            RHO_MIN + (rho - RHO_MIN) * (lr - eta_min) / (lr_max - eta_min)
            for rho, lr, lr_max in zip(RHOS, [g["lr"] for g in optimizer.param_groups], (0.1, 0.03))
        ]
        assert scheduler.get_last_rho() == pytest.approx(expected, rel=1e-14, abs=1e-17), t
        if t == total:  # the lr at its minimum: rho at rho_min
            assert scheduler.get_last_rho() == pytest.approx([RHO_MIN, RHO_MIN], rel=1e-12)
        lr_scheduler.step()
        scheduler.step()


def test_lr_proportional_takes_lr_max_and_lr_min_per_group() -> None:
    optimizer = _two_groups(lrs=(0.1, 0.03))
    scheduler = lr_proportional_rho(optimizer, lr_max=[0.2, 0.03], lr_min=[0.0, 0.01])
    assert scheduler.get_last_rho() == pytest.approx([RHOS[0] * 0.5, RHOS[1]], rel=1e-14)
    with pytest.raises(ValueError, match="0 <= lr_min < lr_max"):
        lr_proportional_rho(_two_groups(), lr_max=0.1, lr_min=0.1)
    with pytest.raises(ValueError, match="one per parameter group"):
        lr_proportional_rho(_two_groups(), lr_max=[0.1, 0.1, 0.1])


@pytest.mark.parametrize(
    "make",
    [
        lambda opt, lr: cosine_rho(opt, 12, rho_min=RHO_MIN, warmup_steps=2),
        lambda opt, lr: step_rho(opt, [3, 8], rho_min=RHO_MIN),
        lambda opt, lr: linear_warmup_rho(opt, 7, rho_min=RHO_MIN),
        lambda opt, lr: lr_proportional_rho(opt, rho_min=RHO_MIN),
    ],
    ids=["cosine", "step", "linear", "lr"],
)
def test_state_dict_round_trips_exactly(make) -> None:
    """Save optimiser, LR and rho schedulers mid-schedule (torch.load weights_only=True), load them into fresh
    objects: every later rho equals the uninterrupted schedule's, bit for bit."""

    def build() -> tuple[SAM, torch.optim.lr_scheduler.LRScheduler, RhoScheduler]:
        optimizer = _two_groups(lrs=(0.1, 0.05))
        lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
        return optimizer, lr_scheduler, make(optimizer, lr_scheduler)

    optimizer, lr_scheduler, scheduler = build()
    straight = []
    for _ in range(14):
        straight.append(scheduler.get_last_rho())
        lr_scheduler.step()
        scheduler.step()
    optimizer, lr_scheduler, scheduler = build()
    for _ in range(5):
        lr_scheduler.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save([optimizer.state_dict(), lr_scheduler.state_dict(), scheduler.state_dict()], buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    optimizer, lr_scheduler, scheduler = build()
    optimizer.load_state_dict(saved[0])
    lr_scheduler.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    resumed = straight[:5]
    for _ in range(5, 14):
        resumed.append(scheduler.get_last_rho())
        lr_scheduler.step()
        scheduler.step()
    assert resumed == straight


def test_a_group_excluded_with_rho_0_stays_excluded_and_rho_min_is_checked() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].parameters(), "rho": 0.2}, {"params": model[1].parameters(), "rho": 0.0}]
    optimizer = SAM(groups, torch.optim.SGD, lr=0.1)
    scheduler = cosine_rho(optimizer, 10, rho_min=0.05)
    for _ in range(12):
        assert scheduler.get_last_rho()[1] == 0.0
        scheduler.step()
    assert scheduler.get_last_rho()[0] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"rho_min=0.5 exceeds the rho of parameter group 0"):
        cosine_rho(_two_groups(), 10, rho_min=0.5)
    with pytest.raises(ValueError, match="rho_min must be a finite number >= 0"):
        step_rho(_two_groups(), [2], rho_min=-0.1)
    with pytest.raises(ValueError, match="rho_min: expected one number, or one per parameter group"):
        RhoScheduler(_two_groups(), lambda s: 1.0, rho_min=[0.01])
    per_group = cosine_rho(_two_groups(), 4, rho_min=[0.05, 0.1])
    for _ in range(4):
        per_group.step()
    assert per_group.get_last_rho() == pytest.approx([0.05, 0.1])


def test_bad_schedule_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        cosine_rho(_two_groups(), 0)
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) exceeds total_steps \(4\)"):
        cosine_rho(_two_groups(), 4, warmup_steps=5)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        step_rho(_two_groups(), [3], gamma=1.5)
    with pytest.raises(ValueError, match="each milestone must be an integer >= 0"):
        step_rho(_two_groups(), [2.5])
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        linear_warmup_rho(_two_groups(), -1)
    assert linear_warmup_rho(_two_groups(), 0).get_last_rho() == list(RHOS)


# ---------------------------------------------------------------- the training config's schedules


@pytest.mark.parametrize("lr_schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_the_config_schedules_follow_the_learning_rate_schedule(lr_schedule: str, warmup_epochs: int) -> None:
    """cosine and step: rho's factor is the lr's after its warm-up (the same drops, the same cosine);
    lr: rho_min + (rho - rho_min) lr_t / lr at every step, warm-up included."""
    per_epoch, epochs = 7, 6
    common = dict(rho=0.2, lr=0.3, epochs=epochs, warmup_epochs=warmup_epochs, lr_schedule=lr_schedule)
    for rho_schedule in ("cosine", "step", "lr"):
        if rho_schedule != "lr" and lr_schedule != rho_schedule:
            continue
        config = TrainConfig(rho_schedule=rho_schedule, **common)
        optimizer = _sam(config.rho)
        lr_scheduler = build_scheduler(config, optimizer, per_epoch)
        scheduler = build_rho_scheduler(config, optimizer, per_epoch)
        for step in range(epochs * per_epoch + 3):
            lr_factor = lr_scheduler.lr_lambdas[0](step)
            if rho_schedule == "lr":
                expected = config.rho * (optimizer.param_groups[0]["lr"] / config.lr)
                assert scheduler.get_last_rho()[0] == pytest.approx(expected, rel=1e-14)
            else:
                expected = config.rho * (1.0 if step < warmup_epochs * per_epoch else lr_factor)
                # exact: rho_min = 0, and the rho factor is the lr's expression (the same math.cos of the same
                # argument, or the same power of gamma) in Python floats
                assert scheduler.get_last_rho()[0] == expected, step
            lr_scheduler.step()
            scheduler.step()


def test_the_config_rho_min_is_the_floor() -> None:
    config = TrainConfig(rho=0.2, rho_min=0.05, rho_schedule="cosine", epochs=3)
    optimizer = _sam(config.rho)
    scheduler = build_rho_scheduler(config, optimizer, 5)
    values = []
    for _ in range(16):
        values.append(scheduler.get_last_rho()[0])
        scheduler.step()
    assert values[0] == pytest.approx(0.2, rel=1e-15)  # 0.05 + (0.2 - 0.05) * 1.0: up to two roundings
    assert values[-1] == pytest.approx(0.05) and values == sorted(values, reverse=True)
    linear = TrainConfig(rho=0.2, rho_min=0.05, rho_schedule="linear", warmup_epochs=2)
    scheduler = build_rho_scheduler(linear, _sam(linear.rho), 4)
    assert scheduler.get_last_rho() == [0.05] == [rho_at(linear, 0.0)]
    with pytest.raises(ValueError, match="rho_factor covers the constant and linear"):
        rho_at(config, 0.5)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (dict(rho_schedule="cosine", rho=0.05, rho_min=0.1), r"rho_min must be a finite number in \[0, rho\]"),
        (dict(rho_schedule="lr", rho_min=-0.01), r"rho_min must be a finite number in \[0, rho\]"),
        (dict(rho_schedule="constant", rho_min=0.01), "rho_min has no effect with rho_schedule constant"),
        (dict(rho_schedule="exponential"), "rho_schedule must be one of constant, linear, cosine, step, lr"),
    ],
)
def test_bad_config_values_are_refused(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**values).validate()


@pytest.mark.parametrize("schedule", ["cosine", "step", "lr"])
def test_each_schedule_trains_from_the_command_line(tmp_path: Path, schedule: str) -> None:
    import json

    from flatminima.cli import main

    argv = ["train", "--epochs", "1", "--batch-size", "128", "--threads", "1", "--no-progress", "--lr", "0.05"]
    extra = ["--rho-schedule", schedule, "--rho-min", "0.01", "--rho", "0.1"]
    assert main([*argv, *extra, "--output", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert f"rho_schedule: {schedule}" in text and "rho_min: 0.01" in text


def test_the_schedule_as_yaml_fields(tmp_path: Path) -> None:
    from flatminima.cli import main

    (tmp_path / "c.yaml").write_text("rho_schedule: cosine\nrho_min: 0.02\nrho: 0.1\noptimizer: periodic-sam\n")
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "1", "--batch-size", "128", "--threads", "1"]
    assert main([*argv, "--no-progress", "--output", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "rho_schedule: cosine" in text and "rho_min: 0.02" in text


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "lr_schedule", "warmup"), [("cosine", "cosine", 0), ("lr", "step", 1)])
def test_resume_mid_schedule_continues_exactly(
    tmp_path: Path, monkeypatch, schedule: str, lr_schedule: str, warmup: int
) -> None:
    """A run killed after its first checkpoint, mid cosine (or lr-proportional) rho schedule, resumes to the same
    weights as a run left alone."""
    config = TrainConfig(epochs=2, batch_size=128, threads=1, progress=False, rho=0.2, rho_min=0.02, lr=0.05,
                         rho_schedule=schedule, lr_schedule=lr_schedule, warmup_epochs=warmup)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)
