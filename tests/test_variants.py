"""n-SAM, RW-SAM and Ahn et al.'s two algorithms against independent float64 references of their updates.

Each reference is written from the equations (docs/papers.md sec. 3 and 4) in plain per-tensor code on a hand-written
two-layer network, with the same random draws (fixed generators, drawn in the same order), and must match the
library's step through ``SharpnessAwareStep`` to 1e-10 over several steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import SAM, DualNorm, RandomDirection, SharpnessAwareStep
from flatminima.optim import RuleContext
from flatminima.variants import AscentSample, GibbsReweighting, OrthogonalEscape, RandomSign, SingleExample
from tests.conftest import resumed_equals_straight

LR, MOMENTUM, RHO, STEPS = 0.1, 0.9, 0.05, 5
torch.set_default_dtype(torch.float32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int, n: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------- the reference: plain per-tensor code


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def _losses(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = _forward(w, x)
    return torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]


def _grad(w: list[Tensor], loss_of: Callable[[list[Tensor]], Tensor]) -> list[Tensor]:
    leaves = [t.detach().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(loss_of(leaves), leaves)]


def _norm(ts: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((s * t).sum() for s, t in zip(a, b))


class _ReferenceSGD:
    """torch.optim.SGD's update with momentum (dampening 0, no Nesterov, no weight decay)."""

    def __init__(self, w: list[Tensor]) -> None:
        self.w, self.buf = [t.detach().clone() for t in w], None

    def step(self, d: list[Tensor]) -> None:
        self.buf = [t.clone() for t in d] if self.buf is None else [MOMENTUM * b + t for b, t in zip(self.buf, d)]
        self.w = [w - LR * b for w, b in zip(self.w, self.buf)]


def _signs(w: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """The random sign vector z: one draw of +-1 for all weights, in parameter order."""
    flat = torch.randint(0, 2, (sum(t.numel() for t in w),), generator=generator, dtype=torch.int8).double() * 2 - 1
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in w]), w)]


def _escape_direction(g: list[Tensor], u: list[Tensor], c: float) -> list[Tensor]:
    gg = _dot(g, g)
    coefficient = _dot(u, g) / gg if gg > 0 else 0.0
    return [gt + c * (ut - coefficient * gt) for gt, ut in zip(g, u)]


# ---------------------------------------------------------------- helpers


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _sam(model: nn.Module, **options) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, **options)


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    assert worst < atol, f"max |difference| {worst:.2e}"


def _batches() -> list[tuple[Tensor, Tensor]]:
    return [_data(100 + k) for k in range(STEPS)]


# ---------------------------------------------------------------- n-SAM


