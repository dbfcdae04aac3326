"""The seams: ascent rules, descent rules and cadences plug into SAM and the batch-aware step unchanged.

Each rule here is written in the test (or is a library rule added without touching ``sam.py`` / ``step.py``),
and the result is checked against a float64 reference written out by hand.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.functional import cross_entropy

import flatminima
from flatminima.optim import AscentRule, DescentRule, EveryKSteps, RandomDirection, RuleContext
from tests.conftest import make_batch, make_mlp, per_example_ce

LR = 0.5


class Counting:
    """A per-example loss that counts its calls (one per forward pass of the step)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        self.calls += 1
        return per_example_ce(outputs, targets)


def _gradient(model: nn.Module, weights: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    loss = cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _random_e(weights: dict[str, Tensor], rho: float, seed: int) -> dict[str, Tensor]:
    """The random-direction rule's e, written out: rho z / ||z||, z ~ N(0, I) drawn tensor by tensor."""
    gen = torch.Generator().manual_seed(seed)
    z = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()}
    norm = torch.sqrt(sum((t**2).sum() for t in z.values()))
    return {k: rho * t / norm for k, t in z.items()}


# ---------------------------------------------------------------------------------------------- ascent


@pytest.mark.parametrize("pattern", ["closure", "step"])
def test_gradient_free_ascent_takes_one_pass_and_moves_by_e_exactly(pattern: str) -> None:
    """A random-direction ascent needs no g(w): one forward-backward per step, at exactly w + e."""
    model = make_mlp(seed=1, dtype=torch.float64)
    x, y = make_batch(dtype=torch.float64)
    rule = RandomDirection(torch.Generator().manual_seed(7))
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=LR, perturbation=rule)
    assert not opt.needs_first_pass
    w = _weights(model)
    e = _random_e(w, 0.3, seed=7)
    seen: dict[str, Tensor] = {}
    loss_fn = Counting()
    if pattern == "closure":

        def closure() -> Tensor:
            seen.update(_weights(model))
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            return loss

        opt.step(closure)
    else:
        flatminima.SharpnessAwareStep(model, loss_fn, opt)(x, y)
    assert loss_fn.calls == 1  # one forward-backward: the step costs an SGD step plus one pass
    if pattern == "closure":
        # the only pass ran at w + e as the rule drew it: the same draws, but ||z|| summed another way here, so
        # float64 values of O(0.5) a few ulp (1.1e-16) apart; a wrong draw or scale shows at 1e-2
        for k in w:
            torch.testing.assert_close(seen[k], w[k] + e[k], rtol=0, atol=1e-15)
    g = _gradient(model, {k: w[k] + e[k] for k in w}, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k] - LR * g[k], rtol=1e-12, atol=1e-14)


def test_gradient_free_ascent_lets_batchnorm_learn_from_its_only_pass() -> None:
    model = make_mlp(seed=2, batch_norm=True)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, perturbation=RandomDirection())
    x, y = make_batch()
    flatminima.SharpnessAwareStep(model, per_example_ce, opt)(x, y)
    assert model[1].num_batches_tracked.item() == 1
    assert model[1].track_running_stats


class ScaledSign(AscentRule):
    """rho * sign(g), but declared *not* to scale with rho: SAM must call it once per distinct rho."""

    scales_with_rho = False

    def __init__(self) -> None:
        self.calls: list[float] = []

    def perturb_(self, params, grads, rho, grad_norms=None) -> None:  # no context: a rule written before it
        self.calls.append(rho)
        torch._foreach_sign_(grads)
        torch._foreach_mul_(grads, rho)


