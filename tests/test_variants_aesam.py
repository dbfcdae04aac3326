"""AE-SAM (Jiang et al., ICLR 2023, Algorithm 1): its update against an independent float64 reference, its limits (SAM
and the base optimiser, bit for bit), its statistics through checkpoints, its options, and the seam it uses (a
descent rule's ``declines_ascent`` handed the rule context, rules written without it unchanged)."""

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

import flatminima.variants.aesam as aesam_module  # registers aesam
from flatminima import SAM, SharpnessAwareStep
from flatminima.optim.rules import DescentRule, RuleContext, takes_context
from flatminima.variants.aesam import STATE_KEYS, AdaptivePolicy, aesam, policy_statistics
from tests.conftest import quick_train_args, resumed_equals_straight

LR, MOMENTUM, WD, RHO, STEPS = 0.1, 0.9, 5e-4, 0.05, 8
TOTAL = 16  # T of the reference runs: c_t goes from 1 to -1/8 over the 8 steps, which take both branches


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _data(seed: int, n: int = 16, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _batches(count: int = STEPS, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    return [_data(100 + k, dtype=dtype) for k in range(count)]


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _options(**changes) -> dict:
    return dict(rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD) | changes


def _aesam(model: nn.Module, total: int = TOTAL, **policy) -> SAM:
    return aesam(model.parameters(), torch.optim.SGD, total, **policy, **_options())


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _two_step(model: nn.Module, opt: SAM, x: Tensor, y: Tensor) -> None:
    """davda54's pattern: backward at w, first_step (False when declined), backward at w + e if it moved."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if opt.first_step(zero_grad=True):
        F.cross_entropy(model(x), y).backward()
    else:
        assert opt.ascent_declined  # .grad still holds g(w): a plain step along it
    opt.second_step(zero_grad=True)


def _train(
    make: Callable[[nn.Module], SAM], driver: str = "closure", batches=None, model: nn.Module | None = None
) -> tuple[nn.Module, SAM, list[int]]:
    """The model and optimiser after the batches under ``driver``, and the forward passes of each step."""
    model = model if model is not None else _model()
    opt = make(model)
    passes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: passes.append(opt.steps))
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in batches if batches is not None else _batches():
        if driver == "closure":
            opt.step(_closure(model, x, y))
        elif driver == "two-step":
            _two_step(model, opt, x, y)
        else:
            step(x, y)
    return model, opt, [passes.count(t) for t in range(opt.steps)]


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    """Bit for bit: only for runs that take the same code path, which no CPU can make differ."""
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    assert worst < atol, f"max |difference| {worst:.2e}"


# ---------------------------------------------------------------- the reference: plain per-tensor code


# the per-tensor forward, loss and gradient of the GSAM and LookSAM references (tests/ is on sys.path)
from test_variants_gsam_looksam import _grad  # noqa: E402


def _reference(
    total: int = TOTAL, delta: float = 0.9, lambda1: float = -1.0, lambda2: float = 1.0, steps: int = STEPS
) -> tuple[list[Tensor], list[bool], float, float, float]:
    """Algorithm 1 in float64 from its equations: s_t = ||g||^2 (a sum of squares over every entry), mu and sigma2
    updated first, then SAM's direction g(w + rho g/||g||) if s_t >= mu_t + c_t sigma_t, else g, then SGD with
    momentum and L2 weight decay (as torch.optim.SGD). Returns the weights, the decisions, mu, sigma2, and the
    smallest |s_t - threshold| / s_t (how far every decision was from the edge)."""
    w = _weights(_model())
    buf: list[Tensor] | None = None
    mu = sigma2 = 0.0
    decisions, margin = [], math.inf
    for t, (x, y) in enumerate(_batches(steps)):
        g = _grad(w, x, y)
        s = sum(float((a * a).sum()) for a in g)
        mu = delta * mu + (1 - delta) * s
        sigma2 = delta * sigma2 + (1 - delta) * (s - mu) ** 2
        c = t / total * lambda1 + (1 - t / total) * lambda2 if t < total else lambda1
        threshold = mu + c * math.sqrt(sigma2)
        margin = min(margin, abs(s - threshold) / s)
        decisions.append(s >= threshold)
        if decisions[-1]:
            norm = math.sqrt(s)
            g = _grad([a + RHO * b / norm for a, b in zip(w, g)], x, y)
        d = [a + WD * b for a, b in zip(g, w)]
        buf = [a.clone() for a in d] if buf is None else [MOMENTUM * b + a for b, a in zip(buf, d)]
        w = [a - LR * b for a, b in zip(w, buf)]
    return w, decisions, mu, sigma2, margin


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("driver", ["closure", "sharpness-aware-step", "two-step"])
@pytest.mark.parametrize(("total", "delta"), [(TOTAL, 0.9), (STEPS, 0.5)])
def test_matches_the_reference(driver: str, total: int, delta: float) -> None:
    weights, decisions, mu, sigma2, margin = _reference(total, delta)
    assert 0 < sum(decisions) < STEPS  # both branches taken
    assert margin > 1e-6  # no decision on the edge, where rounding could flip it
    model, opt, passes = _train(lambda m: _aesam(m, total, delta=delta), driver)
    _assert_close(_weights(model), weights)
    stats = policy_statistics(opt)
    assert (stats.sam_steps, stats.plain_steps) == (sum(decisions), STEPS - sum(decisions))
    assert stats.sam_fraction == sum(decisions) / STEPS
    assert math.isclose(stats.mu, mu, rel_tol=1e-12) and math.isclose(stats.sigma2, sigma2, rel_tol=1e-12)
    assert passes == [2 if ascended else 1 for ascended in decisions]  # a declined step is one pass at w


def test_the_threshold_schedule() -> None:
    policy = AdaptivePolicy(10, lambda1=-1.0, lambda2=2.0)
    assert [policy.threshold(t) for t in (0, 5, 10, 11, 1000)] == [2.0, 0.5, -1.0, -1.0, -1.0]
    assert AdaptivePolicy(4, lambda1=0.5, lambda2=0.5).threshold(2) == 0.5


def test_the_first_step_ascends_and_stores_its_statistics() -> None:
    """t = 0: mu_0 = (1 - delta) s_0 and sigma2_0 = (1 - delta) (delta s_0)^2, which include s_0 (Algorithm 1)."""
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64)]  # s_0 = 25
    states = [{}]
    assert not AdaptivePolicy(10).declines_ascent(g, context=RuleContext(states, step=0))
    mu = (1 - 0.9) * 25.0  # the equations in Python floats, the same operations: equal bit for bit
    assert states[0] == {"aesam_mu": mu, "aesam_sigma2": (1 - 0.9) * (25.0 - mu) ** 2, "aesam_sam_steps": 1,
                         "aesam_plain_steps": 0}  # fmt: skip
    assert math.isclose(mu, 2.5) and math.isclose(states[0]["aesam_sigma2"], 0.1 * 22.5**2)
    assert set(states[0]) == set(STATE_KEYS)
    # lambda2 above 1 / sqrt(1 - delta) = 3.16: even the first step is declined
    assert AdaptivePolicy(10, lambda1=3.2, lambda2=3.2).declines_ascent(g, context=RuleContext([{}], step=0))


# ---------------------------------------------------------------- the limits, bit for bit


@pytest.mark.parametrize("driver", ["closure", "sharpness-aware-step"])
def test_very_negative_lambdas_ascend_every_step_as_sam(driver: str) -> None:
    model, opt, passes = _train(lambda m: _aesam(m, lambda1=-1e9, lambda2=-1e9), driver)
    sam, _, sam_passes = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, **_options()), driver)
    # same code path: every step ascends and SAM's g(w + e) goes untouched to the same base step
    assert _equal(_weights(model), _weights(sam))
    assert passes == sam_passes == [2] * STEPS
    assert policy_statistics(opt).sam_steps == STEPS and policy_statistics(opt).plain_steps == 0


@pytest.mark.parametrize("driver", ["closure", "two-step"])
def test_very_large_lambdas_never_ascend_as_sgd(driver: str) -> None:
    model, opt, passes = _train(lambda m: _aesam(m, lambda1=1e9, lambda2=1e9), driver)
    sgd = _model()
    base = torch.optim.SGD(sgd.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in _batches():
        base.zero_grad()
        F.cross_entropy(sgd(x), y).backward()
        base.step()
    # same code path: one pass at w, the same loss and backward, and torch.optim.SGD's step on .grad
    assert _equal(_weights(model), _weights(sgd))
    assert passes == [1] * STEPS  # never a second pass
    assert policy_statistics(opt).plain_steps == STEPS and policy_statistics(opt).sam_steps == 0


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_state_dict_saved_mid_run_resumes_bit_for_bit(dtype: torch.dtype) -> None:
    """Saved after 3 steps and loaded with torch.load(weights_only=True) into a fresh optimiser: the remaining steps
    take the same decisions and end on the same weights and statistics. The statistics are kept as Python floats,
    so a float32 model does not round them to float32 on load (SAM loads a rule-state tensor in its parameter's
    dtype)."""
    make = lambda m: _aesam(m, total=STEPS)  # noqa: E731
    batches = _batches(dtype=dtype)
    straight, straight_opt, _ = _train(make, batches=batches, model=_model(dtype))
    model, opt, _ = _train(make, batches=batches[:3], model=_model(dtype))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    kept = next(iter(saved["optimizer"]["sam_rule_state"].values()))
    assert set(kept) == set(STATE_KEYS) and isinstance(kept["aesam_mu"], float)
    assert saved["optimizer"]["sam_steps"] == 3
    resumed = _model(dtype)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # the load must overwrite everything
    fresh = make(resumed)
    resumed.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["optimizer"])
    assert policy_statistics(fresh) == policy_statistics(opt)
    for x, y in batches[3:]:
        fresh.step(_closure(resumed, x, y))
    # same code path: the resumed steps replay the same ops in the same order, from the same saved values
    assert _equal(_weights(resumed), _weights(straight))
    assert policy_statistics(fresh) == policy_statistics(straight_opt)
    assert 0 < policy_statistics(fresh).plain_steps < STEPS
    saved["optimizer"].pop("sam_rule_state")  # the control: without the statistics the policy starts afresh
    lost = make(_model(dtype))
    lost.load_state_dict(saved["optimizer"])
    assert policy_statistics(lost).mu == 0.0 and policy_statistics(lost).sam_steps == 0


def test_a_killed_run_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """Killed after the first epoch's checkpoint and resumed: the same weights as a straight run, bit for bit (the
    statistics, counts and step counter come back from the checkpoint). With delta 0.5 the 20 steps on digits take
    both branches (13 SAM steps, 7 plain)."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer="aesam", epochs=2, batch_size=128, threads=1, progress=False, lr=0.05, seed=1,
                         aesam_delta=0.5)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["optimizer"]
    kept = next(iter(saved["sam_rule_state"].values()))
    assert saved["sam_steps"] == 20 and kept["aesam_sam_steps"] + kept["aesam_plain_steps"] == 20
    assert 0 < kept["aesam_plain_steps"] < 20


