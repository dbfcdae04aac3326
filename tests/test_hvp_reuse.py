"""Hessian-vector products on a gradient graph built once and kept (issue 30), against the dense float64 Hessian
and against the products that rebuild the graph every time."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.sharpness import HessianOperator, hessian_eigenvalues, lanczos_eigs

SIZES = (8, 8, 4)  # 20 examples, the last batch short


def _model(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm: list[nn.Module] = [nn.BatchNorm2d(2)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(1, 2, 3), *norm, nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()


def _data(n: int = 20) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _batches(sizes: tuple[int, ...] = SIZES) -> list[tuple[Tensor, Tensor]]:
    x, y = _data(sum(sizes))
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def _vectors(dim: int, k: int, seed: int = 3) -> Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_kept_graph_products_equal_dense_hessian(batch_norm: bool, train_mode: bool) -> None:
    model = _model(batch_norm)
    op = HessianOperator(model, F.cross_entropy, _batches(), train_mode=train_mode)
    dense = op.dense_hessian()
    vectors = _vectors(op.dim, 3)
    for j in range(3):  # the first product builds the graphs, the others run on them
        torch.testing.assert_close(op.matvec(vectors[:, j]), dense @ vectors[:, j], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(vectors), dense @ vectors, rtol=1e-10, atol=1e-12)
    assert op.graph_reused == 3 and op.num_hvp == 6 and op.graph_bytes > 0 and not op.graph_over_budget


def test_kept_graph_equals_rebuilt_graph() -> None:
    """The same operations on the same tensors in the same order: on the CPU the products agree to the last bits.
    The bound, 1e-14 of the product's largest entry (a few float64 ulps), leaves room for a backend that reduces in
    another order from one call to the next (threaded convolution backward), which reordered sums can move by
    that much."""
    model = _model(batch_norm=True)
    kept = HessianOperator(model, F.cross_entropy, _batches())
    rebuilt = HessianOperator(model, F.cross_entropy, _batches(), reuse_graph=False)
    vectors = _vectors(kept.dim, 4)
    for j in range(4):
        reference = rebuilt.matvec(vectors[:, j])
        scale = float(reference.abs().max())
        torch.testing.assert_close(kept.matvec(vectors[:, j]), reference, rtol=0, atol=1e-14 * scale)
    assert kept.graph_reused == 3 and rebuilt.graph_reused == 0 and rebuilt.graph_bytes == 0


def test_graph_rebuilt_after_the_model_changes() -> None:
    """An optimiser step writes the parameters in place: the kept graph is stale and must be rebuilt."""
    model = _model(batch_norm=True)
    op = HessianOperator(model, F.cross_entropy, _batches())
    v = _vectors(op.dim, 1)[:, 0]
    op.matvec(v)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(_data()[0]), _data()[1]).backward()
    optimiser.step()
    after = op.matvec(v)
    assert op.graph_reused == 0  # the second product rebuilt the graphs
    fresh = HessianOperator(model, F.cross_entropy, _batches(), reuse_graph=False)
    torch.testing.assert_close(after, fresh.matvec(v), rtol=0, atol=1e-14 * float(after.abs().max()))
    torch.testing.assert_close(op.matvec(v), after, rtol=0, atol=0)  # and kept again
    assert op.graph_reused == 1


def test_graph_memory_grows_with_the_examples_and_respects_the_budget() -> None:
    model = _model()
    one = HessianOperator(model, F.cross_entropy, _batches((8,)))
    two = HessianOperator(model, F.cross_entropy, _batches((8, 8)))
    v = _vectors(one.dim, 1)[:, 0]
    one.matvec(v), two.matvec(v)
    # per batch: the activations the graph saves plus one gradient: two equal batches keep twice as much, up to a
    # few scalar storages (8 bytes each) that the allocator may hand to both batches' graphs, counted once (seen:
    # 20,088 against 2 x 10,048 in one run and exactly twice in others); a batch's activations alone are ~5 KB
    assert one.graph_bytes > 0 and abs(two.graph_bytes - 2 * one.graph_bytes) <= 64
    dense = two.dense_hessian() @ v
    small = HessianOperator(model, F.cross_entropy, _batches((8, 8)), graph_budget=1.5 * one.graph_bytes)
    for _ in range(2):  # over budget after the first batch: every product rebuilds, and is still right
        torch.testing.assert_close(small.matvec(v), dense, rtol=1e-10, atol=1e-12)
    assert small.graph_over_budget and small.graph_reused == 0 and small._graphs is None
    never = HessianOperator(model, F.cross_entropy, _batches((8, 8)), graph_budget=0)
    torch.testing.assert_close(never.matvec(v), dense, rtol=1e-10, atol=1e-12)
    assert never.graph_reused == 0
    two.release_graph()
    torch.testing.assert_close(two.matvec(v), dense, rtol=1e-10, atol=1e-12)
    assert two.graph_reused == 0


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_vectorized_matmat_equals_one_backward_per_column(method: str) -> None:
    model = _model(batch_norm=True)
    looped = HessianOperator(model, F.cross_entropy, _batches(), method=method)
    batched = HessianOperator(model, F.cross_entropy, _batches(), method=method, vectorize=True)
    vectors = _vectors(looped.dim, 5)
    dense = looped.dense_hessian() @ vectors
    for _ in range(2):  # building the graphs, then on the kept ones
        torch.testing.assert_close(batched.matmat(vectors), dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched.matmat(vectors), looped.matmat(vectors), rtol=1e-12, atol=1e-14)
    assert batched.num_hvp == 15


def test_auto_times_the_kept_graph_and_leaves_the_model_alone() -> None:
    model = _model(batch_norm=True).train()
    buffers = [b.clone() for b in model.buffers()]
    op = HessianOperator(model, F.cross_entropy, _batches(), method="auto", train_mode=True)
    assert set(op.benchmark) == {"double_backward", "forward_over_reverse"} and op.num_hvp == 0
    v = _vectors(op.dim, 1)[:, 0]
    torch.testing.assert_close(op.matvec(v), op.dense_hessian() @ v, rtol=1e-10, atol=1e-12)
    assert model.training and all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="graph_budget"):
        HessianOperator(_model(), F.cross_entropy, _batches(), graph_budget=-1)
    with pytest.raises(ValueError, match="graph_budget"):
        HessianOperator(_model(), F.cross_entropy, _batches(), graph_budget=float("nan"))
    for bad in ("1GiB", None, True):
        with pytest.raises(TypeError, match=r"graph_budget must be a number of bytes .*2\*\*30"):
            HessianOperator(_model(), F.cross_entropy, _batches(), graph_budget=bad)  # type: ignore[arg-type]
    assert HessianOperator(_model(), F.cross_entropy, _batches(), graph_budget=math.inf).graph_budget == math.inf


def _frozen_write(model: nn.Module) -> None:
    """A frozen parameter changed in place (the version moves; the operator does not differentiate it)."""
    with torch.no_grad():
        model[0].bias.add_(0.5)


def _data_write(model: nn.Module) -> None:
    """A trainable parameter written through ``.data``: neither its version nor its storage moves."""
    model[0].weight.data.add_(0.3)


def _buffer_data_write(model: nn.Module) -> None:
    """A BatchNorm running mean (used in eval mode) written through ``.data``."""
    model[1].running_mean.data.add_(0.5)


@pytest.mark.parametrize("write", [_frozen_write, _data_write, _buffer_data_write])
def test_kept_graph_sees_writes_the_version_misses(write: Callable[[nn.Module], None]) -> None:
    """After the write, the next product on the old operator equals a fresh operator's, to 1e-12 in float64."""
    model = _model(batch_norm=True)
    model[0].bias.requires_grad_(False)
    op = HessianOperator(model, F.cross_entropy, _batches())
    v = _vectors(op.dim, 1)[:, 0]
    before = op.matvec(v)
    write(model)
    after = op.matvec(v)
    fresh = HessianOperator(model, F.cross_entropy, _batches(), reuse_graph=False).matvec(v)
    assert float((fresh - before).abs().max()) > 1e-3  # the write moved the Hessian
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-12)
    assert op.graph_reused == 0 and op.graph_builds == 2
    torch.testing.assert_close(op.matvec(v), fresh, rtol=0, atol=1e-12)  # kept again, and reused
    assert op.graph_reused == 1