def test_rule_not_scaling_with_rho_gets_one_call_per_rho() -> None:
    model = make_mlp(seed=3, dtype=torch.float64)
    rule = ScaledSign()
    groups = [{"params": [model[0].weight], "rho": 0.1}, {"params": [model[2].weight], "rho": 0.3}]
    opt = flatminima.SAM(groups, torch.optim.SGD, lr=0.0, perturbation=rule)
    x, y = make_batch(dtype=torch.float64)
    g = _gradient(model, _weights(model), x, y)
    before = {k: v.clone() for k, v in _weights(model).items()}
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert sorted(rule.calls) == [0.1, 0.3]
    torch.testing.assert_close(model[0].weight, before["0.weight"] + 0.1 * g["0.weight"].sign())
    torch.testing.assert_close(model[2].weight, before["2.weight"] + 0.3 * g["2.weight"].sign())
    opt.restore()


# ---------------------------------------------------------------------------------------------- descent


class MixWithFirstGradient(DescentRule):
    """direction = (1 - a) g(w + e) + a g(w), and a step counter kept in the rule state."""

    needs_first_gradient = True

    def __init__(self, a: float) -> None:
        self.a = a
        self.seen: list[bool] = []

    def direction_(self, params, grads, first_grads, context: RuleContext, ascended: bool) -> None:
        self.seen.append(ascended)
        for state in context.states:
            state["mix_calls"] = state.get("mix_calls", 0) + 1
        if ascended:
            torch._foreach_mul_(grads, 1 - self.a)
            torch._foreach_add_(grads, first_grads, alpha=self.a)


def _mix_reference(model: nn.Module, batches, a: float, rho: float) -> dict[str, Tensor]:
    w = _weights(model)
    for x, y in batches:
        g = _gradient(model, w, x, y)
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        g_e = _gradient(model, {k: w[k] + rho * g[k] / norm for k in w}, x, y)
        w = {k: w[k] - LR * ((1 - a) * g_e[k] + a * g[k]) for k in w}
    return w


@pytest.mark.parametrize("pattern", ["two-step", "closure", "step", "step-scaler"])
def test_descent_rule_gets_the_first_gradient(pattern: str) -> None:
    model = make_mlp(seed=4, dtype=torch.float64)
    batches = [make_batch(i, dtype=torch.float64) for i in range(3)]
    expected = _mix_reference(copy.deepcopy(model), batches, a=0.3, rho=0.2)
    rule = MixWithFirstGradient(0.3)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=LR, descent=rule)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if pattern == "step-scaler" else None
    step = flatminima.SharpnessAwareStep(model, per_example_ce, opt, grad_scaler=scaler)
    for x, y in batches:
        if pattern == "two-step":
            cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        elif pattern == "closure":
            opt.step(lambda x=x, y=y: cross_entropy(model(x), y).backward())
        else:
            step(x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-12, atol=1e-14)
    assert rule.seen == [True, True, True]
    assert all(opt.rule_state[p]["mix_calls"] == 3 for p in model.parameters())  # SAM keeps the rule state
    assert all("mix_calls" not in opt.state[p] for p in model.parameters())  # not in the base optimiser's


def test_descent_rule_state_is_checkpointed() -> None:
    model = make_mlp(seed=5)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, descent=MixWithFirstGradient(0.5))
    x, y = make_batch()
    opt.step(lambda: cross_entropy(model(x), y).backward())
    state = opt.state_dict()
    assert state["sam_steps"] == 1
    assert all(s["mix_calls"] == 1 for s in state["sam_rule_state"].values())
    assert all("mix_calls" not in s for s in state["state"].values())


def test_msam_refuses_a_descent_rule_that_needs_g_w() -> None:
    model = make_mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, descent=MixWithFirstGradient(0.5))
    with pytest.raises(ValueError, match="group_size"):
        flatminima.SharpnessAwareStep(model, per_example_ce, opt, group_size=4)


# ---------------------------------------------------------------------------------------------- cadence


