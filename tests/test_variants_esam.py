"""ESAM (Du et al., ICLR 2022) against an independent float64 reference of its step, and its invariants.

The reference is written from the paper's equations in plain per-tensor code on a hand-written two-layer network:
the mask from SplitMix64 run as a sequential generator, the norm over the kept tensors, the per-example losses at
``w`` and ``w + e``, the top-k selection by a Python sort, and torch.optim.SGD's update with momentum and weight
decay; it must match the library's step to 1e-10 over several steps.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatminima.variants.esam  # noqa: F401  (registers esam)
from flatminima import SAM, SharpnessAwareStep
from flatminima.optim.rules import RuleContext
from flatminima.variants.esam import (
    SharpnessSensitiveSelection,
    StochasticWeightPerturbation,
    esam,
    selected_count,
)
from tests.conftest import make_tiny_cnn, quick_train_args, resumed_equals_straight

LR, MOMENTUM, WD, RHO, N = 0.1, 0.9, 5e-4, 0.2, 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int, n: int = N) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    return [_data(100 + k) for k in range(steps)]


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    assert worst < atol, f"max |difference| {worst:.2e}"


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _esam(model: nn.Module, beta: float = 0.6, seed: int = 0, **options) -> SAM:
    settings = {"rho": RHO, "lr": LR, "momentum": MOMENTUM, "weight_decay": WD, **options}
    return esam(model.parameters(), torch.optim.SGD, beta=beta, seed=seed, **settings)


def _train(
    make: Callable[[nn.Module], SAM], batches: list[tuple[Tensor, Tensor]], gamma: float | None = None
) -> tuple[nn.Module, SAM, SharpnessSensitiveSelection | None]:
    """``make``'s optimiser through SharpnessAwareStep over ``batches``, with SDS when ``gamma`` is given."""
    model = _model()
    opt = make(model)
    rule = SharpnessSensitiveSelection(gamma) if gamma is not None else None
    step = SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)
    for x, y in batches:
        step(x, y)
    return model, opt, rule


# ---------------------------------------------------------------- the reference: plain per-tensor code


def _splitmix_uniforms(seed: int, count: int) -> list[float]:
    """The first ``count`` outputs of SplitMix64 started at ``seed`` (Steele, Lea, Flood 2014), run as the
    sequential generator it is, each as u in [0, 1) from its top 53 bits."""
    mask, state, out = 2**64 - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> 11) / 2.0**53)
    return out


def _masks(beta: float, seed: int, steps: int, tensors: int) -> list[list[bool]]:
    """m_j of step t: the (t * tensors + j)-th draw below beta."""
    u = _splitmix_uniforms(seed, steps * tensors)
    return [[u[t * tensors + j] < beta for j in range(tensors)] for t in range(steps)]


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def _losses(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = _forward(w, x)
    return torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_losses(leaves, x, y).mean(), leaves)]


class _ReferenceSGD:
    """torch.optim.SGD's update with momentum and weight decay (dampening 0, no Nesterov)."""

    def __init__(self, w: list[Tensor]) -> None:
        self.w, self.buf = [t.detach().clone() for t in w], None

    def step(self, d: list[Tensor]) -> None:
        d = [g + WD * w for g, w in zip(d, self.w)]
        self.buf = d if self.buf is None else [MOMENTUM * b + g for b, g in zip(self.buf, d)]
        self.w = [w - LR * b for w, b in zip(self.w, self.buf)]


def _reference(beta: float, gamma: float, seed: int, steps: int) -> tuple[list[Tensor], list[list[int]]]:
    """ESAM's step (the paper's SWP and SDS, the official code's norm over the kept tensors), and the examples each
    descent saw."""
    reference = _ReferenceSGD(_weights(_model()))
    masks = _masks(beta, seed, steps, 4)
    selections = []
    for t, (x, y) in enumerate(_batches(steps)):
        w = reference.w
        g = _grad(w, x, y)
        norm = math.sqrt(sum(float((gj * gj).sum()) for gj, m in zip(g, masks[t]) if m))
        e = [RHO * gj / (beta * norm) if m and norm > 0 else torch.zeros_like(gj) for gj, m in zip(g, masks[t])]
        perturbed = [a + b for a, b in zip(w, e)]
        rise = (_losses(perturbed, x, y) - _losses(w, x, y)).tolist()
        k = max(1, math.floor(gamma * len(rise)))
        if all(s == 0 for s in rise):  # nothing moved: the whole batch
            chosen = list(range(len(rise)))
        else:
            chosen = sorted(sorted(range(len(rise)), key=lambda i: -rise[i])[:k])
        selections.append(chosen)
        reference.step(_grad(perturbed, x[chosen], y[chosen]))
    return reference.w, selections


