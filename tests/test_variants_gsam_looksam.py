"""GSAM and LookSAM against independent float64 references of their updates, and their invariants.

Each reference is written from the paper's equations (GSAM: Zhuang et al. 2022, Algorithm 1; LookSAM: Liu et al.
2022, Algorithm 1) in plain per-tensor code on a hand-written two-layer network, with SGD momentum as the base
optimiser, and must match the library's step to 1e-10 over several steps (LookSAM's cheap steps included).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import SAM, SharpnessAwareStep
from flatminima.optim.rules import EveryKSteps, RuleContext
from flatminima.variants.gsam import GSAMDescent
from flatminima.variants.looksam import STATE_KEY, LookSAMDescent
from tests.conftest import quick_train_args, resumed_equals_straight

LR, MOMENTUM, RHO, STEPS = 0.1, 0.9, 0.05, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int, n: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _batches(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    return [_data(100 + k) for k in range(steps)]


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------- the reference: plain per-tensor code


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def _loss(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = _forward(w, x)
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_loss(leaves, x, y), leaves)]


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum(float((s * t).sum()) for s, t in zip(a, b))


def _norm(a: list[Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _sam_gradient(w: list[Tensor], g: list[Tensor], rho: float, x: Tensor, y: Tensor) -> list[Tensor]:
    """g_s = grad f(w + rho g / ||g||) (Foret et al. 2021, eq. 2)."""
    return _grad([t + rho * s / _norm(g) for t, s in zip(w, g)], x, y)


class _ReferenceSGD:
    """torch.optim.SGD's update with momentum (dampening 0, no Nesterov, no weight decay)."""

    def __init__(self, w: list[Tensor]) -> None:
        self.w, self.buf = [t.detach().clone() for t in w], None

    def step(self, d: list[Tensor], lr: float = LR) -> None:
        self.buf = [t.clone() for t in d] if self.buf is None else [MOMENTUM * b + t for b, t in zip(self.buf, d)]
        self.w = [w - lr * b for w, b in zip(self.w, self.buf)]


class _ReferenceAdamW:
    """The base step of torch.optim.AdamW on plain tensors, fed the reference direction as their gradient."""

    def __init__(self, w: list[Tensor]) -> None:
        self.leaves = [t.detach().clone().requires_grad_(True) for t in w]
        self.opt = torch.optim.AdamW(self.leaves, lr=1e-2, weight_decay=0.01)

    @property
    def w(self) -> list[Tensor]:
        return [t.detach().clone() for t in self.leaves]

    def step(self, d: list[Tensor]) -> None:
        for leaf, t in zip(self.leaves, d):
            leaf.grad = t.clone()
        self.opt.step()


def _gsam_direction(g: list[Tensor], gp: list[Tensor], alpha: float, minimize_perturbed: bool) -> list[Tensor]:
    """Algorithm 1, steps 3-4: g = g_par + g_perp w.r.t. g_p; direction g_p - alpha g_perp. big_vision's
    minimize_fp=False: g + alpha (g_p - its projection on g)."""
    if minimize_perturbed:
        g_perp = [a - (_dot(g, gp) / _dot(gp, gp)) * b for a, b in zip(g, gp)]
        return [b - alpha * c for b, c in zip(gp, g_perp)]
    gp_perp = [b - (_dot(g, gp) / _dot(g, g)) * a for a, b in zip(g, gp)]
    return [a + alpha * c for a, c in zip(g, gp_perp)]


def _looksam_reference(
    k: int, alpha: float, per_tensor: bool, steps: int = STEPS, base: type = _ReferenceSGD
) -> list[Tensor]:
    """LookSAM, Algorithm 1: at t mod k = 0 the SAM gradient g_s and g_v = g_s - ||g_s|| cos(theta) g / ||g||;
    otherwise g + alpha (||g|| / ||g_v||) g_v; per tensor (pytorch_optimizer's variant) when asked."""
    reference = base([p.detach() for p in _model().parameters()])
    gv: list[Tensor] = []
    for t, (x, y) in enumerate(_batches(steps)):
        w = reference.w
        g = _grad(w, x, y)
        if t % k == 0:
            gs = _sam_gradient(w, g, RHO, x, y)
            if per_tensor:
                cosines = [_dot([a], [b]) / (_norm([a]) * _norm([b])) for a, b in zip(g, gs)]
                gv = [b - _norm([b]) * c * a / _norm([a]) for a, b, c in zip(g, gs, cosines)]
            else:
                cosine = _dot(g, gs) / (_norm(g) * _norm(gs))
                gv = [b - _norm(gs) * cosine * a / _norm(g) for a, b in zip(g, gs)]
            reference.step(gs)
        elif per_tensor:
            reference.step([a + alpha * (_norm([a]) / _norm([v])) * v for a, v in zip(g, gv)])
        else:
            reference.step([a + alpha * (_norm(g) / _norm(gv)) * v for a, v in zip(g, gv)])
    return reference.w


