"""Hessian spectral density by stochastic Lanczos quadrature (SLQ, as in Ghorbani et al. 2019 / PyHessian)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.lanczos import lanczos
from flatminima.sharpness.losses import LossFn
from flatminima.sharpness.operator import CountingOperator, OperatorLike, as_operator
from flatminima.sharpness.probes import check_distribution, random_vectors
from flatminima.sharpness.results import SpectralDensity

__all__ = ["spectral_density", "spectral_density_op"]


def spectral_density_op(
    op: OperatorLike, num_runs: int = 8, num_steps: int = 60, seed: int = 0, distribution: str = "rademacher"
) -> SpectralDensity:
    """SLQ: per run, Lanczos from a unit random ``v``; nodes = Ritz values, weights = squared first components.

    ``sum_i w_i theta_i^k = v^T H^k v`` exactly for ``k < 2 * num_steps`` (Gauss quadrature), and with ``E[v v^T] =
    I / dim`` its mean over runs estimates ``tr(H^k) / dim``; the spread over runs is the error estimate.
    ``op`` is any ``LinearOperator`` or a dense symmetric tensor.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError(f"need num_runs >= 1 and num_steps >= 1, got {num_runs}, {num_steps}")
    check_distribution(distribution)
    op = CountingOperator(as_operator(op))
    gen = torch.Generator().manual_seed(seed)
    steps = min(num_steps, op.dim)
    nodes, weights = [], []
    for run in range(num_runs):
        v = random_vectors(1, op.dim, gen, distribution)[0]
        v = (v / torch.linalg.vector_norm(v)).to(device=op.device, dtype=op.dtype)
        decomposition = lanczos(op, op.dim, steps, v, reorthogonalize=True, seed=seed * 1000 + run)
        theta, s = torch.linalg.eigh(decomposition.tridiagonal())
        w = s[0] ** 2
        nodes.append(theta)
        weights.append(w / w.sum())
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), op.num_products, op.dim)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_runs: int = 8,
    num_steps: int = 60,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    distribution: str = "rademacher",
    **operator_kwargs: Any,
) -> SpectralDensity:
    """Hessian spectral density of the full-data loss by SLQ (see ``spectral_density_op``, whose ``distribution``
    of start vectors it takes too); ``.plot()`` draws it."""
    check_distribution(distribution)
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return spectral_density_op(op, num_runs=num_runs, num_steps=num_steps, seed=seed, distribution=distribution)
