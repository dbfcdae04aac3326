"""Hessian trace by Hutchinson, Hutch++ (Meyer et al. 2021) and XTrace (Epperly et al. 2024), each with its
standard error."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flatminima.sharpness.checks import positive_int
from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.losses import LossFn
from flatminima.sharpness.operator import CountingOperator, LinearOperator, OperatorLike, as_operator
from flatminima.sharpness.probes import check_distribution, random_vectors
from flatminima.sharpness.results import TraceResult, mean_stderr

__all__ = [
    "BLOCK_SIZE",
    "hutchinson_trace",
    "hutchinson_trace_op",
    "hutchpp_trace",
    "hutchpp_trace_op",
    "xnystrace_op",
    "xtrace",
    "xtrace_op",
]

BLOCK_SIZE = 16  # probes per matmat: one pass over the data serves this many products


def _quadratic_forms(op: LinearOperator, rows: Tensor, block_size: int) -> Tensor:
    """``v^T A v`` in float64 for each row ``v`` of ``rows``, ``block_size`` rows per ``matmat``.

    The blocks go to ``matmat`` as ``block.T``, a view whose columns are the contiguous probes (no copy; the
    Hessian operator and a column-by-column ``matmat`` read them as they are)."""
    out = [(block * op.matmat(block.T).T).sum(dim=1).to(torch.float64) for block in rows.split(block_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def hutchinson_trace_op(
    op: OperatorLike,
    num_probes: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = BLOCK_SIZE,
) -> TraceResult:
    """Hutchinson: the mean of ``v^T A v`` over random probes (unbiased); stderr = sample std / sqrt(n), NaN for
    one probe (see ``mean_stderr``).

    ``op`` is any ``LinearOperator`` or a square tensor; the probes go through
    ``matmat`` ``block_size`` at a time (one pass over the data per block for a Hessian over a data set).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    check_distribution(distribution)
    block_size = positive_int("block_size", block_size)
    op = CountingOperator(as_operator(op))
    probes = random_vectors(num_probes, op.dim, torch.Generator().manual_seed(seed), distribution, op.dtype, op.device)
    samples = _quadratic_forms(op, probes, block_size)
    estimate, stderr = mean_stderr(samples)
    return TraceResult(estimate, stderr, op.num_products, f"hutchinson-{distribution}", samples)


