"""bSAM against a float64 reference written from the paper's Algorithm 1, and its posterior.

The reference (Möllenhoff and Khan 2023, Algorithm 1) is plain per-tensor code on a hand-written two-layer network:
the draw ``theta = w + sqrt(1/(N s)) z``, ``g`` at ``theta``, ``e = rho g / s``, ``g_e`` at ``w + e``, then the
momentum, precision and mean updates. Both sides draw ``z`` from generators with the same seed, in parameter order,
so the library's step must match it to 1e-12 over several steps, whichever driver runs the plan.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import SharpnessAwareStep
from flatminima.optim.bsam_base import ABS_GRAD_COUNT, ABS_GRAD_SUM, MOMENTUM, PRECISION, BSAMBase
from flatminima.variants.bsam import (
    BSAM,
    BayesianAscent,
    ReturnToMean,
    SamplePosterior,
    posterior_sample,
    posterior_variance,
    predictive,
    sample_weights,
)
from tests.conftest import quick_train_args, resumed_equals_straight

# Small N (so the draw's standard deviation, about 0.1-0.3, moves the gradients well beyond the tolerance), a fast
# beta2 (so s changes within a few steps), a large damping and weight decay (each term matters).
N, LR, RHO, BETAS, DELTA, GAMMA, S0 = 40.0, 0.05, 0.05, (0.8, 0.9), 0.01, 0.1, 1.0
STEPS, SEED = 6, 7
# Both sides run the same float64 maths (unit roundoff 1.1e-16) and differ only in the order of a few sums
# (F.cross_entropy's mean against logsumexp - gather, a fused add against mul then add): 1e-16 per operation,
# far below 1e-12 after six steps of lr 0.05; a missing term or a wrong draw moves the weights by 1e-4 or more.
TOLERANCE = 1e-12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(steps: int = STEPS, n: int = 16) -> list[tuple[Tensor, Tensor]]:
    out = []
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        out.append((torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)))
    return out


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _bsam(model: nn.Module, seed: int = SEED, **options) -> BSAM:
    settings = dict(num_data=N, lr=LR, rho=RHO, betas=BETAS, weight_decay=DELTA, damping=GAMMA, init_precision=S0)
    settings.update(options)
    return BSAM(model.parameters(), generator=torch.Generator().manual_seed(seed), **settings)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((s - t).abs().max().item() for s, t in zip(a, b, strict=True))


# ---------------------------------------------------------------- the reference: plain per-tensor code


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    logits = _forward(leaves, x)
    loss = (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


def _reference(
    steps: int = STEPS, *, noise: bool = True, order: str = "paper", groups: int = 1, seed: int = SEED
) -> tuple[list[Tensor], list[Tensor]]:
    """Algorithm 1 of the paper, step by step; with ``groups`` > 1 each group of the batch its own draw, ascent and
    perturbed gradient, ``|g|`` and ``g_e`` averaged (the authors' ``--batchsplit``). Returns ``(w, s)``."""
    w = _weights(_model())
    s = [torch.full_like(t, S0) for t in w]
    g_m = [torch.zeros_like(t) for t in w]
    gen = torch.Generator().manual_seed(seed)
    beta1, beta2 = BETAS
    for x, y in _batches(steps):
        abs_g = [torch.zeros_like(t) for t in w]
        g_e = [torch.zeros_like(t) for t in w]
        for xk, yk in zip(x.chunk(groups), y.chunk(groups)):
            if noise:
                z = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in w]
                theta = [t + torch.sqrt(1.0 / (N * si)) * zi for t, si, zi in zip(w, s, z)]
            else:
                theta = w
            g = _grad(theta, xk, yk)
            e = [RHO * gi / si for gi, si in zip(g, s)]
            for a, b, gi, gk in zip(abs_g, g_e, g, _grad([t + ei for t, ei in zip(w, e)], xk, yk)):
                a += gi.abs() / groups
                b += gk / groups
        g_m = [beta1 * mi + (1 - beta1) * (gi + DELTA * t) for mi, gi, t in zip(g_m, g_e, w)]
        if order == "official":
            w = [t - LR * mi / si for t, mi, si in zip(w, g_m, s)]
        s = [beta2 * si + (1 - beta2) * (torch.sqrt(si) * a + DELTA + GAMMA) for si, a in zip(s, abs_g)]
        if order == "paper":
            w = [t - LR * mi / si for t, mi, si in zip(w, g_m, s)]
    return w, s


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _train(
    make: Callable[[nn.Module], BSAM] = _bsam, steps: int = STEPS, driver: str = "step", group_size: int | None = None
) -> tuple[nn.Module, BSAM]:
    model = _model()
    opt = make(model)
    step = SharpnessAwareStep(model, _per_example, opt, group_size=group_size)
    for x, y in _batches(steps):
        if driver == "closure":
            opt.step(_closure(model, x, y))
        elif driver == "manual":  # the two-call API, the first pass inside sampled_pass()
            opt.zero_grad()
            with opt.sampled_pass():
                F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            step(x, y)
    return model, opt