# ---------------------------------------------------------------- helpers


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _sam(model: nn.Module, **options) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, **{"rho": RHO, **options}, lr=LR, momentum=MOMENTUM)


def _gsam(model: nn.Module, alpha: float = 0.3, minimize_perturbed: bool = True, **options) -> SAM:
    return _sam(model, descent=GSAMDescent(alpha, minimize_perturbed), **options)


def _looksam(model: nn.Module, k: int = 3, alpha: float = 0.7, per_tensor: bool = False, **options) -> SAM:
    return _sam(model, descent=LookSAMDescent(alpha, per_tensor=per_tensor), cadence=EveryKSteps(k), **options)


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    assert worst < atol, f"max |difference| {worst:.2e}"


def _assert_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def _train(make: Callable[[nn.Module], SAM], steps: int = STEPS, closure: bool = False) -> tuple[nn.Module, SAM]:
    model = _model()
    opt = make(model)
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches(steps):
        opt.step(_closure(model, x, y)) if closure else step(x, y)
    return model, opt


# ---------------------------------------------------------------- GSAM


@pytest.mark.parametrize(("alpha", "minimize_perturbed"), [(0.3, True), (1.0, True), (0.3, False)])
def test_gsam_matches_the_reference(alpha: float, minimize_perturbed: bool) -> None:
    model, _ = _train(lambda m: _gsam(m, alpha, minimize_perturbed=minimize_perturbed))
    reference = _ReferenceSGD(_weights(_model()))
    for x, y in _batches():
        w = reference.w
        g = _grad(w, x, y)
        reference.step(_gsam_direction(g, _sam_gradient(w, g, RHO, x, y), alpha, minimize_perturbed))
    _assert_close(_weights(model), reference.w)


def test_gsam_and_looksam_around_adamw_match_the_reference() -> None:
    """The paper's ViT setting (AdamW as the base): the direction goes through AdamW unchanged; LookSAM's g_v sits
    in the optimiser state beside AdamW's, which still initialises its own state on the first step."""

    def adamw(model: nn.Module, **options) -> SAM:
        return SAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-2, weight_decay=0.01, **options)

    model, _ = _train(lambda m: adamw(m, descent=GSAMDescent(0.4)))
    reference = _ReferenceAdamW(_weights(_model()))
    for x, y in _batches():
        w = reference.w
        g = _grad(w, x, y)
        reference.step(_gsam_direction(g, _sam_gradient(w, g, RHO, x, y), 0.4, True))
    _assert_close(_weights(model), reference.w)
    model, opt = _train(lambda m: adamw(m, descent=LookSAMDescent(0.7), cadence=EveryKSteps(3)))
    _assert_close(_weights(model), _looksam_reference(3, 0.7, False, base=_ReferenceAdamW))
    assert all({"step", "exp_avg", "exp_avg_sq"} == set(state) for state in opt.state.values())  # AdamW's own
    assert all(STATE_KEY in opt.rule_state[p] for p in opt.state)  # g_v in SAM's rule state


