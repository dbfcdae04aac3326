"""The run's checkpoint as registered parts: each saved under its keys, loaded back in order, gaps reported."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flatminima.train.run_state import RunState


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_parts_round_trip_in_registration_order() -> None:
    order: list[str] = []
    a, b = Counter(3), Counter(5)
    run = RunState()
    run.register_object("a", a)
    run.register(lambda: {"b": b.value, "c": 7}, lambda state: (order.append("b"), setattr(b, "value", state["b"])))
    saved = run.save()
    assert saved == {"a": {"value": 3}, "b": 5, "c": 7}
    a.value, b.value = 0, 0
    run.load(saved)
    assert (a.value, b.value, order) == (3, 5, ["b"])


def test_a_missing_part_is_an_error_unless_it_has_a_fallback_or_is_optional() -> None:
    required, fallback, optional = Counter(1), Counter(2), Counter(3)
    run = RunState()
    run.register_object("fallback", fallback, fallback=lambda: {"value": 9})
    run.register_object("optional", optional, optional=True)
    run.load({})
    assert (fallback.value, optional.value) == (9, 3)
    run.register_object("required", required)
    with pytest.raises(KeyError, match="no 'required'"):
        run.load({})


def test_a_scheduler_and_the_rng_resume_exactly() -> None:
    """Real parts: an LR scheduler and the global RNG continue as if the run had not stopped."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run = RunState()
    run.register_object("scheduler", scheduler)
    run.register(lambda: {"rng": torch.get_rng_state()}, lambda state: torch.set_rng_state(state["rng"]))
    for _ in range(3):
        opt.step()
        scheduler.step()
    saved = run.save()
    expected = (torch.rand(3), [scheduler.get_last_lr()])
    torch.rand(5)
    opt.step()
    scheduler.step()
    run.load(saved)
    assert torch.equal(torch.rand(3), expected[0]) and [scheduler.get_last_lr()] == expected[1]
