"""Momentum-SAM and Friendly SAM against independent float64 references of their updates.

Each reference is written from the paper's equations (Becker et al. 2024, Algorithm 1; Li et al. 2024, the F-SAM
step) in plain per-tensor code on a hand-written two-layer network, and must match the library to 1e-10 over
several steps. The Momentum-SAM reference is the paper's own form, which keeps the weights at ``w~`` between steps;
the library moves to ``w + e`` and back each step: the match shows the two give the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import SAM, SharpnessAwareStep
from flatminima.variants.friendly_sam import STATE_KEY, FriendlyAscent
from flatminima.variants.momentum_sam import MomentumAscent
from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo
from tests.conftest import quick_train_args, resumed_equals_straight

LR, MOMENTUM, STEPS = 0.1, 0.9, 6
MSAM_RHO, FSAM_RHO = 0.5, 0.05


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(steps: int = STEPS, n: int = 16) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
            for _ in range(steps)]  # fmt: skip


# ---------------------------------------------------------------- the references: plain per-tensor code


def _loss(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_loss(leaves, x, y), leaves)]


def _norm(ts: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def _msam_reference(w0: list[Tensor], batches, rho: float) -> list[Tensor]:
    """Algorithm 1 of the paper as written: the weights stay at w~ between steps; v_0 = 0 (no perturbation)."""
    w_tilde, v = [t.clone() for t in w0], None
    w = w_tilde
    for x, y in batches:
        g = _grad(w_tilde, x, y)  # the only forward-backward, at w~_t
        w = w_tilde if v is None else [a + rho * b / _norm(v) for a, b in zip(w_tilde, v)]  # remove the perturbation
        v = g if v is None else [MOMENTUM * b + t for b, t in zip(v, g)]  # v_{t+1} = mu v_t + g_t
        w = [a - LR * b for a, b in zip(w, v)]  # w_{t+1} = w_t - eta v_{t+1}
        w_tilde = [a - rho * b / _norm(v) for a, b in zip(w, v)]  # w~_{t+1} = w_{t+1} - rho v_{t+1} / ||v_{t+1}||
    return w


def _fsam_reference(
    w0: list[Tensor], batches, rho: float, sigma: float, lmbda: float, subtract: str, start: str
) -> list[Tensor]:
    """m_t = lambda m_{t-1} + (1 - lambda) g_t, d_t = g_t - sigma m_t (or m_{t-1}), e = rho d / ||d||, then SGD."""
    w, buf, m = [t.clone() for t in w0], None, None
    for x, y in batches:
        g = _grad(w, x, y)
        if m is None and start == "gradient":
            m, d = g, g
        else:
            previous = m if m is not None else [torch.zeros_like(t) for t in g]
            m = [lmbda * a + (1 - lmbda) * b for a, b in zip(previous, g)]
            removed = m if subtract == "updated" else previous
            d = [a - sigma * b for a, b in zip(g, removed)]
        n = _norm(d)
        e = [rho * t / n if n > 0 else torch.zeros_like(t) for t in d]
        u = _grad([a + b for a, b in zip(w, e)], x, y)
        buf = u if buf is None else [MOMENTUM * b + t for b, t in zip(buf, u)]
        w = [a - LR * b for a, b in zip(w, buf)]
    return w


# ---------------------------------------------------------------- helpers


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert worst < atol, f"max |difference| {worst:.2e}"


def _closure(model: nn.Module, x: Tensor, y: Tensor, calls: list[int] | None = None) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        if calls is not None:
            calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _msam(model: nn.Module, rho: float = MSAM_RHO, **options) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM,
               perturbation=MomentumAscent(), **options)  # fmt: skip


def _fsam(model: nn.Module, rho: float = FSAM_RHO, rule: FriendlyAscent | None = None, **options) -> SAM:
    rule = rule if rule is not None else FriendlyAscent()
    return SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM, perturbation=rule, **options)


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------- Momentum-SAM


@pytest.mark.parametrize("driver", ["closure", "batch_step"])
def test_momentum_sam_matches_the_papers_algorithm(driver: str) -> None:
    model = _model()
    expected = _msam_reference(_weights(model), _batches(), MSAM_RHO)
    opt, calls = _msam(model), []
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches():
        if driver == "closure":
            opt.step(_closure(model, x, y, calls))
        else:
            step(x, y)
    _assert_close(_weights(model), expected)
    if driver == "closure":
        assert len(calls) == STEPS  # one forward-backward per step, at w + e
    sgd = _model()
    plain = torch.optim.SGD(sgd.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        plain.zero_grad()
        _closure(sgd, x, y)()
        plain.step()
    assert max((a - b).abs().max().item() for a, b in zip(_weights(model), _weights(sgd))) > 1e-4  # it perturbed


def test_momentum_sam_perturbs_along_the_update_direction() -> None:
    """At a step with a buffer v, the pass runs at w - rho v / ||v||: the way SGD moves, not up the gradient."""
    model = _model()
    opt = _msam(model)
    x, y = _batches(1)[0]
    opt.step(_closure(model, x, y))
    w = _weights(model)
    v = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    seen: list[list[Tensor]] = []

    def closure() -> Tensor:
        seen.append(_weights(model))
        return _closure(model, x, y)()

    opt.step(closure)
    assert len(seen) == 1
    _assert_close(seen[0], [a - MSAM_RHO * b / _norm(v) for a, b in zip(w, v)], atol=1e-14)


def test_momentum_sam_first_step_is_the_base_step() -> None:
    """No buffer yet: e = 0 and the step is SGD's, bit for bit."""
    model, sgd = _model(), _model()
    opt, plain = _msam(model), torch.optim.SGD(sgd.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = _batches(1)[0]
    opt.step(_closure(model, x, y))
    _closure(sgd, x, y)()
    plain.step()
    # exact by construction: e = 0 exactly, so the only pass runs at w + 0 = w and the same SGD step follows
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(sgd)))


