"""What ``lanczos_eigs`` pays for by default (issue 30): with ``value_tol`` no verification products (the guard
stays); verification stays available as an option, and is the default without ``value_tol``."""

from __future__ import annotations

import pytest
import torch

from flatminima.sharpness import lanczos_eigs
from flatminima.sharpness.lanczos import eigenvalue_error_bounds


def _matrix(dim: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric float64 matrix with a decaying spectrum, like a Hessian's top; its eigenvalues, largest first."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = 10.0 * 0.8 ** torch.arange(dim, dtype=torch.float64) - 0.5
    return (q * values) @ q.T, values


def test_a_single_ritz_value_has_no_gap_bound() -> None:
    """One Ritz value says nothing about the rest of the spectrum: its bound is its residual, not r^2 / inf = 0
    (which stopped value_tol=1e-3 after one product, 100 % off)."""
    bounds = eigenvalue_error_bounds(torch.tensor([2.0]), torch.tensor([0.5]))
    assert bounds.tolist() == [0.5]
    two = eigenvalue_error_bounds(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert two.tolist() == [0.5**2 / 1.5, 0.5**2 / 1.5]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambda_max_to_value_tol_pays_no_verification(seed: int) -> None:
    matrix, values = _matrix(seed=seed)
    default = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed)
    plain = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, guard=1, verify=False)
    assert default.num_hvp == plain.num_hvp and torch.equal(default.eigenvalues, plain.eigenvalues)
    assert default.converged and abs(default.eigenvalues[0].item() - values[0].item()) <= 1e-3 * values[0].item()
    checked = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, verify=True)
    assert checked.num_hvp >= default.num_hvp + 1  # the verification product at least
    unguarded = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, guard=0)
    assert unguarded.num_hvp <= default.num_hvp


def test_top_k_to_value_tol_keeps_its_guard_but_skips_verification() -> None:
    matrix, values = _matrix()
    default = lanczos_eigs(matrix, k=5, value_tol=1e-4)
    same = lanczos_eigs(matrix, k=5, value_tol=1e-4, guard=1, verify=False)
    assert default.num_hvp == same.num_hvp and torch.equal(default.eigenvalues, same.eigenvalues)
    verified = lanczos_eigs(matrix, k=5, value_tol=1e-4, verify=True)
    assert verified.num_hvp >= default.num_hvp + 5
    torch.testing.assert_close(default.eigenvalues, values[:5], rtol=1e-4, atol=0)


def test_residual_tol_alone_keeps_the_old_defaults() -> None:
    matrix, values = _matrix()
    for k in (1, 5):
        default = lanczos_eigs(matrix, k=k, tol=1e-8)
        old = lanczos_eigs(matrix, k=k, tol=1e-8, guard=1, verify=True)
        assert default.num_hvp == old.num_hvp and torch.equal(default.eigenvalues, old.eigenvalues)
        torch.testing.assert_close(default.eigenvalues, values[:k], rtol=1e-10, atol=1e-12)


def test_bad_guard_is_refused() -> None:
    matrix, _ = _matrix()
    with pytest.raises(ValueError, match="guard"):
        lanczos_eigs(matrix, k=1, guard=-1)


def test_a_warm_start_on_the_top_eigenvector_stops_after_one_product() -> None:
    """Unguarded: the guard would go on until lambda_2 converged too."""
    matrix, values = _matrix()
    vector = torch.linalg.eigh(matrix).eigenvectors[:, -1]
    warm = lanczos_eigs(matrix, k=1, value_tol=1e-6, v0=vector, guard=0)
    assert warm.num_hvp == 1 and abs(warm.eigenvalues[0].item() - values[0].item()) <= 1e-12
    with pytest.raises(ValueError, match="v0"):
        lanczos_eigs(matrix, k=1, v0=torch.zeros(matrix.shape[0]))


def test_a_start_vector_that_is_not_a_tensor_is_refused_clearly() -> None:
    matrix, _ = _matrix(dim=10)
    with pytest.raises(TypeError, match=r"v0 must be a torch.Tensor of shape \(10,\).*got list.*torch.as_tensor"):
        lanczos_eigs(matrix, k=1, v0=[1.0] * 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="v0 must be a finite, non-zero vector"):
        lanczos_eigs(matrix, k=1, v0=torch.zeros(10, dtype=torch.float64))


def test_power_iteration_refuses_a_start_vector_that_is_not_a_tensor() -> None:
    from flatminima.sharpness.power import power_iteration_op

    matrix, _ = _matrix(dim=10)
    with pytest.raises(TypeError, match=r"v0 must be a torch.Tensor of shape \(10,\).*got list.*torch.as_tensor"):
        power_iteration_op(matrix, v0=[1.0] * 10)  # type: ignore[arg-type]
