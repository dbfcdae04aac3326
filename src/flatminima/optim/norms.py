"""Norms over lists of tensors, without host syncs, accumulated in float32 for half-precision tensors.

The global reductions (``global_norm``, ``global_max``, ``global_sum``) are over every tensor passed,
and, inside ``reduced_over``, over the other ranks' parts of them too: with sharded parameters (FSDP2) each rank
holds a shard of each tensor, and SAM's rules, written for whole tensors, then see the whole model's totals.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

__all__ = [
    "FLAT_LIMIT",
    "flat_norm",
    "global_max",
    "global_norm",
    "global_sum",
    "is_finite",
    "reduced_over",
    "tensor_norms",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
FLAT_LIMIT = 1 << 20  # elements: below this a flat copy of the tensors costs less than a kernel per tensor
_SHARD_GROUPS: ContextVar[tuple[Any, ...] | None] = ContextVar("flatminima_shard_groups", default=None)


@contextmanager
def reduced_over(groups: Sequence[Any] | None) -> Iterator[None]:
    """Within the block, the global reductions also combine the values of every rank of each process group in
    ``groups`` (the groups the tensors' shards are spread over); ``None`` or empty: this process's tensors only.

    Every rank of the groups must then make the same sequence of reductions (they are collectives).
    """
    token = _SHARD_GROUPS.set(tuple(groups) if groups else None)
    try:
        yield
    finally:
        _SHARD_GROUPS.reset(token)


def _all_reduce(value: Tensor, op: str) -> Tensor:
    groups = _SHARD_GROUPS.get()
    if groups:
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        for group in groups:
            dist.all_reduce(value, op=reduce_op, group=group)
    return value


def tensor_norms(tensors: list[Tensor], low: bool | None = None) -> list[Tensor]:
    """Per-tensor L2 norms, accumulated in float32 for half-precision tensors (their norm overflows fp16);
    ``low``: whether any tensor is half precision, when the caller knows."""
    if low is None:
        low = any(t.dtype in _LOW_PRECISION for t in tensors)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)


def flat_norm(tensor: Tensor) -> Tensor:
    """L2 norm of one tensor, in float32 at least."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32 if tensor.dtype in _LOW_PRECISION else None)


def stack(values: list[Tensor]) -> Tensor:
    """0-d tensors stacked on the first one's device."""
    try:
        return torch.stack(values)
    except RuntimeError:  # on several devices
        device = values[0].device
        return torch.stack([v.to(device) for v in values])


def global_norm(norms: list[Tensor]) -> Tensor:
    """L2 norm of a list of tensors, from their per-tensor L2 norms, without a host sync."""
    stacked = stack(norms)
    if _SHARD_GROUPS.get() is None:
        return torch.linalg.vector_norm(stacked)
    return _all_reduce(stacked.square().sum(), "sum").sqrt()


def global_max(tensors: list[Tensor]) -> Tensor:
    """The largest entry over a list of tensors, as a 0-d tensor on the first one's device (for entries >= 0: an
    empty tensor, such as a rank's empty shard, counts as 0)."""
    device = tensors[0].device
    tops = [t.amax().to(device) for t in tensors if t.numel()]
    top = torch.stack(tops).amax() if tops else torch.zeros((), dtype=tensors[0].dtype, device=device)
    return _all_reduce(top, "max")


def global_sum(values: list[Tensor]) -> Tensor:
    """The sum of 0-d tensors, as a 0-d tensor on the first one's device."""
    return _all_reduce(stack(values).sum(), "sum")


def is_finite(tensors: list[Tensor]) -> bool:
    """Whether the L2 norm over every tensor is finite (an inf/NaN entry, or a norm past the float range); one host
    sync, True for an empty list. Small gradients on one device go through one flat copy (one kernel instead of
    one per tensor)."""
    if not tensors:
        return True
    if _SHARD_GROUPS.get() is None and sum(map(Tensor.numel, tensors)) <= FLAT_LIMIT:
        try:
            return bool(torch.isfinite(flat_norm(_flatten_dense_tensors(tensors))).item())
        except RuntimeError:  # several devices or dtypes: the per-tensor norms below
            pass
    return bool(torch.isfinite(global_norm(tensor_norms(tensors))).item())
