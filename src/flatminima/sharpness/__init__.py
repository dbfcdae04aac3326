"""Sharpness measurement: Hessian eigenvalues, trace and spectral density of the training loss."""

# ---- Hessian measures (hvp, lanczos, power, trace, density, results) ----
from flatminima.sharpness.density import spectral_density, spectral_density_op
from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.lanczos import LanczosDecomposition, hessian_eigenvalues, lanczos, lanczos_eigs
from flatminima.sharpness.power import power_iteration, power_iteration_op
from flatminima.sharpness.results import EigenResult, SpectralDensity, TraceResult
from flatminima.sharpness.trace import hutchinson_trace, hutchinson_trace_op, hutchpp_trace, hutchpp_trace_op

__all__ = [
    "EigenResult",
    "HessianOperator",
    "LanczosDecomposition",
    "SpectralDensity",
    "TraceResult",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "hutchinson_trace_op",
    "hutchpp_trace",
    "hutchpp_trace_op",
    "lanczos",
    "lanczos_eigs",
    "power_iteration",
    "power_iteration_op",
    "spectral_density",
    "spectral_density_op",
]
# ---- end of Hessian measures ----

# ---- m-sharpness and loss landscapes ----
from flatminima.sharpness.landscape import (
    Landscape,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
)
from flatminima.sharpness.msharpness import MSharpnessResult, m_sharpness

__all__ += [
    "Landscape",
    "MSharpnessResult",
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
]
