"""Tracking sharpness along training: lambda_max every N steps, warm-started from the previous eigenvector.

Between two measurements a few optimiser steps move the weights a little, so the top eigenvector moves a little
too: power iteration started from the previous one needs a few products where a cold start needs many more
(``benchmarks/bench_tracking.py`` measures both). The model is measured as ``flatminima.sharpness`` always
measures it: on fixed data, in eval mode by default, its weights, buffers and modes left exactly as they were, and
without touching the global random state, so a run with tracking trains exactly like one without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from flatminima.sharpness.checks import positive_int
from flatminima.sharpness.hvp import HessianOperator
from flatminima.sharpness.losses import LossFn
from flatminima.sharpness.power import largest_eigenvalue_op
from flatminima.sharpness.trace import hutchinson_trace_op

__all__ = ["SharpnessRecord", "SharpnessTracker"]


@dataclass
class SharpnessRecord:
    """One measurement: the step it was taken at, lambda_max with its residual, its cost in products."""

    step: int
    lambda_max: float
    residual: float
    converged: bool
    num_hvp: int
    trace: float | None = None
    trace_stderr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class SharpnessTracker:
    """Call ``maybe_measure`` after every optimiser step; every ``every`` steps it measures lambda_max.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss (the Hessian's loss).
        data: one ``(inputs, targets)`` batch or an iterable of them: the fixed set the Hessian is taken over.
        every: steps between measurements (the first at step ``every``; ``measure`` any time).
        tol: of the power iteration (the relative change of the Rayleigh quotient at which it stops).
        max_iter: of the power iteration.
        trace_probes: also estimate the trace with this many Hutchinson probes (0: no trace).
        train_mode: measure with BatchNorm's batch statistics instead of its running ones.
        seed: seed of the first (cold) start vector and of the trace probes.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        data: Any,
        every: int,
        *,
        tol: float = 1e-3,
        max_iter: int = 100,
        trace_probes: int = 0,
        train_mode: bool = False,
        seed: int = 0,
    ) -> None:
        self.loss_fn, self.data = loss_fn, data
        self.every = positive_int("every", every)
        self.tol, self.max_iter = tol, positive_int("max_iter", max_iter)
        self.trace_probes = positive_int("trace_probes", trace_probes, minimum=0)
        self.train_mode, self.seed = train_mode, seed
        self.vector: Tensor | None = None  # the last eigenvector: the next warm start
        self.history: list[SharpnessRecord] = []

    def maybe_measure(self, model: nn.Module, step: int) -> SharpnessRecord | None:
        """Measure when ``step`` (the number of steps taken so far) is a multiple of ``every``."""
        if step <= 0 or step % self.every:
            return None
        return self.measure(model, step)

    def measure(self, model: nn.Module, step: int) -> SharpnessRecord:
        """lambda_max of ``model`` now (warm-started), and the trace if asked; appended to ``history``."""
        op = HessianOperator(model, self.loss_fn, self.data, train_mode=self.train_mode, distributed=False)
        if self.vector is not None and self.vector.shape != (op.dim,):
            self.vector = None  # the model changed shape: start cold
        result = largest_eigenvalue_op(op, tol=self.tol, max_iter=self.max_iter, seed=self.seed, v0=self.vector)
        self.vector = result.eigenvectors[0].detach().clone()
        record = SharpnessRecord(
            step=step,
            lambda_max=result.eigenvalues[0].item(),
            residual=result.residuals[0].item(),
            converged=result.converged,
            num_hvp=result.num_hvp,
        )
        if self.trace_probes:
            trace = hutchinson_trace_op(op, num_probes=self.trace_probes, seed=self.seed + step)
            record.trace, record.trace_stderr = trace.estimate, trace.stderr
            record.num_hvp += trace.num_hvp
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        """The warm start, so that a resumed run measures as an uninterrupted one would."""
        return {"vector": self.vector}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vector = state.get("vector")
        self.vector = vector.clone() if isinstance(vector, Tensor) else None
