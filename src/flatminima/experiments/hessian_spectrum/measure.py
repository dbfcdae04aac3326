"""The measurements at the stopping point: the top eigenvalues with their errors, the trace, the spectral density."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.experiments.hessian_spectrum.setting import TOP_K, VALUE_TOL, Setting
from flatminima.sharpness import (
    HessianOperator,
    SpectralDensity,
    hutchinson_trace_op,
    lanczos_eigs,
    spectral_density_op,
)

__all__ = ["Spectrum", "measure_spectrum"]


@dataclass
class Spectrum:
    """The cross-entropy Hessian of one trained model on the measured subset (fields in results.json's order).

    ``eigenvalues``: the top-``TOP_K`` by Lanczos, largest first, with their ``residuals``, ``relative_residuals``
    (verified with true products) and ``error_bounds`` (None when Lanczos gives none); ``ratio``:
    lambda_max / lambda_5; ``trace`` and ``trace_stderr``: Hutchinson's estimate and its standard error;
    ``lanczos_hvp`` and ``density_hvp``: Hessian-vector products spent.
    """

    eigenvalues: list[float]
    residuals: list[float]
    relative_residuals: list[float]
    error_bounds: list[float] | None
    lanczos_converged: bool
    lanczos_hvp: int
    lambda_max: float
    lambda_5: float
    ratio: float
    trace: float
    trace_stderr: float
    trace_probes: int
    density_hvp: int
    seconds_measuring: float


def measure_spectrum(
    model: nn.Module, subset: list[tuple[Tensor, Tensor]], setting: Setting, seed: int, density: bool
) -> tuple[Spectrum, SpectralDensity | None]:
    """Top-5 eigenvalues (Lanczos, verified residuals and error bounds), tr(H) (Hutchinson, with its standard
    error) and, if ``density``, the SLQ spectral density of the cross-entropy Hessian on ``subset``."""
    op = HessianOperator(model, F.cross_entropy, subset)
    started = time.perf_counter()
    eigen = lanczos_eigs(op, k=TOP_K, value_tol=VALUE_TOL, seed=seed)
    trace = hutchinson_trace_op(op, num_probes=setting.trace_probes, seed=seed)
    spectrum = None
    if density:
        spectrum = spectral_density_op(op, num_runs=setting.density_runs, num_steps=setting.density_steps, seed=seed)
    values = eigen.eigenvalues.tolist()
    result = Spectrum(
        eigenvalues=values,
        residuals=eigen.residuals.tolist(),
        relative_residuals=eigen.relative_residuals.tolist(),
        error_bounds=eigen.error_bounds.tolist() if eigen.error_bounds is not None else None,
        lanczos_converged=eigen.converged,
        lanczos_hvp=eigen.num_hvp,
        lambda_max=values[0],
        lambda_5=values[TOP_K - 1],
        ratio=eigen.ratio(TOP_K),
        trace=trace.estimate,
        trace_stderr=trace.stderr,
        trace_probes=setting.trace_probes,
        density_hvp=spectrum.num_hvp if spectrum is not None else 0,
        seconds_measuring=time.perf_counter() - started,
    )
    return result, spectrum
