"""Friendly SAM (Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization", CVPR 2024, arXiv 2403.12350):
the SAM perturbation from the batch gradient with its running mean, the estimate of the full gradient, removed.

The paper's F-SAM step, with ``g_t`` the batch gradient at ``w_t``:

    m_t = lambda m_{t-1} + (1 - lambda) g_t          (an EMA of the batch gradients: the full-gradient estimate)
    d_t = g_t - sigma m_t                            (what is left: the batch's stochastic gradient noise)
    e_t = rho d_t / ||d_t||,   w_{t+1} = base step along grad L_B(w_t + e_t)

sigma = 1 in the paper's experiments. On the seams: the ascent rule ``FriendlyAscent`` (``needs_state``: the
EMA ``m`` lives in each parameter's rule state under ``"fsam_mean"``, so checkpoints carry it), SAM's descent
and cadence; two forward-backward passes per step, as SAM, and one more parameter-sized buffer. Choices, each an
option or stated:

* ``subtract``: ``"updated"`` (the paper's equations: ``m_t`` already holds ``g_t``) or ``"previous"``
  (``d_t = g_t - sigma m_{t-1}``, then the EMA: the official code, nblt/F-SAM ``utils.py``, and
  pytorch_optimizer's ``FriendlySAM``). For sigma = 1 the two are the same perturbation, since
  ``g_t - m_t = lambda (g_t - m_{t-1})`` and ``e`` is normalised; for other sigma they differ;
* ``start``: ``"gradient"`` (the official code's: the first step sets ``m_0 = g_0`` and perturbs along ``g_0``,
  SAM's step) or ``"zero"`` (``m_{-1} = 0``, the textbook EMA, and the equations from the first step on);
* defaults sigma = 1, lambda = 0.6: the official ``run.sh`` (CIFAR-100, ResNet-18); its ``FriendlySAM`` class
  defaults to lambda = 0.9 (as pytorch_optimizer), its ``train.py`` to 0.95;
* ``||d|| = 0``: ``e = 0`` (the official code divides by ``||d|| + 1e-12``); the norm is global over all perturbed
  parameters; the EMA advances on steps that ascend (all of them, unless a cadence or a declined ascent skips one)
  and never with an inf/NaN gradient (SAM checks ``g`` before the rule runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.optim.catalog import build_sam
from flatminima.optim.perturb import DualNorm
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import AscentRule, RuleContext
from flatminima.optim.sam import SAM

_SPHERE = DualNorm(2.0)  # SAM's L2 ascent: scale to radius rho

__all__ = ["STATE_KEY", "SUBTRACT", "FriendlyAscent"]

STATE_KEY = "fsam_mean"  # where m lives in each parameter's rule state
SUBTRACT = ("updated", "previous")
STARTS = ("gradient", "zero")


class FriendlyAscent(AscentRule):
    """``e = rho d / ||d||`` with ``d = g - sigma m``, ``m`` the EMA of the batch gradients (see the module).

    Args:
        sigma: how much of the mean to remove (the paper's sigma; 0 is SAM).
        lmbda: the EMA's decay lambda in [0, 1].
        subtract: ``"updated"`` (the paper: ``m_t``, which holds ``g_t``) or ``"previous"`` (``m_{t-1}``, the
            official code).
        start: ``"gradient"`` (``m_0 = g_0``, the first perturbation SAM's) or ``"zero"`` (``m_{-1} = 0``).
    """

    needs_state = True
    state_keys = (STATE_KEY,)
    # the maths is elementwise with a global_norm, but the EMA would be stored as plain local shards, which FSDP's
    # state-dict functions do not gather: not declared shard-aware (SAM refuses sharded parameters with it)
    shard_aware = False

    def __init__(
        self, sigma: float = 1.0, lmbda: float = 0.6, subtract: str = "updated", start: str = "gradient"
    ) -> None:
        if not (sigma >= 0 and sigma < float("inf")):
            raise ValueError(f"sigma (how much of the gradient mean to remove) must be finite and >= 0; got {sigma}")
        if not 0 <= lmbda <= 1:
            raise ValueError(f"lmbda (the EMA decay) must be in [0, 1]; got {lmbda}")
        if subtract not in SUBTRACT:
            raise ValueError(f"subtract must be one of {', '.join(SUBTRACT)}; got {subtract!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
        self.sigma, self.lmbda, self.subtract, self.start = float(sigma), float(lmbda), subtract, start

    def __repr__(self) -> str:
        return (
            f"FriendlyAscent(sigma={self.sigma}, lmbda={self.lmbda}, subtract={self.subtract!r}, start={self.start!r})"
        )

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        """``grads`` (``g``) becomes ``e``; each state's ``m`` advances by one EMA step (or starts)."""
        if context is None:
            raise TypeError("FriendlyAscent keeps its mean in the rule state: SAM passes context= (a RuleContext).")
        if not grads:
            return
        gs, means = [], []
        for grad, state in zip(grads, context.states):
            mean = state.get(STATE_KEY)
            if mean is None and self.start == "gradient":
                state[STATE_KEY] = grad.clone()  # m_0 = g_0; d_0 = g_0
                continue
            if mean is None:
                mean = state[STATE_KEY] = torch.zeros_like(grad)
            gs.append(grad)
            means.append(mean)
        if gs:
            weight = 1.0 - self.lmbda
            if self.subtract == "updated":
                torch._foreach_lerp_(means, gs, weight)  # m = lambda m + (1 - lambda) g
                torch._foreach_sub_(gs, means, alpha=self.sigma)  # d = g - sigma m
            else:
                d = torch._foreach_sub(gs, means, alpha=self.sigma)  # d = g - sigma m_{t-1}
                torch._foreach_lerp_(means, gs, weight)
                torch._foreach_copy_(gs, d)
        _SPHERE.perturb_(params, grads, rho)  # e = rho d / ||d|| (0 for d = 0), the norm over all ranks' shards


@dataclass(frozen=True)
class FriendlySAMOptions:
    """Friendly SAM's options (``--fsam-*``)."""

    fsam_sigma: float = option(
        1.0,
        "friendly-sam: sigma, how much of the gradient's running mean to remove",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )
    fsam_lambda: float = option(
        0.6,
        "friendly-sam: lambda, decay of the running mean (EMA) of the gradients",
        check=lambda v: 0 <= v <= 1,
        why="must be in [0, 1]",
    )
    fsam_subtract: str = option(
        "updated",
        "friendly-sam: remove the mean updated with this gradient (the paper) or the previous one",
        choices=SUBTRACT,
    )


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    config = request.config
    if getattr(config, "group_size", None) is not None:
        raise ValueError(
            "friendly-sam keeps one running mean of the batch gradient per step, which m-SAM's groups would each "
            "advance; drop --group-size."
        )
    rule = FriendlyAscent(
        request.options.fsam_sigma, request.options.fsam_lambda, subtract=request.options.fsam_subtract
    )
    return build_sam(request, perturbation=rule)


register_optimizer(
    "friendly-sam",
    "Friendly SAM: perturb along the batch gradient minus its running mean (--fsam-*)",
    _build,
    sharpness_aware=True,
    options=FriendlySAMOptions,
)