# ---------------------------------------------------------------- the seam: declines_ascent with its context


class _Counting(DescentRule):
    """A rule written before the context existed: declines_ascent(first_grads) alone."""

    needs_first_gradient = True

    def __init__(self) -> None:
        self.calls = 0

    def declines_ascent(self, first_grads: list[Tensor]) -> bool:
        self.calls += 1
        return self.calls % 2 == 0


class _Keyword(DescentRule):
    """A rule that takes **options: it is handed the context too."""

    needs_first_gradient = True

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def declines_ascent(self, first_grads: list[Tensor], **options) -> bool:
        self.seen.append((options["context"].step, len(options["context"].states)))
        return False


def test_rules_written_without_the_context_still_decline() -> None:
    assert not takes_context(_Counting(), "declines_ascent") and takes_context(_Keyword(), "declines_ascent")
    assert takes_context(AdaptivePolicy(3), "declines_ascent") and not takes_context(AdaptivePolicy(3))
    old = _Counting()
    _, _, passes = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, descent=old, **_options()))
    assert old.calls == STEPS and passes == [2, 1] * (STEPS // 2)  # every other ascent declined
    new = _Keyword()
    _train(lambda m: SAM(m.parameters(), torch.optim.SGD, descent=new, **_options()), "sharpness-aware-step")
    assert new.seen == [(t, 4) for t in range(STEPS)]  # the step, and the states of the 4 parameters


def test_keep_first_gradient_passes_the_context_too() -> None:
    """SAM.keep_first_gradient (g(w) kept before an ascent on another sample) asks the rule with its context."""
    model = _model()
    opt = _aesam(model, lambda1=1e9, lambda2=1e9)
    x, y = _data(1)
    F.cross_entropy(model(x), y).backward()
    assert not opt.keep_first_gradient()  # declined: .grad holds g(w)
    opt.second_step()
    assert policy_statistics(opt).plain_steps == 1 and policy_statistics(opt).mu > 0


def test_the_policy_needs_its_context() -> None:
    with pytest.raises(TypeError, match="context="):
        AdaptivePolicy(3).declines_ascent([torch.ones(2)])


def test_a_non_finite_gradient_is_left_to_the_guard() -> None:
    """nonfinite="skip": a NaN batch skips the step; the statistics and counts stay as they were."""
    model, opt, _ = _train(lambda m: aesam(m.parameters(), torch.optim.SGD, TOTAL, nonfinite="skip", **_options()),
                           batches=_batches(2))  # fmt: skip
    before, weights = policy_statistics(opt), _weights(model)
    x, y = _data(7)
    x[0, 0] = math.nan
    opt.step(_closure(model, x, y))
    assert opt.steps == 3 and policy_statistics(opt) == before and _equal(_weights(model), weights)


def test_sharded_gradients_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(aesam_module.sharded, "is_sharded", lambda tensor: True)
    with pytest.raises(ValueError, match="FSDP"):
        AdaptivePolicy(3).declines_ascent([torch.ones(2)], context=RuleContext([{}]))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (dict(delta=1.0), r"delta .* \[0, 1\)"),
        (dict(delta=-0.1), r"delta .* \[0, 1\)"),
        (dict(delta=math.nan), r"delta .* \[0, 1\)"),
        (dict(lambda1=-math.inf), "lambda1 must be a finite number"),
        (dict(lambda2=math.nan), "lambda2 must be a finite number"),
        (dict(lambda1=2.0, lambda2=1.0), "lambda1 <= lambda2"),
        (dict(total_steps=0), "integer >= 1"),
        (dict(total_steps=2.5), "integer >= 1"),
        (dict(total_steps=True), "integer >= 1"),
    ],
)
def test_bad_options_are_refused(arguments: dict, match: str) -> None:
    arguments = {"total_steps": 10} | arguments
    with pytest.raises(ValueError, match=match):
        AdaptivePolicy(**arguments)
    with pytest.raises(ValueError, match=match):
        aesam(_model().parameters(), torch.optim.SGD, **arguments, lr=0.1)


