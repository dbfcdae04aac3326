"""``flatminima train --fsdp``: the model sharded with FSDP2's ``fully_shard`` across the torchrun processes.

What sharding changes around the loop, kept here: applying ``fully_shard``; checkpoints as full (unsharded) state
dicts, gathered by every rank and written by rank 0, so a checkpoint reads like any other and resumes under any
number of processes; evaluation in lock step (FSDP's all-gathers are collectives, so every rank must run as many
forward passes); BatchNorm buffers, which FSDP leaves per rank, made rank 0's after each epoch (as DDP does
before every forward pass), so that evaluation and checkpoints agree on them and a resumed run equals a straight
one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flatminima.optim.sam import SAM

__all__ = ["full_state", "load_full_state", "lockstep_batch_size", "shard_model", "sync_buffers"]

_SAM_STEPS = "sam_steps"


def shard_model(model: nn.Module, device_type: str) -> nn.Module:
    """``fully_shard`` every submodule that holds parameters of its own, then the root (which then holds the
    rest); in place. The process group must be up (torchrun)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    owners = [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]
    for module in owners:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _plain(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser torch's state-dict functions handle: SAM's base (they call ``step()`` without a closure to
    initialise an empty state, which SAM refuses); SAM shares its groups and state."""
    return optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's and the optimiser's (if given) full state dicts, on the CPU, on rank 0 (other ranks get empty
    dicts). A collective: every rank calls it. The optimiser's state is keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, None
    optimizer_state = get_optimizer_state_dict(model, _plain(optimizer), options=options)
    if isinstance(optimizer, SAM) and optimizer_state:
        optimizer_state[_SAM_STEPS] = optimizer.steps
    return model_state, optimizer_state


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Shard full state dicts (as ``full_state`` wrote them, read by every rank) into the model and optimiser."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    optimizer_state = dict(optimizer_state)
    steps = optimizer_state.pop(_SAM_STEPS, None)
    set_model_state_dict(model, model_state, options=_options())
    plain = _plain(optimizer)
    set_optimizer_state_dict(model, plain, optimizer_state, options=_options())
    if isinstance(optimizer, SAM):  # share the loaded groups and state again, with the step counter
        optimizer.load_state_dict({**plain.state_dict(), _SAM_STEPS: int(steps or 0)})


def sync_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def lockstep_batch_size(count: int, world_size: int, batch_size: int) -> int:
    """An evaluation batch size, ``batch_size`` or a little more, at which each rank's share of ``count`` examples
    (every ``world_size``-th) takes the same number of forward passes; FSDP's all-gathers are collectives."""
    shares = [len(range(rank, count, world_size)) for rank in range(world_size)]
    if min(shares) == 0 < max(shares):
        raise ValueError(
            f"an evaluation split of {count} examples cannot be spread over {world_size} processes under --fsdp "
            "(every process needs at least one example); use fewer processes."
        )
    size = batch_size
    while len({math.ceil(share / size) for share in shares}) > 1:
        size += 1
    return size
