"""Result dataclasses of the sharpness measures, each carrying its own error estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flatminima.output_folder import save_figure

__all__ = ["EigenResult", "SpectralDensity", "TraceResult", "mean_stderr"]


def mean_stderr(samples: Tensor) -> tuple[float, float]:
    """The mean of ``samples`` and its standard error ``std / sqrt(n)`` (unbiased std).

    One sample has no spread to estimate an error from: its stderr is NaN (unknown, not infinite and not zero), so
    a table shows it as missing rather than as a bound. No samples give a NaN mean too.
    """
    samples = samples.reshape(-1).to(torch.float64)
    n = samples.numel()
    mean = float(samples.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan
    return mean, float(samples.std(unbiased=True) / math.sqrt(n))


@dataclass
class EigenResult:
    """Hessian eigenpairs.

    ``eigenvalues`` are sorted from the requested end inwards (descending for ``which="largest"``, ascending for
    ``"smallest"``); ``eigenvectors`` holds one unit vector per row (``None`` when not requested); ``residuals`` are
    the residual norms ``||H y - theta y||`` of the returned pairs, the error estimate (an eigenvalue is within its
    residual norm of an exact eigenvalue, and much closer when well separated). Power iteration and
    ``lanczos_eigs(verify=True)`` (its default without ``value_tol``) give the true norms, measured with products;
    with ``verify=False`` (the default when ``value_tol`` is given, as in ``hessian_eigenvalues(value_tol=...)``)
    they are the Lanczos estimates ``|beta_m s_{m,i}|``, equal to the true norms up to rounding under full
    reorthogonalisation, but not measured.
    ``error_bounds`` (Lanczos only) bound ``|lambda - theta|`` with the gap to the other Ritz values,
    ``min(r, r^2 / gap)``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    num_hvp: int
    which: str
    error_bounds: Tensor | None = None

    def ratio(self, k: int = 5) -> float:
        """``lambda_1 / lambda_k`` (the SAM paper reports ``lambda_max / lambda_5``)."""
        if not 1 <= k <= len(self.eigenvalues):
            raise ValueError(f"ratio needs 1 <= k <= {len(self.eigenvalues)} (the eigenvalues computed), got k={k}")
        return float(self.eigenvalues[0] / self.eigenvalues[k - 1])

    @property
    def relative_residuals(self) -> Tensor:
        """Residual norms divided by ``|eigenvalue|``."""
        return self.residuals / self.eigenvalues.abs().clamp_min(torch.finfo(self.eigenvalues.dtype).tiny)


@dataclass
class TraceResult:
    """A stochastic trace estimate with its standard error.

    ``samples`` are the per-probe quadratic forms ``v^T H v`` of the stochastic part (for Hutch++, those of the
    deflated remainder, which are added to the exact trace over the low-rank part).
    """

    estimate: float
    stderr: float
    num_hvp: int
    method: str
    samples: Tensor | None = None


@dataclass
class SpectralDensity:
    """Spectral density of the Hessian by stochastic Lanczos quadrature.

    Row ``r`` of ``nodes``/``weights`` is the Gauss quadrature of run ``r``: ``sum_i weights[r, i] * f(nodes[r, i])``
    approximates ``v_r^T f(H) v_r`` for the unit start vector ``v_r``, whose expectation is ``tr(f(H)) / dim``.
    """

    nodes: Tensor
    weights: Tensor
    num_hvp: int
    dim: int

    @property
    def num_runs(self) -> int:
        return int(self.nodes.shape[0])

    def moment(self, k: int) -> tuple[float, float]:
        """Estimate of ``tr(H^k) / dim`` and its standard error over the runs (exact per run for k < 2 * steps;
        the stderr is NaN for one run, see ``mean_stderr``)."""
        return mean_stderr((self.weights * self.nodes.pow(k)).sum(dim=1))

    def default_sigma(self) -> float:
        """A smoothing width of 1% of the spectral range (used when none is given)."""
        span = float(self.nodes.max() - self.nodes.min())
        return max(span, float(self.nodes.abs().max()), 1e-12) * 0.01

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density on ``grid``, averaged over the runs (integrates to 1)."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = torch.as_tensor(grid, dtype=torch.float64)
        nodes = self.nodes.to(torch.float64).reshape(-1)
        weights = self.weights.to(torch.float64).reshape(-1) / self.num_runs
        z = (grid[:, None] - nodes[None, :]) / sigma
        return (weights[None, :] * torch.exp(-0.5 * z * z)).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))

    def plot(self, path: str | Path, sigma: float | None = None, log: bool = True, num_points: int = 1000) -> Path:
        """Save the smoothed density as a PNG (matplotlib's Agg canvas, no pyplot state touched)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        sigma = self.default_sigma() if sigma is None else float(sigma)
        low, high = float(self.nodes.min()) - 5 * sigma, float(self.nodes.max()) + 5 * sigma
        grid = torch.linspace(low, high, num_points, dtype=torch.float64)
        values = self.density(grid, sigma)
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if log:
            ax.semilogy(grid.numpy(), values.clamp_min(1e-12).numpy())
        else:
            ax.plot(grid.numpy(), values.numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"Hessian spectral density (SLQ, {self.num_runs} runs, sigma={sigma:.3g})")
        fig.tight_layout()
        path = Path(path)
        save_figure(fig, path)
        return path
