"""Sharded parameters: FSDP2's ``fully_shard`` makes each parameter a DTensor of which this rank holds a shard.

SAM then works on the local shards. The ascent rules are handed local tensors and take their totals (the norm of
the gradient, its largest entry, sums) through ``flatminima.optim.norms.reduced_over``, over the process
groups the parameters are sharded on, so every rank computes the perturbation of the whole model and all agree on
the inf/NaN checks. ``w + e`` is written into the shards in place (FSDP gathers the weights from there for the
next forward pass) and ``w`` is copied back afterwards, bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from flatminima.optim import scaler as amp
from flatminima.optim.norms import global_norm, reduced_over, tensor_norms

__all__ = [
    "check_scaler",
    "check_shardable",
    "host_norms",
    "is_sharded",
    "local",
    "locals_of",
    "reducing",
    "shard_groups",
]


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


def reducing(groups: tuple[Any, ...] | None) -> AbstractContextManager[None]:
    """The block in which norms and sums run over all ranks' shards (``groups`` from ``shard_groups``), else
    a no-op."""
    return reduced_over(groups) if groups is not None else nullcontext()


def host_norms(groups: tuple[Any, ...] | None, grads: list[Tensor]) -> list[float]:
    """Norms of ``grads`` read back for the inf/NaN check: per tensor, or the total over all ranks' shards."""
    if not grads:
        return []
    if groups is None:
        return torch.stack(tensor_norms(grads)).tolist()
    with reduced_over(groups):
        return [global_norm(tensor_norms(locals_of(grads))).item()]


def check_scaler(sharded: bool, grad_scaler: torch.amp.GradScaler | None) -> None:
    if sharded and amp.is_active(grad_scaler):
        raise ValueError(
            "a GradScaler with sharded (FSDP) parameters is not supported: its inf/NaN check would differ "
            "between ranks. Use bfloat16 autocast without a GradScaler, or float32."
        )


def check_shardable(book: Any, descent: Any, groups: list[dict[str, Any]], flatten: bool = False) -> None:
    """Sharded parameters: every rule in use must work on local shards (declare ``shard_aware``), and the
    parameters cannot be re-pointed into one flat buffer."""
    from flatminima.optim.rules import DescentCapabilities

    if flatten:
        raise ValueError(
            "flatten=True re-points the parameters into one buffer, which FSDP's sharded parameters do not "
            "allow; use flatten=False with fully_shard."
        )
    for rule in {book.rule_for(g) for g in groups}:  # rho = 0 now may grow (a rho schedule): all are checked
        if not book.declared(rule).shard_aware:
            raise ValueError(
                f"the ascent rule {rule!r} is not declared shard_aware, so it cannot run on FSDP's sharded "
                "parameters (its totals would cover this rank's shard only). The built-in DualNorm (any p), "
                "Adaptive and Unnormalized rules can."
            )
        if book.declared(rule).state_keys:
            raise ValueError(
                f"the ascent rule {rule!r} keeps state of its own, which on FSDP's sharded parameters would be kept "
                "as local shards that FSDP's state-dict functions do not gather; use a rule without state_keys."
            )
    declared = book.declared(descent, DescentCapabilities)
    if not (declared.is_identity or declared.shard_aware):
        raise ValueError(
            f"the descent rule {descent!r} is not declared shard_aware, so it cannot run on FSDP's sharded "
            "parameters; use SAM's own descent (PerturbedGradient) with fully_shard."
        )
