"""The sharpness seams: one linear-operator protocol for every estimator, one mean/stderr, and m-sharpness measured
with the training rules (any p that trains can be measured)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from flatminima.sharpness import (
    DenseOperator,
    HessianOperator,
    LinearOperator,
    MatvecOperator,
    as_operator,
    hutchinson_trace_op,
    hutchpp_trace_op,
    lanczos_eigs,
    m_sharpness,
    mean_stderr,
    power_iteration_op,
    spectral_density_op,
)

DIM = 24
EIGENVALUES = torch.cat([torch.tensor([9.0, 5.0, 3.0]), torch.linspace(-1.0, 1.0, DIM - 3)]).double()


def _symmetric() -> Tensor:
    """``Q diag(EIGENVALUES) Q^T`` with a random orthogonal ``Q``: a known spectrum and no special structure."""
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return q @ torch.diag(EIGENVALUES) @ q.T


class UserOperator:
    """A user's own operator: no base class, just the protocol's five members."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix, self.dim, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device
        self.products = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.matrix @ v

    def matmat(self, matrix: Tensor) -> Tensor:
        self.products += matrix.shape[1]
        return self.matrix @ matrix


def _forms(matrix: Tensor) -> dict[str, object]:
    return {
        "tensor": matrix,
        "dense": DenseOperator(matrix),
        "matvec": MatvecOperator(lambda v: matrix @ v, DIM),
        "user": UserOperator(matrix),
    }


FORMS = ("tensor", "dense", "matvec", "user")


def test_user_operator_satisfies_the_protocol():
    op = UserOperator(_symmetric())
    assert isinstance(op, LinearOperator)
    assert as_operator(op) is op
    assert isinstance(as_operator(_symmetric()), DenseOperator)
    with pytest.raises(TypeError, match="linear operator"):
        as_operator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3, 4))


@pytest.mark.parametrize("form", FORMS)
def test_lanczos_and_power_accept_every_form(form: str):
    op = _forms(_symmetric())[form]
    top = lanczos_eigs(op, k=3, tol=1e-10)
    torch.testing.assert_close(top.eigenvalues, EIGENVALUES[:3], rtol=0, atol=1e-8)
    bottom = lanczos_eigs(op, k=1, which="smallest", tol=1e-10)
    assert abs(bottom.eigenvalues[0].item() + 1.0) < 1e-8
    power = power_iteration_op(op, tol=1e-12, max_iter=2000)
    assert abs(power.eigenvalues[0].item() - 9.0) < 1e-8  # 5/9 ratio: converges fast


@pytest.mark.parametrize("form", FORMS)
def test_trace_estimators_accept_every_form(form: str):
    matrix = _symmetric()
    op = _forms(matrix)[form]
    exact = hutchpp_trace_op(op, num_matvecs=3 * DIM)  # Q spans the whole space: exact
    assert abs(exact.estimate - EIGENVALUES.sum().item()) < 1e-10
    # Rademacher probes are exact on a diagonal matrix (v_i^2 = 1), whatever the operator's form.
    diagonal = _forms(torch.diag(EIGENVALUES))[form]
    hutch = hutchinson_trace_op(diagonal, num_probes=5, block_size=2)
    assert abs(hutch.estimate - EIGENVALUES.sum().item()) < 1e-10
    assert hutch.num_hvp == 5
    density = spectral_density_op(diagonal, num_runs=2, num_steps=DIM)
    mean, _ = density.moment(1)
    assert abs(mean - EIGENVALUES.mean().item()) < 1e-10  # Gauss quadrature is exact for k < 2 num_steps


def test_user_operator_products_go_through_matmat():
    op = UserOperator(torch.diag(EIGENVALUES))
    result = hutchinson_trace_op(op, num_probes=8, block_size=4)
    assert op.products == 8 == result.num_hvp


def test_hessian_operator_matmat_is_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (10,), generator=gen)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    op = HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert isinstance(op, LinearOperator)
    params = [p.detach().clone() for p in model.parameters()]
    shapes = [p.shape for p in params]

    def loss(flat: Tensor) -> Tensor:
        chunks = flat.split([math.prod(s) for s in shapes])
        weights = {name: c.view(s) for (name, _), c, s in zip(model.named_parameters(), chunks, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params]))
    columns = torch.randn(op.dim, 3, generator=gen, dtype=torch.float64)
    product = op.matmat(columns)
    torch.testing.assert_close(product, dense @ columns, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.matvec(columns[:, 1]), product[:, 1], rtol=0, atol=1e-12)
    assert op.num_hvp == 4  # 3 columns + 1 vector


def test_mean_stderr_one_definition():
    mean, stderr = mean_stderr(torch.tensor([1.0, 2.0, 3.0]))
    assert mean == 2.0 and abs(stderr - 1.0 / math.sqrt(3.0)) < 1e-15  # small integers: the mean 6 / 3 is exact
    mean, stderr = mean_stderr(torch.tensor([4.0]))
    assert mean == 4.0 and math.isnan(stderr)  # one sample: unknown, neither 0 nor inf


def _linear_model(dim: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(dim, 1, bias=False).double()


def _linear_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example loss ``w . x``: linear in ``w``, so one ascent step of radius rho gains exactly ``g . e``."""
    return outputs[:, 0]


@pytest.mark.parametrize("adaptive", [False, True])
def test_msharpness_any_p_is_the_dual_norm_of_the_group_gradient(adaptive: bool):
    """p = 3 (trainable with DualNorm(3), so measurable): ``max_{||e||_3 <= rho} g . e = rho ||g||_{3/2}``, with
    ``g`` the group's mean input; adaptive: ``rho ||T g||_{3/2}`` with ``T = |w| + eta``."""
    model = _linear_model(5)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.zeros(12)
    rho, eta = 0.05, 0.1
    result = m_sharpness(model, _linear_loss, (x, y), m=4, rho=rho, p=3, steps=1, adaptive=adaptive, adaptive_eta=eta)
    scale = model.weight.detach()[0].abs() + eta if adaptive else torch.ones(5, dtype=torch.float64)
    expected = torch.stack([rho * torch.linalg.vector_norm(scale * g, ord=1.5) for g in x.view(3, 4, 5).mean(1)])
    torch.testing.assert_close(result.per_group[:, 0], expected, rtol=1e-12, atol=0)
    assert result.p == 3.0 and result.num_groups == 3
    # The L2 ball gives a different, also closed-form, answer: the geometry really comes from p.
    l2 = m_sharpness(model, _linear_loss, (x, y), m=4, rho=rho, steps=1)
    if not adaptive:
        expected_l2 = torch.stack([rho * g.norm() for g in x.view(3, 4, 5).mean(1)])
        torch.testing.assert_close(l2.per_group[:, 0], expected_l2, rtol=1e-12, atol=0)
        assert not torch.allclose(l2.per_group[:, 0], result.per_group[:, 0])
