"""Periodic SAM and random SAM (RST): their limits are SAM and the base optimiser bit for bit, the update matches an
independent float64 reference, the random decisions are a pure function of (seed, step), and runs resume exactly."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flatminima.variants.periodic  # noqa: F401  (registers periodic-sam and random-sam)
from flatminima import SAM, SharpnessAwareStep
from flatminima.optim import EveryKSteps
from flatminima.variants.periodic import RandomCadence, periodic_sam, random_sam, uniform_draw
from tests.conftest import quick_train_args, resumed_equals_straight

LR, MOMENTUM, WD, RHO, STEPS = 0.1, 0.9, 5e-4, 0.05, 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int, n: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _batches(count: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    return [_data(100 + k) for k in range(count)]


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _options() -> dict:
    return dict(rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _closure(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _train(make: Callable[[nn.Module], torch.optim.Optimizer], batches=None) -> list[Tensor]:
    """The weights after ``opt.step(closure)`` over the batches."""
    model = _model()
    optimizer = make(model)
    for x, y in batches or _batches():
        optimizer.step(_closure(model, optimizer, x, y))
    return _weights(model)


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    """Bit for bit: only for runs that take the same code path (a cadence that picks SAM's step, or the plain base
    step, on every step; a resume that replays the same ops), which no CPU can make differ."""
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


# ---------------------------------------------------------------- the limits, bit for bit


def test_periodic_sam_with_k_1_is_sam() -> None:
    sam = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, **_options()))
    periodic = _train(lambda m: periodic_sam(m.parameters(), torch.optim.SGD, k=1, **_options()))
    assert _equal(periodic, sam)


def test_random_sam_with_p_1_is_sam_and_with_p_0_the_base_optimizer() -> None:
    sam = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, **_options()))
    always = _train(lambda m: random_sam(m.parameters(), torch.optim.SGD, probability=1.0, seed=3, **_options()))
    assert _equal(always, sam)
    sgd = _train(lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD))
    never = _train(lambda m: random_sam(m.parameters(), torch.optim.SGD, probability=0.0, seed=3, **_options()))
    assert _equal(never, sgd)
    assert not _equal(sam, sgd)


def test_the_batch_step_follows_the_cadence_too() -> None:
    """Through SharpnessAwareStep (what the training loop uses): p = 0 is SGD, k = 1 is SAM, bit for bit."""

    def run(make: Callable[[nn.Module], torch.optim.Optimizer], plain: bool = False) -> list[Tensor]:
        model = _model()
        optimizer = make(model)
        for x, y in _batches(5):
            if plain:
                optimizer.zero_grad()
                (F.cross_entropy(model(x), y, reduction="none").sum() / x.shape[0]).backward()
                optimizer.step()
            else:
                SharpnessAwareStep(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), optimizer)(x, y)
        return _weights(model)

    sam = run(lambda m: SAM(m.parameters(), torch.optim.SGD, **_options()))
    assert _equal(run(lambda m: periodic_sam(m.parameters(), torch.optim.SGD, k=1, **_options())), sam)
    never = run(lambda m: random_sam(m.parameters(), torch.optim.SGD, probability=0.0, **_options()))
    sgd = run(lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD), plain=True)
    assert max((a - b).abs().max().item() for a, b in zip(never, sgd)) < 1e-14


# ---------------------------------------------------------------- against an independent reference


def _forward(w: list[Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def _loss(w: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    logits = _forward(w, x)
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None])[:, 0]).mean()


def _grad(w: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    leaves = [t.detach().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(_loss(leaves, x, y), leaves)]


def _reference(batches: list[tuple[Tensor, Tensor]], takes_sam: Callable[[int], bool]) -> list[Tensor]:
    """Per-tensor float64 code from the equations: SAM's direction g(w + rho g/||g||) on the steps ``takes_sam``
    chooses, g(w) on the others, then SGD with momentum and L2 weight decay (as torch.optim.SGD)."""
    w = _weights(_model())
    buf: list[Tensor] | None = None
    for t, (x, y) in enumerate(batches):
        g = _grad(w, x, y)
        if takes_sam(t):
            norm = torch.sqrt(sum((s * s).sum() for s in g))
            g = _grad([a + RHO * s / norm for a, s in zip(w, g)], x, y)
        d = [s + WD * a for s, a in zip(g, w)]
        buf = [s.clone() for s in d] if buf is None else [MOMENTUM * b + s for b, s in zip(buf, d)]
        w = [a - LR * b for a, b in zip(w, buf)]
    return w


def _assert_close(ours: list[Tensor], reference: list[Tensor], atol: float = 1e-10) -> None:
    worst = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
    assert worst < atol, f"max |difference| {worst:.2e}"


def test_periodic_sam_matches_the_reference() -> None:
    ours = _train(lambda m: periodic_sam(m.parameters(), torch.optim.SGD, k=3, **_options()))
    _assert_close(ours, _reference(_batches(), lambda t: t % 3 == 0))
    assert not _equal(ours, _train(lambda m: SAM(m.parameters(), torch.optim.SGD, **_options())))


def test_random_sam_matches_the_reference() -> None:
    cadence = RandomCadence(0.4, seed=11)
    ours = _train(lambda m: SAM(m.parameters(), torch.optim.SGD, cadence=cadence, **_options()))
    decisions = _independent_decisions(0.4, 11, STEPS)
    assert 0 < sum(decisions) < STEPS  # both kinds of step happen
    _assert_close(ours, _reference(_batches(), lambda t: decisions[t]))


# ---------------------------------------------------------------- the random decisions


def _independent_decisions(p: float, seed: int, count: int) -> list[bool]:
    """SplitMix64 run as the sequential generator it is (Steele, Lea, Flood 2014): state += golden gamma, then the
    output mix; the top 53 bits as u in [0, 1); SAM on the step when u < p."""
    mask = 2**64 - 1
    state, decisions = seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        decisions.append((z >> 11) / 2.0**53 < p)
    return decisions


@pytest.mark.parametrize(("p", "seed"), [(0.5, 0), (0.3, 7), (0.9, 2**40 + 5)])
def test_decisions_are_a_pure_function_of_seed_and_step(p: float, seed: int) -> None:
    cadence = RandomCadence(p, seed)
    expected = _independent_decisions(p, seed, 4000)
    assert [cadence.takes_ascent(t) for t in range(4000)] == expected
    order = (3999, 17, 0, 17)  # random access, in any order, repeatable
    assert [cadence.takes_ascent(t) for t in order] == [expected[t] for t in order]
    assert abs(sum(expected) / 4000 - p) < 0.03
    assert [RandomCadence(p, seed + 1).takes_ascent(t) for t in range(64)] != expected[:64]  # seeds differ


def test_uniform_draw_is_in_the_unit_interval() -> None:
    draws = [uniform_draw(5, t) for t in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert 0.45 < sum(draws) / len(draws) < 0.55


def test_the_optimizer_takes_the_decided_steps() -> None:
    """SAM.step(closure) runs the closure twice on the steps the cadence picks and once on the others."""
    model = _model()
    optimizer = random_sam(model.parameters(), torch.optim.SGD, probability=0.5, seed=4, **_options())
    calls = []
    for x, y in _batches(20):
        closure = _closure(model, optimizer, x, y)
        count = [0]

        def counted(closure=closure, count=count) -> Tensor:
            count[0] += 1
            return closure()

        optimizer.step(counted)
        calls.append(count[0])
    assert calls == [2 if d else 1 for d in _independent_decisions(0.5, 4, 20)]
    assert optimizer.steps == 20


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_a_probability_outside_the_unit_interval_is_refused(p) -> None:
    with pytest.raises(ValueError, match=r"probability p in \[0, 1\]"):
        RandomCadence(p)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_a_bad_seed_is_refused(seed) -> None:
    with pytest.raises(ValueError, match="integer seed >= 0"):
        RandomCadence(0.5, seed)


def test_periodic_needs_k_at_least_1() -> None:
    with pytest.raises(ValueError, match="k >= 1"):
        periodic_sam(_model().parameters(), torch.optim.SGD, k=0, lr=LR)
    assert repr(EveryKSteps(3)) == "EveryKSteps(3)" and repr(RandomCadence(0.25, 2)) == "RandomCadence(p=0.25, seed=2)"


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["periodic", "random"])
def test_a_state_dict_saved_mid_run_resumes_bit_for_bit(kind: str) -> None:
    def make(model: nn.Module) -> SAM:
        if kind == "periodic":
            return periodic_sam(model.parameters(), torch.optim.SGD, k=3, **_options())
        return random_sam(model.parameters(), torch.optim.SGD, probability=0.5, seed=9, **_options())

    batches = _batches(10)
    straight = _train(make, batches)
    model = _model()
    optimizer = make(model)
    for x, y in batches[:5]:
        optimizer.step(_closure(model, optimizer, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["sam_steps"] == 5
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the load must overwrite everything
    optimizer = make(model)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for x, y in batches[5:]:
        optimizer.step(_closure(model, optimizer, x, y))
    assert _equal(_weights(model), straight)  # same code path: the resume replays the same ops in the same order


# ---------------------------------------------------------------- command line


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return quick_train_args(tmp_path, *extra, batch_size=128)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--optimizer", "periodic-sam", "--sam-every", "3"], {"sam_every": 3}),
        (["--optimizer", "random-sam", "--sam-probability", "0.3", "--seed", "4"], {"sam_probability": 0.3}),
        (["--optimizer", "random-sam"], {"sam_probability": 0.5}),
    ],
)
def test_each_trains_from_the_command_line(tmp_path: Path, extra: list[str], expected: dict) -> None:
    import yaml

    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert {k: saved[k] for k in expected} == expected
    assert (tmp_path / "run" / "model.pt").is_file()


def test_options_as_yaml_fields(tmp_path: Path) -> None:
    from flatminima.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("optimizer: periodic-sam\nsam_every: 4\n")
    assert main([*_cli(tmp_path), "--config", str(config)]) == 0
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "optimizer: periodic-sam" in text and "sam_every: 4" in text
    config.write_text("optimizer: random-sam\nsam_probability: 0.25\n")
    assert main([*_cli(tmp_path), "--config", str(config), "--overwrite"]) == 0
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "optimizer: random-sam" in text and "sam_probability: 0.25" in text
    config.write_text("optimizer: periodic-sam\nsam_every: 4\n")  # random-sam's option as a flag: refused
    assert main([*_cli(tmp_path), "--config", str(config), "--overwrite", "--sam-probability", "0.25"]) == 2


def test_the_flags_are_in_the_help(capsys) -> None:
    from flatminima.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("periodic-sam", "random-sam", "--sam-every", "--sam-probability"):
        assert flag in out, flag


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--optimizer", "periodic-sam", "--sam-every", "0"], "sam_every must be >= 1"),
        (["--optimizer", "random-sam", "--sam-probability", "1.5"], r"sam_probability must be in \[0, 1\]"),
        (["--optimizer", "random-sam", "--sam-probability", "-0.5"], r"sam_probability must be in \[0, 1\]"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    import re

    from flatminima.cli import main

    assert main(_cli(tmp_path, *extra)) == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_periodic_sam_every_step_trains_as_sam(tmp_path: Path) -> None:
    """The loop's --optimizer periodic-sam --sam-every 1 and random-sam with p = 1 end where sam does, bit for bit."""
    from flatminima.train import TrainConfig, train

    common = dict(epochs=1, batch_size=128, threads=1, progress=False, lr=0.05)
    sam = train(TrainConfig(optimizer="sam", output=str(tmp_path / "a"), **common)).model
    periodic = train(TrainConfig(optimizer="periodic-sam", sam_every=1, output=str(tmp_path / "b"), **common)).model
    randomly = train(TrainConfig(optimizer="random-sam", sam_probability=1.0, output=str(tmp_path / "c"), **common))
    for other in (periodic, randomly.model):  # same code path: the same SAM built alike, ascending on every step
        assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(), other.state_dict().values()))


# random-sam stays in the default run: one quick kill-and-resume of the training loop
@pytest.mark.parametrize("optimizer", [pytest.param("periodic-sam", marks=pytest.mark.slow), "random-sam"])
def test_a_killed_run_resumes_exactly(tmp_path: Path, monkeypatch, optimizer: str) -> None:
    """The cadence reads SAM's step counter, which the checkpoint holds: a resumed run ends with the same weights."""
    from flatminima.train import TrainConfig

    config = TrainConfig(optimizer=optimizer, epochs=2, batch_size=128, threads=1, progress=False, lr=0.05,
                         sam_every=3, sam_probability=0.4, seed=1)  # fmt: skip
    assert resumed_equals_straight(tmp_path, monkeypatch, config)
