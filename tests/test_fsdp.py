"""SAM on FSDP2 (``fully_shard``): 2 gloo processes on the CPU against one unsharded process, float64.

Under FSDP every backward pass reduce-scatters the gradient, so each rank holds its shard of the global batch's
gradient; SAM's norms are then taken over all ranks' shards and the step is plain SAM on the global batch. Before
the fix the first step failed (``.tolist() is not supported for tensor subclasses, got DTensor``).

One spawned run (spawning is the slow part) trains the float64 MLP of the distributed tests in several ways,
each rank on its half of the global batch, and saves the full weights; the references run in this process over
the whole batch. The last tests run ``flatminima train --fsdp`` under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import SAM, SharpnessAwareStep
from flatminima.cli import main
from flatminima.optim import RandomDirection
from flatminima.variants import GibbsReweighting
from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

PER_RANK = 8
STEPS = 4
TOL = dict(rtol=1e-10, atol=1e-12)
RULES = {  # SAM's options for each ascent rule tested
    "sam": {},
    "p_inf": {"p": math.inf},
    "p1": {"p": 1.0},
    "p3": {"p": 3.0},
    "asam": {"adaptive": True},
    "usam": {"normalize": False},
}
STEP_OPTIONS = {"accumulation_steps": 2, "max_grad_norm": 0.5}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _sam(model: nn.Module, **options) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **options)


def _closure(model: nn.Module, x: Tensor, y: Tensor):
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------------------- the workers


def _sharded_mlp(root: bool = True) -> nn.Module:
    """Each Linear layer sharded, then the root; without the root, the first layer only (a mix of DTensor and
    plain parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, mesh = ddp_mlp(), init_device_mesh("cpu", (WORLD_SIZE,))
    for module in model if root else model[:1]:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    if root:
        fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.full_tensor().clone() for name, value in model.state_dict().items()}


