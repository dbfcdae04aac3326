"""SAF and MESA (Du et al., NeurIPS 2022): the trajectory loss against hand-written loops, its state, the registry,
the training loop's resume, DDP, and the errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import flatminima.variants.saf  # noqa: F401  (registers saf and mesa)
from flatminima.step import PlainStep
from flatminima.trajectory import EMATarget, PastOutputs, TrajectoryLoss, kl_to_target
from tests.conftest import resumed_equals_straight

N, BATCH, EPOCHS, START, BACK, CLASSES = 26, 6, 8, 2, 2, 3  # 26 // 6 = 4 steps an epoch, 2 examples dropped
LR, MOMENTUM, LAM, TAU, DECAY = 0.1, 0.9, 0.7, 2.0, 0.9


def _mlp(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, CLASSES)]
    return nn.Sequential(*layers).double()


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(N, 5, dtype=torch.float64, generator=gen) * 2, torch.randint(0, CLASSES, (N,), generator=gen)


def _batches(epochs: int = EPOCHS):
    """(epoch, step, indices): a fresh order each epoch, the last incomplete batch dropped."""
    for epoch in range(epochs):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
        for step in range(N // BATCH):
            yield epoch, step, order[step * BATCH : (step + 1) * BATCH]


def _ce(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _kl_by_hand(outputs: Tensor, target: Tensor, active: Tensor) -> Tensor:
    """lambda tau^2 mean_i active_i sum_c q_ic log(q_ic / p_ic), softmaxes written out."""
    p = torch.exp(outputs / TAU) / torch.exp(outputs / TAU).sum(1, keepdim=True)
    q = torch.exp(target / TAU) / torch.exp(target / TAU).sum(1, keepdim=True)
    per_example = (q * (q.log() - p.log())).sum(1) * active.double()
    return LAM * TAU**2 * per_example.sum() / outputs.shape[0]


def _sgd_by_hand(params: list[Tensor], grads: tuple[Tensor, ...], velocity: list[Tensor | None]) -> None:
    with torch.no_grad():
        for k, (p, g) in enumerate(zip(params, grads)):
            velocity[k] = g.clone() if velocity[k] is None else MOMENTUM * velocity[k] + g
            p -= LR * velocity[k]


def _weights(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _worst(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def _train_step(model: nn.Module, trajectory: TrajectoryLoss | None, epochs: int = EPOCHS) -> PlainStep:
    inputs, labels = _data()
    step = PlainStep(model, _ce, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), trajectory=trajectory)
    for _, _, idx in _batches(epochs):
        step(inputs[idx], labels[idx], indices=idx)
    return step


# ---------------------------------------------------------------- the KL term


def test_kl_to_target_closed_form() -> None:
    a = torch.tensor([[0.3, -1.2], [2.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.4], [-0.5, 0.5], [3.0, -1.0]], dtype=torch.float64)
    tau = 1.7
    by_hand = []
    for (a0, a1), (b0, b1) in zip(a.tolist(), b.tolist()):
        p0 = 1 / (1 + math.exp((a1 - a0) / tau))  # two classes: a logistic
        q0 = 1 / (1 + math.exp((b1 - b0) / tau))
        by_hand.append(q0 * math.log(q0 / p0) + (1 - q0) * math.log((1 - q0) / (1 - p0)))
    expected = tau**2 * sum(by_hand) / 3
    assert kl_to_target(a, b, tau).item() == pytest.approx(expected, rel=1e-12)
    mask = torch.tensor([True, False, True])
    masked = tau**2 * (by_hand[0] + by_hand[2]) / 3  # the mean stays over the whole batch
    assert kl_to_target(a, b, tau, mask).item() == pytest.approx(masked, rel=1e-12)
    assert kl_to_target(a, a.clone(), tau).item() == 0.0  # identical logits
    assert kl_to_target(a, a + 5.0, tau).item() == pytest.approx(0.0, abs=1e-15)  # a shift leaves the softmax
    official = F.kl_div(F.softmax(a / tau, 1).log(), F.softmax(b / tau, 1), reduction="none").sum(-1).mean() * tau**2
    assert kl_to_target(a, b, tau).item() == pytest.approx(official.item(), rel=1e-12)
    half = kl_to_target(a.half(), b.half(), tau)
    assert half.dtype == torch.float32  # reduced in float32 at least
    outputs, target = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl_to_target(outputs, target, tau).backward()
    assert target.grad is None and outputs.grad is not None  # the target is a constant


# ---------------------------------------------------------------- float64 references


def test_saf_matches_a_hand_written_loop_in_float64() -> None:
    """Per-example lists of all past logits (the target: the one E~ visits back), the KL written out, SGD with
    momentum by hand; against PlainStep with PastOutputs (E~ + 1 slots) over 8 epochs with 2 examples dropped each
    epoch, so visit counts and epochs part."""
    inputs, labels = _data()
    ref = _mlp()
    params = list(ref.parameters())
    history: list[list[Tensor]] = [[] for _ in range(N)]
    velocity: list[Tensor | None] = [None] * len(params)
    penalties = []
    for _, _, idx in _batches():
        outputs = ref(inputs[idx])
        visits = [len(history[i]) for i in idx.tolist()]
        active = torch.tensor([c > START and c >= BACK for c in visits])
        target = torch.stack([history[i][c - BACK] if a else torch.zeros(CLASSES, dtype=torch.float64)
                              for i, c, a in zip(idx.tolist(), visits, active.tolist())])  # fmt: skip
        penalty = _kl_by_hand(outputs, target, active)
        penalties.append(penalty.item())
        loss = F.cross_entropy(outputs, labels[idx]) + penalty
        _sgd_by_hand(params, torch.autograd.grad(loss, params), velocity)
        for i, row in zip(idx.tolist(), outputs.detach()):
            history[i].append(row)

    model = _mlp()
    saf = PastOutputs(N, epochs_back=BACK, start_visit=START, lam=LAM, tau=TAU, dtype=torch.float64)
    _train_step(model, saf)
    assert _worst(_weights(model), [p.detach() for p in params]) < 1e-10
    assert penalties[3 * (N // BATCH)] > 1e-3  # it did pull: active from the fourth epoch on (visit 3 > 2)
    assert all(p == 0.0 for p in penalties[: 2 * (N // BATCH)])
    counts = torch.tensor([len(h) for h in history])
    assert torch.equal(saf.visits, counts) and counts.min() < EPOCHS  # some examples were dropped in some epoch
    for i in range(N):  # the record holds each example's last E~ + 1 visits, at slot visit mod (E~ + 1)
        for c in range(max(0, len(history[i]) - BACK - 1), len(history[i])):
            torch.testing.assert_close(saf.outputs[c % (BACK + 1), i], history[i][c], rtol=0, atol=1e-10)


def _bn_eval_forward(model: nn.Sequential, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """Linear, BatchNorm1d in eval mode, tanh, Linear: written out, with the averaged tensors."""
    h = x @ state["0.weight"].T + state["0.bias"]
    h = (h - state["1.running_mean"]) / torch.sqrt(state["1.running_var"] + model[1].eps)
    h = torch.tanh(h * state["1.weight"] + state["1.bias"])
    return h @ state["3.weight"].T + state["3.bias"]


def test_mesa_matches_a_hand_written_loop_in_float64() -> None:
    """The average of every parameter and BatchNorm buffer after every step from the first, the target from the
    averaged network in eval mode written out; against PlainStep with EMATarget (start in steps)."""
    inputs, labels = _data()
    start_step = (START + 1) * (N // BATCH)
    ref = _mlp(batch_norm=True)
    params = list(ref.parameters())
    average = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    velocity: list[Tensor | None] = [None] * len(params)
    penalties = []
    for t, (_, _, idx) in enumerate(_batches()):
        outputs = ref(inputs[idx])  # train mode: batch statistics, running statistics updated
        if t >= start_step:
            target = _bn_eval_forward(ref, average, inputs[idx])
            penalty = _kl_by_hand(outputs, target, torch.ones(BATCH, dtype=torch.bool))
        else:
            penalty = torch.zeros((), dtype=torch.float64)
        penalties.append(penalty.item())
        loss = F.cross_entropy(outputs, labels[idx]) + penalty
        _sgd_by_hand(params, torch.autograd.grad(loss, params), velocity)
        for k, v in ref.state_dict().items():
            average[k] = DECAY * average[k] + (1 - DECAY) * v if v.is_floating_point() else v.clone()

    model = _mlp(batch_norm=True)
    mesa = EMATarget(model, decay=DECAY, lam=LAM, tau=TAU, start_step=start_step)
    _train_step(model, mesa)
    assert _worst(_weights(model), list(ref.state_dict().values())) < 1e-10
    assert _worst([mesa.average[k] for k in average], list(average.values())) < 1e-10
    assert all(m.training for m in model.modules())  # the eval-mode target left the model in train mode
    assert min(penalties[start_step:]) > 1e-4 and all(p == 0 for p in penalties[:start_step])
    assert mesa.steps == EPOCHS * (N // BATCH)


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_lambda_zero_and_before_the_start_are_the_base_optimizer_bit_for_bit(which: str) -> None:
    def trajectory(model: nn.Module, lam: float, start: int) -> TrajectoryLoss:
        if which == "saf":
            return PastOutputs(N, epochs_back=1, start_visit=start, lam=lam, tau=TAU)
        return EMATarget(model, decay=DECAY, lam=lam, start_step=start)

    plain = _mlp(batch_norm=which == "mesa")
    _train_step(plain, None, epochs=3)
    for lam, start in ((0.0, 0), (LAM, 1000)):
        model = _mlp(batch_norm=which == "mesa")
        step = _train_step(model, trajectory(model, lam, start), epochs=3)
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(plain)))
        assert step.trajectory.last_penalty.item() == 0.0
    model = _mlp(batch_norm=which == "mesa")
    _train_step(model, trajectory(model, LAM, 0), epochs=3)  # and the term does change the run
    assert _worst(_weights(model), _weights(plain)) > 1e-6


def test_nonfinite_logits_are_not_recorded_and_bf16_autocast_runs() -> None:
    """A NaN row is neither written nor counted (a skipped step's NaN never becomes a target); under bf16 autocast
    the record stays float32 and the term is reduced in float32."""
    saf = PastOutputs(N, epochs_back=1, start_visit=0)
    outputs = torch.tensor([[1.0, 2.0, 3.0], [math.nan, 0.0, 0.0]])
    saf.penalty(outputs, outputs, torch.tensor([4, 5]))
    assert saf.visits[4] == 1 and saf.visits[5] == 0 and torch.equal(saf.outputs[0, 4], outputs[0])
    assert not saf.outputs.isnan().any()
    inputs, labels = _data()
    for which in ("saf", "mesa"):
        model = _mlp(batch_norm=which == "mesa").float()
        trajectory = (PastOutputs(N, epochs_back=1, start_visit=0) if which == "saf"
                      else EMATarget(model, start_step=0))  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        step = PlainStep(model, _ce, opt, autocast_dtype=torch.bfloat16, trajectory=trajectory)
        for _, _, idx in _batches(2):
            loss = step(inputs[idx].float(), labels[idx], indices=idx)
        assert loss.dtype == torch.float32 and trajectory.last_penalty.dtype == torch.float32
        assert trajectory.last_penalty.item() > 0
    assert saf.outputs.dtype == torch.float32


# ---------------------------------------------------------------- state


def _flat(state: dict) -> list[Tensor]:
    return [t for v in state.values() for t in (_flat(v) if isinstance(v, dict) else [v])]


def _saved(obj) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_state_dict_round_trip_continues_bit_for_bit(which: str) -> None:
    inputs, labels = _data()
    batches = list(_batches(6))
    half = len(batches) // 2

    def build() -> tuple[nn.Module, PlainStep]:
        model = _mlp(batch_norm=which == "mesa")
        trajectory = (
            PastOutputs(N, epochs_back=BACK, start_visit=1, lam=LAM, tau=TAU)
            if which == "saf"
            else EMATarget(model, decay=DECAY, lam=LAM, tau=TAU, start_step=5)
        )
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        return model, PlainStep(model, _ce, opt, trajectory=trajectory)

    model, step = build()
    for _, _, idx in batches[:half]:
        step(inputs[idx], labels[idx], indices=idx)
    saved = _saved({"model": model.state_dict(), "opt": step.optimizer.state_dict(),
                    "trajectory": step.trajectory.state_dict()})  # fmt: skip
    for _, _, idx in batches[half:]:
        step(inputs[idx], labels[idx], indices=idx)

    other, resumed = build()
    other.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["opt"])
    resumed.trajectory.load_state_dict(saved["trajectory"])
    for _, _, idx in batches[half:]:
        resumed(inputs[idx], labels[idx], indices=idx)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(other)))
    assert all(torch.equal(a, b) for a, b in zip(_flat(step.trajectory.state_dict()),
                                                 _flat(resumed.trajectory.state_dict())))  # fmt: skip
    if which == "saf":
        with pytest.raises(ValueError, match="for 26 examples; this run's training set has 27"):
            PastOutputs(N + 1).load_state_dict(saved["trajectory"])
        with pytest.raises(ValueError, match=r"needs \(4, 26, C\) \(epochs_back 3\)"):
            PastOutputs(N, epochs_back=3).load_state_dict(saved["trajectory"])
    else:
        with pytest.raises(ValueError, match="does not match the model"):
            EMATarget(_mlp()).load_state_dict(saved["trajectory"])


def test_state_bytes_is_the_formula() -> None:
    saf = PastOutputs(N, epochs_back=BACK)
    assert saf.state_bytes() == 8 * N  # the counts; the record waits for the first outputs (C)
    model = _mlp()
    _train_step(model, saf, epochs=1)
    assert saf.state_bytes() == (BACK + 1) * N * CLASSES * 4 + 8 * N
    bn = _mlp(batch_norm=True)
    expected = sum(t.numel() * t.element_size() for t in [*bn.parameters(), *bn.buffers()])
    assert EMATarget(bn).state_bytes() == expected


# ---------------------------------------------------------------- the registry and the training loop


def test_registry_entries_and_the_base_optimizer() -> None:
    from flatminima.optim.registry import optimizer_spec
    from flatminima.train import TrainConfig
    from flatminima.train.builders import build_optimizer, build_trajectory, optimizer_request

    saf, mesa = optimizer_spec("saf"), optimizer_spec("mesa")
    assert (saf.passes, mesa.passes) == ("1", "1, and one forward of the averaged model")
    assert not saf.sharpness_aware and not mesa.sharpness_aware
    model = _mlp()
    config = TrainConfig(optimizer="mesa", base_optimizer="adamw", batch_size=10, mesa_start_epoch=2)
    request = optimizer_request(config, model, train_size=95)
    assert isinstance(build_optimizer(config, model, request), torch.optim.AdamW)
    built = build_trajectory(config, request)
    assert isinstance(built, EMATarget) and built.start_step == 3 * 9 and (built.lam, built.decay) == (0.8, 0.9998)
    config = TrainConfig(optimizer="saf", batch_size=10)
    request = optimizer_request(config, model, train_size=95)
    assert isinstance(build_optimizer(config, model, request), torch.optim.SGD)
    built = build_trajectory(config, request)
    assert isinstance(built, PastOutputs) and (built.num_examples, built.epochs_back, built.start_visit) == (95, 3, 5)
    assert (built.lam, built.tau) == (0.3, 5.0)
    assert build_trajectory(TrainConfig(optimizer="sgd"), request) is None


def test_registering_a_trajectory_needs_the_plain_step() -> None:
    from flatminima.optim.registry import register_optimizer

    with pytest.raises(ValueError, match="driven by the plain step"):
        register_optimizer("saf-test", "x", lambda r: r.base(), sharpness_aware=True, trajectory=lambda r: None)


@pytest.mark.parametrize(
    "changes",
    [dict(optimizer="saf", saf_start_epoch=0, saf_epochs_back=1, model="mlp"),
     dict(optimizer="mesa", mesa_start_epoch=0, mesa_decay=0.8, model="small_cnn_bn")],
    ids=["saf", "mesa"],
)  # fmt: skip
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, changes: dict) -> None:
    """Killed after the first epoch's checkpoint; the term counts from the second epoch, whose targets come from
    the checkpoint (SAF's record of epoch 1, MESA's average): the same weights as a straight run, bit for bit."""
    from flatminima.train import TrainConfig

    config = TrainConfig(epochs=2, batch_size=128, threads=1, progress=False, lr=0.05, **changes)
    assert resumed_equals_straight(tmp_path, monkeypatch, config)
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    if changes["optimizer"] == "saf":
        assert state["trajectory"]["visits"].sum() == 2 * 10 * 128  # every visit of the 2 epochs is recorded
        assert state["trajectory"]["outputs"].shape == (2, 1347, 10)
    else:
        assert int(state["trajectory"]["steps"]) == 20
        assert any("running_mean" in name for name in state["trajectory"]["average"])


def test_the_command_line_trains_saf_and_mesa(tmp_path: Path) -> None:
    import yaml

    from flatminima.cli import main

    fast = ["--epochs", "1", "--batch-size", "256", "--threads", "1", "--no-progress", "--model", "mlp"]
    (tmp_path / "adamw.yaml").write_text("base_optimizer: adamw\n")
    for name, extra in (("saf", ["--saf-lambda", "0.5", "--saf-start-epoch", "0", "--base-optimizer", "adamw"]),
                        ("mesa", ["--mesa-decay", "0.99", "--config", str(tmp_path / "adamw.yaml")])):  # fmt: skip
        assert main(["train", *fast, "--optimizer", name, *extra, "--output", str(tmp_path / name)]) == 0
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert saved["optimizer"] == name and saved["base_optimizer"] == "adamw"  # SAF and MESA wrap the base
    assert saved["mesa_decay"] == 0.99


def test_the_command_line_refuses_momentum_under_an_adamw_base(tmp_path: Path, capsys) -> None:
    from flatminima.cli import main

    args = ["train", "--epochs", "1", "--model", "mlp", "--optimizer", "saf", "--base-optimizer", "adamw"]
    assert main([*args, "--momentum", "0.5", "--output", str(tmp_path)]) == 2
    assert "--momentum is SGD's, and AdamW (the base optimiser) does not read it" in capsys.readouterr().err


# ---------------------------------------------------------------- errors


def test_python_errors_are_clear() -> None:
    model = _mlp(batch_norm=True)
    inputs, labels = _data()
    step = PlainStep(model, _ce, torch.optim.SGD(model.parameters(), lr=LR), trajectory=PastOutputs(N))
    before = _weights(model)
    with pytest.raises(ValueError, match=r"call step\(inputs, targets, indices=...\)"):
        step(inputs[:4], labels[:4])
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))  # refused before the forward (BatchNorm)
    with pytest.raises(ValueError, match=r"index 26 is out of range for SAF's record of 26 examples \(0..25\)"):
        step(inputs[:2], labels[:2], indices=torch.tensor([3, 26]))
    with pytest.raises(ValueError, match="an example appears twice in a batch"):
        step(inputs[:2], labels[:2], indices=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"one integer per example, shape \(2,\)"):
        step(inputs[:2], labels[:2], indices=torch.tensor([3.0, 4.0]))
    for bad, match in (
        (dict(lam=-1.0), "lam .* must be a finite number >= 0"),
        (dict(lam=math.nan), "lam .* must be a finite number >= 0"),
        (dict(tau=0.0), r"tau \(the temperature of the softmax\) must be a finite number > 0"),
        (dict(epochs_back=0), r"epochs_back \(E~\) must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            PastOutputs(N, **bad)
    for decay in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
            EMATarget(model, decay=decay)
    with pytest.raises(TypeError, match=r"must be a flatminima\.trajectory\.TrajectoryLoss"):
        PlainStep(model, _ce, torch.optim.SGD(model.parameters(), lr=LR), trajectory=object())


def test_sharded_parameters_are_refused(monkeypatch) -> None:
    import flatminima.trajectory as trajectory

    monkeypatch.setattr(trajectory, "is_sharded", lambda tensor: True)
    with pytest.raises(ValueError, match=r"does not support FSDP's sharded parameters \(DTensor\)"):
        EMATarget(_mlp())
    model = _mlp()
    with pytest.raises(ValueError, match="PastOutputs does not support FSDP"):
        PlainStep(model, _ce, torch.optim.SGD(model.parameters(), lr=LR), trajectory=PastOutputs(N))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--optimizer", "saf", "--saf-lambda", "-1"], "saf_lambda must be a finite number >= 0"),
        (["--optimizer", "saf", "--saf-tau", "0"], "saf_tau must be a finite number > 0"),
        (["--optimizer", "saf", "--saf-epochs-back", "0"], "saf_epochs_back must be >= 1"),
        (["--optimizer", "mesa", "--mesa-decay", "1"], "mesa_decay must be in [0, 1)"),
        (["--optimizer", "mesa", "--mesa-tau", "-2"], "mesa_tau must be a finite number > 0"),
        (["--optimizer", "sgd", "--saf-lambda", "0.5"], "--saf-lambda is an option of saf"),
    ],
)
def test_bad_options_on_the_command_line(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    from flatminima.cli import main

    args = ["train", "--epochs", "1", "--threads", "1", "--no-progress", "--output", str(tmp_path / "run")]
    try:
        code = main([*args, *extra])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- DDP (2 gloo processes)

DDP_N, DDP_BATCH, DDP_EPOCHS = 16, 8, 3  # per rank 4 examples a step


def _ddp_order(epoch: int) -> Tensor:
    return torch.randperm(DDP_N, generator=torch.Generator().manual_seed(50 + epoch))


def _ddp_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(DDP_N, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (DDP_N,), generator=gen)


def _ddp_worker(rank: int, out_dir: Path) -> None:
    from tests._gloo import WORLD_SIZE, ddp_mlp

    inputs, labels = _ddp_data()
    per_rank = DDP_BATCH // WORLD_SIZE
    results = {}
    for which in ("saf", "mesa"):
        torch.manual_seed(0)
        model = ddp_mlp() if which == "saf" else nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                                                 nn.Linear(8, 3)).double()  # fmt: skip
        ddp = DistributedDataParallel(model)
        trajectory = (
            PastOutputs(DDP_N, epochs_back=1, start_visit=0, lam=0.5, tau=TAU, dtype=torch.float64)
            if which == "saf"
            else EMATarget(ddp, decay=0.8, lam=0.5, tau=TAU)
        )
        step = PlainStep(ddp, _ce, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), trajectory=trajectory)
        for epoch in range(DDP_EPOCHS):
            order = _ddp_order(epoch)
            for start in range(0, DDP_N, DDP_BATCH):
                local = order[start : start + DDP_BATCH][rank * per_rank : (rank + 1) * per_rank]
                step(inputs[local], labels[local], indices=local)
        results[which] = {"state": trajectory.state_dict(), "weights": [p.detach().clone() for p in model.parameters()],
                          "buffers": [b.clone() for b in model.buffers()]}  # fmt: skip
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_under_ddp_every_rank_keeps_the_whole_record(tmp_path: Path) -> None:
    """2 gloo ranks, 4 examples each a step: both ranks' SAF records (and visit counts) are equal bit for bit and
    equal a one-process run over the same global batches; MESA's averages (BatchNorm buffers included) are equal."""
    from tests._gloo import WORLD_SIZE, ddp_mlp, run_on_gloo

    run_on_gloo(_ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    first, second = (r["saf"]["state"] for r in ranks)
    assert torch.equal(first["visits"], second["visits"]) and torch.equal(first["outputs"], second["outputs"])
    assert torch.equal(first["visits"], torch.full((DDP_N,), DDP_EPOCHS))

    inputs, labels = _ddp_data()
    model = ddp_mlp()
    alone = PastOutputs(DDP_N, epochs_back=1, start_visit=0, lam=0.5, tau=TAU, dtype=torch.float64)
    step = PlainStep(model, _ce, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), trajectory=alone)
    for epoch in range(DDP_EPOCHS):
        order = _ddp_order(epoch)
        for start in range(0, DDP_N, DDP_BATCH):
            batch = order[start : start + DDP_BATCH]
            step(inputs[batch], labels[batch], indices=batch)
    assert alone.last_penalty.item() > 0
    assert torch.equal(alone.visits, first["visits"])
    assert (alone.outputs - first["outputs"]).abs().max().item() < 1e-10
    assert _worst([p.detach() for p in model.parameters()], ranks[0]["saf"]["weights"]) < 1e-10
    mesa = [r["mesa"]["state"]["average"] for r in ranks]
    assert all(torch.equal(mesa[0][k], mesa[1][k]) for k in mesa[0])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["mesa"]["weights"], ranks[1]["mesa"]["weights"]))
    # each rank's BatchNorm statistics are its own after its last forward; the averages took rank 0's
    assert not torch.equal(ranks[0]["mesa"]["buffers"][0], ranks[1]["mesa"]["buffers"][0])