def test_gsam_with_rho_proportional_to_the_lr_matches_algorithm_1() -> None:
    """The whole of Algorithm 1: rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min)/(lr_max - lr_min) (step 0)
    through the shared lr-proportional rho schedule, with a learning rate falling linearly to lr_min = 0."""
    from flatminima.optim.rho_scheduler import lr_proportional_rho

    alpha, rho_min = 0.5, 0.01
    model = _model()
    opt = _gsam(model, alpha)
    lr_of = lambda t: 1.0 - t / STEPS  # noqa: E731
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_of)
    rho_scheduler = lr_proportional_rho(opt, lr_max=LR, lr_min=0.0, rho_min=rho_min)
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches():
        step(x, y)
        lr_scheduler.step()
        rho_scheduler.step()
    reference = _ReferenceSGD(_weights(_model()))
    for t, (x, y) in enumerate(_batches()):
        lr_t = LR * lr_of(t)
        rho_t = rho_min + (RHO - rho_min) * (lr_t - 0.0) / (LR - 0.0)
        w = reference.w
        g = _grad(w, x, y)
        reference.step(_gsam_direction(g, _sam_gradient(w, g, rho_t, x, y), alpha, True), lr=lr_t)
    _assert_close(_weights(model), reference.w)


@pytest.mark.parametrize("closure", [False, True])
def test_gsam_with_alpha_zero_is_sam_bit_for_bit(closure: bool) -> None:
    gsam, _ = _train(lambda m: _gsam(m, 0.0), closure=closure)
    sam, _ = _train(_sam, closure=closure)
    # same code path: with alpha = 0 the rule returns at once, leaving SAM's g(w + e) for the same base step
    _assert_equal(_weights(gsam), _weights(sam))


def test_gsam_direction_decomposes_the_gradient() -> None:
    """d = g_p - alpha g_perp: d - g_p is orthogonal to g_p (it is -alpha g_perp) and g - g_perp is parallel to it."""
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    gp = [torch.randn_like(t) for t in g]
    d = [t.clone() for t in gp]
    GSAMDescent(0.4).direction_([torch.zeros_like(t) for t in g], d, g, RuleContext([{}, {}]), ascended=True)
    g_perp = [(b - a) / 0.4 for a, b in zip(d, gp)]
    assert abs(_dot(g_perp, gp)) < 1e-12
    parallel = [a - b for a, b in zip(g, g_perp)]
    assert abs(abs(_dot(parallel, gp)) - _norm(parallel) * _norm(gp)) < 1e-12


def test_gsam_zero_gradients_are_exact() -> None:
    """No division by zero: g_p = 0 gives g_perp = g (direction -alpha g); g = 0 gives g_perp = 0 (direction g_p)."""
    g = [torch.tensor([3.0, -4.0], dtype=torch.float64)]
    zero = [torch.zeros(2, dtype=torch.float64)]
    d = [zero[0].clone()]
    GSAMDescent(0.5).direction_(zero, d, g, RuleContext([{}]), ascended=True)
    assert torch.equal(d[0], -0.5 * g[0])
    d = [g[0].clone()]
    GSAMDescent(0.5).direction_(zero, d, zero, RuleContext([{}]), ascended=True)
    assert torch.equal(d[0], g[0])
    d = [g[0].clone()]  # no ascent this step: a plain step along g(w)
    GSAMDescent(0.5).direction_(zero, d, None, RuleContext([{}]), ascended=False)
    assert torch.equal(d[0], g[0])


def test_gsam_bad_options() -> None:
    for alpha in (-0.1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="alpha"):
            GSAMDescent(alpha)


# ---------------------------------------------------------------- LookSAM


@pytest.mark.parametrize(("k", "alpha", "per_tensor"), [(3, 0.7, False), (2, 1.5, False), (3, 0.7, True)])
def test_looksam_matches_the_reference(k: int, alpha: float, per_tensor: bool) -> None:
    model, opt = _train(lambda m: _looksam(m, k, alpha, per_tensor))
    _assert_close(_weights(model), _looksam_reference(k, alpha, per_tensor))
    assert opt.steps == STEPS


def test_looksam_through_step_closure_matches_the_reference() -> None:
    model, _ = _train(lambda m: _looksam(m, 3, 0.7), closure=True)
    _assert_close(_weights(model), _looksam_reference(3, 0.7, False))