def test_momentum_sam_with_adamw_perturbs_along_the_first_moment() -> None:
    """With AdamW the buffer is exp_avg (the official AdamW_MSAM): e = -rho m / ||m||, the base step torch's."""
    model, reference = _model(), _model()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=MSAM_RHO, lr=0.01, perturbation=MomentumAscent("exp_avg"))
    base = torch.optim.AdamW(reference.parameters(), lr=0.01)
    calls: list[int] = []
    for x, y in _batches():
        opt.step(_closure(model, x, y, calls))
        params = list(reference.parameters())
        m = [base.state[p]["exp_avg"] for p in params] if base.state else None
        e = [torch.zeros_like(p) for p in params] if m is None else [-MSAM_RHO * t / _norm(m) for t in m]
        g = _grad([p.detach() + t for p, t in zip(params, e)], x, y)
        for p, t in zip(params, g):
            p.grad = t
        base.step()
    _assert_close(_weights(model), _weights(reference))
    assert len(calls) == STEPS


def test_momentum_sam_needs_a_momentum_buffer() -> None:
    params = _model().parameters()
    with pytest.raises(ValueError, match="momentum 0"):
        MomentumAscent.for_optimizer(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="RMSprop"):
        MomentumAscent.for_optimizer(torch.optim.RMSprop(_model().parameters(), lr=0.1))
    assert MomentumAscent.for_optimizer(torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.5)).buffer == (
        "momentum_buffer"
    )
    assert MomentumAscent.for_optimizer(torch.optim.Adam(_model().parameters())).buffer == "exp_avg"
    with pytest.raises(TypeError, match="context="):
        MomentumAscent().perturb_([], [], 0.1)
    with pytest.raises(ValueError, match="buffer"):
        MomentumAscent("")


# ---------------------------------------------------------------- Friendly SAM

FSAM_CASES = [
    (1.0, 0.6, "updated", "gradient"),  # the defaults
    (0.5, 0.9, "updated", "gradient"),
    (0.5, 0.9, "previous", "gradient"),  # the official code's order
    (0.7, 0.8, "updated", "zero"),
    (1.0, 0.9, "previous", "zero"),
]


@pytest.mark.parametrize(("sigma", "lmbda", "subtract", "start"), FSAM_CASES)
def test_friendly_sam_matches_the_reference(sigma: float, lmbda: float, subtract: str, start: str) -> None:
    model = _model()
    expected = _fsam_reference(_weights(model), _batches(), FSAM_RHO, sigma, lmbda, subtract, start)
    opt = _fsam(model, rule=FriendlyAscent(sigma, lmbda, subtract=subtract, start=start))
    calls: list[int] = []
    for x, y in _batches():
        opt.step(_closure(model, x, y, calls))
    _assert_close(_weights(model), expected)
    assert len(calls) == 2 * STEPS


@pytest.mark.parametrize("flatten", [False, True])
def test_friendly_sam_through_the_batch_step_and_flat_buffers(flatten: bool) -> None:
    """The flat path (one buffer) is never taken for a rule that keeps state: the same step as the reference."""
    model = _model()
    expected = _fsam_reference(_weights(model), _batches(), FSAM_RHO, 1.0, 0.6, "updated", "gradient")
    step = SharpnessAwareStep(model, _per_example, _fsam(model, flatten=flatten))
    for x, y in _batches():
        step(x, y)
    _assert_close(_weights(model), expected)