def test_the_builder_takes_t_from_the_run() -> None:
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_optimizer, optimizer_request

    def built(train_size: int, **fields) -> SAM:
        config = TrainConfig(optimizer="aesam", **fields)
        return build_optimizer(config, _model(), optimizer_request(config, _model(), train_size=train_size))

    opt = built(1000, epochs=3, batch_size=64, rho=0.03, aesam_delta=0.8, aesam_lambda1=-0.5, aesam_lambda2=0.5)
    assert isinstance(opt.descent, AdaptivePolicy) and opt.param_groups[0]["rho"] == 0.03
    policy = opt.descent
    assert (policy.total_steps, policy.delta, policy.lambda1, policy.lambda2) == (45, 0.8, -0.5, 0.5)  # T = 3 * 15
    assert built(1000, aesam_total_steps=7).descent.total_steps == 7
    with pytest.raises(ValueError, match="--aesam-total-steps"):
        built(0)  # no training set known: T cannot be told
    assert repr(opt.descent) == "AdaptivePolicy(total_steps=45, delta=0.8, lambda1=-0.5, lambda2=0.5)"


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=128)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--aesam-delta", "1"], r"aesam_delta must be in \[0, 1\)"),
        (["--aesam-lambda1", "inf"], "aesam_lambda1 must be finite"),
        (["--aesam-lambda2", "nan"], "aesam_lambda2 must be finite"),
        (["--aesam-lambda1", "2"], "lambda1 <= lambda2"),
        (["--aesam-total-steps", "-1"], "aesam_total_steps must be >= 0"),
    ],
)
def test_bad_options_are_refused_on_the_command_line(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, "--optimizer", "aesam", *extra)) == 2
    assert re.search(match, capsys.readouterr().err)


