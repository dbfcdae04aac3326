"""The batch-aware step: m-SAM, accumulation, clipping, mixed precision and BatchNorm, against references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy

import flatminima
from tests.conftest import make_batch, make_mlp


def per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(outputs, targets, reduction="none")


def _gradient(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    loss = cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def reference_msam_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int, rho: float):
    """Average over groups of m examples of grad L_k(w + rho g_k / ||g_k||), written out with torch.func."""
    w = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    total = {name: torch.zeros_like(p) for name, p in w.items()}
    for start in range(0, x.shape[0], m):
        xk, yk = x[start : start + m], y[start : start + m]
        g = _gradient(model, w, xk, yk)
        norm = torch.linalg.vector_norm(torch.cat([t.ravel() for t in g.values()]))
        shifted = {name: (w[name] + rho * g[name] / norm).detach().requires_grad_() for name in w}
        for name, t in _gradient(model, shifted, xk, yk).items():
            total[name] += t * (xk.shape[0] / x.shape[0])
    return total


def _sgd_sam(model: nn.Module, **kwargs) -> flatminima.SAM:
    return flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, **kwargs)


@pytest.mark.parametrize("m", [4, 5, 16])
def test_msam_matches_reference(m: int) -> None:
    """m = 5 leaves a short last group: groups are weighted by size. m = 16 (the batch) is plain SAM."""
    model = make_mlp(dtype=torch.float64)
    x, y = make_batch(n=16, dtype=torch.float64)
    expected_grad = reference_msam_gradient(model, x, y, m, rho=0.1)
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), group_size=m)
    step(x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[name] - 0.5 * expected_grad[name], rtol=1e-12, atol=1e-14)


def test_msam_with_m_equal_batch_is_sam() -> None:
    a, b = make_mlp(seed=4), make_mlp(seed=4)
    opt_a, opt_b = _sgd_sam(a, momentum=0.9), _sgd_sam(b, momentum=0.9)
    step = flatminima.SharpnessAwareStep(a, per_example, opt_a, group_size=16)
    for i in range(3):
        x, y = make_batch(i)
        step(x, y)
        cross_entropy(b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        cross_entropy(b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_small_groups_differ_from_sam() -> None:
    """Guards the reference test: m-SAM with m < B really is a different update."""
    model = make_mlp(dtype=torch.float64)
    x, y = make_batch(n=16, dtype=torch.float64)
    sam = reference_msam_gradient(model, x, y, 16, rho=0.1)
    msam = reference_msam_gradient(model, x, y, 4, rho=0.1)
    assert max((sam[k] - msam[k]).abs().max().item() for k in sam) > 1e-4


@pytest.mark.parametrize("k", [2, 3, 16])
def test_gradient_accumulation_equals_whole_batch(k: int) -> None:
    a, b = make_mlp(seed=6, dtype=torch.float64), make_mlp(seed=6, dtype=torch.float64)
    step_a = flatminima.SharpnessAwareStep(a, per_example, _sgd_sam(a, momentum=0.9), accumulation_steps=k)
    step_b = flatminima.SharpnessAwareStep(b, per_example, _sgd_sam(b, momentum=0.9))
    for i in range(3):
        x, y = make_batch(i, dtype=torch.float64)
        loss_a, loss_b = step_a(x, y), step_b(x, y)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_clipping_applies_to_the_descent_gradient() -> None:
    model = make_mlp(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    sam_grad = reference_msam_gradient(model, x, y, 16, rho=0.1)
    norm = torch.linalg.vector_norm(torch.cat([g.ravel() for g in sam_grad.values()]))
    clip = 0.5 * norm.item()
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), max_grad_norm=clip)(x, y)
    for name, p in model.named_parameters():
        expected = w[name] - 0.5 * sam_grad[name] * (clip / norm)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8)  # clip_grad_norm_ adds 1e-6


def test_grad_scaler_step_equals_unscaled_step() -> None:
    """Power-of-two loss scaling is exact, so a GradScaler step equals the plain step."""
    a, b = make_mlp(seed=7), make_mlp(seed=7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step_a = flatminima.SharpnessAwareStep(a, per_example, _sgd_sam(a, momentum=0.9), grad_scaler=scaler)
    step_b = flatminima.SharpnessAwareStep(b, per_example, _sgd_sam(b, momentum=0.9))
    for i in range(3):
        x, y = make_batch(i)
        step_a(x, y)
        step_b(x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**12


def test_grad_scaler_inf_step_is_skipped_without_perturbation() -> None:
    model = make_mlp(seed=8)
    opt = _sgd_sam(model, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = make_batch()
    before = copy.deepcopy(model.state_dict())
    handle = model[0].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss = cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert all(torch.equal(p, before[k]) for k, p in model.state_dict().items())  # no perturbation
    scaler.scale(cross_entropy(model(x), y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    handle.remove()
    assert all(torch.equal(p, before[k]) for k, p in model.state_dict().items())  # step skipped
    assert not opt.state  # no momentum buffer: the base optimiser never stepped
    assert scaler.get_scale() == 2.0**11  # the scaler backed off, as without SAM


def test_grad_scaler_with_clipping_unscales_once() -> None:
    a, b = make_mlp(seed=9), make_mlp(seed=9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step_a = flatminima.SharpnessAwareStep(a, per_example, _sgd_sam(a), grad_scaler=scaler, max_grad_norm=0.1)
    step_b = flatminima.SharpnessAwareStep(b, per_example, _sgd_sam(b), max_grad_norm=0.1)
    x, y = make_batch()
    step_a(x, y)
    step_b(x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_autocast_bfloat16_step_trains() -> None:
    model = make_mlp(seed=10)
    step = flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), autocast_dtype=torch.bfloat16)
    x, y = make_batch()
    first = step(x, y).item()
    for _ in range(20):
        last = step(x, y).item()
    assert last < first
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_batchnorm_updated_once_from_unperturbed_pass() -> None:
    model = make_mlp(seed=11, batch_norm=True)
    probe = copy.deepcopy(model)
    x, y = make_batch(n=16)
    probe(x)
    flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), accumulation_steps=1)(x, y)
    # exact: one pass over the whole batch is the probe's forward at the same w, and one pass needs no averaging
    assert torch.equal(model[1].running_mean, probe[1].running_mean)
    assert torch.equal(model[1].running_var, probe[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize(("m", "k"), [(4, 1), (None, 4)])
def test_batchnorm_one_averaged_update_over_groups(m, k) -> None:
    """Several unperturbed passes (m-SAM groups or micro-batches) make one update: the running mean equals
    a whole-batch pass's (the mean of equal-sized group means is the batch mean), num_batches_tracked += 1."""
    model = make_mlp(seed=12, batch_norm=True, dtype=torch.float64)
    probe = copy.deepcopy(model)
    x, y = make_batch(n=16, dtype=torch.float64)
    probe(x)
    step = flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), group_size=m, accumulation_steps=k)
    step(x, y)
    torch.testing.assert_close(model[1].running_mean, probe[1].running_mean, rtol=1e-12, atol=1e-15)
    assert model[1].num_batches_tracked.item() == 1
    assert model[1].track_running_stats


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 0}, "group_size"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"group_size": 4, "accumulation_steps": 2}, "group by group"),
        ({"group_size": 4, "sync_perturbation": True}, "sync_perturbation"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_step_rejects_nonsense(kwargs, match) -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match=match):
        flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model), **kwargs)


