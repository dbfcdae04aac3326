"""Hessian trace by Hutchinson and Hutch++ (Meyer et al. 2021), each with its standard error."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.sharpness.hvp import HessianOperator, LossFn
from flatminima.sharpness.results import TraceResult

__all__ = ["hutchinson_trace", "hutchinson_trace_op", "hutchpp_trace", "hutchpp_trace_op"]

DISTRIBUTIONS = ("rademacher", "gaussian")


def _probes(dim: int, n: int, gen: torch.Generator, distribution: str, op: HessianOperator) -> Tensor:
    """``n`` probe vectors as rows, with ``E[v v^T] = I``."""
    if distribution == "rademacher":
        probes = torch.randint(0, 2, (n, dim), generator=gen).to(torch.float64) * 2 - 1
    elif distribution == "gaussian":
        probes = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    return probes.to(device=op.device, dtype=op.dtype)


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    mean = float(samples.mean())
    stderr = float(samples.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    return mean, stderr


def hutchinson_trace_op(
    op: HessianOperator, num_probes: int = 100, seed: int = 0, distribution: str = "rademacher"
) -> TraceResult:
    """Hutchinson: the mean of ``v^T H v`` over random probes (unbiased); stderr = sample std / sqrt(n)."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    start_hvp = op.num_hvp
    probes = _probes(op.dim, num_probes, torch.Generator().manual_seed(seed), distribution, op)
    samples = torch.stack([(v @ op.matvec(v)).to(torch.float64) for v in probes]).cpu()
    estimate, stderr = _mean_stderr(samples)
    return TraceResult(estimate, stderr, op.num_hvp - start_hvp, f"hutchinson-{distribution}", samples)


def hutchpp_trace_op(op: HessianOperator, num_matvecs: int = 102, seed: int = 0) -> TraceResult:
    """Hutch++: exact trace on the span ``Q`` of ``H S`` plus Hutchinson on the deflated ``(I-QQ^T) H (I-QQ^T)``.

    ``S`` has ``m/3`` Rademacher columns (at most ``dim``), and the remaining matvecs after the ``2 |S|`` of the
    low-rank part go to Rademacher probes. When ``Q`` spans the whole space (``num_matvecs >= 3 dim``) the trace is
    exact and the deflated part is skipped (stderr 0). The stderr is that of the Hutchinson part.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3, got {num_matvecs}")
    start_hvp = op.num_hvp
    gen = torch.Generator().manual_seed(seed)
    sketch = min(num_matvecs // 3, op.dim)
    s = _probes(op.dim, sketch, gen, "rademacher", op)  # rows
    q, _ = torch.linalg.qr(torch.stack([op.matvec(column) for column in s], dim=1))  # (dim, sketch)
    low_rank = sum(float(column @ op.matvec(column)) for column in q.T)
    if q.shape[1] == op.dim:
        samples = torch.zeros(0, dtype=torch.float64)
        return TraceResult(low_rank, 0.0, op.num_hvp - start_hvp, "hutch++", samples)
    probes = _probes(op.dim, num_matvecs - 2 * sketch, gen, "rademacher", op)
    probes = probes - (probes @ q) @ q.T
    samples = torch.stack([(g @ op.matvec(g)).to(torch.float64) for g in probes]).cpu()
    mean, stderr = _mean_stderr(samples)
    return TraceResult(low_rank + mean, stderr, op.num_hvp - start_hvp, "hutch++", samples)


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
