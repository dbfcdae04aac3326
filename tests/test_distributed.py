"""SAM under DistributedDataParallel: 2 processes on gloo (CPU), compared with single-process runs.

One spawned run (spawning is the slow part) trains the same float64 MLP under DDP in four ways and saves the
weights of each rank; the tests compare them with single-process :class:`SharpnessAwareStep` runs over the
global batch (rank r holds rows [8r, 8r + 8) of the 16):

- the default step (first pass under ``no_sync``, each rank perturbed by its own gradient) is m-SAM with
  m = the per-rank batch, and differs from plain SAM;
- ``sync_perturbation=True`` is plain SAM on the global batch;
- the two-step pattern written by hand (``no_sync`` backward, ``first_step``, backward, ``second_step``) is the
  default step;
- ``group_size=4`` under DDP is m-SAM with m = 4 on the global batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatminima import SAM, SharpnessAwareStep
from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

PER_RANK = 8
GLOBAL_BATCH = WORLD_SIZE * PER_RANK
STEPS = 3
RHO = 0.1
LR = 0.1
MOMENTUM = 0.9
TOL = dict(rtol=1e-10, atol=1e-12)
SCENARIOS = ("step", "sync", "manual", "msam4")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# ---------------------------------------------------------------------------- shared by workers and references


def _model() -> nn.Module:
    return ddp_mlp()


def _data() -> tuple[Tensor, Tensor]:
    """Inputs (STEPS, 16, 6) and class targets (STEPS, 16): different data at each step."""
    return ddp_data(STEPS, GLOBAL_BATCH)


def _optimizer(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)


def _loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss(reduction="none")


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# ---------------------------------------------------------------------------- the DDP worker


def _run_ddp(scenario: str, rank: int, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    ddp = DistributedDataParallel(_model())
    opt = _optimizer(ddp.module)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    if scenario == "manual":
        for x, y in zip(inputs[:, rows], targets[:, rows]):
            opt.zero_grad()
            with ddp.no_sync():
                F.cross_entropy(ddp(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
        return _weights(ddp.module)
    options = {"step": {}, "sync": {"sync_perturbation": True}, "msam4": {"group_size": 4}}[scenario]
    step = SharpnessAwareStep(ddp, _loss_fn(), opt, **options)
    for x, y in zip(inputs[:, rows], targets[:, rows]):
        step(x, y)
    return _weights(ddp.module)


def _train_scenarios(rank: int, out_dir: Path) -> None:
    inputs, targets = _data()
    for scenario in SCENARIOS:
        weights = _run_ddp(scenario, rank, inputs, targets)
        torch.save(weights, out_dir / f"{scenario}_rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    """scenario -> [weights of rank 0, weights of rank 1] after STEPS steps."""
    out_dir = tmp_path_factory.mktemp("ddp")
    run_on_gloo(_train_scenarios, out_dir)
    return {
        scenario: [torch.load(out_dir / f"{scenario}_rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
        for scenario in SCENARIOS
    }


# ---------------------------------------------------------------------------- single-process references


def _single_process(group_size: int | None) -> dict[str, Tensor]:
    model = _model()
    step = SharpnessAwareStep(model, _loss_fn(), _optimizer(model), group_size=group_size)
    for x, y in zip(*_data()):
        step(x, y)
    return _weights(model)


@pytest.fixture(scope="module")
def single() -> dict[int | None, dict[str, Tensor]]:
    """group_size -> weights of a single-process run over the global batch (None: plain SAM)."""
    return {m: _single_process(m) for m in (None, PER_RANK, 4)}


def _assert_ranks_match(per_rank: list[dict[str, Tensor]], expected: dict[str, Tensor]) -> None:
    for rank, weights in enumerate(per_rank):
        assert weights.keys() == expected.keys()
        for name in expected:
            where = f"rank {rank}, {name}"
            torch.testing.assert_close(weights[name], expected[name], **TOL, msg=lambda m, where=where: f"{where}: {m}")
    # DDP all-reduces the descent gradient (gloo hands every rank the same bytes) and each rank then runs the same
    # ops on it: the same code path, so the ranks hold the very same weights on any CPU
    for name in expected:
        torch.testing.assert_close(per_rank[0][name], per_rank[1][name], rtol=0, atol=0)


def _max_abs_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


# ---------------------------------------------------------------------------- the tests


def test_ddp_default_is_msam_with_per_rank_batch(ddp_weights, single):
    _assert_ranks_match(ddp_weights["step"], single[PER_RANK])
    # and not plain SAM on the global batch: a synced perturbation would fail here
    for weights in ddp_weights["step"]:
        assert _max_abs_difference(weights, single[None]) > 1e-6


def test_ddp_sync_perturbation_is_plain_sam(ddp_weights, single):
    _assert_ranks_match(ddp_weights["sync"], single[None])


def test_ddp_manual_two_step_pattern_matches_step(ddp_weights, single):
    _assert_ranks_match(ddp_weights["manual"], single[PER_RANK])
    for manual, step in zip(ddp_weights["manual"], ddp_weights["step"]):
        for name in step:
            torch.testing.assert_close(manual[name], step[name], **TOL)


def test_ddp_msam_within_ranks_matches_single_process(ddp_weights, single):
    _assert_ranks_match(ddp_weights["msam4"], single[4])
    assert _max_abs_difference(single[4], single[PER_RANK]) > 1e-6  # m = 4 is not m = 8
