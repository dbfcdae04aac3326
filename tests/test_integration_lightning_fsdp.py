"""SharpnessAwareMixin on FSDP2 through Lightning: ``ModelParallelStrategy`` with ``fully_shard`` applied in
``configure_model``, on 2 gloo processes on the CPU, against the plain PyTorch SAM loop of
tests/test_integration_lightning.py on one process over the global batch.

Lightning builds the optimiser after ``configure_model``, so SAM holds the sharded parameters (DTensors); every
backward pass reduce-scatters the gradient (the mean over the ranks' halves of the batch), SAM's norms are taken
over all ranks' shards (:mod:`flatminima.optim.sharded`), so the step is SAM's on the global batch.

float32: ``ModelParallelStrategy`` accepts only 32-true, bf16-mixed, bf16-true and 16-true (not 64-true). The two
runs do the same maths in a different order (two half-batch means averaged by the reduce-scatter against one
full-batch mean, the norm as a sum of per-shard partial sums), so they differ by float32 rounding (3e-8 at most
when this was written), not bit for bit: rtol 1e-5 / atol 1e-6 is float32 tolerance with room for other CPUs' kernels,
and far below the ascent's own effect on the weights (checked against plain SGD, > 1e-3).

Checkpoints of the strategy (one full file, or a folder of shards) resume bit for bit, SAM's step counter included.

The FSDP1 path (``FSDPStrategy``) stays refused, with what to use instead: Lightning wraps the model in
``FullyShardedDataParallel`` (flat parameters), and without a GPU Lightning refuses it before the mixin sees it
("The strategy `fsdp` requires a GPU accelerator", lightning/pytorch/trainer/connectors/accelerator_connector.py).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

L = pytest.importorskip("lightning")

from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from flatminima import EveryKSteps  # noqa: E402
from flatminima.integrations.lightning import _check_supported  # noqa: E402
from tests._gloo import WORLD_SIZE, run_on_gloo  # noqa: E402
from tests.test_integration_lightning import (  # noqa: E402
    BATCH,
    LR,
    MOMENTUM,
    Net,
    Resumable,
    make_batches,
    make_model,
    reference,
    step_lr,
)

TOL = dict(rtol=1e-5, atol=1e-6)
CASES = {  # name: (max_steps, Trainer options, Net options)
    "plain": (4, {}, {}),
    # 5 batches an epoch: windows (0, 1), (2, 3), (4); clipping of g(w + e) over the DTensor gradients
    "accumulate_clip_scheduler": (3, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}, {"scheduler": step_lr}),
    # two epochs of 5 steps, the ascent on even steps: reads SAM's step counter
    "cadence": (10, {}, {"cadence": EveryKSteps(2)}),
}
RESUMES = {"resumed_full": False, "resumed_distributed": True}  # save_distributed_checkpoint

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


class ShardedNet(Net):
    """The Net of the Lightning tests, each Linear layer and then the MLP sharded with FSDP2 in configure_model;
    rank r trains on rows r*4 to r*4 + 3 of every batch of the plain loop."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if any(isinstance(p, torch.distributed.tensor.DTensor) for p in self.parameters()):
            return  # configure_model may run again (another fit)
        mesh = self.device_mesh["data_parallel"]
        for module in self.model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def train_dataloader(self):
        rank, share = self.global_rank, BATCH // self.trainer.world_size
        rows = slice(rank * share, (rank + 1) * share)
        return Resumable([(x[rows], y[rows]) for x, y in make_batches(torch.float32)])  # resumes mid-epoch


def _trainer(max_steps: int, save_distributed_checkpoint: bool = True, **options) -> L.Trainer:
    strategy = ModelParallelStrategy(
        data_parallel_size=WORLD_SIZE, tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint
    )
    return L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        precision="32-true",
        max_steps=max_steps,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, **options},
    )


def _fit(net: ShardedNet, run: L.Trainer, **fit_options) -> dict[str, object]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(net, **fit_options)
    sam = run.optimizers[0]
    params = [p for group in sam.param_groups for p in group["params"]]
    return {
        "weights": {key: value.full_tensor().clone() for key, value in net.model.state_dict().items()},
        "sharded": all(isinstance(p, torch.distributed.tensor.DTensor) for p in params),
        "steps": (run.global_step, sam.steps),
        "perturbed": sam.is_perturbed or net.perturbed_in_hook,
        "lr": sam.param_groups[0]["lr"],
        # the stand-in for SAM.step during a resume was dropped, and the LR scheduler's wrapper of it kept
        "step_restored": not getattr(vars(sam).get("step"), "_sam_state_initialising", False),
        "scheduler_warned": any("lr_scheduler.step()" in str(w.message) for w in caught),
    }