def test_nsam_matches_the_reference() -> None:
    pool_x, pool_y = _data(7, n=64)
    drawn: list[tuple[Tensor, Tensor]] = []

    def draw(n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(64, generator=generator)[:n]
        drawn.append((pool_x[index], pool_y[index]))
        return drawn[-1]

    model = _model()
    reference = _ReferenceSGD(_weights(model))
    step = SharpnessAwareStep(model, _per_example, _sam(model), batch_rule=AscentSample(draw, 40, refresh_every=2))
    for x, y in _batches():
        step(x, y)
    assert len(drawn) == 3  # steps 0-1, 2-3, 4 share a sample
    for k, (x, y) in enumerate(_batches()):
        ax, ay = drawn[k // 2]
        w = reference.w
        g = _grad(w, lambda v, ax=ax, ay=ay: _losses(v, ax, ay).mean())
        e = [RHO * t / _norm(g) for t in g]
        reference.step(_grad([a + b for a, b in zip(w, e)], lambda v, x=x, y=y: _losses(v, x, y).mean()))
    _assert_close(_weights(model), reference.w)


def test_nsam_with_the_batch_as_ascent_sample_is_sam() -> None:
    x, y = _data(3)
    model_n, model_s = _model(), _model()
    nsam = SharpnessAwareStep(model_n, _per_example, _sam(model_n), batch_rule=AscentSample(lambda n, g: (x, y), 16))
    sam = SharpnessAwareStep(model_s, _per_example, _sam(model_s))
    for _ in range(STEPS):
        nsam(x, y)
        sam(x, y)
    # same code path: the ascent pass is the batch's mean loss (times 16/16 = 1, exact), the descent the batch's,
    # through the same optimiser; so the same ops on the same tensors
    assert all(torch.equal(a, b) for a, b in zip(_weights(model_n), _weights(model_s)))


def test_nsam_bad_options() -> None:
    with pytest.raises(ValueError, match="sample size must be >= 1"):
        AscentSample(lambda n, g: None, 0)
    with pytest.raises(ValueError, match="refresh_every must be >= 0"):
        AscentSample(lambda n, g: None, 8, refresh_every=-1)


# ---------------------------------------------------------------- RW-SAM


@pytest.mark.parametrize("weighted_descent", [False, True])
def test_rwsam_matches_the_reference(weighted_descent: bool) -> None:
    lam, delta = 2.0, 1e-4
    model = _model()
    reference = _ReferenceSGD(_weights(model))
    rule = GibbsReweighting(lam, delta, weighted_descent=weighted_descent, generator=torch.Generator().manual_seed(5))
    step = SharpnessAwareStep(model, _per_example, _sam(model), batch_rule=rule)
    for x, y in _batches():
        step(x, y)
    z_gen = torch.Generator().manual_seed(5)
    for x, y in _batches():
        w = reference.w
        z = _signs(w, z_gen)
        base = _losses(w, x, y).detach()
        shifted = _losses([a + delta * b for a, b in zip(w, z)], x, y).detach()
        p = torch.softmax(lam * (shifted - base).abs() / delta, dim=0)
        g = _grad(w, lambda v, x=x, y=y, p=p: (p * _losses(v, x, y)).sum())
        e = [RHO * t / _norm(g) for t in g]
        moved = [a + b for a, b in zip(w, e)]
        if weighted_descent:
            reference.step(_grad(moved, lambda v, x=x, y=y, p=p: (p * _losses(v, x, y)).sum()))
        else:
            reference.step(_grad(moved, lambda v, x=x, y=y: _losses(v, x, y).mean()))
    _assert_close(_weights(model), reference.w)


def test_rwsam_with_lambda_zero_is_sam() -> None:
    model_r, model_s = _model(), _model()
    rwsam = SharpnessAwareStep(model_r, _per_example, _sam(model_r), batch_rule=GibbsReweighting(0.0))
    sam = SharpnessAwareStep(model_s, _per_example, _sam(model_s))
    for x, y in _batches():
        rwsam(x, y)
        sam(x, y)
    # same code path: lambda = 0 skips the scoring and takes the plain mean of the same per-example losses, as SAM
    # does (its factor 16/16 = 1 is exact)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model_r), _weights(model_s)))


def test_rwsam_exact_score_is_the_per_example_gradient_norm() -> None:
    model = _model()
    x, y = _data(9)
    rule = GibbsReweighting(1.0, score="exact")
    step = SharpnessAwareStep(model, _per_example, _sam(model), batch_rule=rule)
    w = _weights(model)
    step(x, y)
    expected = torch.stack(
        [_norm(_grad(w, lambda v, i=i: _losses(v, x[i : i + 1], y[i : i + 1]).sum())) for i in range(16)]
    )
    torch.testing.assert_close(rule.weights, torch.softmax(expected, dim=0), rtol=0, atol=1e-12)


def test_rwsam_cheap_score_is_the_directional_derivative() -> None:
    """s_i = |l_i(w + delta z) - l_i(w)| / delta -> |<grad l_i(w), z>| as delta -> 0 (float64, delta 1e-7)."""
    model = _model()
    x, y = _data(11)
    lam = 0.5
    rule = GibbsReweighting(lam, 1e-7, generator=torch.Generator().manual_seed(0))
    step = SharpnessAwareStep(model, _per_example, _sam(model), batch_rule=rule)
    w = _weights(model)
    step(x, y)
    gen = torch.Generator().manual_seed(0)
    z = _signs(w, gen)
    exact = torch.stack(
        [_dot(_grad(w, lambda v, i=i: _losses(v, x[i : i + 1], y[i : i + 1]).sum()), z).abs() for i in range(16)]
    )
    log_p = torch.log(rule.weights)
    torch.testing.assert_close(log_p - log_p.mean(), lam * (exact - exact.mean()), rtol=0, atol=1e-5)


def test_rwsam_bad_options() -> None:
    for kwargs, match in [
        ({"lam": -1.0}, "lambda"),
        ({"lam": 1.0, "delta": -0.1}, "delta"),
        ({"lam": 1.0, "delta": 0.0}, "delta"),
        ({"lam": 1.0, "score": "guess"}, "score"),
        ({"lam": 1.0, "z_group_size": 0}, "z_group_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            GibbsReweighting(**kwargs)


def test_rwsam_needs_per_example_losses() -> None:
    model = _model()
    step = SharpnessAwareStep(model, nn.CrossEntropyLoss(), _sam(model), batch_rule=GibbsReweighting(1.0))
    with pytest.raises(ValueError, match="one loss per example"):
        step(*_data(1))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(_model())))  # weights untouched


# ---------------------------------------------------------------- Ahn et al.


@pytest.mark.parametrize("relative", [True, False])
def test_randomly_smoothed_perturbation_matches_the_reference(relative: bool) -> None:
    eta_prime = 0.5 if relative else 0.03
    c = eta_prime if relative else eta_prime / LR
    model = _model()
    reference = _ReferenceSGD(_weights(model))
    opt = _sam(
        model,
        perturbation=RandomDirection(torch.Generator().manual_seed(3)),
        descent=OrthogonalEscape(math.inf, eta_prime, relative=relative),
    )
    step = SharpnessAwareStep(model, _per_example, opt)
    for x, y in _batches():
        step(x, y)
    gen = torch.Generator().manual_seed(3)
    for x, y in _batches():
        w = reference.w
        z = [torch.empty(t.shape, dtype=t.dtype).normal_(generator=gen) for t in w]
        e = [RHO * t / _norm(z) for t in z]
        g = _grad(w, lambda v, x=x, y=y: _losses(v, x, y).mean())
        u = _grad([a + b for a, b in zip(w, e)], lambda v, x=x, y=y: _losses(v, x, y).mean())
        reference.step(_escape_direction(g, u, c))
    _assert_close(_weights(model), reference.w)


def test_sharpness_aware_perturbation_matches_the_reference() -> None:
    eta_prime = 0.5
    model = _model()
    reference = _ReferenceSGD(_weights(model))
    opt = _sam(
        model,
        perturbation=RandomSign(DualNorm(2.0), torch.Generator().manual_seed(4)),
        descent=OrthogonalEscape(math.inf, eta_prime),
    )
    step = SharpnessAwareStep(model, _per_example, opt, batch_rule=SingleExample(torch.Generator().manual_seed(6)))
    for x, y in _batches():
        step(x, y)
    sign_gen, index_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(6)
    for x, y in _batches():
        w = reference.w
        i = int(torch.randint(16, (1,), generator=index_gen).item())
        s = 1.0 if torch.randint(2, (1,), generator=sign_gen).item() == 1 else -1.0
        xi, yi = x[i : i + 1], y[i : i + 1]
        g = _grad(w, lambda v, x=x, y=y: _losses(v, x, y).mean())
        gi = _grad(w, lambda v, xi=xi, yi=yi: _losses(v, xi, yi).mean())
        e = [s * RHO * t / _norm(gi) for t in gi]
        u = _grad([a + b for a, b in zip(w, e)], lambda v, xi=xi, yi=yi: _losses(v, xi, yi).mean())
        reference.step(_escape_direction(g, u, eta_prime))
    _assert_close(_weights(model), reference.w)


@pytest.mark.parametrize("single_example", [False, True])
def test_large_gradient_takes_a_plain_gradient_step(single_example: bool) -> None:
    """||g|| > epsilon: exactly torch.optim.SGD's step, and no perturbation pass at all."""
    model, plain = _model(), _model()
    perturbation = RandomSign(DualNorm(2.0)) if single_example else RandomDirection()
    opt = _sam(model, perturbation=perturbation, descent=OrthogonalEscape(1e-6, 1.0))
    rule = SingleExample() if single_example else None
    step = SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)
    sgd = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    for x, y in _batches():
        step(x, y)
        sgd.zero_grad()
        _per_example(plain(x), y).mean().backward()
        sgd.step()
    assert len(calls) == STEPS  # one forward per step: the ascent was declined before its pass
    # same code path: the declined step is the batch's mean-loss gradient, left as it is, through the same
    # torch.optim.SGD (default foreach) as the plain run
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(plain)))


