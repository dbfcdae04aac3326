"""The problem: random convex quadratics with ``lambda_1 = 1``, SAM run on them with the library's optimiser, and
the linearised decay factor of a non-top coordinate near the cycle."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatminima.optim import SAM

__all__ = ["decay_factor", "random_quadratic", "run_sam"]


def random_quadratic(seed: int, dim: int, lambda_max: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A random rotation of a spectrum with ``lambda_1 = lambda_max`` and the rest log-uniform in
    ``[0.05, 0.95] lambda_max``: the Hessian, its eigenvalues (descending) and eigenvectors (columns), float64."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.exp(torch.empty(dim - 1, dtype=torch.float64).uniform_(math.log(0.05), math.log(0.95), generator=gen))
    eigenvalues = lambda_max * torch.cat([torch.ones(1, dtype=torch.float64), torch.sort(rest, descending=True).values])
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return vectors @ torch.diag(eigenvalues) @ vectors.T, eigenvalues, vectors


def decay_factor(eta: float, lambda_i: float, lambda_1: float) -> float:
    """The factor ``f_i`` that multiplies coordinate ``i`` each step near the cycle (package docstring)."""
    return 1.0 - eta * lambda_i - (lambda_i / lambda_1) ** 2 * (2.0 - eta * lambda_1)


def run_sam(hessian: Tensor, w0: Tensor, eta: float, rho: float, steps: int) -> Tensor:
    """``steps`` steps of ``SAM(SGD(lr=eta), rho)`` on ``1/2 w^T H w`` from ``w0``: the trajectory ``(steps+1, d)``.

    The step is the library's (``SAM.step(closure)``); the loop is its own, not ``flatminima.train``, because
    this is full-batch descent on a quadratic in float64 that must record every iterate, which the epoch-and-dataset
    training loop does not do.
    """
    w = w0.clone().requires_grad_(True)
    optimizer = SAM([w], torch.optim.SGD, rho=rho, lr=eta)

    def closure() -> Tensor:
        loss = 0.5 * w @ hessian @ w
        loss.backward()
        return loss

    trajectory = torch.empty(steps + 1, len(w0), dtype=w0.dtype)
    trajectory[0] = w0
    for step in range(steps):
        optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        trajectory[step + 1] = w.detach()
    return trajectory
