"""RW-SAM: reweighted SAM (Luo, Harandi, Phung, Le, NeurIPS 2025, arXiv 2509.18001; the papers page of the
documentation, papers.md sec. 3).

SAM's single perturbation for the whole batch, with the ascent loss reweighted toward the examples whose loss is
sharpest, to get m-SAM's benefit without its many small passes:

    s_i = |l_i(w + delta z) - l_i(w)| / delta,   z a random sign vector over all weights,
    p_i = softmax(lambda s)_i over the batch,    e = rho grad(sum_i p_i l_i) / ||grad(sum_i p_i l_i)||,

and the descent along the plain batch gradient at ``w + e``. ``s_i`` estimates the per-example gradient norm
(``E_z |<grad l_i, z>| ~ ||grad l_i||_2`` up to a constant) from one extra forward pass without gradient; the
Gibbs weights solve the entropy-regularised inner problem ``max_p <sum_i p_i grad l_i, e> + H(p) / lambda``.

Choices where the paper is open, each an option: ``delta`` and ``lambda``; ``z_group_size`` (``None``: one ``z``
for the whole batch, one extra forward; ``k``: a fresh ``z`` per group of ``k`` examples, the same forward work
split in groups); ``weighted_descent`` (default False: the descent is the plain batch gradient); ``score``:
``"difference"`` (the cheap finite difference) or ``"exact"`` (per-example gradient norms, one backward per
example: the slow reference the cheap score is checked against). ``lambda = 0`` gives uniform weights and is
SAM exactly (the scoring pass is then skipped). The scoring passes see the model in its current mode with
BatchNorm running statistics frozen; with BatchNorm in train mode and ``z_group_size`` set, each group's
unshifted losses are recomputed on the group alone so that both sides of the difference share batch statistics.
Under DDP each rank weights its own batch (softmax over the local examples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.batch_rules import BatchRule, Probe
from flatminima.optim.catalog import build_sam
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer

__all__ = ["SCORES", "GibbsReweighting"]

SCORES = ("difference", "exact")


class GibbsReweighting(BatchRule):
    """The ascent loss ``sum_i p_i l_i`` with ``p = softmax(lambda s)``, ``s`` per-example sharpness scores."""

    needs_per_example_losses = True

    def __init__(
        self,
        lam: float,
        delta: float = 0.01,
        *,
        z_group_size: int | None = None,
        weighted_descent: bool = False,
        score: str = "difference",
        generator: torch.Generator | None = None,
    ) -> None:
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lambda (the Gibbs temperature) must be a finite number >= 0; got {lam}")
        if not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"delta (the finite-difference step) must be a finite number > 0; got {delta}")
        if z_group_size is not None and (isinstance(z_group_size, bool) or z_group_size < 1):
            raise ValueError(f"z_group_size must be >= 1, or None for one z per batch; got {z_group_size}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}; got {score!r}")
        self.lam, self.delta, self.z_group_size = float(lam), float(delta), z_group_size
        self.weighted_descent, self.score, self.generator = weighted_descent, score, generator
        self.weights: Tensor | None = None  # the last step's p, for inspection and the weighted descent

    def __repr__(self) -> str:
        return (
            f"GibbsReweighting(lam={self.lam}, delta={self.delta}, z_group_size={self.z_group_size}, "
            f"weighted_descent={self.weighted_descent}, score={self.score!r})"
        )

    def scores(self, losses: Tensor, probe: Probe) -> Tensor:
        """``s_i`` for the examples whose losses at ``w`` are ``losses``."""
        n = losses.shape[0]
        if self.score == "exact":
            return probe.gradient_norms(0, n)
        size = n if self.z_group_size is None else self.z_group_size
        parts = []
        for start in range(0, n, size):
            stop = min(start + size, n)
            offsets = self._sign_vectors(probe.params)
            shifted = probe.losses_at(offsets, start, stop)
            base = losses[start:stop]
            if size < n and probe.batch_dependent:  # BatchNorm batch statistics: compare on the group alone
                base = probe.losses_at([None] * len(offsets), start, stop)
            parts.append((shifted.double() - base.double()).abs() / self.delta)
        return torch.cat(parts)

    def _sign_vectors(self, params: list[Tensor]) -> list[Tensor]:
        """``delta z``, one random sign per weight: one draw for all parameters, moved to the device once."""
        sizes = [p.numel() for p in params]
        signs = torch.randint(0, 2, (sum(sizes),), generator=self.generator, dtype=torch.int8)
        flat = (signs.to(device=params[0].device, dtype=params[0].dtype) * 2 - 1) * self.delta
        return [chunk.view_as(p) for chunk, p in zip(flat.split(sizes), params, strict=True)]

    def ascent_weights(self, losses: Tensor, probe: Probe) -> Tensor | None:
        if self.lam == 0:
            self.weights = None
            return None  # uniform: SAM exactly
        weights = torch.softmax(self.lam * self.scores(losses, probe), dim=0)
        self.weights = weights.to(losses.dtype)
        return self.weights

    def descent_weights(self) -> Tensor | None:
        return self.weights if self.weighted_descent else None


@dataclass(frozen=True)
class RWSAMOptions:
    """RW-SAM's options (``--rwsam-*``)."""

    rwsam_lambda: float = option(
        0.01,
        "rwsam: Gibbs temperature lambda of the example weights (0 is SAM)",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )
    rwsam_delta: float = option(
        1e-3,
        "rwsam: finite-difference step delta of the sharpness scores",
        check=lambda v: math.isfinite(v) and v > 0,
        why="must be finite and > 0",
    )
    rwsam_z_group_size: int = option(
        0,
        "rwsam: a fresh sign vector z per group of k examples (0: one per batch)",
        check=lambda v: v >= 0,
        why="must be >= 0 (0: one z per batch)",
    )
    rwsam_weighted_descent: bool = option(False, "rwsam: weight the descent pass too")
    rwsam_score: str = option(
        "difference", "rwsam: score by finite difference, or exact gradient norms", choices=SCORES
    )


def _batch_rule(request: OptimizerRequest) -> GibbsReweighting:
    return GibbsReweighting(  # z from the global RNG, which the training loop checkpoints
        request.options.rwsam_lambda,
        request.options.rwsam_delta,
        z_group_size=request.options.rwsam_z_group_size or None,
        weighted_descent=request.options.rwsam_weighted_descent,
        score=request.options.rwsam_score,
    )


register_optimizer(
    "rwsam",
    "RW-SAM: SAM with the ascent reweighted toward sharp examples (--rwsam-*)",
    build_sam,
    sharpness_aware=True,
    options=RWSAMOptions,
    passes="2, and one forward pass to score the examples",
    batch_rule=_batch_rule,
)