@pytest.mark.parametrize("alpha", [0.7, 5.0])
@pytest.mark.parametrize("closure", [False, True])
def test_looksam_with_k_one_is_sam_bit_for_bit(alpha: float, closure: bool) -> None:
    """k = 1: every step is the full SAM step (t mod 1 = 0), whatever alpha."""
    looksam, _ = _train(lambda m: _looksam(m, 1, alpha), closure=closure)
    sam, _ = _train(_sam, closure=closure)
    # same code path: with k = 1 every step stores g_v and leaves SAM's g(w + e) untouched for the same base step
    _assert_equal(_weights(looksam), _weights(sam))


def test_looksam_with_alpha_zero_is_periodic_sam_bit_for_bit() -> None:
    """alpha = 0: nothing added on the cheap steps, which are then plain steps along g (SAM-k, periodic SAM)."""
    looksam, _ = _train(lambda m: _looksam(m, 3, 0.0))
    periodic, _ = _train(lambda m: _sam(m, cadence=EveryKSteps(3)))
    # exact by construction: the ascent steps are SAM's (g_s untouched); a cheap step adds 0 * g_v = 0 to g
    _assert_equal(_weights(looksam), _weights(periodic))


def test_looksam_with_rho_zero_is_the_base_optimiser_bit_for_bit() -> None:
    """rho = 0: g_s = g, so g_v = 0 and the reused term adds nothing (no 0/0)."""
    looksam, opt = _train(lambda m: _looksam(m, 3, 0.7, rho=0.0))
    assert all(torch.equal(s[STATE_KEY], torch.zeros_like(s[STATE_KEY])) for s in opt.rule_state.values())
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        sgd.zero_grad()
        _per_example(model(x), y).mean().backward()  # the loss as the step computes it (times 16/16 = 1, exact)
        sgd.step()
    # same code path: rho = 0 moves no weight, g_v = 0 adds exactly 0 to g, and the same torch.optim.SGD steps
    _assert_equal(_weights(looksam), _weights(model))


@pytest.mark.parametrize("closure", [False, True])
def test_looksam_cheap_steps_take_one_pass_at_w(closure: bool) -> None:
    """Two passes on the ascent steps (t mod k = 0), one on the others, and those never see perturbed weights."""
    model = _model()
    opt = _looksam(model, k=3)
    passes: list[tuple[int, bool]] = []
    model.register_forward_pre_hook(lambda module, args: passes.append((opt.steps, opt.is_perturbed)))
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches(7):
        opt.step(_closure(model, x, y)) if closure else step(x, y)
    per_step = [sum(1 for t, _ in passes if t == s) for s in range(7)]
    assert per_step == [2, 1, 1, 2, 1, 1, 2]
    assert [t for t, perturbed in passes if perturbed] == [0, 3, 6]  # the second pass of the ascent steps only


def test_looksam_zero_norm_and_missing_gv_are_safe() -> None:
    rule = LookSAMDescent(0.7)
    g = [torch.tensor([3.0, -4.0], dtype=torch.float64)]
    d = [g[0].clone()]
    rule.direction_(g, d, None, RuleContext([{}]), ascended=False)  # before any ascent: a plain step along g
    assert torch.equal(d[0], g[0])
    state = {STATE_KEY: torch.zeros(2, dtype=torch.float64)}
    rule.direction_(g, d, None, RuleContext([state]), ascended=False)  # ||g_v|| = 0: nothing added
    assert torch.equal(d[0], g[0])
    zero = [torch.zeros(2, dtype=torch.float64)]
    gs = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    rule.direction_(g, [gs[0].clone()], zero, RuleContext([state]), ascended=True)  # g = 0 at the ascent: g_v = g_s
    assert torch.equal(state[STATE_KEY], gs[0])


def test_looksam_keeps_the_previous_gv_when_the_new_one_is_not_finite() -> None:
    """An overflowing ascent step (skipped by a GradScaler or nonfinite="skip") must not poison the cheap steps."""
    rule = LookSAMDescent(0.7)
    g = [torch.tensor([1.0, 0.0]), torch.tensor([0.5])]
    states = [{STATE_KEY: torch.tensor([0.0, 2.0])}, {}]
    rule.direction_(g, [torch.tensor([math.inf, 1.0]), torch.tensor([1.0])], g, RuleContext(states), ascended=True)
    assert torch.equal(states[0][STATE_KEY], torch.tensor([0.0, 2.0]))
    assert torch.equal(states[1][STATE_KEY], torch.tensor([0.0]))