def _precisions(opt: BSAM) -> list[Tensor]:
    return [opt.state[p][PRECISION] for g in opt.param_groups for p in g["params"]]


# ---------------------------------------------------------------- the update


@pytest.mark.parametrize("driver", ["step", "closure", "manual"])
def test_bsam_matches_algorithm_1(driver: str) -> None:
    model, opt = _train(driver=driver)
    w, s = _reference()
    assert _max_diff(_weights(model), w) < TOLERANCE
    assert _max_diff(_precisions(opt), s) < TOLERANCE
    # the noise matters: the reference without it is far off (so a missing draw could not pass)
    assert _max_diff(_weights(model), _reference(noise=False)[0]) > 1e-4


@pytest.mark.parametrize(("noise", "order"), [(False, "paper"), (True, "official"), (False, "official")])
def test_the_noiseless_form_and_the_official_order_match(noise: bool, order: str) -> None:
    model, opt = _train(lambda m: _bsam(m, noise=noise, order=order))
    w, s = _reference(noise=noise, order=order)
    assert _max_diff(_weights(model), w) < TOLERANCE
    assert _max_diff(_precisions(opt), s) < TOLERANCE
    other = "paper" if order == "official" else "official"
    assert _max_diff(_weights(model), _reference(noise=noise, order=other)[0]) > 1e-5  # the order matters


def test_msam_groups_are_the_authors_batchsplit() -> None:
    """m-SAM's groups: a draw, an ascent and a perturbed gradient per group, |g| and g_e averaged."""
    model, opt = _train(group_size=4)
    w, s = _reference(groups=4)
    assert _max_diff(_weights(model), w) < TOLERANCE
    assert _max_diff(_precisions(opt), s) < TOLERANCE


def test_the_plan_takes_the_first_pass_at_a_draw() -> None:
    model = _model()
    opt = _bsam(model)
    phases = opt.plan().phases
    kinds = [type(phase).__name__ for phase in phases]
    assert kinds == ["SamplePosterior", "Pass", "ReturnToMean", "Ascend", "Pass", "Descend"]
    assert isinstance(phases[0], SamplePosterior) and isinstance(phases[2], ReturnToMean)
    assert opt.plan().passes == 2
    opt.noise = False
    assert [type(p).__name__ for p in opt.plan().phases] == ["Pass", "Ascend", "Pass", "Descend"]


def test_the_weights_move_to_the_draw_and_back_exactly() -> None:
    model = _model()
    opt = _bsam(model)
    before = _weights(model)
    seen: list[list[Tensor]] = []
    x, y = _batches(1)[0]
    for phase in opt.plan():
        if phase.__class__.__name__ == "Pass" and phase.at == "w":
            seen.append(_weights(model))
            F.cross_entropy(model(x), y).backward()
        elif phase.__class__.__name__ == "Pass":
            F.cross_entropy(model(x), y).backward()
        else:
            opt.restore()
            assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))  # w put back bit for bit
            break
    draw = posterior_sample(_bsam(_model()), generator=torch.Generator().manual_seed(SEED))
    assert _max_diff(seen[0], draw) == 0.0  # the first pass ran at w + sqrt(1/(N s)) z
    assert _max_diff(seen[0], before) > 0.05


def test_first_step_without_the_sampled_pass_is_refused() -> None:
    """davda54's two-step loop with the first pass at w would be bSAM without its noise: refused, nothing moved."""
    model = _model()
    opt = _bsam(model)
    before = _weights(model)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="sampled_pass"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before)) and not opt.is_perturbed
    other = _model()
    quiet = _bsam(other, noise=False)  # without noise the pass at w is the algorithm's
    F.cross_entropy(other(x), y).backward()
    assert quiet.first_step(zero_grad=True) is True
    quiet.restore()


def test_rho_zero_is_the_base_optimiser_bit_for_bit() -> None:
    model, _ = _train(lambda m: _bsam(m, rho=0.0))
    alone = _model()
    base = BSAMBase(alone.parameters(), num_data=N, lr=LR, betas=BETAS, weight_decay=DELTA, damping=GAMMA)
    for x, y in _batches():
        base.zero_grad()
        _per_example(alone(x), y).mean().backward()
        base.step()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(alone)))