def test_escape_direction_is_orthogonal_to_the_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    u = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)]
    d = [t.clone() for t in u]
    OrthogonalEscape(math.inf, 2.0).direction_([], d, g, RuleContext([{}, {}], lrs=[0.1, 0.1]), True)
    v = [(a - b) / 2.0 for a, b in zip(d, g)]
    assert abs(_dot(v, g).item()) / (_norm(v) * _norm(g)).item() < 1e-14
    # zero gradient at w: v = u
    zero = [torch.zeros_like(t) for t in g]
    d = [t.clone() for t in u]
    OrthogonalEscape(math.inf, 2.0).direction_([], d, zero, RuleContext([{}, {}], lrs=[0.1, 0.1]), True)
    # exact by construction: the coefficient is 0, so d = 0 + 2 (u - 0 * 0), each op exact
    assert all(torch.equal(a, 2.0 * b) for a, b in zip(d, u))


def test_escape_bad_options() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        OrthogonalEscape(-1.0, 1.0)
    with pytest.raises(ValueError, match="eta_prime"):
        OrthogonalEscape(1.0, -0.5)


def _escape_step(model: nn.Module, algorithm: str, scaler: torch.amp.GradScaler | None) -> SharpnessAwareStep:
    if algorithm == "rs":
        opt = _sam(model, perturbation=RandomDirection(torch.Generator().manual_seed(3)),
                   descent=OrthogonalEscape(math.inf, 0.5))  # fmt: skip
        return SharpnessAwareStep(model, _per_example, opt, grad_scaler=scaler)
    opt = _sam(model, perturbation=RandomSign(DualNorm(2.0), torch.Generator().manual_seed(4)),
               descent=OrthogonalEscape(math.inf, 0.5))  # fmt: skip
    rule = SingleExample(torch.Generator().manual_seed(6))
    return SharpnessAwareStep(model, _per_example, opt, grad_scaler=scaler, batch_rule=rule)


