"""``flatminima reproduce escape-sharp``: the closed forms it rests on, and its claims checked on the quick run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_reproduce import _quick  # tests/ is on sys.path: pytest's rootdir-less "prepend" import mode

from flatminima.experiments.escape_sharp import PROBLEM, Problem, dense_hessian, make_problem, nearest_minimum

F64 = torch.float64


def _unit(gen: torch.Generator, size: int) -> torch.Tensor:
    v = torch.randn(size, generator=gen, dtype=F64)
    return v / torch.linalg.vector_norm(v)


def _distance_to(problem: Problem, w2: torch.Tensor, W1: torch.Tensor, q: torch.Tensor) -> float:
    """Distance from (w2, W1) to the flattest minimum (a* q, q beta^T / a*) of direction q."""
    a = problem.flattest_scale
    return float(torch.cat([w2 - a * q, (W1 - torch.outer(q, problem.beta / a)).reshape(-1)]).norm())


def test_trace_closed_form_equals_the_dense_hessian_everywhere() -> None:
    """tr(H) = tr(W1 Sigma W1^T) + ||w2||^2 tr(Sigma) at the start and at points far from any minimum."""
    problem = make_problem(**PROBLEM)
    gen = torch.Generator().manual_seed(1)
    points = [(problem.w2_start, problem.W1_start)]
    points += [
        (torch.randn(3, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)) for _ in range(3)
    ]
    for w2, W1 in points:
        assert float(torch.trace(dense_hessian(problem, w2, W1))) == pytest.approx(problem.trace(w2, W1), rel=1e-12)


def test_the_balanced_factorisations_are_the_flattest_minima() -> None:
    """On the minima W1^T w2 = beta: tr(H) >= 2 sqrt(beta^T Sigma beta tr(Sigma)), equal at (a* q, q beta^T / a*);
    the distance formula is the distance to that sphere; lambda_max at a minimum matches the dense Hessian."""
    problem = make_problem(**PROBLEM)
    beta, a_star = problem.beta, problem.flattest_scale
    assert problem.trace_min == pytest.approx(2 * math.sqrt(4), rel=1e-12)  # whitened inputs, unit beta, k = 4
    gen = torch.Generator().manual_seed(2)
    q = _unit(gen, 3)
    w2, W1 = a_star * q, torch.outer(q, beta) / a_star
    assert torch.allclose(W1.T @ w2, beta, atol=1e-14)
    assert problem.trace(w2, W1) == pytest.approx(problem.trace_min, rel=1e-12)
    assert problem.distance_to_flattest(w2, W1) < 1e-7
    for _ in range(20):  # other minima: any scale, any R orthogonal to q
        q = _unit(gen, 3)
        a = a_star * math.exp(float(torch.empty(1).uniform_(-1.5, 1.5, generator=gen)))
        raw = torch.randn(3, 4, generator=gen, dtype=F64)
        w2, W1 = a * q, torch.outer(q, beta) / a + raw - torch.outer(q, q @ raw)
        assert torch.allclose(W1.T @ w2, beta, atol=1e-12)
        assert problem.trace(w2, W1) >= problem.trace_min - 1e-12
        # the distance formula is attained at the best q, and no sampled q does better
        best = a_star * w2 + W1 @ beta / a_star
        at_best = _distance_to(problem, w2, W1, best / torch.linalg.vector_norm(best))
        assert problem.distance_to_flattest(w2, W1) == pytest.approx(at_best, rel=1e-9, abs=1e-9)
        assert all(_distance_to(problem, w2, W1, _unit(gen, 3)) >= at_best - 1e-12 for _ in range(10))
    scale = 0.8
    q = _unit(gen, 3)
    top = float(torch.linalg.eigvalsh(dense_hessian(problem, scale * q, torch.outer(q, beta) / scale))[-1])
    assert problem.lambda_max_at_minimum(scale) == pytest.approx(top, rel=1e-10)
    smallest, at = problem.lambda_max_min()
    assert smallest == pytest.approx(2.0, rel=1e-9) and at == pytest.approx(1.0, rel=1e-6)  # 1/a^2 + a^2 >= 2


def test_nearest_minimum_lands_on_the_minima() -> None:
    problem = make_problem(**PROBLEM)
    gen = torch.Generator().manual_seed(3)
    w2 = problem.w2_start + 0.05 * torch.randn(3, generator=gen, dtype=F64)
    W1 = problem.W1_start + 0.05 * torch.randn(3, 4, generator=gen, dtype=F64)
    near_w2, near_W1 = nearest_minimum(problem, w2, W1)
    assert torch.allclose(near_W1.T @ near_w2, problem.beta, atol=1e-13)
    moved = torch.cat([near_w2 - w2, (near_W1 - W1).reshape(-1)]).norm()
    assert float(moved) < 0.2  # a nearby minimum, not a far one


@pytest.mark.slow
def test_escape_sharp_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _quick("escape-sharp", tmp_path, capsys)
    start, smallest = results["trace_start"], results["trace_min_on_manifold"]
    excess = start - smallest
    near, loss_final, loss_max = (
        results["trace_nearest_minimum"],
        results["loss_final"],
        results["loss_max_along_run"],
    )
    assert results["hessian_trace_vs_closed_form_max_error"] < 1e-10
    # plain GD does not move from the minimum
    assert results["gd_relative_trace_change"] < 1e-10
    assert results["gd_displacement"] < 1e-12
    # both perturbation algorithms walk down tr(H) along the minima, by a clear margin, never below the minimum
    assert near["ahn-sa"] < start - 0.5 * excess
    assert near["ahn-rs"] < start - 0.05 * excess
    assert near["ahn-rs, eta' x 8"] < start - 0.3 * excess
    assert results["trace_final"]["ahn-sa"] < start - 0.5 * excess
    assert all(value >= smallest - 1e-9 for value in near.values())
    # with losses near 0 (the loss at w = 0 is 1/2)
    for label in ("ahn-rs", "ahn-sa", "ahn-rs, eta' x 8"):
        assert loss_final[label] < 1e-4
        assert loss_max[label] < 1e-2  # at every step
    assert results["perturbed_fraction"]["ahn-sa"] == 1.0  # epsilon = inf: every step perturbs
    # SAM goes for the smallest lambda_max, a minimum that is not the flattest in trace
    assert results["lambda_max_final"]["SAM"] == pytest.approx(results["lambda_max_min_on_manifold"], rel=0.05)
    assert near["SAM"] > smallest + 0.5
    # the batch-size effect: one example decreases tr(H) most
    effect = results["batch_size_effect"]
    assert set(effect) == {"1", "3", "12"}
    assert effect["1"]["trace_decrease_mean"] > max(
        effect["3"]["trace_decrease_mean"], effect["12"]["trace_decrease_mean"]
    )
    # from a minimum that interpolates every example exactly, the normalised ascents are zero. Exact by construction:
    # small integer data and a dyadic factorisation make every residual 0.0 in float64 (the experiment checks it), so
    # every gradient is exactly 0 and DualNorm maps it to a zero step
    exact = results["exact_interpolation_displacement"]
    assert exact["GD"] == exact["SAM"] == exact["ahn-sa"] == 0.0
    assert exact["ahn-rs"] > 1e-3
