"""Power iteration for the largest-magnitude Hessian eigenvalue (the PyHessian-style baseline for Lanczos), and
for lambda_max, the largest one, also where the largest in magnitude is negative."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.losses import LossFn
from flatminima.sharpness.operator import CountingOperator, OperatorLike, ShiftedOperator, as_operator
from flatminima.sharpness.probes import random_vectors
from flatminima.sharpness.results import EigenResult

__all__ = ["largest_eigenvalue_op", "power_iteration", "power_iteration_op"]


def power_iteration_op(
    op: OperatorLike,
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int = 0,
    return_vectors: bool = True,
    v0: Tensor | None = None,
) -> EigenResult:
    """Power iteration on ``op``: stops when the Rayleigh quotient changes by less than ``tol`` relatively.

    Converges to the eigenvalue of largest *magnitude* (which may be negative), at a rate set by the ratio of the two
    largest magnitudes; the residual ``||H v - rq v||`` comes free from the last product. ``op`` is any
    ``LinearOperator`` or a dense symmetric tensor. ``v0`` starts the iteration
    (e.g. the previous eigenvector when tracking lambda_max along training: a warm start); default a Gaussian draw.
    """
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    op = CountingOperator(as_operator(op))
    if v0 is not None:
        if not isinstance(v0, torch.Tensor):
            raise TypeError(
                f"v0 must be a torch.Tensor of shape ({op.dim},) (a flat start vector), got {type(v0).__name__}; "
                "convert it with torch.as_tensor(v0)"
            )
        if v0.shape != (op.dim,) or not bool(torch.isfinite(v0).all()) or not bool(v0.abs().sum() > 0):
            raise ValueError(f"v0 must be a finite, non-zero vector of shape ({op.dim},), got {tuple(v0.shape)}")
        v = v0.detach().to(device=op.device, dtype=op.dtype).clone()
    else:
        v = random_vectors(1, op.dim, torch.Generator().manual_seed(seed), "gaussian", op.dtype, op.device)[0]
    v = v / torch.linalg.vector_norm(v)
    previous: float | None = None
    converged = False
    for _ in range(max_iter):
        w = op.matvec(v)
        rq = float(v @ w)
        residual = float(torch.linalg.vector_norm(w - rq * v))
        vector = v  # the vector rq and residual belong to (v moves on below)
        if previous is not None and abs(rq - previous) <= tol * abs(previous):
            converged = True
            break
        previous = rq
        norm = torch.linalg.vector_norm(w)
        if norm == 0:  # v is in the null space: the Hessian vanishes on it, rq = 0 is an exact eigenvalue
            converged = True
            break
        v = w / norm
    return EigenResult(
        eigenvalues=torch.tensor([rq], dtype=torch.float64),
        eigenvectors=vector[None].clone() if return_vectors else None,
        residuals=torch.tensor([residual], dtype=torch.float64),
        converged=converged,
        num_hvp=op.num_products,
        which="magnitude",
    )


def largest_eigenvalue_op(
    op: OperatorLike,
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int = 0,
    v0: Tensor | None = None,
) -> EigenResult:
    """lambda_max, the largest (algebraic) eigenvalue of ``op``, by power iteration.

    Power iteration finds the eigenvalue of largest magnitude. When that one is negative (a saddle: early in
    training, or at a large learning rate), a second run on ``op - s I``, with ``s`` that negative eigenvalue,
    whose spectrum lies in ``[0, lambda_max - s]``, finds ``lambda_max - s``; its vector and residual are
    ``lambda_max``'s. ``num_hvp`` counts both runs; ``tol`` is relative to the shifted value in the second.
    """
    op = as_operator(op)
    first = power_iteration_op(op, tol=tol, max_iter=max_iter, seed=seed, v0=v0)
    shift = first.eigenvalues[0].item()
    if shift >= 0:
        return replace(first, which="largest")
    second = power_iteration_op(ShiftedOperator(op, shift), tol=tol, max_iter=max_iter, seed=seed, v0=v0)
    return replace(
        second,
        eigenvalues=second.eigenvalues + shift,
        converged=first.converged and second.converged,
        num_hvp=first.num_hvp + second.num_hvp,
        which="largest",
    )


def power_iteration(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    tol: float = 1e-3,
    max_iter: int = 1000,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    return_vectors: bool = True,
    **operator_kwargs: Any,
) -> EigenResult:
    """Largest-magnitude Hessian eigenvalue of the full-data loss by power iteration (``power_iteration_op``)."""
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return power_iteration_op(op, tol=tol, max_iter=max_iter, seed=seed, return_vectors=return_vectors)
