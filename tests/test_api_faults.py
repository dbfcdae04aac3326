"""Faults of the API hardening issue, each pinned by a test that failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import flatminima
from flatminima.optim.flat import FlatLayout
from tests.conftest import assert_identical, make_batch, make_mlp, snapshot

SPARSE_MESSAGE = "SAM does not support sparse gradients; use dense embeddings."


def _bn(model: nn.Module) -> nn.BatchNorm1d:
    return model[1]


# ---------------------------------------------------------------- 1. first_step with no gradient


def test_first_step_without_gradients_leaves_batchnorm_tracking() -> None:
    """No gradient, no perturbation: the next forward pass is the step's only one and must update BatchNorm."""
    model = make_mlp(batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model)
    x, _ = make_batch()
    assert opt.first_step() is False
    assert not opt.is_perturbed
    before = _bn(model).running_mean.clone()
    model.train()
    model(x)
    assert not torch.equal(_bn(model).running_mean, before)
    assert int(_bn(model).num_batches_tracked) == 1


def test_first_step_with_rho_zero_still_keeps_one_statistics_update() -> None:
    """With a gradient at w the second pass keeps the first pass's statistics even when rho = 0 moves nothing,
    so rho = 0 stays the base optimiser (one BatchNorm update per step)."""
    model = make_mlp(batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, model=model)
    x, y = make_batch()
    cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True) is False
    after_first = [_bn(model).running_mean.clone(), _bn(model).num_batches_tracked.clone()]
    cross_entropy(model(x), y).backward()
    assert torch.equal(_bn(model).running_mean, after_first[0])
    assert torch.equal(_bn(model).num_batches_tracked, after_first[1])
    opt.second_step()
    assert _bn(model).track_running_stats


# ---------------------------------------------------------------- 2. second_step alone is a plain step


@pytest.mark.parametrize("flatten", [False, True])
def test_second_step_without_first_step_is_the_base_step(flatten: bool) -> None:
    """The documented plain step: second_step alone equals torch.optim.SGD's step bit for bit.

    Exact because it is one code path: SGD's own step on the same tensors. With flatten=True the reference's
    parameters are views of a flat buffer too, in the same layout, so the two models differ in nothing but the
    optimiser and the claim needs no assumption about the kernels a memory layout gets."""
    a, b = make_mlp(seed=3), make_mlp(seed=3)
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    sam = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.5, flatten=flatten, **options)
    if flatten:
        FlatLayout(list(b.parameters()))
    sgd = torch.optim.SGD(b.parameters(), **options)
    for seed in range(3):
        x, y = make_batch(seed=seed)
        for model, opt in ((a, sam), (b, sgd)):
            opt.zero_grad()
            cross_entropy(model(x), y).backward()
        sam.second_step()
        sgd.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
    assert sam.steps == 3


def test_plain_step_is_documented() -> None:
    for doc in (flatminima.SAM.__doc__, flatminima.SAM.second_step.__doc__):
        assert "without first_step" in " ".join(doc.replace("`", "").split())


# ---------------------------------------------------------------- 3. sparse gradients


@pytest.mark.parametrize("flatten", [False, True])
def test_sparse_gradient_gives_the_clear_message(flatten: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten)
    model(torch.tensor([1, 2, 3])).sum().backward()
    saved = snapshot(model)
    with pytest.raises(RuntimeError, match=SPARSE_MESSAGE):
        opt.first_step()
    assert not opt.is_perturbed
    assert_identical(model, saved)


def test_sparse_gradient_is_refused_also_when_it_first_appears_later() -> None:
    """The ascent's layout is worked out once; the sparse check runs until a step where every parameter had a
    gradient, so an embedding that gets its first (sparse) gradient at step 2 still gets the clear message."""
    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)
    opt = flatminima.SAM([*embedding.parameters(), *head.parameters()], torch.optim.SGD, rho=0.1, lr=0.1)
    head(torch.randn(3, 4)).sum().backward()  # step 1: the embedding has no gradient
    opt.first_step(zero_grad=True)
    head(torch.randn(3, 4)).sum().backward()
    opt.second_step(zero_grad=True)
    head(embedding(torch.tensor([1, 2, 3]))).sum().backward()  # step 2: its first gradient, sparse
    with pytest.raises(RuntimeError, match=SPARSE_MESSAGE):
        opt.first_step()
    assert not opt.is_perturbed


# ---------------------------------------------------------------- 4. exceptions inside SharpnessAwareStep


