"""Hessian trace by Hutchinson and Hutch++ (Meyer et al. 2021), each with its standard error."""

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

__all__ = ["BLOCK_SIZE", "hutchinson_trace", "hutchinson_trace_op", "hutchpp_trace", "hutchpp_trace_op"]

BLOCK_SIZE = 16  # probes per matmat: one pass over the data serves this many products


def _quadratic_forms(op: LinearOperator, rows: Tensor, block_size: int) -> Tensor:
    """``v^T A v`` in float64 for each row ``v`` of ``rows``, ``block_size`` rows per ``matmat``."""
    out = [(block * op.matmat(block.T.contiguous()).T).sum(dim=1).to(torch.float64) for block in rows.split(block_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def hutchinson_trace_op(
    op: OperatorLike,
    num_probes: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    block_size: int = BLOCK_SIZE,
) -> TraceResult:
    """Hutchinson: the mean of ``v^T A v`` over random probes (unbiased); stderr = sample std / sqrt(n), NaN for
    one probe (see :func:`~flatminima.sharpness.results.mean_stderr`).

    ``op`` is any :class:`~flatminima.sharpness.operator.LinearOperator` or a square tensor; the probes go through
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
    products = torch.cat([op.matmat(block.T.contiguous()) for block in s.split(block_size)], dim=1)
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
    """Hessian trace of the full-data loss by Hutchinson's estimator (see :func:`hutchinson_trace_op`)."""
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
    """Hessian trace of the full-data loss by Hutch++ (see :func:`hutchpp_trace_op`)."""
    op = HessianOperator(model, loss_fn, data, dtype=dtype, **operator_kwargs)
    return hutchpp_trace_op(op, num_matvecs=num_matvecs, seed=seed)