def test_the_state_holds_only_s_and_the_momentum_between_steps() -> None:
    _, opt = _train(steps=2, group_size=4)
    assert all(set(state) == {PRECISION, MOMENTUM} for state in opt.state.values())
    assert ABS_GRAD_SUM not in str(opt.state_dict()) and ABS_GRAD_COUNT not in str(opt.state_dict())


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_from_a_state_dict_continues_bit_for_bit() -> None:
    straight, _ = _train()
    model, opt = _train(steps=3)
    saved = _round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt = _bsam(resumed, seed=12345)  # another seed: the generator's state must come from the checkpoint
    opt.load_state_dict(saved["optimizer"])
    step = SharpnessAwareStep(resumed, _per_example, opt)
    for x, y in _batches()[3:]:
        step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))


# ---------------------------------------------------------------- the posterior


def test_posterior_variance_is_one_over_n_s() -> None:
    _, opt = _train()
    variance = posterior_variance(opt)
    assert all(torch.equal(v, 1.0 / (N * s)) for v, s in zip(variance, _precisions(opt)))
    assert max(s.max().item() / s.min().item() for s in _precisions(opt)) > 1.05  # s differs between weights
    base = BSAMBase(_model().parameters(), num_data=10, init_precision=4.0)  # the base alone keeps it too
    assert all(torch.equal(v, torch.full_like(v, 1 / 40)) for v in posterior_variance(base))


def test_samples_have_the_posterior_variance() -> None:
    """4000 draws per weight: the sample variance of a normal has relative standard deviation sqrt(2 / 3999) =
    0.022, so each of the 51 weights' must lie within 0.12 (5.4 sd) of 1/(N s); the means of the standardised draws
    (sd 1/sqrt(4000) = 0.016) within 0.08. Over all 204000 draws the variance (sd 0.003) must be within 0.015 of 1.
    Seeded: the same draws every run, and a 5-sd band is passed by a correct sampler with probability > 1 - 1e-5."""
    model, opt = _train()
    mean = _weights(model)
    variance = posterior_variance(opt)
    gen = torch.Generator().manual_seed(2024)
    draws = [posterior_sample(opt, generator=gen) for _ in range(4000)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), mean))  # drawing leaves the weights alone
    standardised = [torch.stack([d[i] for d in draws]).sub(mean[i]).div(variance[i].sqrt()) for i in range(len(mean))]
    for z in standardised:
        assert z.mean(dim=0).abs().max().item() < 0.08
        assert (z.var(dim=0) - 1).abs().max().item() < 0.12
    pooled = torch.cat([z.reshape(4000, -1) for z in standardised], dim=1)
    assert abs(pooled.var().item() - 1) < 0.015


def test_sample_weights_holds_a_draw_and_restores_the_mean() -> None:
    model, opt = _train(steps=2)
    storage = [p.data_ptr() for p in model.parameters()]
    copies = _weights(model)
    with sample_weights(opt, generator=torch.Generator().manual_seed(1)) as drawn:
        inside = _weights(model)
    assert _max_diff(inside, posterior_sample(opt, generator=torch.Generator().manual_seed(1))) == 0.0
    assert _max_diff(inside, drawn) == 0.0 and _max_diff(inside, copies) > 0.01
    assert [p.data_ptr() for p in model.parameters()] == storage  # the model's own tensors, back in place
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), copies))


def test_predictive_averages_the_softmax_over_k_draws() -> None:
    model, opt = _train()
    x = _batches(1, n=5)[0][0]
    got = predictive(model, opt, x, samples=3, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    w, s = _weights(model), _precisions(opt)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for _ in range(3):
        theta = [t + torch.sqrt(1.0 / (N * si)) * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t, si in
                 zip(w, s)]  # fmt: skip
        expected += torch.softmax(_forward(theta, x), dim=1) / 3
    assert (got - expected).abs().max().item() < TOLERANCE
    assert torch.allclose(got.sum(dim=1), torch.ones(5, dtype=torch.float64))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_data": 0}, "num_data"),
        ({"num_data": True}, "num_data"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"damping": float("nan")}, "damping"),
        ({"init_precision": 0.0}, "init_precision"),
        ({"lr": -0.1}, "lr"),
        ({"order": "other"}, "order"),
        ({"rho": -0.1}, "rho"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _bsam(_model(), **options)


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(TypeError, match="noise"):
        _bsam(_model(), noise="yes")
    with pytest.raises(TypeError, match="generator"):
        BSAM(_model().parameters(), num_data=N, generator=7)
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="keeps no posterior"):
        posterior_variance(sgd)
    model, opt = _train(steps=1)
    with pytest.raises(ValueError, match="samples"):
        predictive(model, opt, _batches(1)[0][0], samples=0)
    with pytest.raises(ValueError, match="parameters of the optimiser"):
        posterior_sample(opt, params=[torch.zeros(2)])
    x, y = _batches(1)[0]
    with opt.sampled_pass():
        F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="middle of a step"), sample_weights(opt):
        pass
    with pytest.raises(RuntimeError, match="not at w"), opt.sampled_pass():
        pass
    opt.restore()