@pytest.mark.parametrize(
    ("beta", "gamma", "seed", "steps"),
    [
        (0.6, 0.5, 0, 4),  # masks 0110, 1110, 1010, 1101: a partial mask on every step
        (0.6, 0.25, 1, 5),  # masks 1001, 1001, 1010, 1111, 0000: an all-kept step, and a step with no tensor kept
    ],
)
def test_esam_matches_the_reference(beta: float, gamma: float, seed: int, steps: int) -> None:
    masks = _masks(beta, seed, steps, 4)
    assert any(not all(m) for m in masks)  # SWP drops something
    model, opt, rule = _train(lambda m: _esam(m, beta, seed), _batches(steps), gamma)
    weights, selections = _reference(beta, gamma, seed, steps)
    _assert_close(_weights(model), weights)
    assert opt.steps == steps
    last = selections[-1]
    if len(last) < N:
        assert rule.indices.tolist() == last
    else:  # the last step of the second case keeps no tensor: e = 0, every score 0, the whole batch
        assert rule.indices is None and not bool(rule.scores.any())


def test_the_reference_is_not_sam() -> None:
    """The control: each of SWP and SDS moves the weights well beyond the tolerance."""
    sam, _, _ = _train(lambda m: _esam(m, 1.0), _batches(4))
    swp, _, _ = _train(lambda m: _esam(m, 0.6), _batches(4))
    sds, _, _ = _train(lambda m: _esam(m, 1.0), _batches(4), gamma=0.5)
    for other in (swp, sds):
        assert max((a - b).abs().max().item() for a, b in zip(_weights(other), _weights(sam))) > 1e-4


# ---------------------------------------------------------------- the limits, bit for bit


def test_beta_one_gamma_one_is_sam_bit_for_bit() -> None:
    """beta = 1 declares SAM's linear coefficient, so SAM's own fused path runs; gamma = 1 returns the whole batch
    without an extra pass, and the batch-rule plan is SAM's (the pass at w takes the per-example losses' mean, as
    SAM's takes the mean times 16/16 = 1, exact). Same operations in the same order: bit for bit."""
    batches = _batches(4)

    def plain_sam(model: nn.Module) -> SAM:
        return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)

    sam, _, _ = _train(plain_sam, batches)
    ours, _, rule = _train(lambda m: _esam(m, 1.0), batches, gamma=1.0)
    assert _equal(_weights(ours), _weights(sam))
    assert rule.indices is None and rule.scores is None  # no scoring pass ran
    closure_runs = []
    for make in (plain_sam, lambda m: _esam(m, 1.0)):
        model = _model()
        opt = make(model)
        for x, y in batches:
            opt.step(_closure(model, x, y))
        closure_runs.append(_weights(model))
    assert _equal(*closure_runs)  # opt.step(closure): SWP alone at beta = 1, SAM's fused ascent


def test_rho_zero_is_the_base_optimiser_bit_for_bit() -> None:
    """rho = 0: no rule reads g(w), so SAM's plan is one pass, at w (the weights never move); SDS has no losses at w
    to compare and takes the whole batch: torch.optim.SGD's step, the same ops."""
    batches = _batches(4)
    model = _model()
    opt = _esam(model, 0.6, rho=0.0)
    rule = SharpnessSensitiveSelection(0.5)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(len(args[0])))
    step = SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)
    for x, y in batches:
        step(x, y)
    assert forwards == [N] * 4 and rule.indices is None
    ours = model
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches:
        sgd.zero_grad()
        _per_example(model(x), y).mean().backward()  # the loss as the step computes it (times 16/16 = 1, exact)
        sgd.step()
    assert _equal(_weights(ours), _weights(model))


def test_flat_buffers_give_the_same_steps() -> None:
    """flatten=True: beta < 1 takes the per-tensor path (the mask is no multiple of g), beta = 1 SAM's flat one."""
    for beta in (0.6, 1.0):
        plain, _, _ = _train(lambda m, beta=beta: _esam(m, beta), _batches(4), gamma=0.5)
        flat, opt, _ = _train(lambda m, beta=beta: _esam(m, beta, flatten=True), _batches(4), gamma=0.5)
        assert opt.flat_layout is not None
        # beta < 1: the same per-tensor ops; beta = 1: the flat norm and add against foreach ops, a few ulp apart
        _assert_close(_weights(flat), _weights(plain), atol=1e-12)


