"""The variants under DistributedDataParallel (2 gloo processes): every rank takes the same step.

Ahn et al.'s descent mixes ``g(w)`` into the update, so the batch step all-reduces the pass at ``w`` for them;
with the same random direction on both ranks, ``ahn-rs`` under DDP is then exactly the single-process step on the
global batch. RW-SAM and n-SAM perturb per rank (as SAM does by default) and must still keep the ranks equal.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatminima import SAM, DualNorm, RandomDirection, SharpnessAwareStep
from flatminima.variants import AscentSample, GibbsReweighting, OrthogonalEscape, RandomSign, SingleExample
from tests._gloo import WORLD_SIZE, ddp_data, ddp_mlp, run_on_gloo

PER_RANK, STEPS = 8, 3
SCENARIOS = ("ahn-rs", "ahn-sa", "rwsam", "nsam")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _model() -> nn.Module:
    return ddp_mlp()


def _data() -> tuple[Tensor, Tensor]:
    return ddp_data(STEPS, WORLD_SIZE * PER_RANK)


def _loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _step(scenario: str, model: nn.Module, rank: int) -> SharpnessAwareStep:
    base = dict(rho=0.1, lr=0.1, momentum=0.9)
    params = (model.module if isinstance(model, DistributedDataParallel) else model).parameters()
    if scenario == "ahn-rs":
        opt = SAM(params, torch.optim.SGD, perturbation=RandomDirection(torch.Generator().manual_seed(3)),
                  descent=OrthogonalEscape(math.inf, 0.5), **base)  # fmt: skip
        return SharpnessAwareStep(model, _loss, opt)
    if scenario == "ahn-sa":
        opt = SAM(params, torch.optim.SGD, perturbation=RandomSign(DualNorm(2.0), torch.Generator().manual_seed(4)),
                  descent=OrthogonalEscape(math.inf, 0.5), **base)  # fmt: skip
        return SharpnessAwareStep(model, _loss, opt, batch_rule=SingleExample(torch.Generator().manual_seed(5 + rank)))
    opt = SAM(params, torch.optim.SGD, **base)
    if scenario == "rwsam":
        return SharpnessAwareStep(model, _loss, opt, batch_rule=GibbsReweighting(2.0, 1e-4, generator=None))
    pool_x, pool_y = _data()[0][0], _data()[1][0]

    def draw(n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(pool_x.shape[0], generator=generator)[:n]
        return pool_x[index], pool_y[index]

    return SharpnessAwareStep(model, _loss, opt, batch_rule=AscentSample(draw, 12, seed=rank))


def _train(rank: int, out_dir: Path) -> None:
    inputs, targets = _data()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for scenario in SCENARIOS:
        torch.manual_seed(rank)  # RW-SAM draws z from the global RNG: a different z on each rank
        ddp = DistributedDataParallel(_model())
        step = _step(scenario, ddp, rank)
        for x, y in zip(inputs[:, rows], targets[:, rows]):
            step(x, y)
        torch.save([p.detach().clone() for p in ddp.module.parameters()], out_dir / f"{scenario}_{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[Tensor]]]:
    out_dir = tmp_path_factory.mktemp("variants_ddp")
    run_on_gloo(_train, out_dir)
    return {s: [torch.load(out_dir / f"{s}_{r}.pt", weights_only=True) for r in range(WORLD_SIZE)] for s in SCENARIOS}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_takes_the_same_step(ranks: dict[str, list[list[Tensor]]], scenario: str) -> None:
    first, second = ranks[scenario]
    # same code path on both ranks: the same ops on the same all-reduced gradients (gloo hands every rank the same
    # bytes), so the ranks stay equal bit for bit, on any CPU
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, _model().parameters()))  # it did train


@pytest.mark.slow
def test_ahn_rs_under_ddp_is_the_single_process_step(ranks: dict[str, list[list[Tensor]]]) -> None:
    model = _model()
    step = _step("ahn-rs", model, 0)
    inputs, targets = _data()
    for x, y in zip(inputs, targets):
        step(x, y)
    worst = max((a - b).abs().max().item() for a, b in zip(ranks["ahn-rs"][0], model.parameters()))
    assert worst < 1e-10, worst
