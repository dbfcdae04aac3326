"""Hessian measures against the dense Hessian (torch.autograd.functional.hessian) on small float64 models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.sharpness import (
    HessianOperator,
    hessian_eigenvalues,
    hutchinson_trace_op,
    hutchpp_trace_op,
    lanczos,
    lanczos_eigs,
    power_iteration,
    power_iteration_op,
    spectral_density_op,
)
from tests.conftest import TEST_THREADS

SIZES = (8, 8, 4)  # 20 examples, the last batch short


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()  # 51 parameters


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()  # 119 parameters


def _data(kind: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    shape = (20, 4) if kind == "mlp" else (20, 1, 6, 6)
    return torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen)


def _batches(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(list(SIZES)), y.split(list(SIZES)), strict=True))


MODELS = {"mlp": _mlp, "cnn": _cnn}


@pytest.fixture(autouse=True, scope="module")
def _module_threads():
    """The module-scoped ``setup`` (the dense Hessian and its eigendecomposition) is built before conftest's per-test
    fixture sets the thread count: build it with the same TEST_THREADS as the tests, not 1 whatever the setting
    (FLATMINIMA_TEST_THREADS=2 then tests the whole module on 2 threads) nor the machine's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def setup(request: pytest.FixtureRequest) -> dict:
    """The model, its batched data, the operator and the dense Hessian with its eigendecomposition."""
    model = MODELS[request.param]()
    x, y = _data(request.param)
    data = _batches(x, y)
    op = HessianOperator(model, F.cross_entropy, data)
    dense = op.dense_hessian()
    evals, evecs = torch.linalg.eigh(dense)
    return dict(model=model, x=x, y=y, data=data, op=op, dense=dense, evals=evals, evecs=evecs)


# ---------------------------------------------------------------------------- products


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_equals_dense_hessian_times_v(setup: dict, method: str) -> None:
    op = HessianOperator(setup["model"], F.cross_entropy, setup["data"], method=method)
    assert op.dim == setup["dense"].shape[0] and op.total_count == 20
    torch.testing.assert_close(setup["dense"], setup["dense"].T, rtol=0, atol=1e-14)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), setup["dense"] @ v, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(op @ torch.stack([v, 2 * v], 1), setup["dense"] @ torch.stack([v, 2 * v], 1))
    assert op.num_hvp == 3


def test_batch_weighting_matches_single_batch(setup: dict) -> None:
    """Three uneven batches (8, 8, 4) give the Hessian, gradient and loss of the one full batch."""
    full = HessianOperator(setup["model"], F.cross_entropy, (setup["x"], setup["y"]))
    op = setup["op"]
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), full.matvec(v), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(op.gradient(), full.gradient(), rtol=1e-10, atol=1e-13)
    assert op.loss() == pytest.approx(full.loss(), rel=1e-12)
    # a DataLoader over the same data (a generator too) gives the same product
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(setup["x"], setup["y"]), batch_size=8)
    torch.testing.assert_close(HessianOperator(setup["model"], F.cross_entropy, loader).matvec(v), full.matvec(v))
    torch.testing.assert_close(HessianOperator(setup["model"], F.cross_entropy, iter(setup["data"])).matvec(v), op @ v)


def test_float64_copy_and_auto_method() -> None:
    model = _mlp().float()
    x, y = _data("mlp")
    op = HessianOperator(model, F.cross_entropy, _batches(x.float(), y), dtype=torch.float64, method="auto")
    assert op.dtype == torch.float64 and op.method in ("double_backward", "forward_over_reverse")
    assert set(op.benchmark) == {"double_backward", "forward_over_reverse"}
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    reference = HessianOperator(_mlp(), F.cross_entropy, _batches(x, y))
    v = torch.randn(op.dim, dtype=torch.float64)
    # the float32 weights, promoted, are not bit-identical to the float64 model's: compare loosely
    torch.testing.assert_close(op.matvec(v), reference.matvec(v), rtol=1e-5, atol=1e-6)