# ---------------------------------------------------------------- SWP: the mask and the perturbation


@pytest.mark.parametrize(("beta", "seed"), [(0.6, 0), (0.3, 7), (0.9, 2**40 + 5)])
def test_the_mask_is_a_pure_function_of_seed_and_step(beta: float, seed: int) -> None:
    rule = StochasticWeightPerturbation(beta, seed)
    count, steps = 5, 800
    expected = _masks(beta, seed, steps, count)
    assert [rule.kept(t, count) for t in range(steps)] == expected
    order = (799, 17, 0, 17)  # random access, in any order, repeatable
    assert [rule.kept(t, count) for t in order] == [expected[t] for t in order]
    assert abs(sum(map(sum, expected)) / (steps * count) - beta) < 0.03
    assert [StochasticWeightPerturbation(beta, seed + 1).kept(t, count) for t in range(40)] != expected[:40]
    assert StochasticWeightPerturbation(1.0, seed).kept(3, count) == [True] * count


def test_the_perturbation_is_on_the_kept_tensors_normalised_by_their_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    rule = StochasticWeightPerturbation(0.6, seed=0)
    keep = rule.kept(2, 4)
    assert keep == [True, False, True, False]
    e = [g.clone() for g in grads]
    rule.perturb_(grads, e, 0.3, context=RuleContext(step=2))
    norm = math.sqrt(sum(float((g * g).sum()) for g, k in zip(grads, keep) if k))
    for g, t, k in zip(grads, e, keep):
        torch.testing.assert_close(t, 0.3 * g / (0.6 * norm) if k else torch.zeros_like(g), rtol=0, atol=1e-15)
    assert abs(math.sqrt(sum(float((t * t).sum()) for t in e)) - 0.3 / 0.6) < 1e-14  # ||e|| = rho / beta
    with_norms = [g.clone() for g in grads]  # the norms SAM hands over give the same e
    rule.perturb_(grads, with_norms, 0.3, [g.norm() for g in grads], context=RuleContext(step=2))
    assert _equal(with_norms, e)


def test_no_tensor_kept_or_a_zero_gradient_gives_zero() -> None:
    rule = StochasticWeightPerturbation(0.6, seed=1)
    assert rule.kept(4, 4) == [False] * 4
    e = [torch.ones(3, dtype=torch.float64) for _ in range(4)]
    rule.perturb_(e, e, 0.3, context=RuleContext(step=4))
    assert all(torch.equal(t, torch.zeros(3, dtype=torch.float64)) for t in e)
    e = [torch.zeros(3, dtype=torch.float64) for _ in range(4)]
    rule.perturb_(e, e, 0.3, context=RuleContext(step=0))
    assert all(torch.equal(t, torch.zeros(3, dtype=torch.float64)) for t in e)  # 0, not NaN
    with pytest.raises(TypeError, match="context"):
        rule.perturb_(e, e, 0.3)


# ---------------------------------------------------------------- SDS: the selection


@pytest.mark.parametrize(
    ("gamma", "n", "k"), [(0.5, 16, 8), (0.25, 16, 4), (0.01, 16, 1), (1.0, 7, 7), (0.3, 10, 3), (0.5, 1, 1)]
)
def test_the_selection_count(gamma: float, n: int, k: int) -> None:
    assert selected_count(gamma, n) == k


def test_the_descent_sees_exactly_the_k_examples_whose_loss_rose_most() -> None:
    """Per step: the pass at w on the batch (with gradient), one forward without gradient on the batch at w + e,
    then the pass at w + e on exactly the k examples of largest l_i(w + e) - l_i(w), in batch order."""
    model = _model()
    opt = _esam(model, 1.0, rho=0.5)
    rule = SharpnessSensitiveSelection(0.25)
    seen: list[tuple[bool, bool, Tensor]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((torch.is_grad_enabled(), opt.is_perturbed, args[0])))
    step = SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)
    for x, y in _batches(3):
        w = _weights(model)
        g = _grad(w, x, y)
        norm = math.sqrt(sum(float((t * t).sum()) for t in g))
        rise = _losses([a + 0.5 * b / norm for a, b in zip(w, g)], x, y) - _losses(w, x, y)
        expected = sorted(torch.argsort(rise, descending=True)[:4].tolist())
        seen.clear()
        step(x, y)
        assert [(grad, moved, len(inputs)) for grad, moved, inputs in seen] == [
            (True, False, N),
            (False, True, N),
            (True, True, 4),
        ]
        assert torch.equal(seen[1][2], x) and torch.equal(seen[2][2], x[expected])
        assert rule.indices.tolist() == expected
        chosen = torch.zeros(N, dtype=torch.bool)
        chosen[expected] = True
        assert rule.scores[chosen].min() > rule.scores[~chosen].max()
        torch.testing.assert_close(rule.scores, rise, rtol=0, atol=1e-12)


