"""XTrace against a naive float64 implementation of its definition, exactness, unbiasedness, and its edge over
Hutch++ on a decaying spectrum (Epperly, Tropp, Webber 2024)."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.sharpness import hutchpp_trace_op, xnystrace_op, xtrace_op
from flatminima.sharpness.probes import random_vectors

DIM = 40


def _matrix(decay: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Symmetric, indefinite, with eigenvalues (-1)^i (i+1)^-decay (flat for decay 0)."""
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    values = torch.tensor([(-1) ** i * (i + 1) ** -decay for i in range(DIM)], dtype=torch.float64)
    values[0] = abs(values[0]) * 5
    return q @ torch.diag(values) @ q.T


def _naive(a: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Algorithm 1.2 as written: for each i a fresh basis of A w_j (j != i), dense products everywhere."""
    samples = []
    for i in range(omega.shape[0]):
        others = torch.cat([omega[:i], omega[i + 1 :]]).T
        q, _ = torch.linalg.qr(a @ others)
        w = omega[i]
        r = w - q @ (q.T @ w)
        samples.append(torch.trace(q.T @ a @ q) + r @ a @ r)
    return torch.stack(samples)


@pytest.mark.parametrize("num_matvecs", [6, 20, 50])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_matches_the_naive_definition(num_matvecs: int, distribution: str) -> None:
    a = _matrix(decay=1.0)
    result = xtrace_op(a, num_matvecs=num_matvecs, seed=3, distribution=distribution)
    omega = random_vectors(num_matvecs // 2, DIM, torch.Generator().manual_seed(3), distribution, a.dtype, a.device)
    expected = _naive(a, omega)
    torch.testing.assert_close(result.samples, expected, rtol=1e-10, atol=1e-10)
    assert abs(result.estimate - expected.mean().item()) < 1e-10
    assert result.num_hvp == 2 * (num_matvecs // 2)


def test_exact_once_the_vectors_outnumber_the_dimension() -> None:
    a = _matrix()
    result = xtrace_op(a, num_matvecs=2 * (DIM + 1), seed=1)
    assert abs(result.estimate - torch.trace(a).item()) < 1e-10
    assert result.stderr < 1e-10


def test_unbiased_within_its_standard_error() -> None:
    a = _matrix(decay=0.5)
    estimates = torch.tensor([xtrace_op(a, num_matvecs=12, seed=seed).estimate for seed in range(400)])
    error = abs(estimates.mean().item() - torch.trace(a).item())
    assert error < 4 * estimates.std().item() / math.sqrt(400)


def test_more_accurate_than_hutchpp_on_a_decaying_spectrum() -> None:
    """The paper's claim at equal products (here 24): a smaller RMS error over 100 seeds."""
    a = _matrix(decay=2.0)
    exact = torch.trace(a).item()
    rms = {}
    for name, estimator in (("xtrace", xtrace_op), ("hutch++", hutchpp_trace_op)):
        errors = torch.tensor([estimator(a, num_matvecs=24, seed=seed).estimate - exact for seed in range(100)])
        rms[name] = errors.pow(2).mean().sqrt().item()
    assert rms["xtrace"] < rms["hutch++"], rms


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        xtrace_op(_matrix(), num_matvecs=3)
    with pytest.raises(ValueError, match="distribution"):
        xtrace_op(_matrix(), distribution="uniform")


def _psd(decay: float, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    values = torch.tensor([(i + 1) ** -decay for i in range(DIM)], dtype=torch.float64)
    return q @ torch.diag(values) @ q.T


def _naive_nystrom(a: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """XNysTrace as defined: for each i, the Nystrom approximation from the other vectors, dense everywhere."""
    samples = []
    for i in range(omega.shape[0]):
        w = torch.cat([omega[:i], omega[i + 1 :]]).T
        y = a @ w
        nystrom = y @ torch.linalg.pinv(w.T @ y, hermitian=True) @ y.T
        samples.append(torch.trace(nystrom) + omega[i] @ (a - nystrom) @ omega[i])
    return torch.stack(samples)


@pytest.mark.parametrize("num_matvecs", [5, 20])
def test_xnystrace_matches_the_naive_definition(num_matvecs: int) -> None:
    a = _psd(decay=1.0)
    result = xnystrace_op(a, num_matvecs=num_matvecs, seed=2)
    omega = random_vectors(num_matvecs, DIM, torch.Generator().manual_seed(2), "gaussian", a.dtype, a.device)
    torch.testing.assert_close(result.samples, _naive_nystrom(a, omega), rtol=1e-9, atol=1e-9)
    assert result.num_hvp == num_matvecs


def test_xnystrace_exact_unbiased_and_better_than_xtrace_on_psd() -> None:
    a = _psd(decay=2.0)
    exact = torch.trace(a).item()
    assert abs(xnystrace_op(a, num_matvecs=DIM + 2, seed=0).estimate - exact) < 1e-8
    flat = _psd(decay=0.3)
    estimates = torch.tensor([xnystrace_op(flat, num_matvecs=8, seed=s).estimate for s in range(300)])
    assert abs(estimates.mean().item() - torch.trace(flat).item()) < 4 * estimates.std().item() / math.sqrt(300)
    rms = {}
    for name, estimator in (("xnystrace", xnystrace_op), ("xtrace", xtrace_op)):
        errors = torch.tensor([estimator(a, num_matvecs=24, seed=s).estimate - exact for s in range(60)])
        rms[name] = errors.pow(2).mean().sqrt().item()
    assert rms["xnystrace"] < rms["xtrace"], rms
