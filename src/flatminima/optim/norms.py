"""Norms over lists of tensors, without host syncs, accumulated in float32 for half-precision tensors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flat_norm", "global_max", "global_norm", "is_finite", "tensor_norms"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor L2 norms, accumulated in float32 for half-precision tensors (their norm overflows fp16)."""
    low = any(t.dtype in _LOW_PRECISION for t in tensors)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)


def flat_norm(tensor: Tensor) -> Tensor:
    """L2 norm of one tensor, in float32 at least."""
    return torch.linalg.vector_norm(tensor, dtype=torch.float32 if tensor.dtype in _LOW_PRECISION else None)


def global_norm(norms: list[Tensor]) -> Tensor:
    """L2 norm of a list of tensors, from their per-tensor L2 norms, without a host sync."""
    device = norms[0].device
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def global_max(tensors: list[Tensor]) -> Tensor:
    """The largest entry over a list of tensors, as a 0-d tensor on the first one's device."""
    device = tensors[0].device
    return torch.stack([t.amax().to(device) for t in tensors]).amax()


def is_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one host sync; True for an empty list)."""
    return bool(torch.isfinite(global_norm(tensor_norms(tensors))).item()) if tensors else True
