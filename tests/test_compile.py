"""SAM with torch.compile'd models: BatchNorm running statistics come from the first pass only, as uncompiled.

The reference is the same float64 model uncompiled, with ``model=`` (the flag path). Before the fix, the closure
pattern without ``model=`` on ``torch.compile(model)`` updated the statistics in both passes: after 5 steps
``num_batches_tracked`` was 10, not 5, and the running means were off by ~0.1. Compiled runs use the
``aot_eager`` backend (the same graphs as inductor, no C++ compiler); one test per path runs inductor.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import flatminima

STEPS = 5
TOL = dict(rtol=1e-9, atol=1e-12)

pytestmark = pytest.mark.filterwarnings("ignore:.*global hooks.*:UserWarning")

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="no C++")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


def _train(forward, model: nn.Module, opt: flatminima.SAM, steps: int = STEPS) -> None:
    for step in range(steps):
        x, y = _batch(step)

        def closure(x=x, y=y) -> torch.Tensor:
            loss = cross_entropy(forward(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _optimizer(module: nn.Module, **options) -> flatminima.SAM:
    return flatminima.SAM(module.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, **options)


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """Uncompiled, with model=: statistics from the first pass of each step."""
    model = _model()
    _train(model, model, _optimizer(model, model=model))
    assert int(model[1].num_batches_tracked) == STEPS
    return model


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert int(norm.num_batches_tracked) == STEPS  # one update per step (10 before the fix)
    assert norm.track_running_stats
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[needs_compiler, pytest.mark.slow])])
def test_closure_without_model_on_compiled_module(backend: str, reference: nn.Module) -> None:
    model = _model()
    compiled = torch.compile(model, backend=backend)
    _train(compiled, model, _optimizer(model))
    _assert_same(model, reference)


@pytest.mark.parametrize(
    ("backend", "watch"),
    [
        ("aot_eager", "compiled"),
        ("aot_eager", "module"),
        pytest.param("inductor", "compiled", marks=[needs_compiler, pytest.mark.slow]),
    ],
)
def test_model_argument_with_compiled_module(backend: str, watch: str, reference: nn.Module) -> None:
    """``model=`` given the OptimizedModule, or the module it wraps: the flags it switches are guarded by dynamo,
    which compiles a second graph for the perturbed pass (once) and keeps both."""
    model = _model()
    compiled = torch.compile(model, backend=backend)
    _train(compiled, model, _optimizer(model, model=compiled if watch == "compiled" else model))
    _assert_same(model, reference)


class _OwnModule(nn.Module):
    """The same layers as ``_model()`` in a module of its own: compiled in place, its forward pre-hook still fires but
    its layers' do not (nn.Sequential's layers are reached), so SAM updated BatchNorm on both passes (10 after 5)."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.linear1, self.norm, self.act, self.linear2 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.norm(self.linear1(x))))


@pytest.mark.parametrize("own_module", [False, True], ids=["sequential", "own-module"])
@pytest.mark.parametrize(
    "backend", ["eager", "aot_eager", pytest.param("inductor", marks=[needs_compiler, pytest.mark.slow])]
)
def test_module_compiled_in_place_without_model(reference: nn.Module, backend: str, own_module: bool) -> None:
    model = _OwnModule(_model()) if own_module else _model()
    model.compile(backend=backend)
    _train(model, model, _optimizer(model))
    _assert_same(model, reference)


def test_two_step_pattern_with_compiled_module(reference: nn.Module) -> None:
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = _optimizer(model, model=compiled)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        cross_entropy(compiled(x), y).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(compiled(x), y).backward()
        opt.second_step()
    _assert_same(model, reference)


def test_compiled_function_without_model_warns_and_model_argument_fixes_it(reference: nn.Module) -> None:
    """A model called from inside a compiled function runs no hook: SAM cannot see its layers, and says so."""
    model = _model()
    forward = torch.compile(lambda x: model(x), backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="model=model"):
        _train(forward, model, _optimizer(model))
    torch._dynamo.reset()
    model = _model()
    forward = torch.compile(lambda x: model(x), backend="aot_eager")
    _train(forward, model, _optimizer(model, model=model))
    _assert_same(model, reference)


def test_no_warning_for_a_model_without_modules() -> None:
    """Plain tensors, no module: nothing to warn about, though something else was compiled in the process."""
    import warnings

    torch.compile(lambda t: t * 2, backend="aot_eager")(torch.ones(3))
    w = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    opt = flatminima.SAM([w], torch.optim.SGD, rho=0.1, lr=0.1)
    x, y = _batch(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(lambda: (loss := cross_entropy(x @ w, y), loss.backward(), loss)[-1])


def test_exception_in_compiled_second_pass_rolls_back_statistics() -> None:
    """Weights back at w exactly, statistics as after the first pass, flags on; the next step is normal."""
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    opt = _optimizer(model)
    _train(compiled, model, opt, steps=1)
    x, y = _batch(1)
    probe = copy.deepcopy(model)
    # the first pass's update, through the same compiled graph (aot_eager's decomposed batch norm) as SAM's first
    # pass: the same ops at the same w, so the statistics are compared bit for bit below
    torch.compile(probe, backend="aot_eager")(x)
    weights = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = cross_entropy(compiled(x), y)
        if len(calls) == 2:
            raise KeyboardInterrupt
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights, strict=True))
    assert not opt.is_perturbed
    assert torch.equal(model[1].running_mean, probe[1].running_mean)
    assert torch.equal(model[1].running_var, probe[1].running_var)
    assert int(model[1].num_batches_tracked) == 2 and model[1].track_running_stats
    _train(compiled, model, opt, steps=1)
    assert int(model[1].num_batches_tracked) == 3
