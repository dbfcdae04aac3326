"""flatminima.integrations.huggingface under FSDP2 through Accelerate (``FullyShardedDataParallelPlugin``, version 2):
``sam_step`` and ``SAMTrainer`` on 2 gloo processes on the CPU against one process on the full batch, float32.

Accelerate does not turn FSDP on for CPU processes: ``AcceleratorState.__init__`` (accelerate/state.py, 1.16.0, the
``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch at line 947) sets ``DistributedType.FSDP``
only for processes on an accelerator (MULTI_GPU, MULTI_NPU, MULTI_XPU...), and MULTI_CPU is not in its list, so
``Accelerator(cpu=True, fsdp_plugin=...)`` silently runs MULTI_CPU, that is DDP. The workers therefore set the
state's distributed type to FSDP by hand after building the Accelerator (what that branch sets on a GPU); all the
rest is Accelerate's own FSDP2 code: ``prepare`` applies ``fully_shard`` and swaps the optimiser's parameters for
the DTensor shards (``Accelerator._prepare_fsdp2``), ``no_sync`` is ``set_requires_gradient_sync(False)``.

Why float32 and rtol = atol = 1e-5: each rank's backward covers half the batch and FSDP's reduce-scatter averages
the halves, so the gradient is summed in another order than one process's backward over the whole batch; in float32
that differs by a few ulps (about 1e-7 relative), which SAM's normalised ascent and four steps of momentum SGD carry
along without growing much. 1e-5 is a hundred times that, and far below the distance to plain SGD (checked).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import Tensor, nn

from flatminima import SAM, EveryKSteps
from flatminima.integrations.huggingface import sam_step, unwrap_sam
from flatminima.optim import RandomDirection
from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo
from tests.test_integration_huggingface import (
    BATCH,
    LR,
    RHO,
    InOrder,
    Tiny,
    _fresh_accelerate_state,  # noqa: F401 (the autouse fixture: a fresh Accelerate state per test)
    dataset,
    reference,
    step_batches,
    training_args,
)

PER_RANK = 8  # rows per rank and step: the global batch is 16
STEPS = 4
TOL = dict(rtol=1e-5, atol=1e-5)
TRAINER_CLIP = 0.8
CASES = {  # SAM's options, micro-batches per rank and step, max_grad_norm
    "sam": ({}, 1, None),
    "asam_accumulated_clipped": ({"adaptive": True}, 2, 0.55),
    "p_inf_accumulated": ({"p": math.inf}, 2, None),
}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _mlp() -> nn.Module:
    return ddp_mlp().float()


def _sam(model: nn.Module, **options: object) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, **options)


def _data() -> tuple[Tensor, Tensor]:
    inputs, targets = ddp_data(STEPS, WORLD_SIZE * PER_RANK)
    return inputs.float(), targets


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _as_fsdp(accelerator: Accelerator, version: int = 2) -> Accelerator:
    """Accelerate's state switched to FSDP with ``version`` (see the module's docstring for why on the CPU)."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
    PartialState().distributed_type = DistributedType.FSDP  # each new AcceleratorState copies it from here
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def _error(call) -> str:
    try:
        call()
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


# ---------------------------------------------------------------------------- the workers


def _fsdp_worker(rank: int, out_dir: Path) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # the evidence for the docstring: on CPU processes Accelerate ignores the plugin and runs DDP
    results: dict[str, object] = {"native_type": str(accelerator.distributed_type.value)}
    _as_fsdp(accelerator)
    results["is_fsdp2"] = accelerator.is_fsdp2
    inputs, targets = _data()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for name, (options, micro, max_grad_norm) in CASES.items():
        model = _mlp()
        model, optimizer = accelerator.prepare(model, _sam(model, **options))
        size = PER_RANK // micro
        losses = []
        for x, y in zip(inputs[:, rows], targets[:, rows]):
            batches = [(x[i : i + size], y[i : i + size]) for i in range(0, PER_RANK, size)]
            losses.append(float(sam_step(accelerator, model, optimizer, _loss, *batches, max_grad_norm=max_grad_norm)))
        sam = unwrap_sam(optimizer)
        results[name] = {
            "weights": {k: v.full_tensor().clone() for k, v in model.state_dict().items()},
            "losses": losses,
            "sharded": sam.sharded and all(type(p).__name__ == "DTensor" for p in model.parameters()),
            "steps": sam.steps,
        }

    # what FSDP2 does not support, refused alike on every rank
    model = _mlp()
    model, optimizer = accelerator.prepare(model, _sam(model, perturbation=RandomDirection()))
    batch = (inputs[0, rows], targets[0, rows])
    results["random_direction"] = _error(lambda: sam_step(accelerator, model, optimizer, _loss, batch))
    model = _mlp()
    model, optimizer = accelerator.prepare(model, _sam(model))
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    def inside_no_sync() -> None:
        with accelerator.no_sync(model):  # what accelerator.accumulate enters on its steps that do not sync
            sam_step(accelerator, model, optimizer, _loss, batch)

    results["no_sync"] = _error(inside_no_sync)
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    results["no_sync_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("hf_fsdp")
    run_on_gloo(_fsdp_worker, out_dir, timeout_s=180)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


# ---------------------------------------------------------------------------- one process on the full batch


def _reference(name: str) -> tuple[dict[str, Tensor], list[float], list[float]]:
    """SAM written out on the global batch of 16: g(w), first_step, g(w + e), clip, second_step. Returns the
    weights, the losses at w and the norms of g(w + e) before clipping."""
    options, _, max_grad_norm = CASES[name]
    model = _mlp()
    sam = _sam(model, **options)
    losses, norms = [], []
    for x, y in zip(*_data()):
        sam.zero_grad()
        loss = _loss(model, (x, y))
        loss.backward()
        sam.first_step(zero_grad=True)
        _loss(model, (x, y)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)))
        sam.second_step(zero_grad=True)
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses, norms


