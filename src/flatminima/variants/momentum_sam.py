"""Momentum-SAM (Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", 2024, arXiv 2401.12033): the perturbation along the negative momentum, so no gradient at ``w``.

The paper's Algorithm 1 (SGD with MSAM), in its own notation, which is PyTorch's:

    v_{t+1} = mu v_t + g_t,    w_{t+1} = w_t - eta v_{t+1}        (heavy-ball SGD: v accumulates +gradients)
    w~_t = w_t - rho v_t / ||v_t||,    g_t = grad L_B(w~_t)        (the MSAM perturbation and its only gradient)

So ``v`` is exactly ``torch.optim.SGD``'s ``momentum_buffer``, and the "negative momentum" ``-v`` is the direction
SGD moves in: ``e = -rho v / ||v||`` (the official code, MarlonBecker/MSAM ``optimizer/msam.py``, does
``param.sub_(momentum_buffer, alpha=rho / ||v||)``). The gradient is taken a step of length rho *ahead* along the
update, as in Nesterov's method with a normalised look-ahead; not uphill along ``g`` as SAM.

On the seams: the ascent rule ``MomentumAscent`` (``needs_gradient = False``: SAM skips the pass at ``w``, so a
step costs one forward-backward, at ``w + e``; ``needs_state = True``: it reads the base optimiser's buffer from
the parameters' optimiser state), SAM's descent and cadence. Choices, each an option or stated:

* the first step, with no buffer yet: ``e = 0``, a plain base-optimiser step (the official code initialises ``v``
  to zeros and its inverse norm to 0, which gives the same); a parameter without a buffer gets ``e = 0`` too;
* ``||v|| = 0``: ``e = 0`` (the official code divides by ``||v|| + 1e-12``, the same to within 1e-12 / ||v||);
* the norm is global over all perturbed parameters (one ball, as in the paper and the code);
* ``buffer``: the state key read; ``"momentum_buffer"`` for SGD, ``"exp_avg"`` (Adam's first moment) for
  Adam/AdamW, as the official ``AdamW_MSAM`` (``MomentumAscent.for_optimizer`` picks it and refuses SGD
  without momentum). Dampening only scales ``v``; Nesterov SGD still keeps ``v`` in the buffer, which is used.

The official code keeps the weights at ``w~`` between steps (it removes the last perturbation, steps, and adds the
next one, inside ``optimizer.step``) so that it can be a drop-in SGD; here SAM moves to ``w + e`` and back each
step. The sequence of weights ``w_t`` the base optimiser produces is the same (to rounding); ours holds ``w`` at
evaluation and in checkpoints without ``move_back_from_momentumAscent``. Two small differences from that code:
its weight decay is added to the gradient at ``w~`` (ours, the base optimiser's, at ``w``; ``weight_decay_in_loss``
reproduces it), and it adds each perturbation with one step's rho and removes it with the next step's (ours uses
each step's own rho: the same unless rho is scheduled).
The paper's radii are large (rho = 3 for SGD on CIFAR and ImageNet) since ``e`` is not uphill.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatminima.optim.perturb import DualNorm
from flatminima.optim.registry import OptimizerRequest, register_optimizer
from flatminima.optim.rules import AscentRule, RuleContext
from flatminima.optim.sam import SAM
from flatminima.optim.sharded import local

_SPHERE = DualNorm(2.0)  # SAM's L2 ascent: scale to radius rho

__all__ = ["MomentumAscent"]


class MomentumAscent(AscentRule):
    """``e = -rho v / ||v||`` with ``v`` the base optimiser's momentum buffer (PyTorch's sign: ``v`` accumulates
    +gradients and the base step is ``w -= lr v``, so ``e`` points along the update). ``e = 0`` while there is no
    buffer (the first step: a plain base step) and when ``||v|| = 0``.

    Args:
        buffer: the key of the buffer in each parameter's optimiser state: ``"momentum_buffer"`` (SGD with
            momentum > 0) or ``"exp_avg"`` (Adam, AdamW; the official AdamW_MSAM's choice).
    """

    needs_gradient = False
    needs_state = True
    shard_aware = True  # reads the buffer's local shard; the norm goes through global_norm

    def __init__(self, buffer: str = "momentum_buffer") -> None:
        if not isinstance(buffer, str) or not buffer:
            raise ValueError(f"buffer must be the name of a tensor in the optimiser state; got {buffer!r}")
        self.buffer = buffer

    def __repr__(self) -> str:
        return f"MomentumAscent(buffer={self.buffer!r})"

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer) -> MomentumAscent:
        """The rule reading ``optimizer``'s momentum: SGD with momentum > 0 in every group, Adam or AdamW; any other
        base optimiser (or SGD without momentum, which keeps no buffer) is refused with the reason."""
        if isinstance(optimizer, SAM):
            optimizer = optimizer.base_optimizer
        if isinstance(optimizer, torch.optim.SGD):
            flat = [group["momentum"] for group in optimizer.param_groups if not group["momentum"] > 0]
            if flat:
                raise ValueError(
                    "momentum-sam perturbs along SGD's momentum buffer, but a param group has momentum "
                    f"{flat[0]}: SGD then keeps no buffer and the step would be plain SGD. Set momentum > 0 "
                    "(e.g. --momentum 0.9)."
                )
            return cls("momentum_buffer")
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            return cls("exp_avg")
        raise ValueError(
            f"momentum-sam needs a base optimiser with a momentum buffer (SGD with momentum, Adam, AdamW); got "
            f"{type(optimizer).__name__}. Pass MomentumAscent(buffer=<its state key>) for another one."
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
        """``grads`` (zeros) becomes ``-rho v / ||v||``, the norm over all of them; stays 0 without buffers."""
        if context is None:
            raise TypeError("MomentumAscent reads the optimiser state: SAM passes context= (a RuleContext).")
        if not grads:
            return
        states = context.optimizer_states
        found = [(grad, local(state[self.buffer])) for grad, state in zip(grads, states) if self.buffer in state]
        if found:
            targets, buffers = zip(*found)
            torch._foreach_copy_(list(targets), list(buffers))
        # e = -rho v / ||v|| (0 without buffers); every rank takes the norm's collective, with or without buffers
        _SPHERE.perturb_(params, grads, -rho)


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    config = request.config
    if getattr(config, "group_size", None) is not None:
        raise ValueError(
            "momentum-sam takes one perturbation per step along the momentum (no gradient at w), so m-SAM's "
            "group_size has nothing to split; drop --group-size."
        )
    base = request.base_class(request.model.parameters(), **request.base_options)
    rule = MomentumAscent.for_optimizer(base)
    return SAM(None, base, rho=request.rho, p=request.p, model=request.model, nonfinite=request.nonfinite,
               perturbation=rule)  # fmt: skip


register_optimizer(
    "momentum-sam",
    "Momentum-SAM: perturb along -momentum, one forward-backward per step (rho ~ 1-3, base with momentum)",
    _build,
    sharpness_aware=True,
    passes="1",
)
