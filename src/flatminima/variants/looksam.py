"""LookSAM: SAM's ascent every k steps only, its sharpness component reused in between (Liu, Mai, Chen, Hsieh,
You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022, arXiv 2203.02714; Algorithm 1).

With ``g = grad f(w)`` at every step:

    t mod k = 0:  g_s = grad f(w + rho g / ||g||)                        (SAM's gradient: two passes)
                  g_v = g_s - ||g_s|| cos(theta) g / ||g||,  cos(theta) = <g, g_s> / (||g|| ||g_s||)
                  w <- w - lr g_s
    otherwise:    w <- w - lr (g + alpha (||g|| / ||g_v||) g_v)            (one pass at w)

``g_v`` is the part of ``g_s`` orthogonal to ``g`` (``||g_s|| cos(theta) g / ||g|| = (<g, g_s> / ||g||^2) g``), the
component that steers toward flatter regions and changes slowly between steps. On the seams: ascent
``DualNorm`` (SAM's), cadence ``EveryKSteps`` ``(k)``, descent
``LookSAMDescent``, which keeps ``g_v`` in each parameter's rule state (``SAM.rule_state``, so checkpoints carry
it). Cost: ``(k + 1) / k`` forward-backward passes per step on average (2 on the ascent steps, 1 on the others, where
the weights never leave ``w``), plus one stored copy of the gradient (``g_v``) and, on ascent steps, one kept ``g``.

Choices, each an option: ``k`` (default 5, the paper's LookSAM-5), ``alpha`` (default 0.7, the paper's), and
``per_tensor``: the projection and the rescaling per parameter tensor (``cos(theta)``, ``||g||`` and ``||g_v||``
of each tensor), as pytorch_optimizer does, instead of over the whole parameter vector as the paper writes them
(the default). Where the paper would divide by zero: ``g = 0`` on an ascent step gives ``g_v = g_s``;
``||g_v|| = 0`` on the other steps (and before any ascent) adds nothing, so the step is along ``g``. A parameter
without a gradient at an ascent step keeps the ``g_v`` of its last ascent with one (none yet: zeros). An ascent
step whose weights did not move (``rho = 0``) stores ``g_v = 0``, so LookSAM with ``rho = 0`` is the base
optimiser; an ascent step whose ``g_v`` is not finite (an overflow that a GradScaler or ``nonfinite="skip"`` then
skips) keeps the previous ``g_v``. ``k = 1`` is SAM bit for bit; ``alpha = 0`` is periodic SAM. Not declared
``shard_aware``: on FSDP2's sharded parameters ``g_v`` would be kept as a local shard in the rule state, which
FSDP's state dicts do not expect, so SAM refuses the rule there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import global_norm, global_sum, tensor_norms
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import DescentRule, EveryKSteps, RuleContext
from flatminima.optim.sam import SAM
from flatminima.variants.gsam import safe_ratio, wide_dots

__all__ = ["STATE_KEY", "LookSAMDescent"]

STATE_KEY = "looksam_gv"  # where g_v lives in each parameter's rule state


class LookSAMDescent(DescentRule):
    """On an ascent step, SAM's direction ``g_s``, storing ``g_v`` (the part of ``g_s`` orthogonal to ``g``); on the
    other steps, ``g + alpha (||g|| / ||g_v||) g_v`` (LookSAM, Algorithm 1). Pair it with ``EveryKSteps(k)``.

    Args:
        alpha: weight of the reused ``g_v``; 0 is SAM every k steps and the base optimiser in between.
        per_tensor: project and rescale per parameter tensor (pytorch_optimizer's variant) instead of globally.
    """

    needs_first_gradient = True
    state_keys = (STATE_KEY,)  # kept in SAM's rule state (older checkpoints: in the base optimiser's)

    def __init__(self, alpha: float = 0.7, per_tensor: bool = False) -> None:
        if isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha (LookSAM's weight of the reused g_v) must be a finite number >= 0; got {alpha!r}")
        self.alpha, self.per_tensor = float(alpha), bool(per_tensor)

    def __repr__(self) -> str:
        return f"LookSAMDescent(alpha={self.alpha}, per_tensor={self.per_tensor})"

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        first_grads: list[Tensor] | None,
        context: RuleContext,
        ascended: bool,
    ) -> None:
        if not grads:
            return
        if first_grads is not None:  # an ascent step (first_grads are kept only then): store g_v, step along g_s
            self._store(grads, first_grads, context.states, ascended)
        else:  # grads hold g(w), the weights never moved: add the reused g_v
            self._reuse(grads, context.states)

    def _store(self, gs: list[Tensor], g: list[Tensor], states: list[dict[str, Any]], ascended: bool) -> None:
        """``g_v = g_s - (<g, g_s> / ||g||^2) g`` (0 coefficient when ``g = 0``); zeros when the weights did not move
        (then ``g_s = g``); the previous ``g_v`` kept where the new one is not finite (no host sync)."""
        if not ascended:
            fresh = [torch.zeros_like(t) for t in gs]
            finite = torch.isfinite(global_norm(tensor_norms(gs)))
        else:
            if self.per_tensor:
                coefficients = [safe_ratio(gg_s, gg) for gg_s, gg in zip(wide_dots(g, gs), wide_dots(g, g))]
            else:
                c = safe_ratio(global_sum(wide_dots(g, gs)), global_sum(wide_dots(g, g)))
                coefficients = [c] * len(g)
            fresh = [s - c * t for s, t, c in zip(gs, g, coefficients)]
            finite = torch.isfinite(global_norm(tensor_norms(fresh)))
        for state, new in zip(states, fresh):
            old = state.get(STATE_KEY)
            state[STATE_KEY] = torch.where(finite, new, old if old is not None else torch.zeros_like(new))

    def _reuse(self, g: list[Tensor], states: list[dict[str, Any]]) -> None:
        stored = [state.get(STATE_KEY) for state in states]
        if all(v is None for v in stored):
            return  # no ascent yet: a plain step along g
        gv = [v if v is not None else torch.zeros_like(t) for v, t in zip(stored, g)]
        alpha = self.alpha
        if self.per_tensor:
            for t, v, norm_g, norm_v in zip(g, gv, tensor_norms(g), tensor_norms(gv)):
                t.add_(v * (alpha * safe_ratio(norm_g, norm_v)))
            return
        scale = alpha * safe_ratio(global_norm(tensor_norms(g)), global_norm(tensor_norms(gv)))
        torch._foreach_add_(g, torch._foreach_mul(gv, scale))


@dataclass(frozen=True)
class LookSAMOptions:
    """LookSAM's options (``--looksam-*``)."""

    looksam_k: int = option(
        5,
        "looksam: a full SAM step every k steps, one pass reusing g_v in between (1 is SAM)",
        check=lambda v: v >= 1,
        why="must be >= 1 (1: every step is a full SAM step)",
    )
    looksam_alpha: float = option(
        0.7,
        "looksam: weight alpha of the reused sharpness component g_v",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )
    looksam_per_tensor: bool = option(
        False, "looksam: project and rescale g_v per parameter tensor (pytorch_optimizer's) instead of globally"
    )


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    descent = LookSAMDescent(request.options.looksam_alpha, per_tensor=request.options.looksam_per_tensor)
    return build_sam(request, descent=descent, cadence=EveryKSteps(request.options.looksam_k))


register_optimizer(
    "looksam",
    "LookSAM: SAM every k steps, its part orthogonal to g(w) reused in between (--looksam-*)",
    _build,
    sharpness_aware=True,
    options=LookSAMOptions,
    passes="1 + 1/k on average",
)