class FailingLoss:
    """Cross-entropy per example that raises on its ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        self.fail_on, self.calls = fail_on, 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyError("loss failed")
        return cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize(
    ("options", "fail_on"),
    [
        ({}, 1),
        ({}, 2),  # the second pass, after the first pass updated the statistics
        ({"accumulation_steps": 2}, 3),
        ({"group_size": 4}, 3),  # the second m-SAM group's first pass
        ({"group_size": 4}, 4),
    ],
)
def test_exception_in_step_leaves_weights_and_statistics(options: dict, fail_on: int) -> None:
    model = make_mlp(batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    step = flatminima.SharpnessAwareStep(model, FailingLoss(fail_on), opt, **options)
    x, y = make_batch()
    saved = snapshot(model)  # weights, running_mean, running_var, num_batches_tracked
    with pytest.raises(KeyError, match="loss failed"):
        step(x, y)
    assert_identical(model, saved)
    assert int(_bn(model).num_batches_tracked) == 0
    assert not opt.is_perturbed and opt.steps == 0 and not opt.state
    assert _bn(model).track_running_stats
    step(x, y)  # the next step runs normally
    assert int(_bn(model).num_batches_tracked) == 1


def test_nonfinite_raise_in_step_leaves_statistics() -> None:
    model = make_mlp(batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def nan_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(outputs, targets) * math.nan

    step = flatminima.SharpnessAwareStep(model, nan_loss, opt)
    saved = snapshot(model)
    with pytest.raises(FloatingPointError):
        step(*make_batch())
    assert_identical(model, saved)


# ---------------------------------------------------------------- 5. non-finite rho


@pytest.mark.parametrize("rho", [math.inf, -math.inf, math.nan])
def test_nonfinite_rho_is_rejected_at_construction(rho: float) -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match="rho"):
        flatminima.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        flatminima.SAM([{"params": list(model.parameters()), "rho": rho}], torch.optim.SGD, lr=0.1)


def test_nonfinite_rho_is_rejected_in_add_param_group() -> None:
    model = make_mlp()
    first, *rest = model.parameters()
    opt = flatminima.SAM([first], torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": rest, "rho": math.inf})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("flatten", [False, True])
def test_nonfinite_rho_set_on_a_group_is_rejected_at_the_step(flatten: bool) -> None:
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, flatten=flatten)
    opt.param_groups[0]["rho"] = math.inf  # e.g. a scheduler gone wrong
    x, y = make_batch()
    cross_entropy(model(x), y).backward()
    saved = snapshot(model)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert not opt.is_perturbed
    assert_identical(model, saved)


# ---------------------------------------------------------------- 6. hyperparameters handed to the base optimiser


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": math.nan}, r"lr must be a finite number >= 0; got lr=nan"),
        ({"lr": math.inf}, r"lr must be a finite number >= 0; got lr=inf"),
        ({"lr": 0.1, "rho": "0.05"}, r"rho must be a finite float >= 0 .* rho='0.05'"),
        ({"lr": 0.1, "rho": True}, r"rho must be a finite float"),
        ({"lr": 0.1, "p": "2"}, r"p must be a number in \[1, inf\]"),
        ({"lr": 0.1, "adaptive": True, "adaptive_eta": math.nan}, r"adaptive_eta must be a finite number >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(options: dict, message: str) -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        flatminima.SAM(model.parameters(), torch.optim.SGD, **options)


def _loss_closure(model: nn.Module, opt: torch.optim.Optimizer):
    x, y = make_batch()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure, x, y


@pytest.mark.parametrize("driver", ["closure", "two-step", "SharpnessAwareStep"])
@pytest.mark.parametrize("lr", [math.nan, math.inf, -0.1])
def test_a_bad_lr_set_later_stops_the_step_with_the_weights_unchanged(driver: str, lr: float) -> None:
    """An LR scheduler gone wrong: every driver refuses before the base step, and w is restored exactly."""
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    closure, x, y = _loss_closure(model, opt)
    opt.step(closure)  # one good step: momentum state exists
    opt.param_groups[0]["lr"] = lr
    saved = snapshot(model)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0; a param group has lr="):
        if driver == "closure":
            opt.step(closure)
        elif driver == "two-step":
            closure()
            opt.first_step(zero_grad=True)
            cross_entropy(model(x), y).backward()
            opt.second_step()
        else:
            flatminima.SharpnessAwareStep(model, lambda out, t: cross_entropy(out, t, reduction="none"), opt)(x, y)
    assert not opt.is_perturbed
    assert_identical(model, saved)
    opt.param_groups[0]["lr"] = 0.1  # fixed: the optimiser goes on
    opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torch_state_initialising_step_goes_to_the_base_optimiser() -> None:
    """torch.distributed.checkpoint creates an empty optimiser's state by step() without a closure at lr 0 on zero
    gradients (FSDP2 checkpoints in Lightning and Accelerate load through it): SAM hands it to the base optimiser,
    which creates its state and moves nothing. Any other step() without a closure is still refused."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    saved = snapshot(model)
    _init_optim_state(opt)
    assert_identical(model, saved)
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters()) and opt.steps == 0
    assert opt.param_groups[0]["lr"] == 0.1
    x, y = make_batch()
    cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"SAM.step\(\) needs a closure"):
        opt.step()
    fresh = flatminima.SAM(make_mlp().parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"needs a closure"):  # zero gradients but a real learning rate
        fresh.step()