def test_friendly_sam_with_sigma_one_removes_the_same_direction_in_both_orders() -> None:
    """g - m_t = lambda (g - m_{t-1}): the paper's order and the official code's give the same perturbation."""
    runs = []
    for subtract in ("updated", "previous"):
        model = _model()
        opt = _fsam(model, rule=FriendlyAscent(1.0, 0.9, subtract=subtract))
        for x, y in _batches():
            opt.step(_closure(model, x, y))
        runs.append(_weights(model))
    _assert_close(*runs, atol=1e-13)


def test_friendly_sam_with_a_zero_direction_is_the_base_optimiser() -> None:
    """lambda = 0, sigma = 1 from m = 0: m_t = g_t, so d = 0 and e = 0 (no NaN): SGD's steps, bit for bit."""
    model, sgd = _model(), _model()
    opt = _fsam(model, rule=FriendlyAscent(1.0, 0.0, start="zero"))
    plain = torch.optim.SGD(sgd.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in _batches():
        opt.step(_closure(model, x, y))
        plain.zero_grad()
        _closure(sgd, x, y)()
        plain.step()
    # exact by construction: lerp with weight 1 gives m = g exactly, so d = g - m = 0 and e = 0; the second pass
    # runs at w + 0 = w, giving SGD's gradient, and the same SGD step follows
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(sgd)))


def test_friendly_sam_keeps_its_mean_beside_adams_state() -> None:
    """Adam initialises a parameter's state when the dict is empty: the mean, written at the first ascent, is
    kept in SAM's rule state, out of its way, and the run matches a reference around torch's AdamW."""
    model, reference = _model(), _model()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=FSAM_RHO, lr=0.01, perturbation=FriendlyAscent(0.5, 0.9))
    base, m = torch.optim.AdamW(reference.parameters(), lr=0.01), None
    for x, y in _batches():
        opt.step(_closure(model, x, y))
        params = list(reference.parameters())
        g = _grad([p.detach() for p in params], x, y)
        if m is None:
            m, d = g, g
        else:
            m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
            d = [a - 0.5 * b for a, b in zip(g, m)]
        u = _grad([p.detach() + FSAM_RHO * t / _norm(d) for p, t in zip(params, d)], x, y)
        for p, t in zip(params, u):
            p.grad = t
        base.step()
    _assert_close(_weights(model), _weights(reference))
    first = next(model.parameters())
    assert set(opt.state[first]) == {"step", "exp_avg", "exp_avg_sq"} and STATE_KEY in opt.rule_state[first]


def test_friendly_sam_bad_options() -> None:
    for options, match in [
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("inf")), "sigma"),
        (dict(lmbda=1.5), "lmbda"),
        (dict(subtract="next"), "subtract"),
        (dict(start="ones"), "start"),
    ]:
        with pytest.raises(ValueError, match=match):
            FriendlyAscent(**options)
    with pytest.raises(TypeError, match="context="):
        FriendlyAscent().perturb_([], [], 0.1)


# ---------------------------------------------------------------- both: rho = 0, checkpoints


@pytest.mark.parametrize("variant", ["momentum", "friendly"])
def test_rho_zero_is_the_base_optimiser_bit_for_bit(variant: str) -> None:
    model, sgd = _model(), _model()
    opt = _msam(model, rho=0.0) if variant == "momentum" else _fsam(model, rho=0.0)
    plain = torch.optim.SGD(sgd.parameters(), lr=LR, momentum=MOMENTUM)
    calls: list[int] = []
    for x, y in _batches():
        opt.step(_closure(model, x, y, calls))
        plain.zero_grad()
        _closure(sgd, x, y)()
        plain.step()
    # same code path: rho = 0 takes no ascent, so each step is the same closure and the same SGD step
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(sgd)))
    assert len(calls) == STEPS  # no ascent, no extra pass


@pytest.mark.parametrize(
    ("variant", "base"), [("momentum", "sgd"), ("friendly", "sgd"), ("momentum", "adamw"), ("friendly", "adamw")]
)
def test_a_state_dict_saved_mid_run_resumes_bit_for_bit(tmp_path: Path, variant: str, base: str) -> None:
    def build(model: nn.Module) -> SAM:
        if base == "sgd":
            return _msam(model) if variant == "momentum" else _fsam(model, rule=FriendlyAscent(0.5, 0.9))
        rule = MomentumAscent("exp_avg") if variant == "momentum" else FriendlyAscent(0.5, 0.9)
        return SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01, perturbation=rule)

    batches = _batches()
    straight = _model()
    opt = build(straight)
    for x, y in batches:
        opt.step(_closure(straight, x, y))

    first = _model()
    opt = build(first)
    for x, y in batches[:3]:
        opt.step(_closure(first, x, y))
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "mid.pt")
    saved = torch.load(tmp_path / "mid.pt", weights_only=True)
    if variant == "friendly":
        assert all(STATE_KEY in state for state in saved["optimizer"]["sam_rule_state"].values())
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt = build(resumed)
    opt.load_state_dict(saved["optimizer"])
    for x, y in batches[3:]:
        opt.step(_closure(resumed, x, y))
    # same code path: the resumed steps replay the same ops in the same order, from the same saved values
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))