def test_batchnorm_eval_mode_used_and_restored() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[1].running_mean.normal_()
    x, y = _data("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    results = []
    for train in (True, False):
        model.train(train)
        op = HessianOperator(model, F.cross_entropy, _batches(x, y))
        results.append(op.matvec(v))
        assert model.training is train and model[1].training is train
    # exact: both measure in eval mode (the operator switches a training model to eval), so the two products are the
    # same computation on the same weights, data and v
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    # train_mode=True uses batch statistics (a different Hessian) but leaves the running statistics alone
    model.train()
    batch_stats = HessianOperator(model, F.cross_entropy, _batches(x, y), train_mode=True).matvec(v)
    assert not torch.allclose(batch_stats, results[0])
    for before, after in zip(buffers, model.buffers(), strict=True):  # untouched: exact
        torch.testing.assert_close(before, after, rtol=0, atol=0)


# ---------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_top5_against_dense(setup: dict, which: str) -> None:
    result = hessian_eigenvalues(setup["model"], F.cross_entropy, setup["data"], k=5, which=which, tol=1e-10)
    order = torch.arange(len(setup["evals"]) - 1, -1, -1) if which == "largest" else torch.arange(len(setup["evals"]))
    ref, ref_vecs = setup["evals"][order[:5]], setup["evecs"][:, order[:5]]
    torch.testing.assert_close(result.eigenvalues, ref, rtol=1e-8, atol=0)
    assert result.converged and result.which == which
    assert (result.residuals <= 1e-9 * ref.abs().max()).all()
    assert result.num_hvp <= setup["op"].dim + 5 * 3
    gaps = (setup["evals"][:, None] - ref[None, :]).abs().sort(dim=0).values[1]  # distance to the nearest other
    for i in range(5):
        if gaps[i] > 1e-3 * ref.abs().max():
            assert abs(float(result.eigenvectors[i] @ ref_vecs[:, i])) > 1 - 1e-6
    if which == "largest":
        assert result.ratio(5) == pytest.approx(float(ref[0] / ref[4]), rel=1e-8)
        assert result.ratio(1) == 1.0  # lambda_1 / lambda_1: exact


def test_lanczos_default_tolerance_and_truncated(setup: dict) -> None:
    op = setup["op"]
    result = lanczos_eigs(op, k=3, tol=1e-6, seed=7)
    ref = setup["evals"].flip(0)[:3]
    assert result.converged
    assert ((result.eigenvalues - ref).abs() <= 1e-6 * ref.abs()).all()
    truncated = lanczos_eigs(op, k=3, tol=1e-14, max_steps=5, return_vectors=False)
    assert truncated.eigenvectors is None and not truncated.converged and truncated.num_hvp == 5 + 3


def test_lanczos_core_invariant_subspace() -> None:
    """A diagonal operator with a start vector in a 2-d invariant subspace: breakdown is handled, dim steps exact."""
    diag = torch.arange(1.0, 7.0, dtype=torch.float64)
    v0 = torch.tensor([1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)
    dec = lanczos(lambda v: diag * v, 6, 6, v0)
    assert dec.beta[1] == 0.0  # exact: on breakdown the iteration stores 0.0, not the tiny residual norm
    torch.testing.assert_close(dec.basis @ dec.basis.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.linalg.eigvalsh(dec.tridiagonal()), diag, rtol=1e-12, atol=0)


def test_power_iteration_matches_lambda_max(setup: dict) -> None:
    evals = setup["evals"]
    lam = evals[evals.abs().argmax()]
    result = power_iteration(setup["model"], F.cross_entropy, setup["data"], tol=1e-7, max_iter=3000)
    assert result.converged and result.which == "magnitude"
    assert float(result.eigenvalues[0]) == pytest.approx(float(lam), rel=1e-3)
    assert power_iteration_op(setup["op"], tol=1e-3, max_iter=2).num_hvp == 2


# ---------------------------------------------------------------------------- trace


def test_hutchinson_unbiased(setup: dict) -> None:
    dense = setup["dense"]
    exact = float(dense.trace())
    result = hutchinson_trace_op(setup["op"], num_probes=2000, seed=11)
    assert result.num_hvp == 2000 and result.samples is not None and len(result.samples) == 2000
    assert abs(result.estimate - exact) <= 4 * result.stderr
    # Rademacher variance is 2 * (sum of squared off-diagonal entries): the stderr must match it
    expected = math.sqrt(2 * float((dense**2).sum() - (dense.diagonal() ** 2).sum()) / 2000)
    assert 0.8 * expected < result.stderr < 1.25 * expected
    gaussian = hutchinson_trace_op(setup["op"], num_probes=500, seed=12, distribution="gaussian")
    assert abs(gaussian.estimate - exact) <= 4 * gaussian.stderr


def test_hutchpp(setup: dict) -> None:
    op, exact = setup["op"], float(setup["dense"].trace())
    result = hutchpp_trace_op(op, num_matvecs=60, seed=13)
    assert result.num_hvp == 60 and result.stderr > 0
    assert abs(result.estimate - exact) <= 4 * result.stderr
    plain = hutchinson_trace_op(op, num_probes=60, seed=13)
    assert result.stderr < plain.stderr  # deflating the top of the spectrum reduces the variance
    full = hutchpp_trace_op(op, num_matvecs=3 * op.dim, seed=14)
    assert full.stderr == 0.0 and full.num_hvp == 2 * op.dim  # Q spans the space: no stochastic part, stderr is set 0
    assert full.estimate == pytest.approx(exact, rel=1e-8, abs=1e-12)


# ---------------------------------------------------------------------------- spectral density


def test_slq_moments(setup: dict, tmp_path) -> None:
    op, dense, evals = setup["op"], setup["dense"], setup["evals"]
    density = spectral_density_op(op, num_runs=30, num_steps=12, seed=15)
    assert density.nodes.shape == (30, 12) and density.weights.shape == (30, 12) and density.num_hvp == 30 * 12
    mean0, _ = density.moment(0)
    assert mean0 == pytest.approx(1.0, abs=1e-12)
    for k in (1, 2):
        mean, stderr = density.moment(k)
        exact = float(torch.linalg.matrix_power(dense, k).trace()) / op.dim
        assert abs(mean - exact) <= 4 * stderr
    # Gauss quadrature is exact per run: sum w theta^2 = ||H v||^2 for the unit start vector
    v = torch.randn(op.dim, dtype=torch.float64)
    v = v / v.norm()
    theta, s = torch.linalg.eigh(lanczos(op, op.dim, 5, v).tridiagonal())
    assert float((s[0] ** 2 * theta**2).sum()) == pytest.approx(float((dense @ v).norm() ** 2), rel=1e-10)
    # the smoothed density integrates to 1 and plots
    grid = torch.linspace(float(evals[0]) - 1, float(evals[-1]) + 1, 4001, dtype=torch.float64)
    assert float(torch.trapezoid(density.density(grid, sigma=0.02), grid)) == pytest.approx(1.0, abs=1e-6)
    path = density.plot(tmp_path / "density.png")
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------------------- errors


def test_errors() -> None:
    model = _mlp()
    x, y = _data("mlp")
    data = _batches(x, y)
    with pytest.raises(ValueError, match=r"k=52 exceeds the number of trainable parameters \(51\)"):
        hessian_eigenvalues(model, F.cross_entropy, data, k=52)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, F.cross_entropy, (x[:0], y[:0]))
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        HessianOperator(frozen, F.cross_entropy, data)
    with pytest.raises(ValueError, match="unknown method"):
        HessianOperator(model, F.cross_entropy, data, method="finite_differences")
    with pytest.raises(ValueError, match="unknown which"):
        hessian_eigenvalues(model, F.cross_entropy, data, which="middle")
    op = HessianOperator(model, F.cross_entropy, data)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown distribution"):
        hutchinson_trace_op(op, num_probes=2, distribution="cauchy")
    with pytest.raises(ValueError, match="ratio"):
        lanczos_eigs(op, k=2).ratio(3)