def test_ties_go_to_the_earlier_example() -> None:
    class FixedProbe:
        params = ()

        def losses_at(self, offsets: list, start: int = 0, stop: int | None = None) -> Tensor:
            return torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0, 1.0])

    rule = SharpnessSensitiveSelection(0.5)
    x, y = torch.arange(6.0)[:, None], torch.arange(6)
    rule.ascent_weights(torch.zeros(6), FixedProbe())
    xs, ys = rule.descent_sample(x, y)
    assert ys.tolist() == [1, 2, 4] and rule.indices.tolist() == [1, 2, 4]  # the three 2.0s, none of the 1.0s
    assert torch.equal(xs, x[[1, 2, 4]])
    one = SharpnessSensitiveSelection(0.2)  # k = max(1, floor(1.2)) = 1: the first of the tied examples
    one.ascent_weights(torch.zeros(6), FixedProbe())
    assert one.descent_sample(x, y)[1].tolist() == [1]


def test_without_losses_at_w_the_descent_takes_the_whole_batch() -> None:
    """No pass at w this step (the plan skips it when no rule reads g(w)), or a new step begun: nothing to rank."""
    x, y = _data(0)
    rule = SharpnessSensitiveSelection(0.5)
    assert rule.descent_sample(x, y) is None and rule.indices is None
    rule.ascent_weights(torch.zeros(N, dtype=torch.float64), None)  # a step cut short after its pass at w ...
    assert rule.ascent_sample(x, y, 1) is None  # ... and the next step begins: its losses are not kept
    assert rule.descent_sample(x, y) is None


def test_batchnorm_statistics_are_updated_once_per_step_from_the_pass_at_w() -> None:
    """The scoring forward and the selected examples' pass leave the running statistics alone: one update per
    step, from the pass at w on the whole batch."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    model, reference = make_tiny_cnn(), make_tiny_cnn()
    rule = SharpnessSensitiveSelection(0.5)
    opt = esam(model.parameters(), torch.optim.SGD, beta=0.6, seed=0, rho=0.5, lr=0.1)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append((torch.is_grad_enabled(), len(args[0]))))
    SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)(x, y)
    assert forwards == [(True, 16), (False, 16), (True, 8)]
    assert rule.indices is not None and len(rule.indices) == 8
    reference.train()
    with torch.no_grad():
        reference(x)
    bn, expected = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=1e-14)
    assert int(bn.num_batches_tracked) == 1


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_bad_options_are_refused(value) -> None:
    with pytest.raises(ValueError, match=r"beta .* must be a number in \(0, 1\]"):
        StochasticWeightPerturbation(value)
    with pytest.raises(ValueError, match=r"gamma .* must be a number in \(0, 1\]"):
        SharpnessSensitiveSelection(value)


@pytest.mark.parametrize("seed", [-1, 1.5, None, True])
def test_a_bad_seed_is_refused(seed) -> None:
    with pytest.raises(ValueError, match="integer seed >= 0"):
        StochasticWeightPerturbation(0.6, seed)


def test_the_registered_builders_use_the_config_fields() -> None:
    from flatminima.optim.registry import optimizer_spec
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_batch_rule, build_optimizer, optimizer_request

    config = TrainConfig(optimizer="esam", esam_beta=0.3, esam_gamma=0.75, seed=5, rho=0.03)
    model = _model()
    request = optimizer_request(config, model)
    opt = build_optimizer(config, model, request)
    rule = opt.perturbation
    assert isinstance(rule, StochasticWeightPerturbation) and (rule.beta, rule.seed) == (0.3, 5)
    assert opt.param_groups[0]["rho"] == 0.03
    batch_rule = build_batch_rule(config, request)
    assert isinstance(batch_rule, SharpnessSensitiveSelection) and batch_rule.gamma == 0.75
    defaults = TrainConfig(optimizer="esam")
    assert (defaults.esam_beta, defaults.esam_gamma) == (0.6, 0.5)
    spec = optimizer_spec("esam")
    assert spec.sharpness_aware and spec.passes.startswith("1 + gamma")


# ---------------------------------------------------------------- checkpoints


def test_a_state_dict_round_trip_continues_bit_for_bit() -> None:
    """The masks read SAM's step counter, which state_dict saves: a resumed run draws the same masks."""
    batches = _batches(7)

    def make(model: nn.Module) -> SAM:
        return _esam(model, 0.6, seed=3)

    straight, _, _ = _train(make, batches, gamma=0.5)
    model, opt, _ = _train(make, batches[:3], gamma=0.5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)

    def resume(drop_counter: bool) -> list[Tensor]:
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert saved["optimizer"]["sam_steps"] == 3
        if drop_counter:
            del saved["optimizer"]["sam_steps"]
        resumed = _model()
        resumed.load_state_dict(saved["model"])
        fresh = make(resumed)
        fresh.load_state_dict(saved["optimizer"])
        step = SharpnessAwareStep(resumed, _per_example, fresh, batch_rule=SharpnessSensitiveSelection(0.5))
        for x, y in batches[3:]:
            step(x, y)
        return _weights(resumed)

    # same code path: the resumed steps replay the same ops in the same order, with the same masks
    assert _equal(resume(drop_counter=False), _weights(straight))
    # the control: restarting the counter at 0 redraws steps 0.. 's masks, and the weights differ
    assert max((a - b).abs().max().item() for a, b in zip(resume(drop_counter=True), _weights(straight))) > 1e-6


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=128)