def _plain_sgd() -> dict[str, Tensor]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(*_data()):
        opt.zero_grad()
        _loss(model, (x, y)).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sam_step_under_fsdp2_matches_one_process(fsdp_runs, name: str) -> None:
    expected, losses, norms = _reference(name)
    for rank, results in enumerate(fsdp_runs):
        assert results["native_type"] == "MULTI_CPU" and results["is_fsdp2"] is True
        run = results[name]
        assert run["sharded"] and run["steps"] == STEPS
        assert run["weights"].keys() == expected.keys()
        for key in expected:
            where = f"rank {rank}, {key}"
            torch.testing.assert_close(run["weights"][key], expected[key], **TOL, msg=lambda m, w=where: f"{w}: {m}")
    # each rank's loss is its half's; their mean is the global batch's
    mean = [sum(r[name]["losses"][i] for r in fsdp_runs) / WORLD_SIZE for i in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(losses), **TOL)
    sgd = _plain_sgd()
    assert max((expected[k] - sgd[k]).abs().max().item() for k in sgd) > 1e-3  # the ascent mattered
    max_grad_norm = CASES[name][2]
    if max_grad_norm is not None:  # the clipping bit on some steps, not all
        assert any(n > max_grad_norm for n in norms) and any(n < max_grad_norm for n in norms), norms


@pytest.mark.slow
def test_sam_step_under_fsdp2_refusals_agree_across_ranks(fsdp_runs) -> None:
    for results in fsdp_runs:
        assert "RandomDirection() is not declared shard_aware" in results["random_direction"]
        assert results["no_sync"].startswith("RuntimeError") and "inside accelerator.accumulate" in results["no_sync"]
        assert results["no_sync_unchanged"]


# ---------------------------------------------------------------------------- refusals, in this process


@pytest.mark.parametrize(
    ("kind", "version", "expected"),
    [
        ("FSDP", 1, r"FSDP1 \(fsdp_version=1\) is not supported: its flat parameters"),
        ("DEEPSPEED", 2, "DEEPSPEED backend is not supported: its engine owns the optimizer step"),
        ("XLA", 2, "XLA backend is not supported"),
        ("MEGATRON_LM", 2, "MEGATRON_LM backend is not supported"),
    ],
)
def test_sam_step_refuses_other_sharding_engines(kind: str, version: int, expected: str) -> None:
    accelerator = _as_fsdp(Accelerator(cpu=True), version)
    accelerator.state.distributed_type = DistributedType(kind)
    model = _mlp()
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(NotImplementedError, match=expected):
        sam_step(accelerator, model, _sam(model), _loss, batch)


def test_sam_step_refuses_fp16_under_fsdp2() -> None:
    accelerator = _as_fsdp(Accelerator(cpu=True))
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what Accelerate builds for fp16 on a GPU
    model = _mlp()
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(NotImplementedError, match=r"FSDP2 with fp16 .* Use mixed_precision='bf16' or 'no'"):
        sam_step(accelerator, model, _sam(model), _loss, batch)


# ---------------------------------------------------------------------------- SAMTrainer under FSDP2