@pytest.mark.parametrize("algorithm", ["rs", "sa"])
def test_escape_through_a_grad_scaler_is_the_unscaled_step(algorithm: str) -> None:
    """A power-of-two loss scale is exact, so with a GradScaler the weights equal the unscaled run's (g(w) is
    kept unscaled, also when the ascent itself reads no gradient)."""
    results = []
    for scaled in (False, True):
        model = _model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        step = _escape_step(model, algorithm, scaler)
        for x, y in _batches():
            step(x, y)
        results.append(_weights(model))
    # exact by construction: scaling by 2**10 and back commutes with every rounding (float64, no overflow), and
    # after the unscaling both runs take the same ops on the same values
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("algorithm", ["rs", "sa"])
def test_escape_overflow_under_a_grad_scaler_skips_and_backs_off(algorithm: str) -> None:
    """An inf in g(w) under a GradScaler: no step, weights untouched, the scale halves (as for any overflow)."""
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    step = _escape_step(model, algorithm, scaler)
    before = _weights(model)
    x, y = _data(1)
    x[3, 0] = math.inf
    step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    assert scaler.get_scale() == 2.0**9


# ---------------------------------------------------------------- the command line


def _cli(tmp_path, *extra: str) -> list[str]:
    fast = ["--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-progress", "--lr", "0.05"]
    return ["train", *fast, "--output", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize(
    "extra",
    [
        ["--optimizer", "nsam", "--nsam-sample-size", "128", "--nsam-refresh-every", "3"],
        ["--optimizer", "rwsam", "--rwsam-lambda", "2", "--rwsam-z-group-size", "16", "--rwsam-weighted-descent"],
        ["--optimizer", "ahn-rs", "--ahn-epsilon", "5", "--ahn-eta-prime", "0.02", "--ahn-eta-prime-absolute"],
        ["--optimizer", "ahn-sa", "--amp", "bf16"],
    ],
)
def test_each_variant_trains_from_the_command_line(tmp_path, extra: list[str]) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 0
    assert (tmp_path / "run" / "model.pt").is_file()


def test_variant_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("nsam", "rwsam", "ahn-rs", "ahn-sa", "--nsam-sample-size", "--rwsam-lambda", "--rwsam-delta",
                 "--rwsam-score", "--ahn-epsilon", "--ahn-eta-prime"):  # fmt: skip
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--optimizer", "rwsam", "--rwsam-delta", "-0.1"], "rwsam_delta must be finite and > 0"),
        (["--optimizer", "rwsam", "--rwsam-lambda", "-1"], "rwsam_lambda"),
        (["--optimizer", "ahn-rs", "--ahn-epsilon", "-1"], "ahn_epsilon must be >= 0"),
        (["--optimizer", "ahn-sa", "--ahn-eta-prime", "-1"], "ahn_eta_prime"),
        (["--optimizer", "nsam", "--nsam-sample-size", "-5"], "nsam_sample_size"),
    ],
)
def test_bad_variant_options_are_refused(tmp_path, capsys, extra: list[str], match: str) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err


