"""WSAM against an independent float64 reference of its update, and its invariants.

The reference is written from the paper's equations (Yue et al. 2023, Algorithm 1: the base step along g, then
``w <- w - lr k (g~ - g)`` with ``k = gamma / (1 - gamma)``; and the objective's gradient ``g + k (g~ - g)`` through
the base optimiser when not decoupled) in plain per-tensor code on a hand-written two-layer network, and must match
the library's step to 1e-12 over several steps.
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
from flatminima.variants.wsam import WSAMDescent
from tests.conftest import quick_train_args, resumed_equals_straight

LR, MOMENTUM, RHO, STEPS = 0.1, 0.9, 0.05, 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(steps: int = STEPS, n: int = 16) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]  # fmt: skip


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------- the reference: plain per-tensor code


def _loss(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_loss(leaves, x, y), leaves)]


def _norm(a: list[Tensor]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in a))


def _clip(a: list[Tensor], max_norm: float | None) -> list[Tensor]:
    """torch.nn.utils.clip_grad_norm_'s rule, as the authors' code applies it to g and to g~."""
    if max_norm is None:
        return a
    return [t * min(1.0, max_norm / (_norm(a) + 1e-6)) for t in a]


class _ReferenceSGD:
    """torch.optim.SGD's update with momentum (dampening 0, no Nesterov, no weight decay) on plain tensors."""

    def __init__(self, w: list[Tensor], momentum: float = MOMENTUM) -> None:
        self.w, self.buf, self.momentum = [t.detach().clone() for t in w], None, momentum

    def step(self, d: list[Tensor]) -> None:
        self.buf = [t.clone() for t in d] if self.buf is None else [self.momentum * b + t for b, t in zip(self.buf, d)]
        self.w = [w - LR * b for w, b in zip(self.w, self.buf)]


class _ReferenceAdamW:
    """torch.optim.AdamW's step on plain tensors, fed the reference's gradient; ``w`` can be moved after it."""

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

    def move(self, delta: list[Tensor]) -> None:
        with torch.no_grad():
            for leaf, t in zip(self.leaves, delta):
                leaf.add_(t)


def _reference(
    gamma: float, decouple: bool, max_norm: float | None = None, base: str = "sgd", steps: int = STEPS
) -> list[Tensor]:
    """Algorithm 1: g = grad L(w), e = rho g / ||g||, g~ = grad L(w + e); decoupled: the base step along g, then
    w <- w - lr k (g~ - g); else the base step along g + k (g~ - g). k = gamma / (1 - gamma)."""
    k = gamma / (1 - gamma)
    reference = _ReferenceSGD(_weights(_model())) if base == "sgd" else _ReferenceAdamW(_weights(_model()))
    lr = LR if base == "sgd" else 1e-2
    for x, y in _batches(steps):
        w = reference.w
        g = _grad(w, x, y)
        g_tilde = _grad([t + RHO * s / _norm(g) for t, s in zip(w, g)], x, y)
        g, g_tilde = _clip(g, max_norm), _clip(g_tilde, max_norm)
        if decouple:
            reference.step(g)
            sharpness = [-lr * k * (b - a) for a, b in zip(g, g_tilde)]
            if base == "sgd":
                reference.w = [t + s for t, s in zip(reference.w, sharpness)]
            else:
                reference.move(sharpness)
        else:
            reference.step([a + k * (b - a) for a, b in zip(g, g_tilde)])
    return reference.w


# ---------------------------------------------------------------- helpers


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _wsam(model: nn.Module, gamma: float = 0.9, decouple: bool = True, max_norm: float | None = None, **options):
    momentum = options.pop("momentum", MOMENTUM)
    descent = WSAMDescent(gamma, decouple, max_norm)
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=momentum, descent=descent, **options)


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _train(
    make: Callable[[nn.Module], SAM], steps: int = STEPS, driver: str = "step", model: nn.Module | None = None
) -> tuple[nn.Module, SAM]:
    model = _model() if model is None else model
    opt = make(model)
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches(steps):
        if driver == "closure":
            opt.step(_closure(model, x, y))
        elif driver == "two-step":
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            step(x, y)
    return model, opt


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((s - t).abs().max().item() for s, t in zip(a, b, strict=True))


def _assert_equal(a: list[Tensor], b: list[Tensor]) -> None:
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


# ---------------------------------------------------------------- the update