def test_over_budget_products_keep_no_graph() -> None:
    """Once over budget, a product rebuilds each batch's graph and frees it before the next: no batch's graph is
    alive while another is built, and nothing is kept; the products stay right."""
    model = _model()
    one = HessianOperator(model, F.cross_entropy, _batches((8,)))
    v = _vectors(one.dim, 1)[:, 0]
    one.matvec(v)
    op = HessianOperator(model, F.cross_entropy, _batches(), graph_budget=1.5 * one.graph_bytes)
    dense = op.dense_hessian() @ v
    torch.testing.assert_close(op.matvec(v), dense, rtol=1e-10, atol=1e-12)
    assert op.graph_over_budget
    built: list[weakref.ref[Tensor]] = []
    alive: list[int] = []
    original = op._gradient_graph

    def spy(*args: Any) -> Any:
        alive.append(sum(ref() is not None for ref in built))  # earlier batches' gradients still held
        grads, nbytes = original(*args)
        built.append(weakref.ref(grads[0]))
        return grads, nbytes

    op._gradient_graph = spy  # type: ignore[method-assign]
    torch.testing.assert_close(op.matvec(v), dense, rtol=1e-10, atol=1e-12)
    assert alive == [0, 0, 0]  # three batches, each graph freed before the next was built
    assert op.graph_builds == 2 and op.graph_reused == 0 and op._graphs is None and op.graph_bytes == 0


@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_on_kept_graphs_agree_with_dense_eigendecomposition(k: int) -> None:
    model = _model(batch_norm=True)
    op = HessianOperator(model, F.cross_entropy, _batches())
    exact = torch.linalg.eigvalsh(op.dense_hessian()).flip(0)[:k]
    result = lanczos_eigs(op, k=k, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-9, atol=1e-12)
    assert op.graph_builds == 1 and op.graph_reused >= 1  # one pass built the graphs, every other reused them
    quick = hessian_eigenvalues(model, F.cross_entropy, _batches(), k=k, value_tol=1e-6)
    assert quick.converged
    assert float(((quick.eigenvalues - exact).abs() / exact.abs()).max()) <= 1e-6
