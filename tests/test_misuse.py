"""Misuse of the two-step protocol never leaves the weights at w + e: each error restores w exactly first.

Before the fix, ``step()`` (or ``step(closure)``, ``first_step()``, ``keep_first_gradient()``) called between
``first_step()`` and ``second_step()`` raised with the weights still perturbed (and BatchNorm still frozen).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import flatminima
from flatminima.optim.flat import FlatLayout
from tests.conftest import make_batch, make_mlp


def _perturbed(flatten: bool = False) -> tuple[nn.Module, flatminima.SAM, list[torch.Tensor]]:
    """A model with BatchNorm after first_step (weights at w + e, BatchNorm frozen), and its weights w."""
    model = make_mlp(seed=1, batch_norm=True)
    opt = flatminima.SAM(
        model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, model=model, flatten=flatten
    )
    x, y = make_batch(2)
    cross_entropy(model(x), y).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    assert opt.is_perturbed and not model[1].track_running_stats
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    return model, opt, weights


def _assert_back_at_w(model: nn.Module, opt: flatminima.SAM, weights: list[torch.Tensor]) -> None:
    assert not opt.is_perturbed
    # exact: the restore swaps w's own tensors back (flatten=True: copies the saved buffer back), no arithmetic
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert model[1].track_running_stats  # BatchNorm no longer frozen
    assert opt.steps == 0 and not opt.state  # no step was taken


def _closure(model: nn.Module, seed: int = 3):
    x, y = make_batch(seed)

    def closure() -> torch.Tensor:
        loss = cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _next_step_is_normal(model: nn.Module, opt: flatminima.SAM, flatten: bool) -> None:
    """The step after the error equals a fresh optimiser's first step from the same w, bit for bit.

    The reference takes the same path (same ``flatten``): a flat buffer and separate tensors take different
    kernels (one norm over the buffer vs per-tensor norms), which differ in the last bits on some CPUs."""
    reference = copy.deepcopy(model)
    ref_opt = flatminima.SAM(
        reference.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, model=reference, flatten=flatten
    )
    opt.step(_closure(model))
    ref_opt.step(_closure(reference))
    for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("flatten", [False, True])
def test_step_without_closure_while_perturbed_restores_w(flatten: bool) -> None:
    model, opt, weights = _perturbed(flatten)
    with pytest.raises(RuntimeError, match=r"restored to w.*call(ing)? second_step\(\)"):
        opt.step()
    _assert_back_at_w(model, opt, weights)
    _next_step_is_normal(model, opt, flatten)


def test_step_with_closure_while_perturbed_restores_w_and_runs_nothing() -> None:
    model, opt, weights = _perturbed()
    calls = []
    with pytest.raises(RuntimeError, match=r"between first_step\(\) and second_step\(\)"):
        opt.step(lambda: calls.append(1))
    assert not calls
    _assert_back_at_w(model, opt, weights)


@pytest.mark.parametrize("flatten", [False, True])
def test_first_step_twice_restores_w(flatten: bool) -> None:
    model, opt, weights = _perturbed(flatten)
    cross_entropy(model(make_batch(2)[0]), make_batch(2)[1]).backward()
    with pytest.raises(RuntimeError, match=r"twice.*restored to w"):
        opt.first_step()
    _assert_back_at_w(model, opt, weights)
    _next_step_is_normal(model, opt, flatten)


def test_keep_first_gradient_while_perturbed_restores_w() -> None:
    model, opt, weights = _perturbed()
    cross_entropy(model(make_batch(2)[0]), make_batch(2)[1]).backward()
    with pytest.raises(RuntimeError, match=r"keep_first_gradient\(\) must come before first_step\(\).*restored to w"):
        opt.keep_first_gradient()
    _assert_back_at_w(model, opt, weights)


@pytest.mark.parametrize("with_model", [True, False])
@pytest.mark.parametrize("flatten", [False, True])
def test_exception_in_second_pass_restores_w_and_keeps_first_pass_statistics(with_model: bool, flatten: bool) -> None:
    """The perturbed pass leaves no trace: weights w exactly, BatchNorm statistics as after the first pass (the
    update any optimiser's closure makes), layers tracking again; the next step is a normal one."""
    model = make_mlp(seed=1, batch_norm=True)
    opt = flatminima.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.5,
        lr=0.1,
        momentum=0.9,
        model=model if with_model else None,
        flatten=flatten,
    )
    x, y = make_batch(4)
    probe = copy.deepcopy(model)
    if flatten:  # the same memory layout as the model's: the probe differs from it in nothing
        FlatLayout(list(probe.parameters()))
    probe(x)  # the first pass's statistics update: the same forward at the same w, so compared bit for bit below
    weights = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = cross_entropy(model(x), y)  # the second call runs forward at w + e, then fails
        if len(calls) == 2:
            raise ValueError("data loader failed")
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="data loader failed"):
        opt.step(closure)
    _assert_back_at_w(model, opt, weights)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(probe[1], name)), name
    opt.step(_closure(model))
    assert int(model[1].num_batches_tracked) == 2 and opt.steps == 1


def _overflowing_closure(model: nn.Module, scaler: torch.amp.GradScaler, calls: list[int]):
    x, y = make_batch(2)

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = cross_entropy(model(x), y) * float("inf")  # every gradient entry inf or NaN
        scaler.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("pattern", ["closure", "two-step"])
def test_an_overflowing_first_gradient_under_a_grad_scaler_is_kept_for_the_scaler(pattern: str) -> None:
    """fp16 overflow in g(w): no perturbation, no second pass, and the inf stays in .grad (even with
    zero_grad=True) so that the scaler skips the step and backs off. Before, first_step(zero_grad=True) cleared
    it, and only a second pass that happened to overflow again kept the step from going ahead along g(w)."""
    model = make_mlp(seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    weights = [p.detach().clone() for p in model.parameters()]
    calls: list[int] = []
    closure = _overflowing_closure(model, scaler, calls)
    if pattern == "closure":
        opt.step(closure, grad_scaler=scaler)
    else:
        opt.zero_grad()
        closure()
        assert opt.first_step(zero_grad=True, grad_scaler=scaler) is False
        assert opt.ascent_declined and not opt.is_perturbed
        assert all(p.grad is not None and not torch.isfinite(p.grad).all() for p in model.parameters())
        opt.second_step(grad_scaler=scaler)
    scaler.update()
    assert len(calls) == 1  # no pass at w + e
    assert not opt.is_perturbed and not opt.ascent_declined
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert scaler.get_scale() == 2.0**9 and not opt.state  # skipped: no momentum buffer either