@pytest.mark.parametrize("pattern", ["closure", "step"])
def test_cadence_skips_the_ascent_on_off_steps(pattern: str) -> None:
    """EveryKSteps(2): steps 0, 2 are SAM steps (2 passes), steps 1, 3 plain SGD steps (1 pass), bit for bit.

    Exact because the reference takes the same path: the same loss (per-example losses, then their mean, as the
    step and the closure compute it), SAM's own step on the SAM steps and SGD's own step on the others."""
    sam_model, ref_model = make_mlp(seed=6), make_mlp(seed=6)
    opt = flatminima.SAM(sam_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, cadence=EveryKSteps(2))
    ref = flatminima.SAM(ref_model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    ref_sgd = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    loss_fn = Counting()
    step = flatminima.SharpnessAwareStep(sam_model, loss_fn, opt)
    counts = []
    for i in range(4):
        x, y = make_batch(i)
        assert opt.ascent_due == (i % 2 == 0)
        before = loss_fn.calls
        if pattern == "closure":
            opt.step(lambda x=x, y=y: loss_fn(sam_model(x), y).mean().backward())
        else:
            step(x, y)
        counts.append(loss_fn.calls - before)
        if i % 2 == 0:
            ref.step(lambda x=x, y=y: per_example_ce(ref_model(x), y).mean().backward())
        else:
            ref_sgd.zero_grad()
            per_example_ce(ref_model(x), y).mean().backward()
            ref_sgd.step()
        for p, q in zip(sam_model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q)
    assert counts == [2, 1, 2, 1]
    assert opt.steps == 4


def test_cadence_resumes_where_it_left_off() -> None:
    model = make_mlp(seed=7)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, cadence=EveryKSteps(3))
    x, y = make_batch()
    for _ in range(4):
        opt.step(lambda: cross_entropy(model(x), y).backward())
    resumed = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, cadence=EveryKSteps(3))
    resumed.load_state_dict(opt.state_dict())
    assert resumed.steps == 4 and resumed.ascent_due == opt.ascent_due is False


def test_two_step_pattern_when_the_cadence_declines_is_a_plain_step() -> None:
    a, b = make_mlp(seed=8), make_mlp(seed=8)
    opt = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, cadence=EveryKSteps(2))
    opt.steps = 1  # an off step
    sgd = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = make_batch()
    cross_entropy(a(x), y).backward()
    assert opt.first_step(zero_grad=True) is False and not opt.is_perturbed
    cross_entropy(a(x), y).backward()
    opt.second_step(zero_grad=True)
    cross_entropy(b(x), y).backward()
    sgd.step()
    # exact: the declined step is SGD's own step along the same gradient (the pass at w, computed the same way)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("flatten", [False, True])
def test_two_step_pattern_on_an_off_step_without_a_second_pass_is_a_plain_step(flatten: bool) -> None:
    """first_step(zero_grad=True) returns False on a cadence's off step; a loop that then skips the second pass
    still gets the base optimiser's step along g(w) (set aside and put back: the same tensors, or the flat buffer's
    copy), exactly: SGD's own step from the same pass at w."""
    a, b = make_mlp(seed=8, dtype=torch.float64), make_mlp(seed=8, dtype=torch.float64)
    opt = flatminima.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, cadence=EveryKSteps(2), flatten=flatten)
    opt.steps = 1  # an off step
    sgd = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = make_batch(dtype=torch.float64)
    cross_entropy(a(x), y).backward()
    assert opt.first_step(zero_grad=True) is False and not opt.is_perturbed
    opt.second_step()
    cross_entropy(b(x), y).backward()
    sgd.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_first_gradient_kept_for_the_descent_survives_a_backward_into_bucket_views() -> None:
    """DDP with gradient_as_bucket_view=True makes each .grad a view of a bucket that the next backward overwrites:
    the g(w) a descent rule reads must then be a copy, not the view (the plan's ascent releases the gradients)."""
    from flatminima.variants.gsam import GSAMDescent

    model = make_mlp(seed=9, dtype=torch.float64)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, descent=GSAMDescent(0.4))
    x, y = make_batch(dtype=torch.float64)
    phases = iter(opt.plan())
    next(phases)  # the pass at w
    cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    bucket = torch.cat([p.grad.reshape(-1) for p in params])
    views, start = [], 0
    for p in params:  # gradients as views of one bucket, as DDP makes them
        views.append(bucket[start : start + p.numel()].view_as(p))
        start += p.numel()
    for p, view in zip(params, views):
        p.grad = view
    g_w = bucket.clone()
    next(phases)  # the ascent; then the pass at w + e writes into the bucket
    bucket.fill_(7.0)
    kept = torch.cat([t.reshape(-1) for t in opt._step.first_grads[1]])
    assert torch.equal(kept, g_w)
    opt.restore()


