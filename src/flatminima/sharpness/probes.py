"""Random probe and start vectors for the estimators: the one place they are drawn.

Vectors are drawn on the CPU from a ``torch.Generator`` (Gaussian ones in float64, Rademacher ones, exact in any
floating dtype, in the target dtype) and then cast to the operator's dtype and device, so a seed gives the same
vectors on every device and in every dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DISTRIBUTIONS", "check_distribution", "random_vectors"]

DISTRIBUTIONS = ("rademacher", "gaussian")


def check_distribution(distribution: str) -> None:
    """Raise a ValueError unless ``distribution`` is one of ``DISTRIBUTIONS``."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def random_vectors(
    n: int,
    dim: int,
    generator: torch.Generator,
    distribution: str = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``n`` random vectors as the rows of an ``(n, dim)`` tensor, with ``E[v v^T] = I``.

    ``"rademacher"``: entries +-1 with equal probability (the lowest-variance Hutchinson probe);
    ``"gaussian"``: standard normal entries (also the start vectors of Lanczos and power iteration).
    """
    check_distribution(distribution)
    if distribution == "rademacher":
        # the same 0/1 draws in any dtype (a bit per entry from the generator): drawn in the target floating dtype on
        # the CPU, and mapped to +-1 in place, which saves the int64 tensor and three passes over it
        draw = dtype if torch.device(device).type == "cpu" and dtype.is_floating_point else torch.float64
        vectors = torch.randint(0, 2, (n, dim), generator=generator, dtype=draw).mul_(2).sub_(1)
    else:
        vectors = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return vectors.to(device=device, dtype=dtype)
