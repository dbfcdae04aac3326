"""The problem of ``escape-sharp``: a two-layer linear network on a realisable regression, its sharp starting
minimum, the closed forms of ``tr(H)``, ``lambda_max`` and the flattest minima, and the two measuring devices (the
dense Hessian and the nearest minimum). Only computes; see the package docstring for the derivations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DTYPE",
    "PROBLEM",
    "Problem",
    "TwoLayerLinear",
    "dense_hessian",
    "loss_at_start",
    "make_problem",
    "nearest_minimum",
    "squared_error",
]

#: Every tensor of the experiment is float64: the start is a minimum to rounding (loss ~1e-32).
DTYPE = torch.float64

#: The problem every row starts from (the arguments of ``make_problem``).
PROBLEM: dict[str, Any] = {"seed": 0, "n": 12, "k": 4, "hidden": 3, "sharpness": 2.0, "extra": 1.0, "whiten": True}


@dataclass(frozen=True)
class Problem:
    """A realisable regression by ``p(x) = w2^T W1 x``, its sharp starting minimum and the closed forms."""

    inputs: Tensor  # (n, k)
    targets: Tensor  # (n,)
    beta: Tensor  # (k,), the target: y = beta^T x
    hidden: int  # h
    w2_start: Tensor  # (h,)
    W1_start: Tensor  # (h, k)

    @property
    def covariance(self) -> Tensor:
        """``Sigma = X^T X / n``."""
        return self.inputs.T @ self.inputs / self.inputs.shape[0]

    @property
    def dim(self) -> int:
        """``d = h (k + 1)``, the number of parameters."""
        return self.hidden * (self.inputs.shape[1] + 1)

    @property
    def flattest_scale(self) -> float:
        """``a* = ||w2||`` of the flattest minima: ``a*^2 = sqrt(beta^T Sigma beta / tr(Sigma))``."""
        sigma = self.covariance
        return (float(self.beta @ sigma @ self.beta) / float(torch.trace(sigma))) ** 0.25

    @property
    def trace_min(self) -> float:
        """The smallest ``tr(H)`` over the minima: ``2 sqrt(beta^T Sigma beta tr(Sigma))``."""
        sigma = self.covariance
        return 2.0 * math.sqrt(float(self.beta @ sigma @ self.beta) * float(torch.trace(sigma)))

    def trace(self, w2: Tensor, W1: Tensor) -> float:
        """``tr(H) = tr(W1 Sigma W1^T) + ||w2||^2 tr(Sigma)``, exact at every point."""
        sigma = self.covariance
        return float(torch.sum((W1 @ sigma) * W1) + w2.pow(2).sum() * torch.trace(sigma))

    def trace_off_balance(self, w2: Tensor, W1: Tensor) -> float:
        """``tr(R Sigma R^T)`` at a minimum: its ``tr(H)`` less ``beta^T Sigma beta / a^2 + a^2 tr(Sigma)``, the part
        of the trace that the scale ``a = ||w2||`` alone does not set."""
        sigma, a2 = self.covariance, float(w2.pow(2).sum())
        return self.trace(w2, W1) - float(self.beta @ sigma @ self.beta) / a2 - a2 * float(torch.trace(sigma))

    def distance_to_flattest(self, w2: Tensor, W1: Tensor) -> float:
        """Euclidean distance from ``(w2, W1)`` to the sphere of flattest minima ``{(a* q, q beta^T / a*)}``."""
        a = self.flattest_scale
        b = self.beta / a
        square = w2.pow(2).sum() + W1.pow(2).sum() + a * a + b.pow(2).sum()
        square = square - 2.0 * torch.linalg.vector_norm(a * w2 + W1 @ b)
        return math.sqrt(max(float(square), 0.0))

    def lambda_max_at_minimum(self, scale: float) -> float:
        """``lambda_max`` of the minimum ``(scale q, q beta^T / scale)`` (``R = 0``): the top eigenvalue of
        ``Sigma^1/2 (beta beta^T / scale^2 + scale^2 I) Sigma^1/2``."""
        root = _sqrtm(self.covariance)
        inner = torch.outer(self.beta, self.beta) / scale**2 + scale**2 * torch.eye(len(self.beta), dtype=DTYPE)
        return float(torch.linalg.eigvalsh(root @ inner @ root)[-1])

    def lambda_max_min(self) -> tuple[float, float]:
        """The smallest ``lambda_max`` over the minima and the ``||w2||`` where it is reached (golden-section
        search in ``log a``; ``R = 0`` there, since ``R^T R`` only adds to ``W1^T W1``)."""
        low, high = math.log(self.flattest_scale / 10.0), math.log(self.flattest_scale * 10.0)
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(100):
            left, right = high - ratio * (high - low), low + ratio * (high - low)
            if self.lambda_max_at_minimum(math.exp(left)) <= self.lambda_max_at_minimum(math.exp(right)):
                high = right
            else:
                low = left
        scale = math.exp((low + high) / 2.0)
        return self.lambda_max_at_minimum(scale), scale


def _sqrtm(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0.0).sqrt()) @ vectors.T


def make_problem(
    seed: int = 0,
    n: int = 12,
    k: int = 4,
    hidden: int = 3,
    sharpness: float = 2.0,
    extra: float = 1.0,
    whiten: bool = True,
) -> Problem:
    """``n`` Gaussian inputs in ``R^k`` (whitened: ``X^T X / n = I``), a unit target ``beta`` and the sharp start
    ``w2 = (a* / sharpness) q``, ``W1 = q beta^T / ||w2|| + R``, ``R`` a random matrix with ``R^T q = 0`` scaled so
    that ``tr(R Sigma R^T) = extra * tr(H)_min`` (the part of the sharpness that the balance alone does not
    remove)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, k, generator=gen, dtype=DTYPE)
    if whiten:
        inputs = inputs @ torch.linalg.inv(_sqrtm(inputs.T @ inputs / n))
    beta = torch.randn(k, generator=gen, dtype=DTYPE)
    beta = beta / torch.linalg.vector_norm(beta)
    q = torch.randn(hidden, generator=gen, dtype=DTYPE)
    q = q / torch.linalg.vector_norm(q)
    shell = Problem(inputs, inputs @ beta, beta, hidden, q, torch.outer(q, beta))
    scale = shell.flattest_scale / sharpness
    raw = torch.randn(hidden, k, generator=gen, dtype=DTYPE)
    residual = raw - torch.outer(q, q @ raw)
    residual = residual * math.sqrt(
        extra * shell.trace_min / float(torch.sum((residual @ shell.covariance) * residual))
    )
    return Problem(inputs, inputs @ beta, beta, hidden, scale * q, torch.outer(q, beta) / scale + residual)