@pytest.mark.parametrize(
    ("gamma", "decouple", "max_norm"),
    [(0.9, True, None), (0.7, True, None), (0.9, False, None), (0.3, False, None), (0.9, True, 0.5), (0.8, False, 0.5)],
)
@pytest.mark.parametrize("driver", ["step", "closure", "two-step"])
def test_matches_the_reference(gamma: float, decouple: bool, max_norm: float | None, driver: str) -> None:
    model, opt = _train(lambda m: _wsam(m, gamma, decouple, max_norm), driver=driver)
    # float64, 8 steps of O(0.1) updates: rounding alone leaves about 1e-16; a wrong term shows at 1e-4 or more
    assert _max_diff(_weights(model), _reference(gamma, decouple, max_norm)) < 1e-12
    assert opt.steps == STEPS


def test_the_clipping_acts_in_the_reference_run() -> None:
    """The clipped runs above test something: max_norm = 0.5 is below ||g|| and ||g~|| on these batches."""
    w = _weights(_model())
    x, y = _batches(1)[0]
    assert _norm(_grad(w, x, y)) > 0.5
    assert _max_diff(_reference(0.9, True, 0.5), _reference(0.9, True, None)) > 1e-4


@pytest.mark.parametrize("decouple", [True, False])
def test_around_adamw_matches_the_reference(decouple: bool) -> None:
    """Decoupled, the term is lr k (g~ - g) as it is, not divided by Adam's sqrt(v); AdamW sees g only."""

    def make(model: nn.Module) -> SAM:
        descent = WSAMDescent(0.9, decouple)
        return SAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-2, weight_decay=0.01, descent=descent)

    model, opt = _train(make)
    assert _max_diff(_weights(model), _reference(0.9, decouple, base="adamw")) < 1e-12
    assert all(set(state) == {"step", "exp_avg", "exp_avg_sq"} for state in opt.state.values())
    assert not any(opt.rule_state.values())  # nothing of WSAM's left between steps


def test_flat_buffers_give_the_same_steps() -> None:
    plain, _ = _train(_wsam)
    flat, opt = _train(lambda m: _wsam(m, flatten=True))
    assert opt.flat_layout is not None
    # different paths (flat views vs separate tensors): a few ulp per step at most; a skipped term shows at 1e-4
    assert _max_diff(_weights(flat), _weights(plain)) < 1e-12


def test_a_grad_scaler_takes_the_same_steps() -> None:
    """Under a GradScaler the base step runs from the scaler's callback (optimizer.step(BASE_STEP)): the decoupled
    move must run there too. A power-of-two scale unscales exactly, so the weights are the same bit for bit."""
    plain, _ = _train(_wsam)
    model = _model()
    opt = _wsam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step = SharpnessAwareStep(model, _per_example, opt, grad_scaler=scaler)
    for x, y in _batches():
        step(x, y)
    _assert_equal(_weights(model), _weights(plain))


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("driver", ["step", "closure", "two-step"])
def test_gamma_one_half_not_decoupled_is_sam_bit_for_bit(driver: str) -> None:
    wsam, _ = _train(lambda m: _wsam(m, 0.5, decouple=False), driver=driver)
    sam, _ = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM), driver=driver)
    # k = 0.5 / 0.5 = 1 exactly: the rule leaves g~ untouched for the same base step, SAM's code path
    _assert_equal(_weights(wsam), _weights(sam))


def test_gamma_one_half_decoupled_is_not_sam() -> None:
    """Decoupled, g goes through the momentum and g~ - g does not: a different update even at SAM's weight."""
    wsam, _ = _train(lambda m: _wsam(m, 0.5, decouple=True))
    sam, _ = _train(lambda m: _wsam(m, 0.5, decouple=False))
    assert _max_diff(_weights(wsam), _weights(sam)) > 1e-4


def test_without_momentum_decoupled_and_not_are_the_same_update() -> None:
    """Plain SGD: w - lr g - lr k (g~ - g) = w - lr (g + k (g~ - g)); equal to rounding, not bit for bit."""
    decoupled, _ = _train(lambda m: _wsam(m, 0.9, True, momentum=0.0))
    coupled, _ = _train(lambda m: _wsam(m, 0.9, False, momentum=0.0))
    assert _max_diff(_weights(decoupled), _weights(coupled)) < 1e-13


