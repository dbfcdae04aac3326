"""Sharded parameters: FSDP2's ``fully_shard`` makes each parameter a DTensor of which this rank holds a shard.

SAM then works on the local shards. The ascent rules are handed local tensors and take their totals (the norm of
the gradient, its largest entry, sums) through :func:`flatminima.optim.norms.reduced_over`, over the process
groups the parameters are sharded on, so every rank computes the perturbation of the whole model and all agree on
the inf/NaN checks. ``w + e`` is written into the shards in place (FSDP gathers the weights from there for the
next forward pass) and ``w`` is copied back afterwards, bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["is_sharded", "local", "locals_of", "shard_groups"]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a sharded parameter, or its gradient).

    Not importing ``torch.distributed.tensor`` for this keeps ``import flatminima`` light (the module costs about
    0.4 s): a DTensor exists only once that module was imported, by whoever made it."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(dtensor_module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (under ``torch.no_grad``, a view of its storage), else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def locals_of(tensors: Iterable[Tensor]) -> list[Tensor]:
    return [local(t) for t in tensors]


def shard_groups(params: Iterable[Tensor]) -> tuple[Any, ...] | None:
    """The process groups over which the shards of ``params`` add up to whole tensors; None if none is sharded.

    All parameters must be DTensors on one device mesh, sharded over the same mesh dimensions (what
    ``fully_shard`` gives, HSDP's replicated dimension included); a mix would count replicated values once per
    rank, so it is refused.
    """
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"{len(sharded)} of the {len(params)} parameters are sharded DTensors (FSDP2's fully_shard) and the "
            "others plain tensors; SAM needs all or none sharded. Apply fully_shard to the root module too, so "
            "that it holds every parameter, then build the optimiser."
        )
    mesh = sharded[0].device_mesh
    dims: set[tuple[int, ...]] = set()
    for param in sharded:
        if param.device_mesh != mesh:
            raise ValueError("SAM needs every sharded parameter on one device mesh; got several.")
        if any(placement.is_partial() for placement in param.placements):
            raise ValueError(f"SAM cannot perturb a parameter with a Partial placement ({param.placements}).")
        dims.add(tuple(dim for dim, placement in enumerate(param.placements) if placement.is_shard()))
    if len(dims) != 1:
        raise ValueError(
            "SAM needs every parameter sharded over the same mesh dimensions (as fully_shard does); got the "
            f"dimensions {sorted(dims)}."
        )
    shard_dims = dims.pop()
    if mesh.ndim == 1:
        return tuple(mesh.get_group() for _ in shard_dims)
    return tuple(mesh.get_group(dim) for dim in shard_dims)
