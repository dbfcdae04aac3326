"""The valley ``L(x, y) = 1/2 a(y) x^2`` and the runs on it: SAM and GD from the library's optimisers, in float64.

The settings are the claim's (``eta = 0.1``, ``rho = 0.01``, start ``(1e-3, 1.05)``); the run keeps every iterate,
since the drift is read from whole 2-cycles of the trajectory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatminima.optim import SAM

__all__ = ["ETA", "HALF_WIDTH", "RHO", "SETTLE", "X0", "Y0", "a", "a_prime", "run_valley", "valley_loss"]

ETA = 0.1
RHO = 0.01
X0 = 1e-3
Y0 = 1.05
SETTLE = 200  # steps before the cycle (SAM) or the decay of x (GD) counts as settled; x's error shrinks 0.8x a step
HALF_WIDTH = 0.005  # the rate at y = 1 is fitted on the cycles whose mean y is within this of 1


def a(y: float) -> float:
    """The valley's curvature across itself, ``lambda_max`` on the line of minima: ``1 + y^2``."""
    return 1.0 + y * y


def a_prime(y: float) -> float:
    """``a'(y) = 2 y``: the third derivative that makes SAM drift."""
    return 2.0 * y


def valley_loss(w: Tensor) -> Tensor:
    """``L(x, y) = 1/2 (1 + y^2) x^2`` at ``w = (x, y)``."""
    return 0.5 * (1.0 + w[1] ** 2) * w[0] ** 2


def run_valley(
    method: str, eta: float, rho: float, steps: int, w0: tuple[float, float] = (X0, Y0), stop_below: float = -math.inf
) -> Tensor:
    """``steps`` steps of ``SAM(SGD(lr=eta), rho)`` (``method="sam"``) or ``SGD(lr=eta)`` (``"gd"``) on the valley
    from ``w0``, in float64; stops early once y falls below ``stop_below``. Returns the iterates ``(n + 1, 2)``.

    The step is the library's (``SAM.step(closure)``); the loop is its own, not ``flatminima.train``, because
    this is full-batch descent on a two-parameter function in float64 that must record every iterate and stop on
    the iterate's value, none of which the epoch-and-dataset training loop does.
    """
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    if method == "sam":
        optimizer: torch.optim.Optimizer = SAM([w], torch.optim.SGD, rho=rho, lr=eta)
    elif method == "gd":
        optimizer = torch.optim.SGD([w], lr=eta)
    else:
        raise ValueError(f"method must be 'sam' or 'gd'; got {method!r}")

    def closure() -> Tensor:
        loss = valley_loss(w)
        loss.backward()
        return loss

    trajectory = torch.empty(steps + 1, 2, dtype=torch.float64)
    trajectory[0] = w.detach()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)  # SGD's step(closure) does not clear them; SAM's does, twice a step
        optimizer.step(closure)
        trajectory[step + 1] = w.detach()
        if float(trajectory[step + 1, 1]) < stop_below:
            return trajectory[: step + 2].clone()
    return trajectory
