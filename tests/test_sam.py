"""SAM's invariants: rho = 0 is the base optimiser bit for bit, w restored exactly, no corruption on bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import flatminima
from tests.conftest import make_batch, make_mlp

BASES = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
]


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        loss = cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(("base", "options"), BASES)
@pytest.mark.parametrize("pattern", ["closure", "two-step"])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base, options, pattern) -> None:
    reference, model = make_mlp(batch_norm=True), make_mlp(batch_norm=True)
    ref_opt = base(reference.parameters(), **options)
    opt = flatminima.SAM(model.parameters(), base, rho=0.0, model=model, **options)
    for step in range(5):
        x, y = make_batch(step)
        ref_opt.zero_grad()
        _closure(reference, x, y)()
        ref_opt.step()
        if pattern == "closure":
            opt.step(_closure(model, x, y))
        else:
            cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    # exact: with rho = 0 SAM runs the base optimiser's own ops on the same tensors (the second pass at w gives the
    # same gradient), so this is one code path; checks weights and BatchNorm statistics (updated once per step)
    assert _same(reference, model)


def test_weights_restored_exactly_not_by_subtraction() -> None:
    """With lr = 0 a SAM step must leave w bit for bit; (w + e) - e would not (checked on the same numbers)."""
    model = make_mlp(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    x, y = make_batch(1)
    cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    perturbed = [p.detach().clone() for p in model.parameters()]
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    norm = torch.linalg.vector_norm(torch.cat([g.ravel() for g in grads]))
    subtracted = [w - 0.5 * g / norm for w, g in zip(perturbed, grads)]
    assert not all(torch.equal(s, b) for s, b in zip(subtracted, before)), "test data too kind to tell them apart"


def test_two_step_and_closure_patterns_agree() -> None:
    a, b = make_mlp(seed=1), make_mlp(seed=1)
    opt_a = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = flatminima.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for step in range(4):
        x, y = make_batch(step)
        cross_entropy(a(x), y).backward()
        opt_a.first_step(zero_grad=True)
        cross_entropy(a(x), y).backward()
        opt_a.second_step(zero_grad=True)
        loss = opt_b.step(_closure(b, x, y))
    assert _same(a, b)  # same code path: step(closure) is first_step and second_step on the same tensors
    assert loss.ndim == 0


def test_closure_called_twice_and_returns_loss_at_w() -> None:
    model = make_mlp()
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    calls: list[float] = []

    def closure() -> torch.Tensor:
        loss = cross_entropy(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    with torch.no_grad():  # the same forward ops as the closure's first call (no_grad only records no graph)
        loss_at_w = cross_entropy(model(x), y).item()
    returned = opt.step(closure)
    assert len(calls) == 2
    assert returned.item() == loss_at_w == calls[0]  # exact: the same forward at the same w; returned is calls[0]'s
    assert calls[1] > calls[0]  # the ascent step increases the loss


def test_sam_step_matches_hand_computation() -> None:
    """One step in float64: w+ = w - lr * grad L(w + rho g/||g||)."""
    model = make_mlp(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(cross_entropy(model(x), y), params)
    norm = torch.linalg.vector_norm(torch.cat([t.ravel() for t in g]))
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for q, t in zip(probe.parameters(), g):
            q.add_(0.05 * t / norm)
    g_sam = torch.autograd.grad(cross_entropy(probe(x), y), list(probe.parameters()))
    opt = flatminima.SAM(params, torch.optim.SGD, rho=0.05, lr=0.3)
    opt.step(_closure(model, x, y))
    # float64: the reference's norm and w + e are computed another way (cat + vector_norm, 0.05 t / norm) than the
    # library's (per-tensor norms, w + (rho / norm) g), so the two differ by a few ulp (2.2e-16) of O(0.1) values;
    # a wrong formula (a missing normalisation, the gradient at w) shows at 1e-4 and more
    for p, w0, gs in zip(params, w, g_sam):
        torch.testing.assert_close(p.detach(), w0 - 0.3 * gs, rtol=1e-13, atol=1e-15)


def test_parameters_without_gradient_are_not_perturbed() -> None:
    model = make_mlp()
    frozen = model[0].weight
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = frozen.detach().clone()
    frozen.requires_grad_(False)
    cross_entropy(model(x), y).backward()
    assert frozen.grad is None
    opt.first_step(zero_grad=True)
    assert torch.equal(frozen, before)
    frozen.requires_grad_(True)  # it gets a gradient in the second pass only: still restored, then stepped
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert not torch.equal(frozen, before)
    assert not opt.is_perturbed


def test_excluded_group_and_per_group_rho() -> None:
    """Groups share one norm; a group with perturb=False is left alone; per-group rho scales its part of e."""
    model = make_mlp(dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = flatminima.SAM(
        [
            {"params": [weights[0]], "rho": 0.1},
            {"params": [weights[1]], "rho": 0.3},
            {"params": biases, "perturb": False},
        ],
        torch.optim.SGD,
        lr=0.1,
    )
    cross_entropy(model(x), y).backward()
    grads = [w.grad.clone() for w in weights]
    start = [p.detach().clone() for p in weights + biases]
    opt.first_step(zero_grad=True)
    norm = torch.linalg.vector_norm(torch.cat([g.ravel() for g in grads]))
    torch.testing.assert_close(weights[0] - start[0], 0.1 * grads[0] / norm, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(weights[1] - start[1], 0.3 * grads[1] / norm, rtol=1e-12, atol=1e-15)
    assert all(torch.equal(b, s) for b, s in zip(biases, start[2:]))
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def test_zero_gradient_gives_no_perturbation_and_no_nan() -> None:
    w = torch.ones(5, requires_grad=True)
    opt = flatminima.SAM([w], torch.optim.SGD, rho=0.1, lr=0.1)
    w.grad = torch.zeros(5)
    opt.first_step()
    assert torch.equal(w.detach(), torch.ones(5))
    w.grad = torch.zeros(5)
    opt.second_step()
    assert torch.equal(w.detach(), torch.ones(5))


@pytest.mark.parametrize("where", ["first", "second"])
def test_nonfinite_gradient_raises_and_leaves_weights_and_state_intact(where: str) -> None:
    model = make_mlp()
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step(_closure(model, x, y))  # momentum buffers exist
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = cross_entropy(model(x), y)
        if (where == "first") == (len(calls) == 1):
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="inf or NaN"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))
    assert all(
        torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        for a, b in zip(opt.state_dict()["state"].values(), state["state"].values())
    )
    opt.step(_closure(model, x, y))  # usable afterwards


def test_nonfinite_skip_policy_skips_the_step() -> None:
    model = make_mlp()
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, nonfinite="skip")
    weights = copy.deepcopy(model.state_dict())

    def bad() -> torch.Tensor:
        loss = cross_entropy(model(x), y) * float("inf")
        loss.backward()
        return loss

    opt.step(bad)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))
    assert not opt.state  # the base optimiser never stepped
    opt.step(_closure(model, x, y))
    assert not _same(model, make_mlp())


def test_weights_restored_when_second_closure_raises() -> None:
    model = make_mlp()
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    weights = copy.deepcopy(model.state_dict())
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _closure(model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))


def test_first_step_twice_is_an_error() -> None:
    model = make_mlp()
    x, y = make_batch()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_step_without_closure_is_an_error() -> None:
    opt = flatminima.SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -0.1}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"p": 0.5}, ValueError, "p must be"),
        ({"adaptive_eta": -1.0}, ValueError, "adaptive_eta"),
        ({"nonfinite": "warn"}, ValueError, "nonfinite"),
        ({"perturbation": "sign"}, TypeError, "perturb_"),
    ],
)
def test_nonsense_arguments_fail_at_construction(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        flatminima.SAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("base", ["sgd", nn.Linear, torch.optim.SGD.step, None])
def test_base_optimizer_must_be_an_optimizer(base) -> None:
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        flatminima.SAM(make_mlp().parameters(), base, lr=0.1)


def test_base_optimizer_instance_is_wrapped_and_shared() -> None:
    model = make_mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = flatminima.SAM(None, base, rho=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    with pytest.raises(TypeError, match="its own constructor"):
        flatminima.SAM(None, base, lr=0.2)
    with pytest.raises(ValueError, match="params differ"):
        flatminima.SAM(make_mlp().parameters(), base)


def test_lr_scheduler_drives_the_base_optimizer() -> None:
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch()
    for _ in range(3):
        opt.step(_closure(model, x, y))
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.125


def test_state_dict_resume_is_bit_exact(tmp_path) -> None:
    """Save after 3 steps, load (weights_only) into fresh objects, 3 more steps == 6 uninterrupted steps."""

    def build():
        model = make_mlp(seed=5, batch_norm=True)
        opt = flatminima.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, model=model)
        return model, opt

    straight_model, straight_opt = build()
    model, opt = build()
    for step in range(3):
        x, y = make_batch(step)
        straight_opt.step(_closure(straight_model, x, y))
        opt.step(_closure(model, x, y))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["optimizer"]["state"][0]["exp_avg"].shape == model[0].weight.shape  # base state travels
    resumed_model, resumed_opt = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.state is resumed_opt.base_optimizer.state
    for step in range(3, 6):
        x, y = make_batch(step)
        straight_opt.step(_closure(straight_model, x, y))
        resumed_opt.step(_closure(resumed_model, x, y))
    assert _same(straight_model, resumed_model)  # same code path: the resume replays the same ops in the same order


@pytest.mark.parametrize("with_model", [True, False])
def test_batchnorm_statistics_come_from_the_first_pass_only(with_model: bool) -> None:
    model = make_mlp(seed=2, batch_norm=True)
    probe = copy.deepcopy(model)
    x, y = make_batch(4)
    probe(x)  # one training-mode forward at w: the update SAM should make
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model if with_model else None)
    opt.step(_closure(model, x, y))
    bn, expected = model[1], probe[1]  # exact: the probe's pass is the same forward at the same w as SAM's first
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert bn.num_batches_tracked.item() == 1
    assert bn.track_running_stats


def test_two_step_pattern_with_model_keeps_first_pass_statistics() -> None:
    model = make_mlp(seed=2, batch_norm=True)
    probe = copy.deepcopy(model)
    x, y = make_batch(4)
    probe(x)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert torch.equal(model[1].running_mean, probe[1].running_mean)  # same forward at the same w as the first pass
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("nonfinite", ["ignore", "raise"])
def test_sync_free_path_matches_the_float_path(monkeypatch, nonfinite: str) -> None:
    """On a GPU with nonfinite='ignore' the scale stays a tensor (no host sync); same result as the float path."""
    import flatminima.optim.ascent as ascent_module

    a, b = make_mlp(seed=13, dtype=torch.float64), make_mlp(seed=13, dtype=torch.float64)
    opt_a = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, nonfinite=nonfinite)
    opt_b = flatminima.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, nonfinite=nonfinite)
    x, y = make_batch(dtype=torch.float64)
    opt_a.step(_closure(a, x, y))
    monkeypatch.setattr(ascent_module, "_host_sync_is_free", lambda tensors: False)
    opt_b.step(_closure(b, x, y))
    # two kernels for w + c g (one fused add vs a multiply then an add): float64, one step, a few ulp apart
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_half_precision_gradient_norm_does_not_overflow(flatten: bool, nonfinite: str) -> None:
    """50,000 fp16 gradients of 300 have norm 67,082 > fp16's max 65,504: the norm must be taken in float32."""
    params = [torch.zeros(10_000, dtype=torch.float16, requires_grad=True) for _ in range(5)]
    opt = flatminima.SAM(params, torch.optim.SGD, rho=0.1, lr=0.0, nonfinite=nonfinite, flatten=flatten)
    for p in params:
        p.grad = torch.full_like(p, 300.0)
    opt.first_step(zero_grad=True)
    expected = 0.1 / 50_000**0.5  # rho g / ||g|| with g = 300 everywhere
    for p in params:
        torch.testing.assert_close(p.detach().float(), torch.full((10_000,), expected), rtol=2e-3, atol=0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.second_step()


def test_first_step_twice_without_perturbation_keeps_batchnorm_flags() -> None:
    model = make_mlp(batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, model=model)
    x, y = make_batch()
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.first_step(zero_grad=True)  # nothing perturbed, so allowed: must not lose the saved flags
    cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert model[1].track_running_stats