class _FSDP2Trainer(InOrder):
    """SAMTrainer on Accelerate's FSDP2 path (switched on by hand on the CPU: see the module's docstring)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        _as_fsdp(self.accelerator)
        self.is_fsdp_enabled = True  # what the Trainer reads from the state's fsdp_plugin on a GPU


def _trainer_worker(rank: int, out_dir: Path) -> None:
    """SAMTrainer building SAM around the Trainer's SGD (FSDP forbids optimizers=), k = 2 micro-batches of 2 rows
    per rank: Accelerate hands rank r the batches r, r + 2, ... so each step sees the 8 rows of one process's step."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    model = Tiny(dtype=torch.float32)
    args = training_args(
        out_dir / f"trainer{rank}", per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd",
        learning_rate=LR, max_grad_norm=TRAINER_CLIP,
    )  # fmt: skip
    trainer = _FSDP2Trainer(model=model, args=args, train_dataset=dataset(dtype=torch.float32), sam_rho=RHO)
    trainer.train()
    sam = unwrap_sam(trainer.optimizer)
    wrapped = trainer.model_wrapped
    torch.save(
        {
            "weights": {k: v.full_tensor().clone() for k, v in wrapped.state_dict().items()},
            "sharded": sam.sharded and all(type(p).__name__ == "DTensor" for p in wrapped.parameters()),
            "steps": sam.steps,
        },
        out_dir / f"trainer{rank}.pt",
    )


@pytest.mark.slow
def test_sam_trainer_under_fsdp2_matches_one_process(tmp_path: Path) -> None:
    run_on_gloo(_trainer_worker, tmp_path, timeout_s=180)
    ref = Tiny(dtype=torch.float32)
    base = torch.optim.SGD(
        [{"params": [p for n, p in ref.named_parameters() if n.endswith("weight")]},
         {"params": [p for n, p in ref.named_parameters() if n.endswith("bias")]}], lr=LR,
    )  # fmt: skip
    _, norms = reference(
        ref, SAM(None, base, rho=RHO), step_batches(dataset(dtype=torch.float32), 2 * BATCH), max_grad_norm=TRAINER_CLIP
    )
    assert any(n > TRAINER_CLIP for n in norms) and any(n < TRAINER_CLIP for n in norms), norms
    for rank in range(WORLD_SIZE):
        run = torch.load(tmp_path / f"trainer{rank}.pt", weights_only=False)
        assert run["sharded"] and run["steps"] == 3
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(run["weights"][key], value, **TOL, msg=lambda m, r=rank: f"rank {r}: {m}")


def _checkpoint_run(out_dir: Path, resume: str | None) -> dict[str, object]:
    model = Tiny(dtype=torch.float32)
    args = training_args(
        out_dir / "run", per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_torch",
        learning_rate=0.01, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    trainer = _FSDP2Trainer(
        model=model, args=args, train_dataset=dataset(dtype=torch.float32), sam_rho=RHO,
        sam_kwargs={"cadence": EveryKSteps(2)},
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    sam = unwrap_sam(trainer.optimizer)
    return {
        "weights": {k: v.full_tensor().clone() for k, v in trainer.model_wrapped.state_dict().items()},
        "sam_steps": sam.steps,
        "adam_steps": sorted({int(state["step"]) for state in sam.state.values()}),
    }


def _checkpoint_worker(rank: int, out_dir: Path) -> None:
    """3 steps saving at step 2, then a run resumed from that checkpoint (sharded model and optimiser state)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    straight = _checkpoint_run(out_dir, None)
    files = sorted(os.listdir(out_dir / "run" / "checkpoint-2"))
    resumed = _checkpoint_run(out_dir, str(out_dir / "run" / "checkpoint-2"))
    torch.save({"straight": straight, "resumed": resumed, "files": files}, out_dir / f"checkpoint{rank}.pt")


@pytest.mark.slow
def test_sam_trainer_under_fsdp2_resumes_exactly(tmp_path: Path) -> None:
    """Accelerate's FSDP2 checkpoint of the optimiser goes through the base optimiser (torch's state-dict functions
    call step() without a closure, which SAM refuses), SAM's step counter beside it; a resumed run is the straight
    one bit for bit (same ops in the same order), AdamW's state and the cadence's counter restored."""
    run_on_gloo(_checkpoint_worker, tmp_path, timeout_s=180)
    for rank in range(WORLD_SIZE):
        run = torch.load(tmp_path / f"checkpoint{rank}.pt", weights_only=False)
        assert "sam_state.json" in run["files"] and "optimizer_0" in run["files"], run["files"]
        straight, resumed = run["straight"], run["resumed"]
        assert straight["sam_steps"] == resumed["sam_steps"] == 3
        assert straight["adam_steps"] == resumed["adam_steps"] == [3]  # 2 loaded, then 1: the state was restored
        assert all(torch.equal(straight["weights"][k], resumed["weights"][k]) for k in straight["weights"])