def test_step_needs_a_sam_optimizer_and_a_batch() -> None:
    model = make_mlp()
    with pytest.raises(TypeError, match=r"flatminima\.SAM"):
        flatminima.SharpnessAwareStep(model, per_example, torch.optim.SGD(model.parameters(), lr=0.1))
    step = flatminima.SharpnessAwareStep(model, per_example, _sgd_sam(model))
    with pytest.raises(ValueError, match="non-empty batch"):
        step(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))


def test_grad_scaler_unscales_before_the_perturbation_usam() -> None:
    """USAM's e = rho g depends on the gradient's scale: a missing unscale would change the result 2**12-fold."""
    a, b = make_mlp(seed=14), make_mlp(seed=14)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_a = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, normalize=False)
    opt_b = flatminima.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, normalize=False)
    x, y = make_batch()
    flatminima.SharpnessAwareStep(a, per_example, opt_a, grad_scaler=scaler)(x, y)
    flatminima.SharpnessAwareStep(b, per_example, opt_b)(x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_unscale_before_first_step_is_an_error() -> None:
    model = make_mlp()
    opt = _sgd_sam(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_batch()
    scaler.scale(cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(zero_grad=True, grad_scaler=scaler)


def test_exception_in_a_pass_leaves_weights_restored() -> None:
    model = make_mlp(seed=15, batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        if len(calls) == 2:  # the descent pass, at w + e
            raise MemoryError("simulated out of memory")
        return per_example(outputs, targets)

    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batch()
    with pytest.raises(MemoryError):
        flatminima.SharpnessAwareStep(model, loss_fn, opt)(x, y)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert model[1].track_running_stats  # BatchNorm not left frozen
    flatminima.SharpnessAwareStep(model, per_example, opt)(x, y)  # and the optimiser is usable


def test_skipped_step_leaves_batchnorm_statistics_untouched() -> None:
    model = make_mlp(seed=16, batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, nonfinite="skip")
    before = copy.deepcopy(model.state_dict())
    x, y = make_batch()
    x[0, 0] = float("nan")
    flatminima.SharpnessAwareStep(model, per_example, opt)(x, y)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_flatten_with_msam_is_refused() -> None:
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=True)
    with pytest.raises(ValueError, match="flatten"):
        flatminima.SharpnessAwareStep(model, per_example, opt, group_size=4)
