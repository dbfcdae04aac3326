"""flatten=True: the same SAM on one contiguous buffer, with the general path as fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.functional import cross_entropy

import flatminima
from flatminima.optim.flat import FlatLayout
from tests.conftest import make_batch, make_mlp


def _closure(model, x, y):
    def closure():
        loss = cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _pair(seed: int = 0, **kwargs):
    a, b = make_mlp(seed=seed, dtype=torch.float64), make_mlp(seed=seed, dtype=torch.float64)
    opt_a = flatminima.SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    opt_b = flatminima.SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, flatten=True, **kwargs)
    return a, opt_a, b, opt_b


@pytest.mark.parametrize("options", [{"rho": 0.1}, {"rho": 0.1, "normalize": False}, {"rho": 0.1, "p": 3.0}])
def test_flat_equals_general_path(options) -> None:
    a, opt_a, b, opt_b = _pair(**options)
    for step in range(4):
        x, y = make_batch(step, dtype=torch.float64)
        opt_a.step(_closure(a, x, y))
        if step % 2:
            opt_b.step(_closure(b, x, y))
        else:  # the two-step pattern, zeroing through the optimiser
            opt_b.zero_grad()  # the closure step before it left its gradient, as torch.optim's step does
            cross_entropy(b(x), y).backward()
            opt_b.first_step(zero_grad=True)
            cross_entropy(b(x), y).backward()
            opt_b.second_step(zero_grad=True)
    # different kernels (one norm and one w + c g over the buffer vs per tensor): float64, 4 steps of O(0.1)
    # updates, each a few ulp (2.2e-16) apart; 1e-12 leaves room for growth and still catches a wrong step (>= 1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_flat_layout_is_used_and_gradients_stay_views() -> None:
    model = make_mlp()
    x, y = make_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=True)
    # flattening changes storage, not values: exact, the values are copied (the outputs of model(x) before and after
    # are not compared bit for bit: a matmul on a view of the buffer may take another kernel than on its own tensor)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    flat = opt.flat_layout
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(model.parameters(), flat.weight_views))
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert opt.is_perturbed and flat.weights_in_place()  # the flat path ran: w moved inside the buffer
    assert flat.gradients_are_views() and torch.count_nonzero(flat.grads) == 0
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert flat.gradients_are_views()


def test_flat_restore_is_exact() -> None:
    model = make_mlp(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, flatten=True)
    x, y = make_batch()
    opt.step(_closure(model, x, y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_flat_falls_back_when_a_parameter_has_no_gradient() -> None:
    a, opt_a, b, opt_b = _pair(seed=4, rho=0.2)
    for model in (a, b):
        model[0].bias.requires_grad_(False)
    x, y = make_batch(dtype=torch.float64)
    bias_before = b[0].bias.detach().clone()
    opt_a.step(_closure(a, x, y))
    opt_b.step(_closure(b, x, y))
    assert torch.equal(b[0].bias, bias_before)
    assert b[0].bias.grad is None  # no zero gradient was invented for it
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_flat_rho_zero_is_the_base_optimizer_bit_for_bit() -> None:
    """Exact because it is one code path: with rho = 0 SAM runs SGD's own step, and the reference's parameters are
    views of a flat buffer in the same layout, so the two models differ in nothing but the optimiser (no assumption
    about the kernels a memory layout gets)."""
    reference, model = make_mlp(seed=5), make_mlp(seed=5)
    FlatLayout(list(reference.parameters()))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9, flatten=True)
    for step in range(3):
        x, y = make_batch(step)
        ref_opt.zero_grad()
        _closure(reference, x, y)()
        ref_opt.step()
        opt.step(_closure(model, x, y))
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), model.parameters()))


def test_flat_nonfinite_gradient_raises_with_weights_intact() -> None:
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=True)
    weights = copy.deepcopy(model.state_dict())
    x, y = make_batch()

    def bad():
        loss = cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError):
        opt.step(bad)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_flat_needs_one_device_and_dtype() -> None:
    model = make_mlp()
    model[2].double()
    with pytest.raises(ValueError, match="one device with one dtype"):
        flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, flatten=True)
    opt = flatminima.SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, flatten=True)
    with pytest.raises(ValueError, match="flatten=True"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_flat_parameter_unfrozen_later_is_trained_like_the_general_path() -> None:
    a, b = make_mlp(seed=6, dtype=torch.float64), make_mlp(seed=6, dtype=torch.float64)
    for model in (a, b):
        model[0].weight.requires_grad_(False)
    opt_a = flatminima.SAM(a.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01)
    opt_b = flatminima.SAM(b.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01, flatten=True)
    for step in range(4):
        if step == 2:
            for model in (a, b):
                model[0].weight.requires_grad_(True)
        if step == 3:  # frozen again: must not be stepped with a zero gradient
            for model in (a, b):
                model[0].weight.requires_grad_(False)
        x, y = make_batch(step, dtype=torch.float64)
        opt_a.step(_closure(a, x, y))
        opt_b.step(_closure(b, x, y))
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
