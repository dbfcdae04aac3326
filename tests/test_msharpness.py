"""m-sharpness: closed forms, the SAM step, ordering, model preservation and input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatminima.sharpness.msharpness import MSharpnessResult, m_sharpness
from tests.conftest import assert_identical, make_mlp, make_tiny_cnn, per_example_ce, small_batch, snapshot

DT = torch.float64


def mlp(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    return make_mlp(seed, DT, batch_norm)


def tiny_cnn(seed: int = 0) -> nn.Module:
    return make_tiny_cnn(seed, DT)


def batch(n: int = 24, seed: int = 1, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return small_batch(n, seed, image)


ce = per_example_ce


# a loss linear in the weights: outputs = W x + b, loss = <c, outputs>, so L(w + e) = L(w) + g.e exactly
LINEAR_C = torch.tensor([1.0, -2.0, 0.5], dtype=DT)


def linear_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs @ LINEAR_C


def group_grads(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model(x), y).mean(), params))


@pytest.mark.parametrize("kind", ["worst", "average"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_gives_exactly_zero(kind: str, adaptive: bool) -> None:
    model, (x, y) = mlp(), batch()
    result = m_sharpness(model, ce, (x, y), m=6, rho=0.0, kind=kind, adaptive=adaptive)
    assert isinstance(result, MSharpnessResult)
    assert result.num_groups == 4
    # exact by construction: with rho = 0 every perturbation is +-0, so each iterate's weights w + e are w bit for
    # bit and its loss is the base loss, computed by the same forward pass (autograd on or off changes no kernel)
    assert result.loss_increase == 0.0 and result.error_increase == 0.0
    assert torch.equal(result.per_group, torch.zeros(4, 2, dtype=DT))
    model.eval()
    assert result.base_loss == pytest.approx(ce(model(x), y).mean().item(), rel=1e-12)


def test_worst_case_at_least_average_case() -> None:
    model, data = mlp(), batch()
    worst = m_sharpness(model, ce, data, m=8, rho=0.1, kind="worst")
    average = m_sharpness(model, ce, data, m=8, rho=0.1, kind="average", num_samples=20)
    assert worst.loss_increase > 0
    assert worst.loss_increase >= average.loss_increase
    assert (worst.per_group[:, 0] >= average.per_group[:, 0]).all()
    assert math.isfinite(worst.loss_increase_stderr) and worst.loss_increase_stderr >= 0


def test_one_l2_step_is_the_sam_perturbation() -> None:
    model, (x, y) = mlp(), batch()
    m, rho = 6, 0.05
    result = m_sharpness(model, ce, (x, y), m=m, rho=rho, steps=1)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for k in range(len(y) // m):
        xs, ys = x[k * m : (k + 1) * m], y[k * m : (k + 1) * m]
        grads = group_grads(model, ce, xs, ys)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        base = ce(model(xs), ys).mean()
        perturbed = {
            name: p.detach() + rho * g / norm for (name, p), g in zip(model.named_parameters(), grads, strict=True)
        }
        loss = ce(torch.func.functional_call(model, perturbed, (xs,)), ys).mean()
        expected.append((loss - base).item())
    assert len(params) == 4
    expected_t = torch.tensor(expected, dtype=DT)
    assert (expected_t > 0).all()  # the SAM step beats e = 0, so it is the maximum along the path
    torch.testing.assert_close(result.per_group[:, 0], expected_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("steps", [1, 4])
def test_linear_loss_matches_closed_form(norm: str, adaptive: bool, steps: int) -> None:
    torch.manual_seed(3)
    model = nn.Linear(6, 3).to(DT)
    x, y = batch(n=20)
    m, rho, eta = 5, 0.3, 0.01
    result = m_sharpness(model, linear_loss, (x, y), m=m, rho=rho, norm=norm, adaptive=adaptive, steps=steps)
    scale = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in model.parameters()]
    expected = []
    for k in range(len(y) // m):
        grads = group_grads(model, linear_loss, x[k * m : (k + 1) * m], y[k * m : (k + 1) * m])
        scaled = torch.cat([(t * g).reshape(-1) for t, g in zip(scale, grads)])
        dual = scaled.norm(2) if norm == "l2" else scaled.abs().sum()
        expected.append(rho * dual.item())
    torch.testing.assert_close(result.per_group[:, 0], torch.tensor(expected, dtype=DT), rtol=1e-8, atol=1e-10)


def test_smaller_m_gives_larger_worst_case_for_linear_loss() -> None:
    # For a linear loss the worst case of a group is rho * ||g_group|| and a group's gradient is the mean of its
    # halves' gradients, so by the triangle inequality halving m (nested groups) can only increase the average.
    torch.manual_seed(4)
    model = nn.Linear(6, 3).to(DT)
    data = batch(n=32)
    values = [m_sharpness(model, linear_loss, data, m=m, rho=0.2).loss_increase for m in (32, 16, 8, 4, 2, 1)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]


def test_batches_are_regrouped_across_boundaries() -> None:
    model, (x, y) = mlp(), batch(n=23)
    single = m_sharpness(model, ce, (x, y), m=4, rho=0.05, steps=2)
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5)]
    split = m_sharpness(model, ce, iter(batches), m=4, rho=0.05, steps=2)
    assert single.num_groups == split.num_groups == 5  # the last 3 examples are dropped
    torch.testing.assert_close(single.per_group, split.per_group, rtol=1e-12, atol=1e-14)


def test_error_increase_is_measured_at_the_worst_perturbation() -> None:
    model, data = mlp(), batch(n=30)
    result = m_sharpness(model, ce, data, m=10, rho=2.0, steps=3)
    assert result.loss_increase > 0
    assert -1.0 <= result.error_increase <= 1.0 and 0.0 <= result.base_error <= 1.0
    assert result.per_group.shape == (3, 2)
    # the reported error increase is a multiple of 1/m per group
    assert torch.allclose(result.per_group[:, 1] * 10, (result.per_group[:, 1] * 10).round())


def test_tiny_cnn_linf_adaptive_and_average() -> None:
    model, data = tiny_cnn(), batch(n=12, image=True)
    worst = m_sharpness(model, ce, data, m=4, rho=0.02, norm="linf", adaptive=True, steps=3)
    average = m_sharpness(model, ce, data, m=4, rho=0.02, kind="average", adaptive=True, num_samples=4)
    assert worst.loss_increase > 0 and math.isfinite(average.loss_increase)
    assert worst.loss_increase >= average.loss_increase
    again = m_sharpness(model, ce, data, m=4, rho=0.02, kind="average", adaptive=True, num_samples=4)
    assert torch.equal(average.per_group, again.per_group)  # seeded: the same computation replayed, exact


@pytest.mark.parametrize("train_mode", [False, True])
def test_weights_buffers_and_modes_are_restored(train_mode: bool) -> None:
    model, data = mlp(batch_norm=True), batch()
    model.train()
    model[2].eval()  # a submodule in a different mode must keep it
    saved = snapshot(model)
    grads_before = [p.grad for p in model.parameters()]
    for kind in ("worst", "average"):
        m_sharpness(model, ce, data, m=6, rho=0.5, kind=kind, train_mode=train_mode, adaptive=True)
    assert_identical(model, saved)
    assert model.training and model[0].training and not model[2].training
    assert [p.grad for p in model.parameters()] == grads_before


def test_eval_mode_by_default_and_train_mode_on_request() -> None:
    seen: list[bool] = []
    model = mlp(batch_norm=True)
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    m_sharpness(model, ce, batch(), m=12, rho=0.1, steps=1)
    assert seen and not any(seen)
    seen.clear()
    model.eval()
    m_sharpness(model, ce, batch(), m=12, rho=0.1, steps=1, train_mode=True)
    assert seen and all(seen)
    assert not model.training


def test_restored_after_an_exception_in_loss_fn() -> None:
    model, data = mlp(batch_norm=True), batch()
    model.train()
    saved = snapshot(model)
    calls = 0

    def failing(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("boom")
        return ce(outputs, targets)

    with pytest.raises(RuntimeError, match="boom"):
        m_sharpness(model, failing, data, m=6, rho=0.5, train_mode=True)
    assert calls == 4
    assert_identical(model, saved)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"m": 0}, ValueError, "m must be an integer >= 1"),
        ({"m": 2.5}, ValueError, "m must be an integer"),
        ({"m": 25}, ValueError, "exceeds the number of examples"),
        ({"rho": -0.1}, ValueError, "rho must be"),
        ({"rho": float("nan")}, ValueError, "rho must be"),
        ({"kind": "best"}, ValueError, "kind must be one of"),
        ({"norm": "l1"}, ValueError, "norm must be one of"),
        ({"kind": "average", "norm": "linf"}, ValueError, "Gaussian"),
        ({"steps": 0}, ValueError, "steps must be"),
        ({"step_size": 0.0}, ValueError, "step_size must be"),
        ({"num_samples": 0, "kind": "average"}, ValueError, "num_samples must be"),
    ],
)
def test_nonsense_input_is_rejected(kwargs: dict, error: type, match: str) -> None:
    arguments = {"m": 4, "rho": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        m_sharpness(mlp(), ce, batch(), **arguments)


def test_bad_data_and_loss_fn_are_rejected() -> None:
    model, (x, y) = mlp(), batch()
    with pytest.raises(TypeError, match="pair"):
        m_sharpness(model, ce, x, m=4, rho=0.1)
    with pytest.raises(ValueError, match="leading"):
        m_sharpness(model, ce, (x, y[:-1]), m=4, rho=0.1)
    with pytest.raises(ValueError, match="per-example"):
        m_sharpness(model, lambda o, t: F.cross_entropy(o, t), (x, y), m=4, rho=0.1)
    with pytest.raises(TypeError, match="Module"):
        m_sharpness(lambda t: t, ce, (x, y), m=4, rho=0.1)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        m_sharpness(frozen, ce, (x, y), m=4, rho=0.1)


def test_regression_targets_give_nan_error() -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 1).to(DT)
    x = torch.randn(8, 6, dtype=DT)
    t = torch.randn(8, 1, dtype=DT)
    result = m_sharpness(model, lambda o, y: ((o - y) ** 2).squeeze(1), (x, t), m=4, rho=0.1)
    assert result.loss_increase > 0 and math.isnan(result.error_increase)


def test_more_ascent_steps_never_lower_the_worst_case() -> None:
    model, data = mlp(), batch()
    sam = m_sharpness(model, ce, data, m=8, rho=0.3, steps=1)
    pga = m_sharpness(model, ce, data, m=8, rho=0.3, steps=6)
    # exact: pga's maximum includes the SAM iterate, whose weights are the same bits in both runs (its first step is
    # the same computation), evaluated by the same forward pass (autograd on or off changes no kernel)
    assert (pga.per_group[:, 0] >= sam.per_group[:, 0]).all()
    assert pga.loss_increase > sam.loss_increase
