"""``escape-sharp``: from a sharp global minimum, Ahn et al.'s perturbations walk down tr(H) along the minima.

Ahn, Jadbabaie and Sra (ICML 2024) measure flatness by ``tr(H) / d`` and give two algorithms that, once the
gradient is small, add ``-eta' v`` to the gradient step, ``v`` the part orthogonal to ``grad f(x)`` of a gradient
taken at a randomly perturbed point (``flatminima.variants.escape``): Algorithm 1 (``ahn-rs``) perturbs along
a uniform random direction, Algorithm 2 (``ahn-sa``) along one random example's normalised gradient with a
random sign. Both drifts follow ``-grad tr(H)`` along the set of minima; Algorithm 2's is ``d`` times larger at the
same ``rho`` and ``eta'``. Plain GD does not move at a minimum (its gradient is zero there).

The problem: a two-layer linear network with one output, ``p(x) = w2^T W1 x`` (``W1``: h x k, ``w2``: h), fitted by
``L = 1/(2n) sum_i (p(x_i) - y_i)^2`` to ``n > k`` examples of a linear target ``y_i = beta^T x_i``; ``d = h (k + 1)``.
With ``Sigma = X^T X / n`` (full rank):

* the minima (``L = 0``) are the manifold ``W1^T w2 = beta``, of dimension ``d - k``;
* ``tr(H) = tr(W1 Sigma W1^T) + ||w2||^2 tr(Sigma)`` at every point, not only at minima (each ``d^2 p_i`` has a zero
  diagonal, so the residual term of the Hessian is traceless);
* on the manifold, with ``a = ||w2||``, ``q = w2 / a`` and ``W1 = q beta^T / a + R`` (``R^T q = 0``),
  ``tr(H) = beta^T Sigma beta / a^2 + tr(R Sigma R^T) + a^2 tr(Sigma) >= 2 sqrt(beta^T Sigma beta tr(Sigma))``, with
  equality iff ``R = 0`` and ``a^2 = sqrt(beta^T Sigma beta / tr(Sigma))``: the flattest minima are the balanced
  factorisations ``(a* q, q beta^T / a*)``, a sphere of directions ``q``;
* the distance from ``(w2, W1)`` to that sphere is
  ``sqrt(||w2||^2 + ||W1||^2 + a*^2 + ||beta||^2 / a*^2 - 2 ||a* w2 + W1 beta / a*||)``;
* at a minimum the nonzero eigenvalues of ``H = J^T J / n`` are those of ``Sigma^1/2 (W1^T W1 + a^2 I) Sigma^1/2``,
  so ``lambda_max`` over the manifold is smallest at ``R = 0`` and the ``a`` that minimises
  ``lambda_max(Sigma^1/2 (beta beta^T / a^2 + a^2 I) Sigma^1/2)`` (found numerically): SAM's target, not the
  trace's.

The inputs are whitened (``Sigma = I`` exactly, so ``tr(H)_min = 2 sqrt(k) ||beta||`` and ``a*^2 = ||beta|| /
sqrt(k)``). Every run starts from the same sharp minimum (``a = a* / 2`` and an ``R`` that adds ``tr(H)_min`` to
the trace: ``tr(H) = 3.125 tr(H)_min``) and uses the library's optimisers in float64: ``torch.optim.SGD`` through
``PlainStep`` (GD), ``SAM`` through ``SharpnessAwareStep`` (SAM,
``ahn-rs``, ``ahn-sa``). ``tr(H)`` is the trace of the dense Hessian from ``torch.autograd.functional.hessian``,
checked against the closed form.
"""

from __future__ import annotations

from flatminima.experiments.escape_sharp.algorithms import (
    ALGORITHMS,
    SETTINGS,
    RandomSubset,
    Run,
    Settings,
    exact_interpolation,
    make_step,
    record_steps,
    run_algorithm,
)
from flatminima.experiments.escape_sharp.compute import EscapeSharpResult, References, Variant, compute, variants
from flatminima.experiments.escape_sharp.problem import (
    PROBLEM,
    Problem,
    TwoLayerLinear,
    dense_hessian,
    make_problem,
    nearest_minimum,
    squared_error,
)
from flatminima.experiments.escape_sharp.report import outcome
from flatminima.experiments.reproduce import Context, Outcome, Reproduction

__all__ = [
    "ALGORITHMS",
    "PROBLEM",
    "REPRODUCTION",
    "SETTINGS",
    "EscapeSharpResult",
    "Problem",
    "RandomSubset",
    "References",
    "Run",
    "Settings",
    "TwoLayerLinear",
    "Variant",
    "compute",
    "dense_hessian",
    "exact_interpolation",
    "make_problem",
    "make_step",
    "nearest_minimum",
    "outcome",
    "record_steps",
    "run",
    "run_algorithm",
    "squared_error",
    "variants",
]


def run(ctx: Context) -> Outcome:
    """Compute every run (``compute``), then turn the result into the table, report and figures
    (``outcome``)."""
    return outcome(compute(ctx), ctx)


REPRODUCTION = Reproduction(
    name="escape-sharp",
    summary="Escaping a sharp minimum with random perturbations: tr(H) decreases along the minima set",
    paper="Ahn, Jadbabaie, Sra, How to Escape Sharp Minima with Random Perturbations (ICML 2024), Alg. 1 and 2",
    run=run,
    quick_seeds=(0, 1),
)
