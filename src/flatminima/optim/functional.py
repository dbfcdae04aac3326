"""SAM's tensor maths as functions, apart from the protocol in ``flatminima.optim.sam``.

As ``torch/optim/sgd.py`` splits ``_single_tensor_sgd`` from ``_multi_tensor_sgd``, the optimiser class only
decides *which* maths runs; here is the maths: the foreach path (lists of tensors, ``torch._foreach_*``, a fused
``w + c g`` for rules linear in ``g``) and the flat path (one buffer, one operation each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flatminima.optim.norms import global_norm
from flatminima.optim.rules import AscentRule, RuleContext, takes_context

__all__ = ["Bucket", "apply_rule_", "bucket_norms", "linear_coefficients", "perturb_flat_", "perturbed_weights"]


@dataclass
class Bucket:
    """Tensors perturbed by one rule under one normalisation: ``rhos`` holds (count, rho) per param group;
    ``owners`` the parameters themselves (``params`` may be their local shards), which the rule's
    ``RuleContext`` is aligned with; ``stateful``: the rule declares ``needs_state``, so it runs on every
    ascent (never the fused linear path)."""

    rule: AscentRule
    stateful: bool = False
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    rhos: list[tuple[int, float]] = field(default_factory=list)
    owners: list[Tensor] = field(default_factory=list)
    context: RuleContext | None = None

    def add(self, params: list[Tensor], grads: list[Tensor], rho: float, owners: list[Tensor]) -> None:
        self.params.extend(params)
        self.grads.extend(grads)
        self.rhos.append((len(params), rho))
        self.owners.extend(owners)


def bucket_norms(buckets: list[Bucket], norms: list[Tensor]) -> list[Tensor]:
    """Each bucket's global L2 gradient norm, from the per-tensor norms of all buckets' gradients in order."""
    totals, offset = [], 0
    for bucket in buckets:
        totals.append(global_norm(norms[offset : offset + len(bucket.params)]))
        offset += len(bucket.params)
    return totals


def apply_rule_(
    rule: AscentRule,
    params: list[Tensor],
    grads: list[Tensor],
    rhos: list[tuple[int, float]],
    norms: list[Tensor] | None,
    context: RuleContext | None = None,
) -> None:
    """Overwrite ``grads`` with ``e``, one rho per param group inside the bucket (the rule must scale with rho);
    ``context`` goes to every rule whose ``perturb_`` accepts it (others get the four arguments)."""
    extra: dict[str, Any] = {"context": context} if takes_context(rule) else {}
    distinct = {rho for _, rho in rhos}
    if len(distinct) == 1:
        rule.perturb_(params, grads, distinct.pop(), norms, **extra)
        return
    rule.perturb_(params, grads, 1.0, norms, **extra)
    start = 0
    for count, rho in rhos:
        torch._foreach_mul_(grads[start : start + count], rho)
        start += count


def linear_coefficients(bucket: Bucket, total_norm: Tensor | float) -> list[Tensor | float] | None:
    """Per group, ``c`` with ``e = c g``; None unless the rule declares itself linear in ``g``."""
    coefficients = [bucket.rule.linear_coefficient(rho, total_norm) for _, rho in bucket.rhos]
    return None if any(c is None for c in coefficients) else coefficients


def perturbed_weights(
    bucket: Bucket, total_norm: Tensor | float, norms: list[Tensor] | None, in_place: bool
) -> list[Tensor]:
    """New tensors holding ``w + e`` for one bucket; the parameters' own tensors are left untouched.

    Rules linear in ``g`` take one fused ``w + c g`` per tensor (two passes when ``c`` stays on the device).
    Other rules, and every rule that keeps state, write ``e`` into the gradients when ``in_place`` allows it (they
    are discarded afterwards), into copies otherwise, and add ``w``.
    """
    coefficients = None if bucket.stateful else linear_coefficients(bucket, total_norm)
    if coefficients is None:
        work = bucket.grads if in_place else [g.clone() for g in bucket.grads]
        apply_rule_(bucket.rule, bucket.params, work, bucket.rhos, norms, bucket.context)
        torch._foreach_add_(work, bucket.params)
        return work
    moved: list[Tensor] = []
    start = 0
    for (count, _), c in zip(bucket.rhos, coefficients):
        params, grads = bucket.params[start : start + count], bucket.grads[start : start + count]
        start += count
        if isinstance(c, Tensor):  # no host sync: two passes
            shifted = torch._foreach_mul(grads, c)
            torch._foreach_add_(shifted, params)
            moved.extend(shifted)
        else:
            moved.extend(torch._foreach_add(params, grads, alpha=c))
    return moved


def perturb_flat_(weights: Tensor, grads: Tensor, saved: Tensor, coefficient: Tensor | float) -> None:
    """``saved <- w``, then ``w <- w + c g`` on flat buffers: one operation each."""
    saved.copy_(weights)
    if isinstance(coefficient, Tensor):
        weights.addcmul_(grads, coefficient)
    else:
        weights.add_(grads, alpha=coefficient)
