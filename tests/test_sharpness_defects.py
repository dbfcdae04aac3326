"""Four defects found against dense Hessians (issue 10), each pinned by a test that failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.sharpness import (
    HessianOperator,
    lanczos_eigs,
    power_iteration,
    spectral_density,
)
from flatminima.sharpness.probes import random_vectors


def _bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen)


@pytest.mark.parametrize("method", ["forward_over_reverse", "auto"])
def test_train_mode_batchnorm_with_torch_func_products(method: str) -> None:
    """BatchNorm used to update its running statistics inside torch.func.jvp and crash; now the statistics are
    frozen while measuring in train mode, and the products equal double backward's."""
    model = _bn_mlp()
    before = {name: b.clone() for name, b in model.named_buffers()}
    op = HessianOperator(model, F.cross_entropy, _data(), train_mode=True, method=method)
    reference = HessianOperator(model, F.cross_entropy, _data(), train_mode=True, method="double_backward")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), reference.matvec(v), rtol=0, atol=1e-12)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())  # untouched: exact


def test_power_iteration_stopped_at_max_iter_returns_a_matching_pair() -> None:
    """Stopped by max_iter, the vector used to be one iteration ahead of its eigenvalue and residual."""
    model = _bn_mlp().eval()
    data = _data()
    result = power_iteration(model, F.cross_entropy, data, tol=1e-12, max_iter=3)
    assert not result.converged
    op = HessianOperator(model, F.cross_entropy, data)
    vector = result.eigenvectors[0]
    product = op.matvec(vector)
    assert abs(float(vector @ product) - result.eigenvalues[0].item()) < 1e-12
    residual = torch.linalg.vector_norm(product - result.eigenvalues[0] * vector).item()
    assert abs(residual - result.residuals[0].item()) < 1e-12


def _hidden_fifth_eigenvector(eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix whose 5th eigenvector has only ``eps`` of Lanczos' start vector (seed 0)."""
    dim = 200
    eigenvalues = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0, 5.5]), torch.linspace(0, 4, dim - 6)]).double()
    v0 = random_vectors(1, dim, torch.Generator().manual_seed(0), "gaussian", torch.float64, torch.device("cpu"))[0]
    v0 = v0 / v0.norm()
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = a[:, 0] - (a[:, 0] @ v0) * v0
    fifth = eps * v0 + math.sqrt(1 - eps**2) * u / u.norm()
    rest, _ = torch.linalg.qr(a[:, 1:] - fifth[:, None] * (fifth @ a[:, 1:])[None])
    q = torch.cat([rest[:, :4], fifth[:, None], rest[:, 4:]], dim=1)
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


@pytest.mark.parametrize(("eps", "guard"), [(1e-2, 1), (1e-3, 1), (1e-4, 1), (1e-5, 2), (1e-6, 2)])
def test_top_k_does_not_skip_an_eigenvalue_at_a_loose_tolerance(eps: float, guard: int) -> None:
    """One guard Ritz value (the default) finds a fifth eigenvector with 1e-4 of the start vector, two find 1e-6."""
    matrix, eigenvalues = _hidden_fifth_eigenvector(eps)
    plain = lanczos_eigs(matrix, k=5, tol=3e-2, guard=0)  # the old criterion: lambda_6 reported as lambda_5
    assert plain.converged and abs(plain.eigenvalues[4].item() - 5.5) < 0.05
    for criterion in (dict(tol=3e-2), dict(value_tol=1e-3)):
        guarded = lanczos_eigs(matrix, k=5, guard=guard, **criterion)
        assert guarded.converged
        torch.testing.assert_close(guarded.eigenvalues, eigenvalues[:5], rtol=3e-3, atol=0)


def test_spectral_density_takes_the_distribution() -> None:
    model = _bn_mlp().eval()
    data = _data()
    rademacher = spectral_density(model, F.cross_entropy, data, num_runs=2, num_steps=10)
    gaussian = spectral_density(model, F.cross_entropy, data, num_runs=2, num_steps=10, distribution="gaussian")
    assert not torch.equal(rademacher.nodes, gaussian.nodes)
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(model, F.cross_entropy, data, distribution="uniform")


def test_unverified_lanczos_saves_k_products_and_its_residual_estimates_are_true() -> None:
    matrix, _ = _hidden_fifth_eigenvector(1e-2)
    verified = lanczos_eigs(matrix, k=5, tol=1e-8)
    estimated = lanczos_eigs(matrix, k=5, tol=1e-8, verify=False)
    assert estimated.num_hvp == verified.num_hvp - 5
    # exact: the same seeded iteration stopped at the same step (the counts above), so the Ritz values come from the
    # same tridiagonal by the same eigh; verification only adds products after them
    torch.testing.assert_close(estimated.eigenvalues, verified.eigenvalues, rtol=0, atol=0)
    true = torch.linalg.vector_norm(
        estimated.eigenvectors @ matrix - estimated.eigenvalues[:, None] * estimated.eigenvectors, dim=1
    )
    torch.testing.assert_close(estimated.residuals, true, rtol=0, atol=1e-12)