def test_the_ascent_needs_the_precision() -> None:
    from flatminima import SAM

    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, perturbation=BayesianAscent())
    x, y = _batches(1)[0]
    with pytest.raises(TypeError, match="precision s"):
        opt.step(_closure(model, x, y))


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, "--optimizer", "bsam", *extra, batch_size=256)


def test_bsam_trains_from_the_command_line(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    extra = ["--bsam-beta2", "0.99", "--bsam-damping", "0.2", "--bsam-order", "official", "--rho", "0.02"]
    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for flag, value in zip(extra[::2], extra[1::2]):
        assert str(saved[flag[2:].replace("-", "_")]) == value


def test_the_builder_reads_the_run() -> None:
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_optimizer, optimizer_request

    config = TrainConfig(optimizer="bsam", lr=0.3, rho=0.02, weight_decay=1e-3, bsam_beta1=0.8, bsam_noise=False)
    model = _model()
    opt = build_optimizer(config, model, optimizer_request(config, model, train_size=1347))
    group = opt.param_groups[0]
    assert isinstance(opt, BSAM) and isinstance(opt.base_optimizer, BSAMBase) and opt.noise is False
    assert (group["num_data"], group["lr"], group["rho"], group["weight_decay"]) == (1347.0, 0.3, 0.02, 1e-3)
    assert group["betas"] == (0.8, 0.999) and group["damping"] == 0.1 and group["order"] == "paper"
    config = TrainConfig(optimizer="bsam", bsam_data_size=5e4)
    assert (
        build_optimizer(config, model, optimizer_request(config, model, train_size=10)).param_groups[0]["num_data"]
        == 5e4
    )
    with pytest.raises(ValueError, match="--bsam-data-size"):
        build_optimizer(TrainConfig(optimizer="bsam"), model)  # no training set size known


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--bsam-beta1", "1"], "bsam_beta1 must be in [0, 1)"),
        (["--bsam-init-precision", "0"], "bsam_init_precision must be finite and > 0"),
        (["--bsam-damping", "-1"], "bsam_damping must be finite and >= 0"),
        (["--bsam-data-size", "inf"], "bsam_data_size must be finite and >= 0"),
        (["--base-optimizer", "adamw"], "bsam is its own base optimiser"),
        (["--weight-decay-in-loss"], "bsam adds delta to s"),
        (["--p", "1"], "no L_p ball"),
    ],
)
def test_bad_command_line_options_are_refused(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    """Killed after the first epoch's checkpoint, resumed: the same weights as a straight run, bit for bit (the
    noise generator's state travels in the optimiser's state dict)."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer="bsam", epochs=2, batch_size=256, threads=1, progress=False, lr=0.05)
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


def test_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("bsam", "--bsam-data-size", "--bsam-noise", "--no-bsam-noise", "--bsam-order", "--bsam-beta2"):
        assert flag in out, flag


# ---------------------------------------------------------------- DDP


def _ddp_train(rank: int, out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp

    inputs, targets = ddp_data(3, WORLD_SIZE * 8)
    ddp = DistributedDataParallel(ddp_mlp())
    opt = BSAM(ddp.module.parameters(), num_data=N, lr=LR, rho=RHO, betas=BETAS,
               generator=torch.Generator().manual_seed(SEED))  # fmt: skip
    step = SharpnessAwareStep(ddp, _per_example, opt)  # sync_perturbation is not asked: BSAM all-reduces g
    for x, y in zip(inputs[:, rank * 8 : (rank + 1) * 8], targets[:, rank * 8 : (rank + 1) * 8]):
        step(x, y)
    torch.save([p.detach().clone() for p in ddp.module.parameters()], out_dir / f"w{rank}.pt")
    torch.save(_precisions(opt), out_dir / f"s{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo")
def test_under_ddp_every_rank_takes_the_single_process_step(tmp_path: Path) -> None:
    """The same seed on both ranks: the same draw, the first pass all-reduced, so each rank's w and s are those of
    one process on the global batch."""
    from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

    run_on_gloo(_ddp_train, tmp_path)
    ranks = [torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    precisions = [torch.load(tmp_path / f"s{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks)) and all(torch.equal(a, b) for a, b in zip(*precisions))
    model = ddp_mlp()
    opt = BSAM(
        model.parameters(), num_data=N, lr=LR, rho=RHO, betas=BETAS, generator=torch.Generator().manual_seed(SEED)
    )
    step = SharpnessAwareStep(model, _per_example, opt)
    inputs, targets = ddp_data(3, WORLD_SIZE * 8)
    for x, y in zip(inputs, targets):
        step(x, y)
    assert _max_diff(ranks[0], _weights(model)) < 1e-10
    assert _max_diff(precisions[0], _precisions(opt)) < 1e-10