class LegacyStatesDescent(DescentRule):
    """A descent rule written before RuleContext: it iterates its fourth argument as the list of states."""

    needs_first_gradient = True

    def direction_(self, params, grads, first_grads, states, ascended) -> None:
        for state in states:
            state["calls"] = state.get("calls", 0) + 1


def test_a_descent_rule_reading_states_as_a_list_still_runs() -> None:
    model = make_mlp(seed=10)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, descent=LegacyStatesDescent())
    x, y = make_batch()
    opt.step(lambda: cross_entropy(model(x), y).backward())
    assert all(opt.rule_state[p]["calls"] == 1 for p in model.parameters())


def test_a_parameter_replaced_in_its_group_is_perturbed() -> None:
    """The ascent's layout is keyed on the groups' parameters themselves: one swapped in place is seen."""
    model = make_mlp(seed=11, dtype=torch.float64)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.0)
    x, y = make_batch(dtype=torch.float64)
    opt.step(lambda: cross_entropy(model(x), y).backward())
    replacement = nn.Parameter(model[0].weight.detach().clone())
    opt.param_groups[0]["params"][0] = replacement
    model[0].weight = replacement
    before = replacement.detach().clone()
    cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(replacement, before)  # moved to w + e
    opt.restore()


@pytest.mark.parametrize(("k", "error"), [(0, ValueError), (1.5, ValueError), (True, ValueError)])
def test_cadence_rejects_nonsense(k, error) -> None:
    with pytest.raises(error, match="k >= 1"):
        EveryKSteps(k)


def test_seams_reject_objects_that_are_not_rules() -> None:
    model = make_mlp()
    with pytest.raises(TypeError, match="descent"):
        flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, descent=object())
    with pytest.raises(TypeError, match="cadence"):
        flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, cadence=3)


def test_wrappers_declare_what_the_inner_rule_declares() -> None:
    """ASAM's scaling and the random sign are wrappers: a wrapper of a stateful rule is stateful, one of a
    gradient-free rule needs no gradient (unless the wrapper itself needs it), the state keys pass through."""
    from flatminima.optim import Adaptive, DualNorm
    from flatminima.optim.rules import AscentCapabilities
    from flatminima.variants import RandomSign
    from flatminima.variants.friendly_sam import STATE_KEY, FriendlyAscent
    from flatminima.variants.momentum_sam import MomentumAscent

    declared = AscentCapabilities.of(RandomSign(FriendlyAscent()))
    assert declared.needs_state and declared.state_keys == (STATE_KEY,) and declared.needs_gradient
    assert not declared.shard_aware  # as FriendlyAscent declares
    momentum = AscentCapabilities.of(RandomSign(MomentumAscent()))
    assert momentum.needs_state and momentum.needs_gradient and momentum.shard_aware  # the sign needs g(w)
    assert not AscentCapabilities.of(Adaptive(RandomDirection())).needs_gradient
    assert AscentCapabilities.of(Adaptive(DualNorm(2.0))).shard_aware
    assert AscentCapabilities.of(Adaptive(DualNorm(2.0))) == AscentCapabilities.of(DualNorm(2.0))
    with pytest.raises(ValueError, match="Adaptive cannot wrap"):
        Adaptive(FriendlyAscent())
    with pytest.raises(TypeError, match="RandomSign wraps an ascent rule"):
        RandomSign(0.05)