def test_looksam_under_nonfinite_skip_keeps_gv_and_the_weights() -> None:
    model, opt = _train(lambda m: _looksam(m, 2, nonfinite="skip"), steps=2)
    saved = {id(p): s[STATE_KEY].clone() for p, s in opt.rule_state.items()}
    before = _weights(model)
    x, y = _data(5)
    x[0, 0] = math.nan  # a NaN loss at the ascent step 2
    SharpnessAwareStep(model, _per_example, opt)(x, y)
    _assert_equal(_weights(model), before)
    assert all(torch.equal(s[STATE_KEY], saved[id(p)]) for p, s in opt.rule_state.items())


def test_looksam_bad_options() -> None:
    for alpha in (-0.1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="alpha"):
            LookSAMDescent(alpha)
    with pytest.raises(ValueError, match="k >= 1"):
        EveryKSteps(0)


@pytest.mark.parametrize("variant", ["gsam", "looksam"])
def test_flat_buffers_give_the_same_steps(variant: str) -> None:
    """flatten=True (parameters and gradients as views of one buffer): the rules see views, the steps agree."""
    make = (lambda m, **o: _gsam(m, 0.3, **o)) if variant == "gsam" else (lambda m, **o: _looksam(m, 3, 0.7, **o))
    plain, _ = _train(make)
    flat, opt = _train(lambda m: make(m, flatten=True))
    assert opt.flat_layout is not None
    # different paths (one flat norm and add vs per-tensor foreach ops): float64, 8 steps of O(1) updates, each can
    # differ by a few ulp (2.2e-16) and grow a little through momentum (4e-16 seen); 1e-12 leaves room for that
    # and still catches a rule the flat path skipped, which shows at 3e-3
    _assert_close(_weights(flat), _weights(plain), atol=1e-12)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("layout", ["current", "legacy"])
@pytest.mark.parametrize("variant", ["gsam", "looksam"])
def test_state_dict_round_trip_continues_bit_for_bit(tmp_path: Path, variant: str, layout: str) -> None:
    """Train 3 steps, save, load into a fresh optimiser, continue: the same weights as the uninterrupted run. For
    LookSAM (k = 4) the 4th step is a cheap one, which needs the g_v of step 0 from the checkpoint. "legacy": the
    layout of checkpoints written before SAM kept rule state apart (g_v inside the base optimiser's state)."""
    make = (lambda m: _gsam(m, 0.3)) if variant == "gsam" else (lambda m: _looksam(m, 4, 0.7))
    straight, _ = _train(make, steps=7)
    model, opt = _train(make, steps=3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    if variant == "looksam":
        assert all(STATE_KEY in s for s in saved["optimizer"]["sam_rule_state"].values())
        assert not any(STATE_KEY in s for s in saved["optimizer"]["state"].values())
        if layout == "legacy":
            for index, kept in saved["optimizer"].pop("sam_rule_state").items():
                saved["optimizer"]["state"][index].update(kept)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    fresh = make(resumed)
    fresh.load_state_dict(saved["optimizer"])
    assert not any(STATE_KEY in s for s in fresh.state.values())  # moved out of the base optimiser's state
    step = SharpnessAwareStep(resumed, _per_example, fresh)
    for x, y in _batches(7)[3:]:
        step(x, y)
    # same code path: the resumed steps replay the same ops in the same order, from the same saved values
    _assert_equal(_weights(resumed), _weights(straight))
    if variant == "looksam":  # the control: without g_v the cheap step differs
        saved["optimizer"].pop("sam_rule_state", None)
        for s in saved["optimizer"]["state"].values():
            s.pop(STATE_KEY, None)
        lost = _model()
        lost.load_state_dict(saved["model"])
        opt_lost = make(lost)
        opt_lost.load_state_dict(saved["optimizer"])
        SharpnessAwareStep(lost, _per_example, opt_lost)(*_batches(4)[3])
        kept, _ = _train(make, steps=4)
        assert max((a - b).abs().max().item() for a, b in zip(_weights(lost), _weights(kept))) > 1e-6


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=128)


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "gsam", "--gsam-alpha", "0.05", "--rho-schedule", "lr", "--rho-min", "0.01"],
        ["--optimizer", "looksam", "--looksam-k", "3", "--looksam-alpha", "0.5"],
    ],
)
def test_each_trains_from_the_command_line(tmp_path: Path, extra: list[str]) -> None:
    import yaml

    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for flag, value in zip(extra[2::2], extra[3::2]):
        assert str(saved[flag[2:].replace("-", "_")]) == value