def hutchpp_trace_op(
    op: OperatorLike, num_matvecs: int = 102, seed: int = 0, block_size: int = BLOCK_SIZE
) -> TraceResult:
    """Hutch++: exact trace on the span ``Q`` of ``A S`` plus Hutchinson on the deflated ``(I-QQ^T) A (I-QQ^T)``.

    ``S`` has ``m/3`` Rademacher columns (at most ``dim``), and the remaining matvecs after the ``2 |S|`` of the
    low-rank part go to Rademacher probes. When ``Q`` spans the whole space (``num_matvecs >= 3 dim``) the trace is
    exact and the deflated part is skipped (stderr 0). The stderr is that of the Hutchinson part. Products go
    through ``matmat``, ``block_size`` columns at a time.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}")
    block_size = positive_int("block_size", block_size)
    op = CountingOperator(as_operator(op))
    gen = torch.Generator().manual_seed(seed)
    sketch = min(num_matvecs // 3, op.dim)
    s = random_vectors(sketch, op.dim, gen, "rademacher", op.dtype, op.device)  # rows
    products = torch.cat([op.matmat(block.T) for block in s.split(block_size)], dim=1)
    q, _ = torch.linalg.qr(products)  # (dim, sketch)
    low_rank = float(_quadratic_forms(op, q.T, block_size).sum())
    if q.shape[1] == op.dim:
        samples = torch.zeros(0, dtype=torch.float64)
        return TraceResult(low_rank, 0.0, op.num_products, "hutch++", samples)
    probes = random_vectors(num_matvecs - 2 * sketch, op.dim, gen, "rademacher", op.dtype, op.device)
    probes = probes - (probes @ q) @ q.T
    samples = _quadratic_forms(op, probes, block_size)
    mean, stderr = mean_stderr(samples)
    return TraceResult(low_rank + mean, stderr, op.num_products, "hutch++", samples)


def xtrace_op(
    op: OperatorLike,
    num_matvecs: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = BLOCK_SIZE,
) -> TraceResult:
    """XTrace (Epperly, Tropp, Webber 2024, Algorithm 1.2): Hutch++'s low-rank-plus-residual idea, made exchangeable.

    With ``s = num_matvecs // 2`` test vectors ``w_i``, each estimate ``t_i = tr(Q_i^T A Q_i) + w_i^T (I - P_i) A
    (I - P_i) w_i`` uses the basis ``Q_i`` of ``A w_j`` for all ``j != i`` (``P_i = Q_i Q_i^T``), so every vector
    serves both the low-rank part and the residual part; the estimate is the mean of the ``t_i`` and its stderr their
    standard error. The ``s`` leave-one-out bases need no more products: they lie in the span ``Q`` of all ``A w_j``,
    so with ``A Q`` (``s`` more products) every ``t_i`` is computed from ``s x s`` matrices. ``op`` must be symmetric
    (as a Hessian is). Exact once ``s > dim``.
    """
    if num_matvecs < 4:
        raise ValueError(f"XTrace needs num_matvecs >= 4 (two test vectors), got {num_matvecs}")
    check_distribution(distribution)
    block_size = positive_int("block_size", block_size)
    op = CountingOperator(as_operator(op))
    count = num_matvecs // 2
    omega = random_vectors(count, op.dim, torch.Generator().manual_seed(seed), distribution, op.dtype, op.device)
    y = torch.cat([op.matmat(block.T) for block in omega.split(block_size)], dim=1)  # (dim, s)
    q, _ = torch.linalg.qr(y)  # (dim, r), r = min(dim, s)
    z = torch.cat([op.matmat(block.T) for block in q.T.split(block_size)], dim=1)  # A Q
    small = torch.float64
    r_y = (q.T @ y).to(small)  # Q^T A w_i, also (A Q)^T w_i for a symmetric A
    w = (q.T @ omega.T).to(small)  # Q^T w_i
    h = (q.T @ z).to(small)
    h = (h + h.T) / 2
    d = (omega * y.T).sum(dim=1).to(small)  # w_i^T A w_i
    samples = torch.empty(count, dtype=small)
    for i in range(count):
        others = torch.cat([r_y[:, :i], r_y[:, i + 1 :]], dim=1)
        c, _ = torch.linalg.qr(others)  # Q_i = Q c
        cc = c @ (c.T @ w[:, i])  # coordinates in Q of P_i w_i
        residual = d[i] - 2 * (cc @ r_y[:, i]) + cc @ h @ cc
        samples[i] = torch.trace(c.T @ h @ c) + residual
    estimate, stderr = mean_stderr(samples)
    return TraceResult(estimate, stderr, op.num_products, f"xtrace-{distribution}", samples.cpu())


def xnystrace_op(
    op: OperatorLike,
    num_matvecs: int = 100,
    seed: int = 0,
    distribution: str = "gaussian",
    block_size: int = BLOCK_SIZE,
) -> TraceResult:
    """XNysTrace (Epperly, Tropp, Webber 2024), for positive semidefinite operators only (a Gauss-Newton or Fisher
    matrix, not a Hessian in general).

    Every one of the ``s = num_matvecs`` test vectors ``w_i`` gives ``t_i = tr(N_i) + w_i^T (A - N_i) w_i`` with
    ``N_i`` the Nystrom approximation ``A W_i (W_i^T A W_i)^+ W_i^T A`` from all the other vectors; the estimate is
    the mean of the ``t_i`` and its stderr their standard error. Only ``A W`` is needed (``s`` products): every
    ``t_i`` follows from the ``s x s`` Gram matrices ``W^T A W`` and ``(A W)^T (A W)``. Exact once ``s > dim`` (for a
    positive definite ``A``).
    """
    if num_matvecs < 2:
        raise ValueError(f"XNysTrace needs num_matvecs >= 2, got {num_matvecs}")
    check_distribution(distribution)
    block_size = positive_int("block_size", block_size)
    op = CountingOperator(as_operator(op))
    omega = random_vectors(num_matvecs, op.dim, torch.Generator().manual_seed(seed), distribution, op.dtype, op.device)
    y = torch.cat([op.matmat(block.T) for block in omega.split(block_size)], dim=1)  # (dim, s)
    gram = (omega @ y).to(torch.float64)  # W^T A W
    gram = (gram + gram.T) / 2
    outer = (y.T @ y).to(torch.float64)  # (A W)^T (A W)
    count = num_matvecs
    samples = torch.empty(count, dtype=torch.float64)
    for i in range(count):
        keep = torch.cat([torch.arange(i), torch.arange(i + 1, count)])
        inverse = torch.linalg.pinv(gram[keep][:, keep], hermitian=True, rtol=1e-12)
        g = gram[i, keep]
        samples[i] = torch.trace(inverse @ outer[keep][:, keep]) + gram[i, i] - g @ inverse @ g
    estimate, stderr = mean_stderr(samples)
    return TraceResult(estimate, stderr, op.num_products, f"xnystrace-{distribution}", samples)


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_probes: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    dtype: torch.dtype | None = None,
    **operator_kwargs: Any,
) -> TraceResult:
    """Hessian trace of the full-data loss by Hutchinson's estimator (see ``hutchinson_trace_op``)."""
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return hutchinson_trace_op(op, num_probes=num_probes, seed=seed, distribution=distribution)


def hutchpp_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_matvecs: int = 102,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **operator_kwargs: Any,
) -> TraceResult:
    """Hessian trace of the full-data loss by Hutch++ (see ``hutchpp_trace_op``)."""
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return hutchpp_trace_op(op, num_matvecs=num_matvecs, seed=seed)


def xtrace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_matvecs: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    dtype: torch.dtype | None = None,
    **operator_kwargs: Any,
) -> TraceResult:
    """Hessian trace of the full-data loss by XTrace (see ``xtrace_op``)."""
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return xtrace_op(op, num_matvecs=num_matvecs, seed=seed, distribution=distribution)
