"""Tracking lambda_max along training: warm starts, exact values, and no effect on the training itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.cli import main
from flatminima.sharpness import SharpnessTracker, hessian_eigenvalues


def _setup() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(64, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (64,), generator=gen))


def test_warm_starts_cost_fewer_products_and_give_lambda_max() -> None:
    model, data = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    warm = SharpnessTracker(F.cross_entropy, data, every=5, tol=1e-6, max_iter=500)
    cold_products, warm_products = [], []
    for step in range(1, 31):
        opt.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        opt.step()
        record = warm.maybe_measure(model, step)
        if record is None:
            continue
        cold = SharpnessTracker(F.cross_entropy, data, every=5, tol=1e-6, max_iter=500).measure(model, step)
        exact = hessian_eigenvalues(model, F.cross_entropy, data, k=1, tol=1e-10).eigenvalues[0].item()
        assert abs(record.lambda_max - exact) < 1e-4 * abs(exact)
        cold_products.append(cold.num_hvp)
        warm_products.append(record.num_hvp)
    assert [r.step for r in warm.history] == [5, 10, 15, 20, 25, 30]
    assert sum(warm_products[1:]) < sum(cold_products[1:])  # every measurement after the first is warm


def test_measuring_leaves_the_model_and_the_random_state_alone() -> None:
    model, data = _setup()
    model = nn.Sequential(model[0], nn.BatchNorm1d(16).double(), *model[1:]).train()
    before = [t.clone() for t in [*model.parameters(), *model.buffers()]]
    rng = torch.get_rng_state()
    SharpnessTracker(F.cross_entropy, data, every=1, trace_probes=3).measure(model, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))  # untouched
    assert torch.equal(rng, torch.get_rng_state()) and model.training


def test_bad_tracker_options() -> None:
    _, data = _setup()
    with pytest.raises(ValueError, match="every"):
        SharpnessTracker(F.cross_entropy, data, every=0)
    with pytest.raises(ValueError, match="trace_probes"):
        SharpnessTracker(F.cross_entropy, data, every=1, trace_probes=-1)


@pytest.mark.slow
def test_train_tracks_without_changing_the_run(tmp_path: Path) -> None:
    common = ["train", "--epochs", "2", "--batch-size", "128", "--threads", "1", "--no-progress", "--optimizer", "sam"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    tracked = [*common, "--output", str(tmp_path / "tracked"), "--track-sharpness", "4", "--track-trace-probes", "2"]
    assert main(tracked) == 0
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["model"]
    measured = torch.load(tmp_path / "tracked" / "model.pt", weights_only=True)["model"]
    # exact: the same run replayed (same seed, threads and steps); measuring changed nothing in the training
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    records = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for r in records for m in r["sharpness"]]
    assert steps == [4, 8, 12, 16, 20]  # 10 steps per epoch (1347 // 128)
    assert all(r["lambda_max"] > 0 and "trace" in r["sharpness"][-1] for r in records)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    basis, _ = torch.linalg.qr(
        torch.randn(
            len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    )
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T


def test_lambda_max_where_the_largest_magnitude_is_negative() -> None:
    """Power iteration alone returns -5 (the largest magnitude); lambda_max is 3: the shifted second run finds it."""
    from flatminima.sharpness import largest_eigenvalue_op, power_iteration_op

    matrix = _symmetric([-5.0, -1.0, 0.5, 2.0, 3.0])
    dominant = power_iteration_op(matrix, tol=1e-12, max_iter=5000)
    assert dominant.eigenvalues[0].item() == pytest.approx(-5.0, abs=1e-8)
    top = largest_eigenvalue_op(matrix, tol=1e-12, max_iter=5000)
    assert top.eigenvalues[0].item() == pytest.approx(3.0, abs=1e-8) and top.which == "largest"
    vector = top.eigenvectors[0]
    assert torch.linalg.vector_norm(matrix @ vector - 3.0 * vector) < 1e-4
    assert top.residuals[0].item() == pytest.approx(
        torch.linalg.vector_norm(matrix @ vector - top.eigenvalues[0] * vector).item(), abs=1e-12
    )
    assert top.num_hvp > dominant.num_hvp  # both runs counted
    positive = _symmetric([-1.0, 0.5, 4.0])  # the largest magnitude is lambda_max: one run, the same answer
    one, two = power_iteration_op(positive, tol=1e-10), largest_eigenvalue_op(positive, tol=1e-10)
    # exact: largest_eigenvalue_op returns that first power iteration itself (same seed, same operator)
    assert torch.equal(one.eigenvalues, two.eigenvalues) and one.num_hvp == two.num_hvp
    from flatminima.sharpness import ShiftedOperator

    with pytest.raises(ValueError, match="shift must be a finite number"):
        ShiftedOperator(matrix, float("nan"))
    vector = torch.ones(5, dtype=torch.float64)
    assert torch.allclose(ShiftedOperator(matrix, -5.0).matvec(vector), matrix @ vector + 5.0 * vector, atol=1e-14)


class _Quadratic(nn.Module):
    """Loss 0.5 w^T A w (through ``loss_fn``): its Hessian is A, whatever the data."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def test_tracker_reports_lambda_max_at_a_saddle() -> None:
    matrix = _symmetric([-4.0, 0.1, 1.5], seed=3)
    model = _Quadratic(3)
    data = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))
    loss_fn = lambda outputs, targets: 0.5 * torch.einsum("bi,ij,bj->b", outputs, matrix, outputs).mean()  # noqa: E731
    record = SharpnessTracker(loss_fn, data, every=1, tol=1e-10, max_iter=2000).measure(model, 1)
    assert record.lambda_max == pytest.approx(1.5, abs=1e-6)