def _friendly_sam(model: nn.Module, perturbation: Any) -> flatminima.SAM:
    return flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, perturbation=perturbation)


def test_random_sign_hands_a_stateful_rule_its_states() -> None:
    """RandomSign around Friendly SAM's ascent (which keeps a gradient mean in the optimiser state): with the signs
    drawn +1, +1 the steps are Friendly SAM's own, bit for bit (the same code path: the wrapper adds no arithmetic),
    and the mean is kept; it failed before (the wrapper dropped needs_state, so the rule got no states)."""
    from flatminima.variants import RandomSign
    from flatminima.variants.friendly_sam import STATE_KEY, FriendlyAscent

    seed = 1
    replay = torch.Generator().manual_seed(seed)
    assert [int(torch.randint(2, (1,), generator=replay)) for _ in range(2)] == [1, 1]  # no sign flip
    signed_model, plain_model = make_mlp(seed=2, dtype=torch.float64), make_mlp(seed=2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    signed = _friendly_sam(signed_model, RandomSign(FriendlyAscent(), generator=generator))
    plain = _friendly_sam(plain_model, FriendlyAscent())
    for step in range(2):
        x, y = make_batch(seed=step, dtype=torch.float64)
        signed.step(lambda m=signed_model, x=x, y=y: cross_entropy(m(x), y).backward())
        plain.step(lambda m=plain_model, x=x, y=y: cross_entropy(m(x), y).backward())
        for p, q in zip(signed_model.parameters(), plain_model.parameters(), strict=True):
            assert torch.equal(p, q)
    assert all(STATE_KEY in signed.rule_state[p] for p in signed_model.parameters())


def test_random_sign_flips_a_stateful_rules_perturbation() -> None:
    """A first draw of 0 flips e: w + e with the sign is w - e without it (float64, O(0.1) values: the two sums
    round apart by at most an ulp, 1e-15 here; a missing flip is off by 2 |e|, about 1e-2)."""
    from flatminima.variants import RandomSign
    from flatminima.variants.friendly_sam import FriendlyAscent

    replay = torch.Generator().manual_seed(0)
    assert int(torch.randint(2, (1,), generator=replay)) == 0  # the first draw flips the sign
    signed_model, plain_model = make_mlp(seed=2, dtype=torch.float64), make_mlp(seed=2, dtype=torch.float64)
    w = [p.detach().clone() for p in plain_model.parameters()]
    signed = _friendly_sam(signed_model, RandomSign(FriendlyAscent(), generator=torch.Generator().manual_seed(0)))
    plain = _friendly_sam(plain_model, FriendlyAscent())
    x, y = make_batch(seed=0, dtype=torch.float64)
    for model, opt in ((signed_model, signed), (plain_model, plain)):
        cross_entropy(model(x), y).backward()
        assert opt.first_step(zero_grad=True)
    for p, q, w0 in zip(signed_model.parameters(), plain_model.parameters(), w, strict=True):
        torch.testing.assert_close(p - w0, -(q - w0), rtol=0, atol=1e-15)
        assert (q - w0).abs().max() > 1e-3  # the perturbation is not negligible


def test_sharded_parameters_refuse_a_shard_aware_rule_with_state_of_its_own() -> None:
    """Its state would be kept as local shards, which FSDP's state-dict functions do not gather."""
    from flatminima.optim import sharded
    from flatminima.optim.groups import RuleBook
    from flatminima.optim.rules import PerturbedGradient

    class StatefulShardAware(AscentRule):
        shard_aware = True
        needs_state = True
        state_keys = ("mine",)

        def perturb_(self, params, grads, rho, grad_norms=None, *, context=None) -> None:
            pass

    group = {"params": [torch.zeros(2)], "rho": 0.1, "perturb": True}
    with pytest.raises(ValueError, match="keeps state of its own"):
        sharded.check_shardable(RuleBook(StatefulShardAware()), PerturbedGradient(), [group])