@pytest.mark.parametrize(
    "fields",
    [
        {"optimizer": "gsam", "gsam_alpha": 0.02, "rho_schedule": "lr", "rho_min": 0.02},
        {"optimizer": "looksam", "looksam_k": 2, "looksam_alpha": 0.9},
    ],
)
def test_each_trains_from_a_yaml_config(tmp_path: Path, fields: dict) -> None:
    import yaml

    from flatminima.cli import main

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(fields))
    assert main([*_cli(tmp_path), "--config", str(tmp_path / "config.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert all(saved[key] == value for key, value in fields.items())


def test_the_registered_builders_use_the_config_fields() -> None:
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_optimizer

    opt = build_optimizer(TrainConfig(optimizer="gsam", gsam_alpha=0.2, rho=0.03), _model())
    assert isinstance(opt, SAM) and isinstance(opt.descent, GSAMDescent) and opt.descent.alpha == 0.2
    assert opt.param_groups[0]["rho"] == 0.03
    opt = build_optimizer(TrainConfig(optimizer="looksam", looksam_k=4, looksam_alpha=0.3), _model())
    assert isinstance(opt.descent, LookSAMDescent) and opt.descent.alpha == 0.3 and opt.cadence.k == 4
    assert opt.descent.per_tensor is False  # the paper's global projection by default
    opt = build_optimizer(TrainConfig(optimizer="looksam", looksam_per_tensor=True), _model())
    assert opt.descent.per_tensor is True  # pytorch_optimizer's


def test_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("gsam", "looksam", "--gsam-alpha", "--looksam-k", "--looksam-alpha", "--looksam-per-tensor"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--optimizer", "gsam", "--gsam-alpha", "-1"], "gsam_alpha must be finite and >= 0"),
        (["--optimizer", "looksam", "--looksam-k", "0"], "looksam_k must be >= 1"),
        (["--optimizer", "looksam", "--looksam-alpha", "nan"], "looksam_alpha must be finite and >= 0"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["gsam", "looksam"])
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, optimizer: str) -> None:
    """Killed after the first epoch's checkpoint (10 steps: with k = 3 the resumed run starts on a cheap step, which
    needs g_v from the checkpoint), resumed: the same weights as a straight run, bit for bit."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer=optimizer, epochs=2, batch_size=128, threads=1, progress=False, lr=0.05,
                         looksam_k=3, gsam_alpha=0.1, rho_schedule="lr" if optimizer == "gsam" else "constant",
                         rho_min=0.01 if optimizer == "gsam" else 0.0)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


# ---------------------------------------------------------------- FSDP2 (fully_shard): GSAM's totals over shards


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp

    model, mesh = ddp_mlp(), init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=GSAMDescent(0.5))
    inputs, targets = ddp_data(4, 16)
    rows = slice(rank * 8, (rank + 1) * 8)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        opt.step(_closure(model, x, y))
    weights = {name: value.full_tensor().clone() for name, value in model.state_dict().items()}
    try:
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, descent=LookSAMDescent(), cadence=EveryKSteps(2))
        looksam = "no error"
    except ValueError as error:
        looksam = str(error)
    torch.save({"weights": weights, "looksam": looksam}, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_gsam_on_fsdp_shards_matches_one_unsharded_process(tmp_path: Path) -> None:
    """GSAM declares shard_aware: on 2 gloo ranks of fully_shard-ed float64 weights its dot products cover every
    rank's shard, so the run equals one process on the whole batch. LookSAM (g_v kept per local shard in the
    optimiser state) is refused there, clearly."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_fsdp_worker, tmp_path)
    model = ddp_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=GSAMDescent(0.5))
    for x, y in zip(*ddp_data(4, 16)):
        opt.step(_closure(model, x, y))
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-10, atol=1e-12)
        assert "not declared shard_aware" in result["looksam"]