# ---------------------------------------------------------------- FSDP: Momentum-SAM is shard-aware


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, mesh = ddp_mlp(), init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, perturbation=MomentumAscent())
    inputs, targets = ddp_data(4, 16)
    rows = slice(rank * 8, (rank + 1) * 8)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        opt.step(_closure(model, x, y))
    try:
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, perturbation=FriendlyAscent())
        refused = "no error"
    except ValueError as error:
        refused = str(error)
    weights = {name: value.full_tensor().clone() for name, value in model.state_dict().items()}
    torch.save({"weights": weights, "refused": refused}, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_momentum_sam_on_fsdp_matches_one_unsharded_process(tmp_path: Path) -> None:
    run_on_gloo(_fsdp_worker, tmp_path)
    model = ddp_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, perturbation=MomentumAscent())
    for x, y in zip(*ddp_data(4, 16)):
        opt.step(_closure(model, x, y))
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-10, atol=1e-12)
        assert "not declared shard_aware" in result["refused"]


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=64)


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "momentum-sam", "--rho", "1.0"],
        ["--optimizer", "momentum-sam", "--base-optimizer", "adamw", "--lr", "0.002", "--rho", "0.5"],
        ["--optimizer", "friendly-sam", "--fsam-sigma", "0.8", "--fsam-lambda", "0.9", "--fsam-subtract", "previous"],
    ],
)
def test_each_variant_trains_from_the_command_line(tmp_path: Path, extra: list[str]) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]
    assert ("sam_rule_state" in saved) == ("friendly-sam" in extra)
    assert all(STATE_KEY in s for s in saved.get("sam_rule_state", {}).values())


def test_friendly_sam_options_from_a_yaml_file(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    config = {"optimizer": "friendly-sam", "fsam_sigma": 0.5, "fsam_lambda": 0.95, "fsam_subtract": "previous",
              "epochs": 1, "batch_size": 64, "threads": 1, "progress": False}  # fmt: skip
    config["output"] = str(tmp_path / "run")
    (tmp_path / "fsam.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "fsam.yaml")]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["fsam_sigma"], written["fsam_lambda"], written["fsam_subtract"]) == (0.5, 0.95, "previous")


def test_variant_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("momentum-sam", "friendly-sam", "--fsam-sigma", "--fsam-lambda", "--fsam-subtract"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--optimizer", "momentum-sam", "--momentum", "0"], "momentum 0.0"),
        (["--optimizer", "momentum-sam", "--group-size", "16"], "drop --group-size"),
        (["--optimizer", "friendly-sam", "--group-size", "16"], "drop --group-size"),
        (["--optimizer", "friendly-sam", "--fsam-lambda", "1.5"], "fsam_lambda must be in [0, 1]"),
        (["--optimizer", "friendly-sam", "--fsam-sigma", "-1"], "fsam_sigma must be finite and >= 0"),
    ],
)
def test_bad_variant_options_are_refused(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["momentum-sam", "friendly-sam"])
def test_a_killed_run_resumes_exactly(tmp_path: Path, monkeypatch, optimizer: str) -> None:
    """The momentum buffer and the gradient mean are in the checkpointed optimiser state: a run that dies after its
    first checkpoint resumes to the same weights, bit for bit."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer=optimizer, epochs=2, batch_size=128, threads=1, progress=False, lr=0.05, rho=0.5,
                         fsam_sigma=0.5, fsam_lambda=0.9)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


@pytest.mark.parametrize("rule", ["momentum", "friendly"])
def test_msam_groups_refuse_a_hand_built_stateful_or_gradient_free_rule(rule: str) -> None:
    """The builders refuse --group-size for these; a SAM built by hand is refused by the step itself, when built:
    Momentum-SAM reads no g(w) (the groups would have nothing to split), Friendly SAM's mean would advance per group."""
    model = _model()
    perturbation = MomentumAscent() if rule == "momentum" else FriendlyAscent()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, perturbation=perturbation)
    with pytest.raises(ValueError, match="group_size=None"):
        SharpnessAwareStep(model, _per_example, opt, group_size=4)