def test_an_ascent_sample_larger_than_the_data_is_refused(tmp_path, capsys) -> None:
    from flatminima.cli import main

    assert main(_cli(tmp_path, "--optimizer", "nsam", "--nsam-sample-size", "100000")) == 2
    assert "nsam_sample_size=100000 exceeds the 1347 training examples" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["nsam", "rwsam", "ahn-rs", "ahn-sa"])
def test_a_killed_variant_run_resumes_exactly(tmp_path, monkeypatch, optimizer: str) -> None:
    """The variants draw from the global RNG (checkpointed) or from seeds fixed by the step number: a run that
    dies after its first checkpoint resumes to the same weights, bit for bit."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer=optimizer, epochs=2, batch_size=128, threads=1, progress=False, lr=0.05,
                         nsam_sample_size=256, rwsam_lambda=2.0)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)


@pytest.mark.slow
def test_demo_compares_any_listed_variants(tmp_path, capsys) -> None:
    from flatminima.cli import main

    argv = ["demo", "--variants", "sgd", "ahn-sa", "msam-16", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| SGD |" in out and "| AHN-SA |" in out and "| MSAM-16 |" in out and "SAM - SGD" not in out
    assert (tmp_path / "demo" / "results.md").is_file()
    assert main(["demo", "--variants", "sgd", "lookahead", "--output", str(tmp_path / "bad")]) == 2
    assert "unknown variant(s) ['lookahead']" in capsys.readouterr().err


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()


@pytest.mark.parametrize("variant", ["rwsam", "ahn-rs", "ahn-sa", "nsam"])
def test_batchnorm_statistics_are_updated_once_per_step_from_the_pass_at_w(variant: str) -> None:
    """As for SAM: one update of the running statistics per step, from the unperturbed pass (n-SAM: its ascent
    sample's), none from the scoring, single-example or perturbed passes."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    sample = (torch.randn(12, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen))
    model, reference = _bn_model(), _bn_model()
    escape = dict(descent=OrthogonalEscape(math.inf, 0.5))
    rule = None
    if variant == "rwsam":
        opt, rule = _sam(model), GibbsReweighting(2.0, 1e-4, generator=torch.Generator().manual_seed(0))
    elif variant == "ahn-rs":
        opt = _sam(model, perturbation=RandomDirection(), **escape)
    elif variant == "ahn-sa":
        opt, rule = _sam(model, perturbation=RandomSign(DualNorm(2.0)), **escape), SingleExample()
    else:
        opt, rule = _sam(model), AscentSample(lambda n, g: sample, 12)
    SharpnessAwareStep(model, _per_example, opt, batch_rule=rule)(x, y)
    reference.train()
    with torch.no_grad():
        reference(sample[0] if variant == "nsam" else x)
    bn, expected = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, expected.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(bn.running_var, expected.running_var, rtol=0, atol=1e-14)
    assert int(bn.num_batches_tracked) == 1


def test_the_demo_can_run_twice_in_the_same_folder(tmp_path, capsys) -> None:
    """The README's first command, run again, replaces the demo's own runs (they are not a user's)."""
    from flatminima.cli import main

    argv = ["demo", "--variants", "sgd", "--epochs", "1", "--no-progress", "--output", str(tmp_path / "demo")]
    assert main(argv) == 0
    assert main(argv) == 0