def test_trains_from_the_command_line_and_a_yaml_config(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    extra = ["--optimizer", "esam", "--esam-beta", "0.5", "--esam-gamma", "0.25", "--seed", "2"]
    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["optimizer"], saved["esam_beta"], saved["esam_gamma"]) == ("esam", 0.5, 0.25)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"optimizer": "esam", "esam_gamma": 0.75}))
    assert main([*_cli(tmp_path), "--config", str(tmp_path / "config.yaml"), "--overwrite"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["esam_beta"], saved["esam_gamma"]) == (0.6, 0.75)


def test_the_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("esam", "--esam-beta", "--esam-gamma"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--esam-beta", "0"], r"esam_beta must be in \(0, 1\]"),
        (["--esam-beta", "1.5"], r"esam_beta must be in \(0, 1\]"),
        (["--esam-gamma", "0"], r"esam_gamma must be in \(0, 1\]"),
        (["--esam-gamma", "2"], r"esam_gamma must be in \(0, 1\]"),
        (["--esam-gamma", "nan"], r"esam_gamma must be in \(0, 1\]"),
    ],
)
def test_bad_options_are_refused_on_the_command_line(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, "--optimizer", "esam", *extra)) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_killed_run_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """Killed after the first epoch's checkpoint, resumed: the masks of the second epoch come from the saved step
    counter, so the weights equal a straight run's, bit for bit."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer="esam", epochs=2, batch_size=128, threads=1, progress=False, lr=0.05,
                         esam_beta=0.5, esam_gamma=0.5, seed=1)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


# ---------------------------------------------------------------- FSDP2 (fully_shard): the mask and norm over shards


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp

    model, mesh = ddp_mlp(), init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = esam(model.parameters(), torch.optim.SGD, beta=0.6, seed=0, rho=0.1, lr=0.1, momentum=0.9)
    inputs, targets = ddp_data(4, 16)
    rows = slice(rank * 8, (rank + 1) * 8)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        opt.step(_closure(model, x, y))
    weights = {name: value.full_tensor().clone() for name, value in model.state_dict().items()}
    torch.save(weights, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_swp_on_fsdp_shards_matches_one_unsharded_process(tmp_path: Path) -> None:
    """SWP declares shard_aware: on 2 gloo ranks of fully_shard-ed float64 weights every rank draws the same mask
    and the norm covers every rank's shard, so the run equals one process on the whole batch."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_fsdp_worker, tmp_path)
    model = ddp_mlp()
    opt = esam(model.parameters(), torch.optim.SGD, beta=0.6, seed=0, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in zip(*ddp_data(4, 16)):
        opt.step(_closure(model, x, y))
    assert any(not all(StochasticWeightPerturbation(0.6, 0).kept(t, 4)) for t in range(4))
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result[name], value, rtol=1e-10, atol=1e-12)