def _error(call) -> str:
    try:
        call()
    except (ValueError, RuntimeError, TypeError, FloatingPointError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _nan_in_rank1_shard(model: nn.Module, rank: int) -> None:
    """A NaN in one gradient entry that only rank 1's shard holds (the others stay finite)."""
    if rank == 1:
        model[2].weight.grad.to_local()[0, 0] = math.nan


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    inputs, targets = ddp_data(STEPS, WORLD_SIZE * PER_RANK)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = list(zip(inputs[:, rows], targets[:, rows]))
    results: dict[str, object] = {}
    for name, options in RULES.items():
        model = _sharded_mlp()
        opt = _sam(model, **options)
        for x, y in batches:
            opt.step(_closure(model, x, y))
        results[name] = _full(model)
    model = _sharded_mlp()
    opt = _sam(model)
    for x, y in batches:  # the two-step pattern
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    results["two_step"] = _full(model)
    model = _sharded_mlp()
    step = SharpnessAwareStep(model, _loss_fn, _sam(model), **STEP_OPTIONS)
    for x, y in batches:
        step(x, y)
    results["batch_step"] = _full(model)

    # the inf/NaN guard decides alike on every rank, though only rank 1's shard holds the NaN
    x, y = batches[0]
    for policy in ("skip", "raise"):
        model = _sharded_mlp()
        opt = _sam(model, nonfinite=policy)
        before = _full(model)
        F.cross_entropy(model(x), y).backward()
        _nan_in_rank1_shard(model, rank)
        outcome = _error(lambda opt=opt: opt.first_step(zero_grad=True)) if policy == "raise" else None
        if policy == "skip":
            opt.first_step(zero_grad=True)
            outcome = f"skipped={opt.step_skipped} perturbed={opt.is_perturbed}"
            opt.second_step()
        results[f"first_guard_{policy}"] = (outcome, all(torch.equal(before[k], v) for k, v in _full(model).items()))
    model = _sharded_mlp()
    opt = _sam(model, nonfinite="skip")
    before = _full(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    _nan_in_rank1_shard(model, rank)
    opt.second_step()
    results["descent_guard_skip"] = all(torch.equal(before[k], v) for k, v in _full(model).items())

    # what sharded parameters do not support: clear errors, on every rank
    model, reweighting = _sharded_mlp(), GibbsReweighting(1.0)
    results["errors"] = {
        "flatten": _error(lambda: _sam(model, flatten=True)),
        "random_direction": _error(lambda: _sam(model, perturbation=RandomDirection())),
        "msam": _error(lambda: SharpnessAwareStep(model, _loss_fn, _sam(model), group_size=4)),
        "batch_rule": _error(lambda: SharpnessAwareStep(model, _loss_fn, _sam(model), batch_rule=reweighting)),
        "scaler": _error(lambda: _sam(model).step(_closure(model, x, y), grad_scaler=torch.amp.GradScaler("cpu"))),
        "mixed": _error(lambda: _sam(_sharded_mlp(root=False))),
    }
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_on_gloo(_fsdp_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


# ---------------------------------------------------------------------------- single-process references


def _reference(name: str) -> dict[str, Tensor]:
    model = ddp_mlp()
    inputs, targets = ddp_data(STEPS, WORLD_SIZE * PER_RANK)
    if name == "batch_step":
        step = SharpnessAwareStep(model, _loss_fn, _sam(model), **STEP_OPTIONS)
        for x, y in zip(inputs, targets):
            step(x, y)
    else:
        opt = _sam(model, **RULES.get(name, {}))
        for x, y in zip(inputs, targets):
            opt.step(_closure(model, x, y))
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _plain_sgd() -> dict[str, Tensor]:
    model = ddp_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(*ddp_data(STEPS, WORLD_SIZE * PER_RANK)):
        opt.zero_grad()
        _closure(model, x, y)()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RULES, "two_step", "batch_step"])
def test_fsdp_matches_one_unsharded_process(fsdp_runs, name: str) -> None:
    expected = _reference(name)
    for rank, results in enumerate(fsdp_runs):
        weights = results[name]
        assert weights.keys() == expected.keys()
        for key in expected:
            where = f"rank {rank}, {key}"
            torch.testing.assert_close(weights[key], expected[key], **TOL, msg=lambda m, where=where: f"{where}: {m}")
    if name in ("sam", "asam", "p1", "p3"):  # the ascent happened (these rules take totals over the shards)
        sgd = _plain_sgd()
        assert max((expected[k] - sgd[k]).abs().max().item() for k in sgd) > 1e-4


@pytest.mark.slow
def test_fsdp_nonfinite_guard_agrees_across_ranks(fsdp_runs) -> None:
    for results in fsdp_runs:
        assert results["first_guard_skip"] == ("skipped=True perturbed=False", True)
        outcome, unchanged = results["first_guard_raise"]
        assert outcome.startswith("FloatingPointError") and "inf or NaN" in outcome, outcome
        assert unchanged
        assert results["descent_guard_skip"] is True


@pytest.mark.slow
def test_fsdp_unsupported_combinations_are_clear_errors(fsdp_runs) -> None:
    for results in fsdp_runs:
        errors = results["errors"]
        assert "flatten=True" in errors["flatten"] and errors["flatten"].startswith("ValueError")
        assert "RandomDirection() is not declared shard_aware" in errors["random_direction"]
        assert "m-SAM (group_size)" in errors["msam"]
        assert "the batch rule" in errors["batch_rule"] and "needs a perturbation per rank" in errors["batch_rule"]
        assert "GradScaler" in errors["scaler"]
        assert "all or none sharded" in errors["mixed"]


# ---------------------------------------------------------------------------- flatminima train --fsdp

FAST = ["--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--lr", "0.05", "--lr-schedule", "constant",
        "--optimizer", "sam", "--rho", "0.1", "--threads", "1", "--no-progress", "--device", "cpu"]  # fmt: skip


def _torchrun(tmp_path: Path, name: str, *extra: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "flatminima", "train", *FAST, "--fsdp", "--output", str(tmp_path / name), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(path: Path) -> dict[str, Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_train_fsdp_under_torchrun_matches_one_process_and_resumes_exactly(tmp_path: Path, capsys) -> None:
    """2 epochs with --fsdp == 2 epochs in one process with the same global batch (float32, to rounding); and
    1 epoch, then --resume to 2, == the straight run bit for bit (full checkpoints, sharded again)."""
    _torchrun(tmp_path, "fsdp", "--epochs", "2")
    assert main(["train", *FAST, "--epochs", "2", "--output", str(tmp_path / "single")]) == 0
    sharded, single = _weights(tmp_path / "fsdp" / "model.pt"), _weights(tmp_path / "single" / "model.pt")
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-6)
    checkpoint = torch.load(tmp_path / "fsdp" / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["sam_steps"] == 2 * (1347 // 64)
    _torchrun(tmp_path, "resumed", "--epochs", "1")
    _torchrun(tmp_path, "resumed", "--epochs", "2", "--resume")
    resumed = _weights(tmp_path / "resumed" / "model.pt")
    # same code path (both runs under torchrun on 2 ranks): the resume replays the same ops in the same order
    assert all(torch.equal(resumed[key], sharded[key]) for key in sharded)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_loss"] for r in lines] == [r["test_loss"] for r in straight]  # the same evaluations, same weights
    # a --fsdp run resumes only with --fsdp (its checkpoint's optimiser state is keyed by parameter names)
    code = main(["train", "--output", str(tmp_path / "fsdp"), "--resume", "--no-fsdp", "--epochs", "3"])
    assert code == 2 and "fsdp: True -> False" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--fsdp shards the model across torchrun processes, and this run has one"),
        (["--group-size", "8"], "fsdp does not combine with group_size"),
        (["--optimizer", "rwsam"], "fsdp does not combine with optimizer rwsam"),
        (["--amp", "fp16"], "fsdp does not combine with amp fp16"),
        (["--track-sharpness", "5"], "fsdp does not combine with track_sharpness"),
        (["--weight-decay-in-loss"], "fsdp does not combine with weight_decay_in_loss"),
    ],
)
def test_train_fsdp_refuses_clearly(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    code = main(["train", *FAST, "--epochs", "1", "--fsdp", *extra, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err, err
