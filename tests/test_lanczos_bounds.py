"""Eigenvalue error bounds and the eigenvalue-accuracy stopping rule (``value_tol``) of Lanczos, against dense
float64 spectra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.sharpness import HessianOperator, hessian_eigenvalues, lanczos, lanczos_eigs
from flatminima.sharpness.lanczos import eigenvalue_error_bounds


def _matrix(seed: int, dim: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with a heavy-tailed spectrum like a network's Hessian (a few outliers, a dense bulk)."""
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = torch.sort(10.0 / torch.arange(1, dim + 1, dtype=torch.float64) ** 1.2, descending=True).values
    eigenvalues = eigenvalues * (1 + 0.05 * torch.rand(dim, generator=gen, dtype=torch.float64))
    eigenvalues = torch.sort(eigenvalues, descending=True).values
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T, eigenvalues


@pytest.mark.parametrize("seed", range(4))
def test_error_bounds_hold_for_ritz_values_of_a_growing_krylov_space(seed: int) -> None:
    """Every converged-enough Ritz value lies within its bound ``min(r, r^2/gap)`` of a true eigenvalue."""
    matrix, eigenvalues = _matrix(seed)
    v0 = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    decomposition = lanczos(matrix, matrix.shape[0], 40, v0)
    for m in (10, 20, 40):
        tridiagonal = torch.diag(decomposition.alpha[:m])
        tridiagonal += torch.diag(decomposition.beta[: m - 1], 1) + torch.diag(decomposition.beta[: m - 1], -1)
        theta, s = torch.linalg.eigh(tridiagonal)
        residuals = (decomposition.beta[m - 1] * s[-1]).abs()
        bounds = eigenvalue_error_bounds(theta, residuals)
        distance = (theta[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
        top = slice(m - 5, m)  # the top five Ritz values, the ones the solver returns
        assert (bounds[top] <= residuals[top] + 1e-15).all()
        assert (distance[top] <= bounds[top] * (1 + 1e-8) + 1e-12).all(), (m, distance[top], bounds[top])


@pytest.mark.parametrize("seed", range(4))
def test_value_tol_reaches_the_eigenvalue_accuracy_asked_for_with_fewer_products(seed: int) -> None:
    matrix, eigenvalues = _matrix(seed)
    by_value = lanczos_eigs(matrix, k=5, value_tol=1e-8, tol=1e-12, seed=seed)
    by_residual = lanczos_eigs(matrix, k=5, tol=1e-8, seed=seed)
    assert by_value.converged and by_residual.converged
    error = (by_value.eigenvalues - eigenvalues[:5]).abs()
    assert (error <= 1e-8 * eigenvalues[:5]).all()
    assert (error <= by_value.error_bounds * (1 + 1e-8) + 1e-14).all()
    assert (by_value.error_bounds <= 1e-8 * by_value.eigenvalues.abs()).all()
    assert by_value.num_hvp < by_residual.num_hvp


def test_value_tol_on_a_network_hessian_matches_the_dense_spectrum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(96, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (96,), generator=gen))
    op = HessianOperator(model, F.cross_entropy, data)
    dense = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    exact = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:5]
    result = hessian_eigenvalues(model, F.cross_entropy, data, k=5, value_tol=1e-6)
    assert result.converged and result.error_bounds is not None
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-6, atol=0)


def test_value_tol_must_be_positive() -> None:
    with pytest.raises(ValueError, match="value_tol must be positive"):
        lanczos_eigs(torch.eye(4, dtype=torch.float64), k=1, value_tol=0.0)
