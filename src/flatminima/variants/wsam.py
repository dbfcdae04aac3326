"""WSAM: weighted sharpness as a regularisation term (Yue, Jiang, Ye, Gao, Liu, Zhang, "Sharpness-Aware Minimization
Revisited: Weighted Sharpness as a Regularization Term", KDD 2023, arXiv 2305.15817; the authors' code,
``atorch/optimizers/wsam.py`` in intelligent-machine-learning/dlrover, and pytorch_optimizer's ``WSAM``).

The objective weighs SAM's sharpness ``L(w + e) - L(w)`` against the loss with ``k = gamma / (1 - gamma)``:

    L_WSAM(w) = L(w) + k (L(w + e) - L(w)),     gamma in [0, 1),  gamma = 1/2 (k = 1) is SAM's L(w + e)

and the paper's Algorithm 1 keeps the sharpness term out of the base optimiser ("weight decouple"):

    g = grad L(w),   e = rho g / ||g||,   g~ = grad L(w + e)
    w~ = base step from w along g          (momentum, Adam's moments... see g only)
    w <- w~ - lr k (g~ - g)                 (lr: the base optimiser's learning rate, as it steps)

On the seams: SAM's ascent and cadence, the descent rule ``WSAMDescent``, which hands the base optimiser ``g``
and, once the base optimiser has stepped, moves the weights by ``-lr k (g~ - g)`` (``after_base_step_``, the
seam's hook after the base step). Two forward-backward passes per step, as SAM (one when gamma = 0: the ascent
is declined and the step is the base optimiser's); one kept copy of ``g`` and, decoupled, one of ``g~ - g``.

Choices, each an option or stated:

* ``decouple`` (default True, the paper's Algorithm 1 and both codes' default). False: the gradient of the
  objective, ``g + k (g~ - g)``, goes through the base optimiser (the codes' ``decouple=False``); with
  gamma = 1/2 that is SAM bit for bit. Decoupled, gamma = 1/2 is not SAM: ``g`` goes through the base
  optimiser's momentum and the difference ``g~ - g`` does not.
* ``gamma`` default 0.9: pytorch_optimizer's default and the authors' README; the paper finds 0.8-0.95 stable
  and tunes it per task (the authors' code now defaults to 0.88).
* ``max_norm`` (default None, the paper's, which clips nothing): the authors' code clips ``g`` and ``g~`` each
  to this global L2 norm before forming the update (its default 1.0), ``e`` from the unclipped ``g``; the rule
  of ``torch.nn.utils.clip_grad_norm_`` (``max_norm / (norm + 1e-6)``, at most 1). pytorch_optimizer clips
  ``g~`` only. A driver's own clipping (``SharpnessAwareStep(max_grad_norm=)``) clips the direction handed to
  the base optimiser, ``g`` when decoupled, and not the sharpness term.
* ``e = rho g / ||g||`` exactly (SAM's ``DualNorm``, zero when ``g = 0``); both codes divide by
  ``||g|| + 1e-12``, a relative difference of ``1e-12 / ||g||`` in ``e``.
* ``lr`` of the decoupled term is each parameter's group learning rate, read after the base step (before a
  scheduler's ``step``), as both codes do; with Adam the term is not divided by Adam's ``sqrt(v)``.
* An inf/NaN in ``g~`` reaches the base optimiser's gradient (``g + 0 (g~ - g)``) so that SAM's non-finite
  guard sees it when decoupled too; a step skipped by the guard or a GradScaler takes no decoupled move.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import global_norm, tensor_norms
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import DescentRule, RuleContext
from flatminima.optim.sam import SAM

__all__ = ["WSAMDescent"]

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s, which the authors' code calls


def _valid_gamma(gamma: object) -> bool:
    return isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 <= gamma < 1


def _clip_coefficient(tensors: list[Tensor], max_norm: float) -> Tensor:
    """``min(1, max_norm / (||tensors|| + 1e-6))`` over all tensors (all ranks' shards), as ``clip_grad_norm_``."""
    norm = global_norm(tensor_norms(tensors))
    return (max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)


class WSAMDescent(DescentRule):
    """WSAM's descent (see the module): ``g`` to the base optimiser and ``-lr k (g~ - g)`` after its step
    (``decouple=True``), or ``g + k (g~ - g)`` to the base optimiser (``decouple=False``); ``k = gamma/(1-gamma)``.

    Args:
        gamma: weight of the sharpness in [0, 1); 1/2 is SAM's weight, 0 the base optimiser.
        decouple: the paper's decoupled sharpness term (True) or the objective's gradient through the base
            optimiser (False).
        max_norm: clip ``g`` and ``g~`` each to this global L2 norm first (the authors' code), or None.
    """

    needs_first_gradient = True
    shard_aware = True  # elementwise, and the clipping norm goes through global_norm

    def __init__(self, gamma: float = 0.9, decouple: bool = True, max_norm: float | None = None) -> None:
        if not _valid_gamma(gamma):
            raise ValueError(
                f"gamma (WSAM's weight of the sharpness, used as gamma / (1 - gamma)) must be a number in [0, 1); "
                f"got {gamma!r}. 0.5 weighs it as SAM does; the paper's range is 0.8-0.95."
            )
        if max_norm is not None and (
            isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < math.inf
        ):
            raise ValueError(
                f"max_norm (WSAM's gradient clipping) must be a finite number > 0 or None; got {max_norm!r}"
            )
        self.gamma, self.decouple = float(gamma), bool(decouple)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.weight = self.gamma / (1.0 - self.gamma)  # k
        self.steps_after_base = self.decouple  # SAM calls after_base_step_ only then
        self._sharpness: list[Tensor] | None = None  # g~ - g of the step under way, until the base step

    def __repr__(self) -> str:
        return f"WSAMDescent(gamma={self.gamma}, decouple={self.decouple}, max_norm={self.max_norm})"

    def declines_ascent(self, first_grads: list[Tensor], *, context: RuleContext | None = None) -> bool:
        """gamma = 0 weighs the sharpness by 0: no ascent, the base optimiser's step along ``g`` (one pass)."""
        return self.weight == 0

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        first_grads: list[Tensor] | None,
        context: RuleContext,
        ascended: bool,
    ) -> None:
        """``grads`` (``g~``) becomes ``g`` (decoupled; ``g~ - g`` kept for ``after_base_step_``) or
        ``k g~ + (1 - k) g``: foreach operations, no host sync."""
        self._sharpness = None
        if not ascended or first_grads is None or not grads:
            return  # no ascent this step: a plain step along g(w)
        g, gp = first_grads, grads
        if self.max_norm is not None:
            g = torch._foreach_mul(g, _clip_coefficient(g, self.max_norm))
            torch._foreach_mul_(gp, _clip_coefficient(gp, self.max_norm))
        k = self.weight
        if not self.decouple:
            if k == 1.0:
                return  # SAM's step, bit for bit
            torch._foreach_mul_(gp, k)
            torch._foreach_add_(gp, g, alpha=1.0 - k)
            return
        sharpness = torch._foreach_sub(gp, g)
        torch._foreach_copy_(gp, g)
        # + 0 (g~ - g): g exactly, or NaN where g~ is not finite, for the guard to see (no temporary copy)
        torch._foreach_add_(gp, sharpness, alpha=0.0)
        self._sharpness = sharpness

    @torch.no_grad()
    def after_base_step_(self, params: list[Tensor], context: RuleContext) -> None:
        """``w <- w - lr k (g~ - g)``, each parameter with its group's learning rate."""
        sharpness, self._sharpness = self._sharpness, None
        if sharpness is None or self.weight == 0:
            return
        if len(sharpness) != len(params):
            raise RuntimeError(
                f"WSAM kept g(w+e) - g(w) for {len(sharpness)} parameters but the base step had {len(params)} with a "
                "gradient; do not add or drop gradients between apply_descent_rule() and second_step()."
            )
        by_lr: dict[float, list[int]] = defaultdict(list)
        for index, lr in enumerate(context.lrs):
            by_lr[lr].append(index)
        for lr, indices in by_lr.items():
            torch._foreach_add_([params[i] for i in indices], [sharpness[i] for i in indices], alpha=-lr * self.weight)


@dataclass(frozen=True)
class WSAMOptions:
    """WSAM's options (``--wsam-gamma``, ``--wsam-decouple`` / ``--no-wsam-decouple``, ``--wsam-max-norm``)."""

    wsam_gamma: float = option(
        0.9,
        "wsam: weight gamma of the sharpness, as gamma/(1-gamma) (0.5 with --no-wsam-decouple: SAM)",
        check=_valid_gamma,
        why="must be in [0, 1)",
    )
    wsam_decouple: bool = option(
        True, "wsam: apply the sharpness term after the base step, outside its momentum (the paper's)"
    )
    wsam_max_norm: float = option(
        0.0,
        "wsam: clip g(w) and g(w+e) each to this L2 norm (the authors' code; 0: no clipping, the paper's)",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    options = request.options
    rule = WSAMDescent(options.wsam_gamma, options.wsam_decouple, options.wsam_max_norm or None)
    return build_sam(request, descent=rule)


register_optimizer(
    "wsam",
    "WSAM: L + gamma/(1-gamma) (L(w+e) - L(w)), the sharpness term outside the base step (--wsam-gamma)",
    _build,
    sharpness_aware=True,
    passes="2 (1 when gamma = 0)",
    options=WSAMOptions,
)
