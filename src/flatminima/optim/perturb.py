"""Perturbation rules: where SAM takes its second gradient.

A rule maps the parameters ``w`` and the gradients ``g`` at ``w`` to the perturbation ``e`` with ``||e|| <= rho``
(in the rule's own geometry). Rules are pure tensor maths on lists of tensors, written with ``torch._foreach_*``
so that one call covers every parameter; they know nothing of modules, data or optimisers.

Each rule is an ``AscentRule`` and declares what the optimiser may rely on (whether it
needs ``g``, whether ``e`` scales with rho, whether ``e`` is a multiple of ``g``). For speed and memory a rule
works *in place*: ``perturb_`` overwrites the gradient tensors with ``e``. SAM hands
it the gradients of the first pass, which are discarded afterwards anyway, so ``e`` costs no extra copy of the
parameters. Rules compose: ``Adaptive`` wraps any other rule and applies it in the ``|w|``-scaled space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatminima.optim.norms import flat_norm, global_max, global_norm, global_sum, tensor_norms
from flatminima.optim.rules import AscentCapabilities, AscentRule, AscentWrapper, PerturbationRule, RuleContext

__all__ = [
    "Adaptive",
    "DualNorm",
    "PerturbationRule",
    "RandomDirection",
    "Unnormalized",
    "flat_norm",
    "global_norm",
    "tensor_norms",
]


class DualNorm(AscentRule):
    """Ascent in the L_p ball: the first-order solution of max_{||e||_p <= rho} g.e (SAM paper, eq. 2).

    ``e = rho * sign(g) * |g|^(q-1) / (||g||_q^q)^(1/p)`` elementwise, with ``1/p + 1/q = 1``:
    ``p = 2`` gives ``rho g / ||g||_2`` (the SAM default), ``p = inf`` gives ``rho sign(g)``, and ``p = 1`` puts
    all of rho on the largest ``|g_i|`` (split evenly among exact ties). The norm is global, over all tensors
    passed together. A zero gradient gives a zero perturbation, never NaN.
    """

    shard_aware = True

    def __init__(self, p: float = 2.0) -> None:
        p = float(p)
        if not p >= 1.0:  # also rejects NaN
            raise ValueError(f"DualNorm needs p >= 1 (p = 2 is SAM, p = inf the sign rule); got p={p}.")
        self.p = p

    def __repr__(self) -> str:
        return f"DualNorm(p={self.p})"

    def linear_coefficient(self, rho: float, grad_norm: Tensor | float) -> Tensor | float | None:
        """For p = 2, ``e = (rho / ||g||) g``; other p are not a multiple of g."""
        if self.p != 2.0:
            return None
        if isinstance(grad_norm, Tensor):
            return torch.where(grad_norm > 0, rho / grad_norm, torch.zeros_like(grad_norm))
        return rho / grad_norm if grad_norm > 0 else 0.0

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        if not grads:
            return
        if self.p == 2.0:
            norms = grad_norms if grad_norms is not None else tensor_norms(grads)
            norm = global_norm(norms)
            scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
            torch._foreach_mul_(grads, scale)
        elif math.isinf(self.p):
            torch._foreach_sign_(grads)
            torch._foreach_mul_(grads, rho)
        elif self.p == 1.0:
            self._largest_coordinate_(grads, rho)
        else:
            self._general_p_(grads, rho)

    @staticmethod
    def _largest_coordinate_(grads: list[Tensor], rho: float) -> None:
        magnitudes = torch._foreach_abs(grads)
        top = global_max(magnitudes)
        hits = [(m == top) & (top > 0) for m in magnitudes]
        count = global_sum([h.sum().to(top.device) for h in hits]).clamp_min(1)
        torch._foreach_sign_(grads)
        for grad, hit in zip(grads, hits):
            grad.mul_(hit).mul_(rho / count.to(grad))

    def _general_p_(self, grads: list[Tensor], rho: float) -> None:
        # The formula is invariant to scaling g, so divide by max|g| first: no overflow in |g|^q for any q.
        q = self.p / (self.p - 1.0)
        ratios = torch._foreach_abs(grads)
        top = global_max(ratios)
        torch._foreach_div_(ratios, torch.where(top > 0, top, torch.ones_like(top)))
        weights = torch._foreach_pow(ratios, q - 1.0)  # |g|^(q-1), scaled
        torch._foreach_mul_(ratios, weights)  # now |g|^q, scaled
        total = global_sum([r.sum().to(top.device) for r in ratios])
        denominator = total.pow(1.0 / self.p)
        scale = torch.where(denominator > 0, rho / denominator, torch.zeros_like(denominator))
        torch._foreach_sign_(grads)
        torch._foreach_mul_(grads, weights)
        torch._foreach_mul_(grads, scale)


class Unnormalized(AscentRule):
    """USAM: ``e = rho g``, the unnormalised step the theory papers analyse (no division by ||g||)."""

    shard_aware = True

    def __repr__(self) -> str:
        return "Unnormalized()"

    def linear_coefficient(self, rho: float, grad_norm: Tensor | float) -> float:
        return rho

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        if grads:
            torch._foreach_mul_(grads, rho)


class Adaptive(AscentWrapper):
    """ASAM: apply ``inner`` in the space scaled by ``T_w = |w| + eta`` and map the result back.

    With ``g' = T_w g`` the inner rule gives ``e'``, and ``e = T_w e'``; for ``inner = DualNorm(2)`` this is
    ``e = rho T_w^2 g / ||T_w g||`` (Kwon et al. 2021), invariant to rescaling a layer's weights. ``eta = 0.01``
    is the ASAM paper's; ``eta = 0`` is davda54/sam's and pytorch_optimizer's ``T_w = |w|`` (the Variants page of
    the documentation).
    """

    def __init__(self, inner: PerturbationRule | None = None, eta: float = 0.01) -> None:
        if not eta >= 0.0:
            raise ValueError(f"Adaptive needs eta >= 0 (T_w = |w| + eta); got eta={eta}.")
        inner = inner if inner is not None else DualNorm(2.0)
        if AscentCapabilities.of(inner).needs_state:
            raise ValueError(
                f"Adaptive cannot wrap {inner!r}: it reads or keeps optimiser state (a momentum buffer, a "
                "running mean of gradients) in the unscaled coordinates, which the scaling by T_w = |w| + eta would "
                "not reach. Use the rule without Adaptive."
            )
        super().__init__(inner)  # declares what the inner rule declares: the scaling itself is elementwise
        self.eta = float(eta)

    def __repr__(self) -> str:
        return f"Adaptive({self.inner!r}, eta={self.eta})"

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        if not grads:
            return
        scaling = torch._foreach_abs(params)
        if self.eta:
            torch._foreach_add_(scaling, self.eta)
        torch._foreach_mul_(grads, scaling)
        self.perturb_inner_(params, grads, rho, None, context)  # norms of g no longer apply to T_w g
        torch._foreach_mul_(grads, scaling)


class RandomDirection(AscentRule):
    """``e = rho z / ||z||`` with ``z ~ N(0, I)``: uniform on the sphere of radius rho, ``g`` not needed.

    The perturbation of randomly smoothed SAM variants (e.g. Ahn et al. 2024, Algorithm 1). It needs no gradient
    at ``w``, so a step with it costs one forward-backward, at ``w + e``. The norm is global over all tensors
    perturbed together. ``generator`` fixes the draws (it must live on the parameters' device).
    """

    needs_gradient = False

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __repr__(self) -> str:
        return "RandomDirection()"

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        if not grads:
            return
        for buffer in grads:
            buffer.normal_(generator=self.generator)
        norm = global_norm(tensor_norms(grads))
        torch._foreach_mul_(grads, rho / norm)