@pytest.mark.parametrize("decouple", [True, False])
def test_gamma_zero_is_the_base_optimiser_bit_for_bit_in_one_pass(decouple: bool) -> None:
    model = _model()
    opt = _wsam(model, 0.0, decouple)
    passes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: passes.append(opt.is_perturbed))
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches():
        step(x, y)
    assert passes == [False] * STEPS  # the ascent declined: one pass at w per step
    base = _model()
    sgd = torch.optim.SGD(base.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        sgd.zero_grad()
        _per_example(base(x), y).mean().backward()
        sgd.step()
    # the same torch.optim.SGD steps on the same g(w): a declined ascent is the plain step
    _assert_equal(_weights(model), _weights(base))


def test_rho_zero_decoupled_is_the_base_optimiser_bit_for_bit() -> None:
    """rho = 0: g~ = g, so the decoupled term is lr k 0 = 0 and the base optimiser steps along g itself."""
    wsam, _ = _train(
        lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.0, lr=LR, momentum=MOMENTUM, descent=WSAMDescent(0.9))
    )
    base = _model()
    sgd = torch.optim.SGD(base.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        sgd.zero_grad()
        _per_example(base(x), y).mean().backward()
        sgd.step()
    _assert_equal(_weights(wsam), _weights(base))


def test_the_direction_and_the_kept_difference() -> None:
    """On given g and g~: decoupled, .grad becomes g and the move after the base step is -lr k (g~ - g)."""
    g = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    gp = [torch.tensor([3.0, 0.5], dtype=torch.float64)]
    w = [torch.tensor([0.25, 0.75], dtype=torch.float64)]
    from flatminima.optim.rules import RuleContext

    rule = WSAMDescent(0.75)  # k = 3
    d = [gp[0].clone()]
    rule.direction_(w, d, g, RuleContext([{}], [{}], [0.5]), ascended=True)
    assert torch.equal(d[0], g[0])
    rule.after_base_step_(w, RuleContext([{}], [{}], [0.5]))
    assert torch.equal(w[0], torch.tensor([0.25 - 0.5 * 3 * 2.0, 0.75 - 0.5 * 3 * 2.5], dtype=torch.float64))
    rule.after_base_step_(w, RuleContext([{}], [{}], [0.5]))  # consumed: a second call moves nothing
    assert torch.equal(w[0], torch.tensor([-2.75, -3.0], dtype=torch.float64))
    d = [gp[0].clone()]
    WSAMDescent(0.75, decouple=False).direction_(w, d, g, RuleContext([{}]), ascended=True)
    assert torch.equal(d[0], torch.tensor([1.0 + 3 * 2.0, -2.0 + 3 * 2.5], dtype=torch.float64))
    d = [g[0].clone()]  # no ascent this step: a plain step along g(w), no move after it
    rule.direction_(w, d, None, RuleContext([{}]), ascended=False)
    assert torch.equal(d[0], g[0]) and rule._sharpness is None


@pytest.mark.parametrize("decouple", [True, False])
def test_a_non_finite_perturbed_gradient_is_caught(decouple: bool) -> None:
    """g~ = NaN with g finite: the guard sees it in .grad (decoupled too), skips the step, no decoupled move."""
    model, opt = _train(lambda m: _wsam(m, decouple=decouple, nonfinite="skip"), steps=2)
    before = _weights(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    calls = [0]

    def closure() -> Tensor:
        calls[0] += 1
        loss = F.cross_entropy(model(x), y) * (math.nan if calls[0] == 2 else 1.0)
        loss.backward()
        return loss

    opt.step(closure)
    assert calls[0] == 2
    _assert_equal(_weights(model), before)
    _assert_equal([opt.state[p]["momentum_buffer"] for p in model.parameters()], momentum)


def test_a_non_finite_perturbed_gradient_raises_by_default() -> None:
    model = _model()
    opt = _wsam(model)
    x, y = _batches(1)[0]
    calls = [0]

    def closure() -> Tensor:
        calls[0] += 1
        loss = F.cross_entropy(model(x), y) * (math.inf if calls[0] == 2 else 1.0)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="w \\+ e"):
        opt.step(closure)


def test_bad_options() -> None:
    for gamma in (1.0, 1.5, -0.1, math.nan, math.inf, True, "0.9", None):
        with pytest.raises(ValueError, match=r"gamma .* must be a number in \[0, 1\)"):
            WSAMDescent(gamma)  # type: ignore[arg-type]
    for max_norm in (0.0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match=r"max_norm .* must be a finite number > 0 or None"):
            WSAMDescent(0.9, max_norm=max_norm)  # type: ignore[arg-type]


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("decouple", [True, False])
def test_state_dict_round_trip_continues_bit_for_bit(tmp_path: Path, decouple: bool) -> None:
    """Train 3 steps, save, load (weights_only=True) into a fresh optimiser, continue: the straight run's weights."""
    make = lambda m: _wsam(m, 0.85, decouple)  # noqa: E731
    straight, _ = _train(make, steps=7)
    model, opt = _train(make, steps=3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "sam_rule_state" not in saved["optimizer"]  # WSAM keeps nothing between steps
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    fresh = make(resumed)
    fresh.load_state_dict(saved["optimizer"])
    step = SharpnessAwareStep(resumed, _per_example, fresh)
    for x, y in _batches(7)[3:]:
        step(x, y)
    # the same ops in the same order from the same saved values (momentum buffers and weights)
    _assert_equal(_weights(resumed), _weights(straight))


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=128)


def test_trains_from_the_command_line(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    extra = ["--optimizer", "wsam", "--wsam-gamma", "0.8", "--no-wsam-decouple", "--wsam-max-norm", "2.0"]
    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optimizer"] == "wsam" and saved["wsam_gamma"] == 0.8
    assert saved["wsam_decouple"] is False and saved["wsam_max_norm"] == 2.0


def test_trains_from_a_yaml_config(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    fields = {"optimizer": "wsam", "wsam_gamma": 0.95}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(fields))
    assert main([*_cli(tmp_path), "--config", str(tmp_path / "config.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["wsam_gamma"] == 0.95 and saved["wsam_decouple"] is True


def test_the_registered_builder_uses_the_config_fields() -> None:
    from flatminima.optim.registry import optimizer_spec
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_optimizer

    opt = build_optimizer(TrainConfig(optimizer="wsam", rho=0.03), _model())
    assert isinstance(opt, SAM) and isinstance(opt.descent, WSAMDescent)
    assert (opt.descent.gamma, opt.descent.decouple, opt.descent.max_norm) == (0.9, True, None)  # the paper's form
    assert opt.param_groups[0]["rho"] == 0.03
    config = TrainConfig(optimizer="wsam", wsam_gamma=0.6, wsam_decouple=False, wsam_max_norm=1.0)
    opt = build_optimizer(config, _model())
    assert (opt.descent.gamma, opt.descent.decouple, opt.descent.max_norm) == (0.6, False, 1.0)
    assert optimizer_spec("wsam").passes.startswith("2") and optimizer_spec("wsam").sharpness_aware


def test_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("wsam", "--wsam-gamma", "--wsam-decouple", "--no-wsam-decouple", "--wsam-max-norm"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--wsam-gamma", "1"], "wsam_gamma must be in [0, 1)"),
        (["--wsam-gamma", "-0.5"], "wsam_gamma must be in [0, 1)"),
        (["--wsam-max-norm", "-1"], "wsam_max_norm must be finite and >= 0"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, "--optimizer", "wsam", *extra)) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("decouple", [True, False])
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, decouple: bool) -> None:
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer="wsam", epochs=2, batch_size=128, threads=1, progress=False, lr=0.05,
                         wsam_gamma=0.9, wsam_decouple=decouple)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


# ---------------------------------------------------------------- DDP: every rank takes one process's step


def _ddp_worker(rank: int, out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tests._gloo import ddp_data, ddp_mlp

    ddp = DistributedDataParallel(ddp_mlp())
    opt = SAM(ddp.module.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=WSAMDescent(0.9))
    step = SharpnessAwareStep(ddp, _per_example, opt)
    inputs, targets = ddp_data(4, 16)
    rows = slice(rank * 8, (rank + 1) * 8)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        step(x, y)
    torch.save([p.detach().clone() for p in ddp.module.parameters()], out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_under_ddp_the_ranks_take_one_process_step_on_the_global_batch(tmp_path: Path) -> None:
    """The rule reads g(w), so the batch step all-reduces both passes: the decoupled move is the same on every
    rank, and equal to one process's on the whole batch."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_ddp_worker, tmp_path)
    model = ddp_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=WSAMDescent(0.9))
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in zip(*ddp_data(4, 16)):
        step(x, y)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    _assert_equal(ranks[0], ranks[1])
    assert _max_diff(ranks[0], _weights(model)) < 1e-12  # all-reduced means: sums in another order


# ---------------------------------------------------------------- FSDP2 (fully_shard): the move on local shards


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp

    model, mesh = ddp_mlp(), init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=WSAMDescent(0.9, max_norm=0.3)
    )
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
def test_on_fsdp_shards_matches_one_unsharded_process(tmp_path: Path) -> None:
    """WSAMDescent declares shard_aware: on 2 gloo ranks of fully_shard-ed float64 weights the decoupled move runs on
    each rank's shard after the base step and the clipping norm covers every shard, so the run equals one process
    on the whole batch."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_fsdp_worker, tmp_path)
    model = ddp_mlp()
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, descent=WSAMDescent(0.9, max_norm=0.3)
    )
    for x, y in zip(*ddp_data(4, 16)):
        opt.step(_closure(model, x, y))
    unclipped = ddp_mlp()
    F.cross_entropy(unclipped(ddp_data(4, 16)[0][0]), ddp_data(4, 16)[1][0]).backward()
    assert _norm([p.grad for p in unclipped.parameters()]) > 0.3  # the clipping acts
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result[name], value, rtol=1e-10, atol=1e-12)
