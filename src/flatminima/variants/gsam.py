"""GSAM: surrogate-gap guided SAM (Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training",
ICLR 2022, arXiv 2203.08065; Algorithm 1 and its official code, big_vision's ``trainers/proj/gsam`` in JAX and the
PyTorch re-implementation github.com/juntang-zhuang/GSAM).

SAM's ascent, then a descent that also lowers the surrogate gap ``h(w) = f(w + e) - f(w)`` without changing the
perturbed loss to first order (Algorithm 1, steps 0-4):

    rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)              (step 0)
    e = rho_t g / ||g||,   g = grad f(w),   g_p = grad f(w + e)                                (steps 1-2)
    g = g_par + g_perp,    g_perp = g - (<g, g_p> / ||g_p||^2) g_p                             (step 3)
    w <- w - lr (g_p - alpha g_perp)                                                          (step 4)

``-g_perp`` lowers ``h`` and is orthogonal to ``g_p``. On the seams: ascent ``DualNorm``
(SAM's), descent ``GSAMDescent``, cadence every step. Step 0 is a rho schedule, not part of the rule: any
variant can use it, ``flatminima.optim.rho_scheduler.lr_proportional_rho`` (``--rho-schedule lr --rho-min``
on the command line). Cost: two forward-backward passes per step, as SAM, plus one kept copy of ``g`` and two
global dot products.

Choices, each an option: ``alpha`` (default 0.01, the paper's value for ResNet-50/101 on ImageNet with SGD,
Table 4; its ViT and MLP-Mixer runs with AdamW use 0.01-1.0, the PyTorch re-implementation and pytorch_optimizer
default to 0.4); ``minimize_perturbed`` (default True, the paper's ``min(f_p, h)``; False is big_vision's
``minimize_fp=False``, ``min(f, h)``: the direction ``g + alpha (g_p - (<g_p, g> / ||g||^2) g)``, the plain
gradient plus the part of ``g_p`` orthogonal to it). The dot products are global, over every parameter (in float64
for float64 tensors, float32 at least), and combine FSDP shards (``flatminima.optim.norms``). Where the paper's
code divides by a norm plus ``eps``, zero is handled exactly instead: ``g_p = 0`` gives ``g_perp = g`` (all of
``g`` is orthogonal to the zero vector), ``g = 0`` gives ``g_perp = 0``. ``alpha = 0`` is SAM bit for bit. Under
DDP ``g`` is all-reduced (the rule needs it, as every descent rule that reads ``g(w)``), so the perturbation is
the global batch's; the reference code perturbs and decomposes per worker and averages the directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import global_sum
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import DescentRule, RuleContext
from flatminima.optim.sam import SAM

__all__ = ["GSAMDescent"]


def wide_dots(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """``<a_i, b_i>`` per tensor pair, accumulated in float64 for float64 tensors and float32 at least otherwise."""
    dots = []
    for s, t in zip(a, b, strict=True):
        wide = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
        dots.append(torch.dot(s.reshape(-1).to(wide), t.reshape(-1).to(wide)))
    return dots


def safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where the denominator is 0 (no host sync)."""
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)


class GSAMDescent(DescentRule):
    """GSAM's direction ``g_p - alpha g_perp``: ``g_p = g(w + e)``, ``g_perp`` the part of ``g = g(w)`` orthogonal
    to ``g_p`` (Algorithm 1, steps 3-4); a plain step along ``g`` on a step without the ascent.

    Args:
        alpha: weight of the surrogate-gap term; 0 is SAM.
        minimize_perturbed: True (the paper's): decompose ``g`` against ``g_p``, as above. False: big_vision's
            ``minimize_fp=False``, ``g + alpha (g_p - (<g_p, g> / ||g||^2) g)`` (alpha = 0 is then plain SGD).
    """

    needs_first_gradient = True
    shard_aware = True  # elementwise, and its two totals go through global_sum

    def __init__(self, alpha: float = 0.01, minimize_perturbed: bool = True) -> None:
        if isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha (GSAM's weight of the surrogate gap) must be a finite number >= 0; got {alpha!r}")
        self.alpha, self.minimize_perturbed = float(alpha), bool(minimize_perturbed)

    def __repr__(self) -> str:
        return f"GSAMDescent(alpha={self.alpha}, minimize_perturbed={self.minimize_perturbed})"

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        first_grads: list[Tensor] | None,
        context: RuleContext,
        ascended: bool,
    ) -> None:
        """``grads`` (``g_p``) becomes ``g_p - alpha (g - c g_p) = (1 + alpha c) g_p - alpha g`` with
        ``c = <g, g_p> / <g_p, g_p>`` (0 when ``g_p = 0``), or, with ``minimize_perturbed=False``,
        ``alpha g_p + (1 - alpha c') g`` with ``c' = <g, g_p> / <g, g>``: foreach operations, no host sync."""
        if not ascended or first_grads is None or not grads:
            return  # a plain step along g(w): no ascent, so g_p = g and g_perp = 0
        g, gp = first_grads, grads
        alpha = self.alpha
        if self.minimize_perturbed:
            if alpha == 0:
                return  # SAM's step, bit for bit
            c = safe_ratio(global_sum(wide_dots(g, gp)), global_sum(wide_dots(gp, gp)))
            torch._foreach_mul_(gp, 1.0 + alpha * c)  # c in float64 for float64 tensors, float32 otherwise
            torch._foreach_add_(gp, g, alpha=-alpha)
            return
        c = safe_ratio(global_sum(wide_dots(g, gp)), global_sum(wide_dots(g, g)))
        torch._foreach_mul_(gp, alpha)
        torch._foreach_add_(gp, torch._foreach_mul(g, 1.0 - alpha * c))


@dataclass(frozen=True)
class GSAMOptions:
    """GSAM's option (``--gsam-alpha``)."""

    gsam_alpha: float = option(
        0.01,
        "gsam: weight alpha of the surrogate-gap term (0: SAM; the paper's for ResNets)",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    return build_sam(request, descent=GSAMDescent(request.options.gsam_alpha))


register_optimizer(
    "gsam",
    "GSAM: SAM's step minus alpha times the part of g(w) orthogonal to g(w+e) (--gsam-alpha; --rho-schedule lr)",
    _build,
    sharpness_aware=True,
    options=GSAMOptions,
)
