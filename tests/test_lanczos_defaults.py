"""What ``lanczos_eigs`` pays for by default (issue 30): with ``value_tol`` no verification products; for k = 1 no
guard Ritz value either, but a wanted residual of at most ``EVIDENCE_TOL``; the guard stays for k > 1. The stronger
checks stay available as options, and verification is the default without ``value_tol``."""

from __future__ import annotations

import pytest
import torch

from flatminima.sharpness import lanczos_eigs
from flatminima.sharpness.lanczos import EVIDENCE_TOL, eigenvalue_error_bounds


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
def test_lambda_max_to_value_tol_pays_for_neither_guard_nor_verification(seed: int) -> None:
    matrix, values = _matrix(seed=seed)
    default = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed)
    assert default.converged and abs(default.eigenvalues[0].item() - values[0].item()) <= 1e-3 * values[0].item()
    # the evidence asked in place of the guard: a relative residual of at most EVIDENCE_TOL (exact here: float64)
    assert default.residuals[0].item() <= EVIDENCE_TOL * default.eigenvalues[0].item()
    product = matrix @ default.eigenvectors[0]
    true_residual = torch.linalg.vector_norm(product - default.eigenvalues[0] * default.eigenvectors[0]).item()
    assert true_residual <= EVIDENCE_TOL * default.eigenvalues[0].item()
    guarded = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, guard=1)
    unguarded = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, guard=0)
    assert unguarded.num_hvp <= default.num_hvp <= guarded.num_hvp
    checked = lanczos_eigs(matrix, k=1, value_tol=1e-3, seed=seed, guard=1, verify=True)
    assert checked.num_hvp == guarded.num_hvp + 1  # the verification product
    assert torch.equal(checked.eigenvalues, guarded.eigenvalues)


def _hidden_top_eigenvector(eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues 10, 9.5, 5, then [0, 4]; the top eigenvector has only ``eps`` of the start vector returned."""
    dim = 200
    values = torch.cat([torch.tensor([10.0, 9.5, 5.0]), torch.linspace(4, 0, dim - 3)]).double()
    gen = torch.Generator().manual_seed(1)
    v0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    v0 = v0 / v0.norm()
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    u = a[:, 0] - (a[:, 0] @ v0) * v0
    top = eps * v0 + (1 - eps**2) ** 0.5 * u / u.norm()
    rest, _ = torch.linalg.qr(a[:, 1:] - top[:, None] * (top @ a[:, 1:])[None])
    q = torch.cat([top[:, None], rest], dim=1)
    return (q * values) @ q.T, values, v0


def test_lambda_max_default_finds_a_top_eigenvector_that_the_plain_criterion_misses() -> None:
    """With 1e-2 of the start on the top eigenvector, the plain criterion (``guard=0``) stops near 9.5 after 5
    products; the default's residual evidence goes on until 10 has entered the space (9 products)."""
    matrix, values, v0 = _hidden_top_eigenvector(1e-2)
    plain = lanczos_eigs(matrix, k=1, value_tol=1e-3, v0=v0, guard=0)
    assert abs(plain.eigenvalues[0].item() - values[1].item()) < 5e-2  # near lambda_2, reported as lambda_max
    default = lanczos_eigs(matrix, k=1, value_tol=1e-3, v0=v0)
    assert abs(default.eigenvalues[0].item() - values[0].item()) <= 1e-3 * values[0].item()
    assert default.num_hvp > plain.num_hvp


def test_the_guard_is_the_stronger_option_for_lambda_max() -> None:
    """With 1e-3 of the start on the top eigenvector the default stops on 9.5 too; ``guard=1`` still finds 10 (down to
    1e-5 of the start, in 10-12 products)."""
    matrix, values, v0 = _hidden_top_eigenvector(1e-3)
    default = lanczos_eigs(matrix, k=1, value_tol=1e-3, v0=v0)
    assert abs(default.eigenvalues[0].item() - values[1].item()) < 1e-2
    guarded = lanczos_eigs(matrix, k=1, value_tol=1e-3, v0=v0, guard=1)
    assert abs(guarded.eigenvalues[0].item() - values[0].item()) <= 1e-3 * values[0].item()


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