class TwoLayerLinear(nn.Module):
    """``p(x) = w2^T W1 x``, float64, initialised at the problem's sharp minimum."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.w2 = nn.Parameter(problem.w2_start.clone())
        self.W1 = nn.Parameter(problem.W1_start.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return (inputs @ self.W1.T) @ self.w2


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example ``(p - y)^2 / 2`` (``reduction="none"``, as Algorithm 2's single-example passes need)."""
    return 0.5 * (outputs - targets) ** 2


def _unflatten(flat: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    return flat[:hidden], flat[hidden:].reshape(hidden, -1)


def _loss_of(problem: Problem) -> Callable[[Tensor], Tensor]:
    def loss(flat: Tensor) -> Tensor:
        w2, W1 = _unflatten(flat, problem.hidden)
        return squared_error((problem.inputs @ W1.T) @ w2, problem.targets).mean()

    return loss


def dense_hessian(problem: Problem, w2: Tensor, W1: Tensor) -> Tensor:
    """The ``d x d`` Hessian of the mean loss at ``(w2, W1)`` (``torch.autograd.functional.hessian``, float64)."""
    flat = torch.cat([w2.detach().reshape(-1), W1.detach().reshape(-1)])
    return torch.autograd.functional.hessian(_loss_of(problem), flat)


def nearest_minimum(problem: Problem, w2: Tensor, W1: Tensor, iterations: int = 50) -> tuple[Tensor, Tensor]:
    """A minimum next to ``(w2, W1)``: minimum-norm Gauss-Newton steps on ``W1^T w2 = beta`` (a measuring device:
    where along the manifold a run that stays near it has got to, to first order the orthogonal projection)."""
    flat = torch.cat([w2.detach().reshape(-1), W1.detach().reshape(-1)])

    def constraint(z: Tensor) -> Tensor:
        v2, V1 = _unflatten(z, problem.hidden)
        return V1.T @ v2 - problem.beta

    for _ in range(iterations):
        residual = constraint(flat)
        if float(torch.linalg.vector_norm(residual)) < 1e-15:
            break
        jacobian = torch.func.jacrev(constraint)(flat)
        flat = flat - jacobian.T @ torch.linalg.solve(jacobian @ jacobian.T, residual)
    return _unflatten(flat, problem.hidden)


def loss_at_start(problem: Problem) -> float:
    """The mean loss at the problem's starting minimum (float64 rounding: ~1e-32)."""
    with torch.no_grad():
        return float(squared_error(TwoLayerLinear(problem)(problem.inputs), problem.targets).mean())
