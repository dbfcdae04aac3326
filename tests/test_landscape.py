"""Loss landscapes: centre point, filter normalisation, exact parabolas, eigen directions, plots and restoration."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatminima.sharpness.landscape import (
    Landscape,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
)
from tests.conftest import assert_identical, make_mlp, make_tiny_cnn, per_example_ce, small_batch, snapshot

DT = torch.float64


def mlp(seed: int = 0, batch_norm: bool = True) -> nn.Module:
    return make_mlp(seed, DT, batch_norm)


def tiny_cnn(seed: int = 0) -> nn.Module:
    return make_tiny_cnn(seed, DT)


def batch(n: int = 20, seed: int = 1, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return small_batch(n, seed, image)


ce_none = per_example_ce


class Quadratic(nn.Module):
    """Every example's loss is ``1/2 w^T H w`` (the inputs are ignored)."""

    def __init__(self, dim: int = 5, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(dim, dim, generator=gen, dtype=DT)
        self.register_buffer("hessian", a @ a.T - 2.0 * torch.eye(dim, dtype=DT))  # indefinite on purpose
        self.w = nn.Parameter(torch.randn(dim, generator=gen, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.hessian @ self.w).expand(x.shape[0])


def identity_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs


@pytest.mark.parametrize("loss_fn", [ce_none, F.cross_entropy], ids=["per-example", "mean"])
def test_centre_is_the_model_loss_exactly(loss_fn) -> None:
    model, (x, y) = mlp(), batch()
    model.train()
    one = loss_landscape_1d(model, loss_fn, (x, y), num_points=11)
    two = loss_landscape_2d(model, loss_fn, (x, y), num_points=5)
    model.eval()
    # Exact, and the same path on any CPU: the grid puts alpha = 0.0 exactly on the centre, where w + 0.0 * d == w bit
    # for bit; one batch has weight n / n = 1.0; and the landscape evaluates, under no_grad, the same modules in eval
    # mode on the same tensors, then takes the mean of loss_fn's output, as here.
    with torch.no_grad():
        expected = loss_fn(model(x), y).mean()
    accuracy = (model(x).argmax(1) == y).double().mean()
    assert one.alphas[5] == 0.0 and one.losses[5] == expected
    assert one.accuracies is not None
    torch.testing.assert_close(one.accuracies[5], accuracy, rtol=0, atol=1e-12)  # summed per batch: last-bit
    assert two.alphas[2] == 0.0 and two.betas is not None and two.betas[2] == 0.0
    assert two.losses[2, 2] == expected


def test_filter_normalisation() -> None:
    model = tiny_cnn()
    params = list(model.parameters())
    directions = filter_normalized_direction(model, seed=3)
    assert [d.shape for d in directions] == [p.shape for p in params]
    for p, d in zip(params, directions):
        if p.dim() <= 1:
            assert torch.equal(d, torch.zeros_like(p))
        else:
            for pf, df in zip(p.detach(), d):
                torch.testing.assert_close(df.norm(), pf.norm(), rtol=0, atol=1e-10)
    kept = filter_normalized_direction(model, seed=3, ignore_bn_and_bias=False)
    for p, d in zip(params, kept):
        if p.dim() <= 1:
            torch.testing.assert_close(d.norm(), p.detach().norm(), rtol=0, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(directions, filter_normalized_direction(model, seed=3)))  # replayed
    assert not torch.equal(directions[0], filter_normalized_direction(model, seed=4)[0])


def test_quadratic_gives_the_exact_parabola() -> None:
    model = Quadratic()
    x, y = torch.zeros(4, 1, dtype=DT), torch.zeros(4, 1, dtype=DT)
    d = torch.randn(5, generator=torch.Generator().manual_seed(7), dtype=DT)
    result = loss_landscape_1d(model, identity_loss, (x, y), direction=[d], span=(-2.0, 3.0), num_points=26)
    w, h = model.w.detach(), model.hessian
    a = result.alphas
    expected = 0.5 * w @ h @ w + a * (w @ h @ d) + 0.5 * a**2 * (d @ h @ d)
    torch.testing.assert_close(result.losses, expected, rtol=1e-12, atol=1e-12)
    assert result.accuracies is None and result.directions == "given"
    # 2D: the exact quadric in (alpha, beta)
    d2 = torch.randn(5, generator=torch.Generator().manual_seed(8), dtype=DT)
    grid = loss_landscape_2d(model, identity_loss, (x, y), directions=(d, d2), num_points=7)
    al, be = grid.alphas[:, None], grid.betas[None, :]
    quad = (
        0.5 * w @ h @ w
        + al * (w @ h @ d)
        + be * (w @ h @ d2)
        + 0.5 * al**2 * (d @ h @ d)
        + al * be * (d @ h @ d2)
        + 0.5 * be**2 * (d2 @ h @ d2)
    )
    torch.testing.assert_close(grid.losses, quad, rtol=1e-12, atol=1e-12)


def test_eigen_direction_curvature_is_the_eigenvalue() -> None:
    model, (x, y) = mlp(batch_norm=False), batch()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = [t.reshape(p.shape) for t, p in zip(torch.split(flat, sizes), params)]
        out = torch.func.functional_call(model, dict(zip(names, pieces)), (x,))
        return F.cross_entropy(out, y)

    flat = torch.cat([p.reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(flat_loss, flat)
    values, vectors = torch.linalg.eigh(hessian)
    top = vectors[:, -1]
    h = 1e-3
    result = loss_landscape_1d(
        model, F.cross_entropy, (x, y), direction="eigen", eigenvectors=top, span=(-h, h), num_points=3
    )
    curvature = (result.losses[0] - 2 * result.losses[1] + result.losses[2]) / h**2
    assert result.directions == "eigen"
    torch.testing.assert_close(curvature, values[-1], rtol=1e-4, atol=0)
    # the same along the eigenvector given per parameter, and from a (k, dim) stack. Exact: every form holds copies
    # of the same eigenvector entries, so each point's weights w + alpha d (+ 0.0 d2 on the 2D grid's beta = 0
    # column, which adds exactly nothing) are the same bits, evaluated by the same forward pass
    as_list = [t.reshape(p.shape) for t, p in zip(torch.split(top, sizes), params)]
    by_list = loss_landscape_1d(model, F.cross_entropy, (x, y), direction=as_list, span=(-h, h), num_points=3)
    torch.testing.assert_close(by_list.losses, result.losses, rtol=0, atol=0)
    stack = vectors[:, [-1, -2]].T
    grid = loss_landscape_2d(
        model, F.cross_entropy, (x, y), directions="eigen", eigenvectors=stack, span=(-h, h), num_points=3
    )
    torch.testing.assert_close(grid.losses[:, 1], result.losses, rtol=0, atol=0)
    curvature2 = (grid.losses[1, 0] - 2 * grid.losses[1, 1] + grid.losses[1, 2]) / h**2
    torch.testing.assert_close(curvature2, values[-2], rtol=1e-4, atol=0)
    # a result object carrying the vectors row-wise (as the Hessian module's EigenResult does)
    carrier = SimpleNamespace(eigenvalues=values[[-1, -2]], eigenvectors=stack)
    again = loss_landscape_1d(
        model, F.cross_entropy, (x, y), direction="eigen", eigenvectors=carrier, span=(-h, h), num_points=3
    )
    torch.testing.assert_close(again.losses, result.losses, rtol=0, atol=0)


def test_2d_shape_plot_and_restoration(tmp_path) -> None:
    model, data = tiny_cnn(), batch(n=8, image=True)
    model.train()
    saved = snapshot(model)
    grid = loss_landscape_2d(model, ce_none, data, num_points=6, span=(-0.5, 0.5))
    assert isinstance(grid, Landscape)
    assert grid.losses.shape == (6, 6) and grid.accuracies is not None and grid.accuracies.shape == (6, 6)
    assert grid.alphas.shape == grid.betas.shape == (6,) and grid.directions == "random"
    assert torch.isfinite(grid.losses).all()
    assert_identical(model, saved)
    assert model.training
    path = grid.plot(tmp_path / "sub" / "grid.png")
    assert path.exists() and path.stat().st_size > 1024
    line = loss_landscape_1d(model, ce_none, data, num_points=5)
    assert line.losses.shape == (5,) and line.betas is None
    path = line.plot(tmp_path / "line.png", title="1D")
    assert path.stat().st_size > 1024
    assert_identical(model, saved)


def test_batches_are_size_weighted_and_iterators_are_read_once() -> None:
    model, (x, y) = mlp(), batch(n=23)
    whole = loss_landscape_1d(model, ce_none, (x, y), num_points=5)
    batches = ((x[i : i + 5], y[i : i + 5]) for i in range(0, 23, 5))  # a generator, last batch of 3
    split = loss_landscape_1d(model, F.cross_entropy, batches, num_points=5)
    torch.testing.assert_close(split.losses, whole.losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(split.accuracies, whole.accuracies, rtol=1e-12, atol=1e-14)


def test_restored_after_an_exception() -> None:
    model, data = mlp(), batch()
    model.train()
    saved = snapshot(model)
    calls = 0

    def failing(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return ce_none(outputs, targets)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape_1d(model, failing, data, train_mode=True)
    assert_identical(model, saved)
    assert model.training


def test_nonsense_input_is_rejected() -> None:
    model, data = mlp(), batch()
    with pytest.raises(ValueError, match="low < high"):
        loss_landscape_1d(model, ce_none, data, span=(1.0, -1.0))
    with pytest.raises(ValueError, match="num_points"):
        loss_landscape_1d(model, ce_none, data, num_points=1)
    with pytest.raises(ValueError, match="elements"):
        loss_landscape_1d(model, ce_none, data, direction=torch.zeros(7, dtype=DT))
    with pytest.raises(ValueError, match="do not match"):
        loss_landscape_1d(model, ce_none, data, direction=[torch.zeros(3)])
    with pytest.raises(ValueError, match="needs eigenvectors"):
        loss_landscape_1d(model, ce_none, data, direction="eigen")
    with pytest.raises(ValueError, match="needs 2 eigenvectors"):
        total = sum(p.numel() for p in model.parameters())
        loss_landscape_2d(model, ce_none, data, directions="eigen", eigenvectors=torch.ones(total, dtype=DT))
    with pytest.raises(ValueError, match="direction must be"):
        loss_landscape_1d(model, ce_none, data, direction="hessian")
    with pytest.raises(ValueError, match="pair"):
        loss_landscape_2d(model, ce_none, data, directions=[torch.zeros(1)])
    with pytest.raises(ValueError, match="non-finite"):
        total = sum(p.numel() for p in model.parameters())
        loss_landscape_1d(model, ce_none, data, direction=torch.full((total,), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="batch mean or per-example"):
        loss_landscape_1d(model, lambda o, t: ce_none(o, t)[:-1], data)
    with pytest.raises(TypeError, match="pair"):
        loss_landscape_1d(model, ce_none, data[0])
    with pytest.raises(ValueError, match="no examples"):
        loss_landscape_1d(model, ce_none, [])
