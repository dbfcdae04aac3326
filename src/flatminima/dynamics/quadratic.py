"""Full-batch SAM on a convex quadratic: the 2-cycle of Bartlett, Long and Bousquet (JMLR 2023).

On ``L(w) = 1/2 w^T H w`` normalised SAM, ``w+ = w - eta grad L(w + rho grad L(w) / ||grad L(w)||)``, settles
into a 2-cycle ``w = +-c u_1`` along the top eigenvector, with ``c = eta rho lambda_1 / (2 - eta lambda_1)``
(for ``0 < eta lambda_1 < 2``): at ``w = c u_1`` the step lands on ``-c u_1`` and back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["simulate_sam_quadratic", "two_cycle_amplitude"]


def two_cycle_amplitude(eta: float, rho: float, lambda_max: float) -> float:
    """Amplitude ``c`` of the 2-cycle ``+-c u_1``; needs ``0 < eta * lambda_max < 2``."""
    if not 0.0 < eta * lambda_max < 2.0:
        raise ValueError(f"the 2-cycle exists for 0 < eta * lambda_max < 2; got eta * lambda_max = {eta * lambda_max}.")
    if rho < 0:
        raise ValueError(f"rho must be >= 0; got {rho}.")
    return eta * rho * lambda_max / (2.0 - eta * lambda_max)


def simulate_sam_quadratic(hessian: Tensor, w0: Tensor, eta: float, rho: float, steps: int) -> Tensor:
    """Iterate full-batch normalised SAM on ``1/2 w^T H w``; returns the trajectory, shape ``(steps + 1, d)``.

    Written from the update rule alone (no optimiser), as the reference the optimisers are tested against.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1] or w0.shape != hessian.shape[:1]:
        shapes = f"{tuple(hessian.shape)} and {tuple(w0.shape)}"
        raise ValueError(f"need a square hessian (d, d) and w0 of shape (d,); got {shapes}.")
    trajectory = [w0.clone()]
    w = w0.clone()
    for _ in range(steps):
        g = hessian @ w
        norm = torch.linalg.vector_norm(g)
        e = rho * g / norm if norm > 0 else torch.zeros_like(g)
        w = w - eta * (hessian @ (w + e))
        trajectory.append(w)
    return torch.stack(trajectory)
