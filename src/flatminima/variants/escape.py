"""Escaping sharp minima with random perturbations (Ahn, Jadbabaie, Sra, ICML 2024, arXiv 2305.15659).

Both algorithms take a plain gradient step while ``||grad f(x)|| > epsilon`` and, once the gradient is small,

    x+ = x - eta grad f(x) - eta' v,    v = u - (<u, grad f(x)> / ||grad f(x)||^2) grad f(x),

the part of a second gradient ``u`` orthogonal to ``grad f(x)``; ``E[v]`` follows the gradient of tr(H) along the
valley of minima. They differ in ``u`` (the papers page of the documentation, papers.md sec. 4):

* **randomly smoothed perturbation** (Algorithm 1, ``ahn-rs``): ``u = grad f(x + rho g)``, ``g`` uniform on the
  unit sphere of the whole parameter vector. On the seams: ascent ``RandomDirection``,
  descent ``OrthogonalEscape``; one batch pass at ``x`` and one at ``x + rho g``.
* **sharpness-aware perturbation** (Algorithm 2, ``ahn-sa``): ``u = grad f_i(x + rho s grad f_i(x) /
  ||grad f_i(x)||)`` for one random example ``i`` of the batch and a random sign ``s``. Ascent
  ``RandomSign`` around ``DualNorm(2)``, batch rule ``SingleExample`` (both extra passes on example
  ``i`` alone: single-example gradients, never the batch's per-example gradients), descent
  ``OrthogonalEscape``. Cost: the batch pass plus two single-example passes.

Choices where the paper is open, each an option: ``epsilon`` (the switch), ``eta'`` as a multiple of the base
learning rate (``relative=True``, the default: ``eta' = c * lr``, so it follows the LR schedule) or absolute; the
norm in the switch is the L2 norm of the whole gradient; when ``grad f(x) = 0``, ``v = u``. With a base
optimiser other than plain SGD, the direction ``grad f(x) + (eta' / eta) v`` goes through it (momentum included).
Under DDP, ``grad f(x)`` is all-reduced (every rank switches and projects alike); for ``ahn-rs`` each rank draws
its own ``g`` and the second gradients are averaged; for ``ahn-sa`` each rank picks its own example, so ``u`` is
the mean of one example's gradient per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.batch_rules import BatchRule, Sample, random_index
from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import global_norm, tensor_norms
from flatminima.optim.perturb import DualNorm, RandomDirection
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import AscentRule, AscentWrapper, DescentRule, RuleContext
from flatminima.optim.sam import SAM

__all__ = ["OrthogonalEscape", "RandomSign", "SingleExample"]


class OrthogonalEscape(DescentRule):
    """Direction ``g + (eta' / lr) v`` with ``v`` the part of ``g(w + e)`` orthogonal to ``g = g(w)``; a plain
    step along ``g`` while ``||g|| > epsilon`` (the ascent is then declined, and its passes skipped).

    Args:
        epsilon: the switch; ``inf`` perturbs on every step.
        eta_prime: the perturbation step size: a multiple of each group's learning rate when ``relative``
            (``eta' = eta_prime * lr``), else absolute.
        relative: see ``eta_prime``.
    """

    needs_first_gradient = True

    def __init__(self, epsilon: float, eta_prime: float, relative: bool = True) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon (the gradient-norm switch) must be >= 0 (inf: always perturb); got {epsilon}")
        if not eta_prime >= 0 or eta_prime == float("inf"):
            raise ValueError(f"eta_prime (the perturbation step) must be a finite number >= 0; got {eta_prime}")
        self.epsilon, self.eta_prime, self.relative = float(epsilon), float(eta_prime), relative

    def __repr__(self) -> str:
        return f"OrthogonalEscape(epsilon={self.epsilon}, eta_prime={self.eta_prime}, relative={self.relative})"

    def declines_ascent(self, first_grads: list[Tensor]) -> bool:
        """A plain gradient step (no perturbation) while the gradient is large (one host sync, none for inf)."""
        if math.isinf(self.epsilon):
            return False
        return bool(global_norm(tensor_norms(first_grads)) > self.epsilon)

    def direction_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        first_grads: list[Tensor] | None,
        context: RuleContext,
        ascended: bool,
    ) -> None:
        """``grads`` (``u = g(w + e)``) becomes ``g + s (u - c g)`` with ``c = <u, g> / <g, g>`` (0 when ``g = 0``):
        foreach operations and two flat dot products, no host sync."""
        if not ascended or first_grads is None:
            return  # grads hold g(w): a plain gradient step
        g, u = first_grads, grads
        flat_g = torch.cat([t.reshape(-1) for t in g])
        wide = torch.float64 if flat_g.dtype == torch.float64 else torch.float32
        flat_g = flat_g.to(wide)
        gg = torch.dot(flat_g, flat_g)
        ug = torch.dot(torch.cat([t.reshape(-1) for t in u]).to(wide), flat_g)
        coefficient = torch.where(gg > 0, ug / torch.where(gg > 0, gg, 1.0), 0.0).to(u[0].dtype)
        torch._foreach_sub_(u, torch._foreach_mul(g, coefficient))  # v = u - c g
        scales = self.eta_prime if self.relative else [self.eta_prime / lr for lr in context.lrs]
        torch._foreach_mul_(u, scales)
        torch._foreach_add_(u, g)


class RandomSign(AscentWrapper):
    """``s * e`` for the inner rule's ``e`` and a random sign ``s`` (one per step, for the whole vector).

    It declares what the inner rule declares (a stateful inner rule gets its states), except that it always takes
    the gradient at ``w``, as Ahn et al.'s algorithm does."""

    def __init__(self, inner: AscentRule, generator: torch.Generator | None = None) -> None:
        super().__init__(inner, needs_gradient=True)
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomSign({self.inner!r})"

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        self.perturb_inner_(params, grads, rho, grad_norms, context)
        if torch.randint(2, (1,), generator=self.generator).item() == 0:
            torch._foreach_neg_(grads)


class SingleExample(BatchRule):
    """Both extra passes on one example drawn uniformly from the batch (a new one every step)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self.index: int | None = None

    def __repr__(self) -> str:
        return "SingleExample()"

    def ascent_sample(self, inputs: Tensor, targets: Tensor, step: int) -> Sample | None:
        self.index = random_index(inputs.shape[0], self.generator)
        return inputs[self.index : self.index + 1], targets[self.index : self.index + 1]

    def descent_sample(self, inputs: Tensor, targets: Tensor) -> Sample | None:
        i = self.index
        return inputs[i : i + 1], targets[i : i + 1]


@dataclass(frozen=True)
class AhnOptions:
    """The options of Ahn et al.'s two algorithms (``--ahn-*``)."""

    ahn_epsilon: float = option(
        float("inf"),
        "ahn-rs/ahn-sa: perturb only when ||grad|| <= epsilon (inf: always)",
        check=lambda v: v >= 0,
        why="must be >= 0 (inf: always perturb)",
    )
    ahn_eta_prime: float = option(
        0.1,
        "ahn-rs/ahn-sa: step eta' of the perturbation, as a multiple of lr",
        check=lambda v: math.isfinite(v) and v >= 0,
        why="must be finite and >= 0",
    )
    ahn_eta_prime_absolute: bool = option(False, "ahn-rs/ahn-sa: eta' is absolute, not a multiple of lr")


# ---------------------------------------------------------------- command line: draws from the global RNG, which
# the training loop checkpoints, so a resumed run draws the same directions, signs and examples.


def _escape(request: OptimizerRequest) -> OrthogonalEscape:
    return OrthogonalEscape(
        request.options.ahn_epsilon, request.options.ahn_eta_prime, relative=not request.options.ahn_eta_prime_absolute
    )


def _build_rs(request: OptimizerRequest) -> SAM:
    return build_sam(request, perturbation=RandomDirection(), descent=_escape(request))


def _build_sa(request: OptimizerRequest) -> SAM:
    return build_sam(request, perturbation=RandomSign(DualNorm(2.0)), descent=_escape(request))


register_optimizer(
    "ahn-rs",
    "Ahn et al. Alg. 1: random-direction perturbation, orthogonal part (--ahn-*)",
    _build_rs,
    sharpness_aware=True,
    options=AhnOptions,
    passes="2 (1 while the gradient is larger than epsilon)",
)
register_optimizer(
    "ahn-sa",
    "Ahn et al. Alg. 2: one random example's SAM perturbation, orthogonal part (--ahn-*)",
    _build_sa,
    sharpness_aware=True,
    options=AhnOptions,
    passes="3 (1 while the gradient is larger than epsilon)",
    batch_rule=lambda request: SingleExample(),
)
