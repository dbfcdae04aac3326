"""Sharpness measurement: Hessian eigenvalues, trace and spectral density of the training loss, m-sharpness and
loss landscapes.

The layout, one concept per module:

* ``operator``: the ``LinearOperator`` protocol (dim, dtype, device, matvec, matmat) every estimator takes,
  with adapters for a dense tensor and a bare matvec function;
* ``hvp``: ``HessianOperator``, the Hessian of the full-data loss as such an operator;
* ``lanczos``, ``power``, ``trace``, ``density``: the estimators, typed to the protocol (``*_op``), each with a
  ``(model, loss_fn, data)`` front end;
* ``data``: batches, size weighting, casting, tuple inputs and model modes, shared by every measure;
* ``probes``: the random probe and start vectors; ``results``: result dataclasses and ``mean_stderr``;
* ``msharpness``, ``landscape``: m-sharpness (its ascent from ``flatminima.optim.perturb``) and loss landscapes;
* ``tracking``: lambda_max along training, warm-started (``flatminima train --track-sharpness N``);
* ``losses``, ``checks``: batch losses and errors, argument checks; ``report``: everything as one table.
"""

# ---- Hessian measures (operator, hvp, lanczos, power, trace, density, results) ----
from flatminima.sharpness.density import spectral_density, spectral_density_op
from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.lanczos import LanczosDecomposition, hessian_eigenvalues, lanczos, lanczos_eigs
from flatminima.sharpness.operator import DenseOperator, LinearOperator, MatvecOperator, ShiftedOperator, as_operator
from flatminima.sharpness.power import largest_eigenvalue_op, power_iteration, power_iteration_op
from flatminima.sharpness.results import EigenResult, SpectralDensity, TraceResult, mean_stderr
from flatminima.sharpness.trace import (
    hutchinson_trace,
    hutchinson_trace_op,
    hutchpp_trace,
    hutchpp_trace_op,
    xnystrace_op,
    xtrace,
    xtrace_op,
)

__all__ = [
    "DenseOperator",
    "EigenResult",
    "HessianOperator",
    "LanczosDecomposition",
    "LinearOperator",
    "MatvecOperator",
    "ShiftedOperator",
    "SpectralDensity",
    "TraceResult",
    "as_operator",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "hutchinson_trace_op",
    "hutchpp_trace",
    "hutchpp_trace_op",
    "lanczos",
    "lanczos_eigs",
    "largest_eigenvalue_op",
    "mean_stderr",
    "power_iteration",
    "power_iteration_op",
    "spectral_density",
    "spectral_density_op",
    "xnystrace_op",
    "xtrace",
    "xtrace_op",
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
from flatminima.sharpness.tracking import SharpnessRecord, SharpnessTracker

__all__ += [
    "Landscape",
    "MSharpnessResult",
    "SharpnessRecord",
    "SharpnessTracker",
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
]