def test_trains_from_the_command_line_and_from_yaml(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    extra = ["--optimizer", "aesam", "--aesam-delta", "0.8", "--aesam-lambda1", "-0.5"]
    assert main(_cli(tmp_path, *extra)) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["optimizer"], saved["aesam_delta"], saved["aesam_lambda1"], saved["aesam_lambda2"]) == (
        "aesam", 0.8, -0.5, 1.0
    )  # fmt: skip
    assert (tmp_path / "run" / "model.pt").is_file()
    config = tmp_path / "c.yaml"
    config.write_text("optimizer: aesam\naesam_lambda2: 0.5\naesam_total_steps: 20\n")
    assert main([*_cli(tmp_path), "--config", str(config), "--overwrite"]) == 0
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "aesam_lambda2: 0.5" in text and "aesam_total_steps: 20" in text


def test_the_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main
    from flatminima.optim.registry import optimizer_spec

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("aesam", "--aesam-delta", "--aesam-lambda1", "--aesam-lambda2", "--aesam-total-steps"):
        assert flag in out, flag
    assert optimizer_spec("aesam").passes.startswith("1 + the fraction of SAM steps")


# ---------------------------------------------------------------- DDP: every rank decides alike


def _ddp_worker(rank: int, out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp

    ddp = DistributedDataParallel(ddp_mlp())
    opt = aesam(ddp.module.parameters(), torch.optim.SGD, 12, delta=0.5, rho=0.1, lr=0.1, momentum=0.9)
    step = SharpnessAwareStep(ddp, _per_example, opt)
    inputs, targets = ddp_data(8, 16)
    rows = slice(rank * 8, (rank + 1) * 8)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        step(x, y)
    stats = policy_statistics(opt)
    weights = [p.detach().clone() for p in ddp.module.parameters()]
    torch.save({"weights": weights, "stats": (stats.mu, stats.sigma2, stats.sam_steps, stats.plain_steps)},
               out_dir / f"rank{rank}.pt")  # fmt: skip
    assert WORLD_SIZE == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_under_ddp_every_rank_decides_as_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """The batch step all-reduces g(w) for a rule that reads it, so both ranks see the global batch's ||g||^2: they
    take the same decisions and steps, those of one process on the whole batch."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_ddp_worker, tmp_path)
    model = ddp_mlp()
    opt = aesam(model.parameters(), torch.optim.SGD, 12, delta=0.5, rho=0.1, lr=0.1, momentum=0.9)
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in zip(*ddp_data(8, 16)):
        step(x, y)
    stats = policy_statistics(opt)
    assert 0 < stats.plain_steps < 8  # both branches taken
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert _equal(ranks[0]["weights"], ranks[1]["weights"]) and ranks[0]["stats"] == ranks[1]["stats"]
    assert ranks[0]["stats"][2:] == (stats.sam_steps, stats.plain_steps)
    assert math.isclose(ranks[0]["stats"][0], stats.mu, rel_tol=1e-10)
    _assert_close(ranks[0]["weights"], _weights(model))