def _worker(rank: int, out_dir: Path) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # Lightning joins the process group the harness started
    results: dict[str, object] = {}
    for name, (steps, options, net_options) in CASES.items():
        net = ShardedNet(make_model(dtype=torch.float32), **net_options)
        results[name] = _fit(net, _trainer(steps, **options))
    # 3 steps with a ModelCheckpoint (one full file, or a folder of shards), then a resume to 10 steps: the
    # "cadence" run
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name, distributed in RESUMES.items():
        saving = ModelCheckpoint(dirpath=out_dir / name, every_n_train_steps=3)
        run = _trainer(3, distributed, enable_checkpointing=True, callbacks=[saving])
        _fit(ShardedNet(make_model(dtype=torch.float32), cadence=EveryKSteps(2)), run)
        net = ShardedNet(make_model(dtype=torch.float32, seed=1), cadence=EveryKSteps(2))  # weights from the file
        results[name] = _fit(net, _trainer(10, distributed), ckpt_path=out_dir / name / "epoch=0-step=3.ckpt")
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def lightning_fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("lightning_fsdp")
    run_on_gloo(_worker, out_dir, timeout_s=240)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _plain_sgd(steps: int) -> dict[str, torch.Tensor]:
    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for x, y in make_batches(torch.float32)[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_model_parallel_fsdp2_matches_the_global_batch_loop(lightning_fsdp_runs, name: str) -> None:
    steps, options, net_options = CASES[name]
    model = make_model(dtype=torch.float32)
    opt, _ = reference(
        model,
        make_batches(torch.float32),
        steps,
        k=options.get("accumulate_grad_batches", 1),
        clip=options.get("gradient_clip_val"),
        scheduler=net_options.get("scheduler"),
        cadence=net_options.get("cadence"),
    )
    expected = {key: value.detach() for key, value in model.state_dict().items()}
    for rank, results in enumerate(lightning_fsdp_runs):
        result = results[name]
        assert result["sharded"], "SAM must hold the sharded parameters (built after configure_model)"
        assert result["steps"] == (steps, steps) and not result["perturbed"] and result["step_restored"]
        assert not result["scheduler_warned"]
        assert result["lr"] == opt.param_groups[0]["lr"]
        weights = result["weights"]
        assert weights.keys() == expected.keys()
        for key in expected:
            where = f"rank {rank}, {key}"
            torch.testing.assert_close(weights[key], expected[key], **TOL, msg=lambda m, where=where: f"{where}: {m}")
    if name == "plain":  # the ascent moved the weights far more than the tolerance
        sgd = _plain_sgd(steps)
        assert max((expected[k] - sgd[k]).abs().max().item() for k in sgd) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_model_parallel_resume_equals_the_uninterrupted_run(lightning_fsdp_runs, name: str) -> None:
    """Saved after step 3 (mid-epoch, a loader Lightning checkpoints) and resumed to step 10 == the 10 straight
    steps, bit for bit (same ops, same order):
    the optimiser state goes through torch's set_optimizer_state_dict (whose initialising step() without a closure
    SAM hands to its base optimiser), and SAM's step counter through the checkpoint (else the cadence would shift:
    the ascents on the odd steps after the resume)."""
    for results in lightning_fsdp_runs:
        resumed, straight = results[name], results["cadence"]
        assert resumed["steps"] == (10, 10) and resumed["step_restored"] and not resumed["perturbed"]
        for key, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][key], value), key


def test_fsdp1_strategy_is_refused_with_what_to_use_instead() -> None:
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # Lightning's own check, on the CPU
        L.Trainer(accelerator="cpu", strategy="fsdp", devices=1, logger=False)
    with pytest.raises(NotImplementedError) as caught:  # the mixin's, reached on a GPU
        _check_supported(FSDPStrategy(), FSDPPrecision("32-true"))
    message = str(caught.value)
    assert "FSDP1's FullyShardedDataParallel" in message
    assert "ModelParallelStrategy" in message and "fully_shard" in message and "configure_model" in message


def test_model_parallel_strategy_is_accepted() -> None:
    from lightning.pytorch.plugins.precision import Precision

    _check_supported(ModelParallelStrategy(), Precision())  # no error
