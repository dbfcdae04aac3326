"""ESAM: efficient sharpness-aware minimisation (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware
Minimization for Improved Training of Neural Networks", ICLR 2022, arXiv 2110.03141; official code
dydjw9/Efficient_SAM, ``utils/Esam.py``).

Two changes to SAM's step, each on an existing seam, with ``g = grad L_B(w)`` the batch gradient at ``w``:

* **stochastic weight perturbation** (SWP, the ascent rule ``StochasticWeightPerturbation``): each parameter
  tensor ``j`` is perturbed only when a Bernoulli trial ``m_j ~ B(beta)`` succeeds, and the perturbation is scaled
  up by ``1 / beta``:

      e_j = m_j rho g_j / (beta ||g_K||),     ||g_K|| = sqrt(sum_{j : m_j = 1} ||g_j||^2)

  the L2 norm over the kept tensors ``K`` only (the official code takes the norm over the tensors that received a
  gradient, which are the kept ones, and divides by beta). So ``||e|| = rho / beta`` whenever a tensor is kept (at
  ``beta = 0.6`` the perturbed point is ``1.67 rho`` from ``w``). ``beta = 1`` is SAM's ``e = rho g / ||g||``;
* **sharpness-sensitive data selection** (SDS, the batch rule ``SharpnessSensitiveSelection``): with the
  per-example losses ``l_i(w)`` of the pass at ``w`` and ``l_i(w + e)`` from one forward pass without gradient at
  ``w + e``, the descent takes the gradient at ``w + e`` of the mean loss over the ``k`` examples whose loss rose
  most,

      s_i = l_i(w + e) - l_i(w),   B+ = the k largest s_i,   k = max(1, floor(gamma n)),
      w <- base step along grad (1/k) sum_{i in B+} l_i (w + e)

  ``gamma = 1`` is the whole batch (no extra forward pass).

Choices where the paper is silent, and where this module differs from the official code:

* the trials are per parameter tensor, as in the official code (the paper writes a mask per weight). They are a
  pure function of ``(seed, step, j)``: tensor ``j`` (its position among the tensors the rule is handed: the
  perturbed parameters that have a gradient, in parameter-group order) of step ``t`` (SAM's counter of completed
  steps, ``context.step``) among ``n`` tensors is kept when ``uniform_draw(seed, t n + j) < beta``
  (``uniform_draw``, SplitMix64). No generator state: the checkpoint's step
  counter is enough for a resumed run to draw the same masks, bit for bit, and every rank under DDP (or FSDP)
  draws the same. The official code draws the mask of step ``t`` with Python's ``random`` at the end of step
  ``t - 1``, so its step 0 perturbs every tensor (still divided by beta); ours masks step 0 too;
* the official code saves backward compute by setting ``requires_grad = False`` on the dropped tensors during the
  first backward pass. That is not done here: the first pass computes every gradient and SWP is the maths only;
  the saving this module realises is the data selection's (the descent pass on ``gamma n`` examples). As in the
  official code, the pass at ``w + e`` and the base step cover every tensor;
* ``||g_K|| = 0`` (a zero gradient, or no tensor kept) gives ``e = 0``, never NaN (the official code divides by
  ``||g_K|| + 1e-7``). ``beta = 1`` declares SAM's fused ``w + c g`` (``linear_coefficient``), so it runs SAM's own
  code path and is SAM bit for bit; ``beta < 1`` takes the per-tensor path;
* SDS keeps exactly ``k`` examples, by a stable descending sort of the scores (ties go to the earlier example of
  the batch; the kept examples keep their batch order). The official code keeps those strictly above the k-th
  largest score, ``k - 1`` examples when there are no ties and fewer with ties at the k-th score (``k = int(gamma
  n)`` there too, which fails for ``int(gamma n) = 0``), and uses the whole batch for ``gamma >= 0.99``; ours only
  for ``gamma = 1``. Deciding whether any score is nonzero (below) costs one host sync per step;
* when no example's loss moved (every ``s_i = 0``: a zero gradient, no tensor kept) there is nothing to rank, and
  the descent takes the whole batch; so it does when the step took no pass at ``w`` (SAM's plan skips it when no
  rule reads ``g(w)``: every group at ``rho = 0``, or a gradient-free ascent rule), which leaves no ``l_i(w)``.
  So ``rho = 0`` is the base optimiser bit for bit (one pass per step), whatever gamma;
* the scoring forward pass runs without gradient with BatchNorm running statistics frozen (in train mode the
  layers still normalise with the batch's statistics, as in the pass at ``w``), through the step's
  ``Probe`` at the live (perturbed) weights. The official one runs in train mode
  and updates the running statistics; here they are updated once per step, by the pass at ``w`` (SAM's rule);
* the descent's loss is the mean over the selected examples, as in the official code; the loss a step reports
  is the batch's mean at ``w``. Under DDP each rank selects from its own batch, and each rank perturbs with its
  own gradient (``SharpnessAwareStep``'s default, as the official code's first pass without gradient sync);
* defaults ``beta = 0.6``, ``gamma = 0.5``: the official ``run.sh``'s ResNet-18 runs (its wide-ResNet and
  PyramidNet runs use ``beta = 0.5``; the class and ``train.py`` default to 1 and 1, SAM);
* the official code also offers ASAM's scaling (``adaptive``); SWP here is the L2 rule only (``--p`` and
  ``adaptive`` are not read).

Cost per step: one forward-backward pass on the batch at ``w``, one forward pass without gradient on the batch at
``w + e`` (none for ``gamma = 1``), and one forward-backward pass on ``gamma n`` examples at ``w + e``: "1 + gamma"
batch passes and one forward. Counting a backward as two forwards, SAM is 6 forward passes of the batch and ESAM
``3 + 1 + 3 gamma`` (5.5 at ``gamma = 0.5``, about 0.9 of SAM): without SWP's skipped backward work, ESAM here
saves little over SAM. ``SharpnessAwareStep`` alone runs it (a batch rule), without m-SAM groups or
``accumulation_steps``; SWP alone (``esam``, no batch rule) runs under every driver. Memory: SAM's, plus the
per-example losses and, during the descent, the selected examples' copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatminima.batch_rules import BatchRule, Probe, Sample
from flatminima.optim.catalog import build_sam
from flatminima.optim.norms import global_norm, tensor_norms
from flatminima.optim.perturb import DualNorm
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.optim.rules import AscentRule, RuleContext
from flatminima.optim.sam import SAM
from flatminima.variants.periodic import uniform_draw

_SAM_ASCENT = DualNorm(2.0)  # beta = 1 is SAM's ascent, e = (rho / ||g||) g

__all__ = ["ESAMOptions", "SharpnessSensitiveSelection", "StochasticWeightPerturbation", "esam", "selected_count"]


def _probability(value: Any, name: str, what: str) -> float:
    """``value`` as a float in (0, 1], or a ValueError naming ``name`` and saying what it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"{name} ({what}) must be a number in (0, 1]; got {name}={value!r}.")
    return float(value)


class StochasticWeightPerturbation(AscentRule):
    """ESAM's SWP: ``e_j = m_j rho g_j / (beta ||g_K||)``, tensor ``j`` kept (``m_j = 1``) with probability ``beta``
    and ``||g_K||`` the L2 norm of the kept tensors' gradients (see the module).

    The trial of tensor ``j`` of ``n`` at step ``t`` is ``uniform_draw(seed, t n + j) < beta``: a pure function of
    ``(seed, t, j)``, with ``t`` read from the ``RuleContext`` SAM passes (its counter
    of completed steps), so the rule keeps no state (``needs_state`` stays False: the step is not per-parameter
    state) and runs under m-SAM groups (each group of a step gets the same mask) and on FSDP's shards (the norm is
    taken over every rank's shards, and every rank draws the same mask).

    The official code skips the first backward pass's work on the dropped tensors (``requires_grad = False``); this
    rule does not: it is the maths of SWP only, and the first pass computes every gradient.

    Args:
        beta: probability that a tensor is perturbed, in (0, 1]; 1 is SAM (bit for bit: SAM's code path).
        seed: an integer >= 0; the training command line passes the run's ``--seed``.
    """

    shard_aware = True  # a mask shared by all ranks, and a global_norm over their shards

    def __init__(self, beta: float = 0.6, seed: int = 0) -> None:
        self.beta = _probability(beta, "beta", "the probability that a parameter tensor is perturbed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"StochasticWeightPerturbation needs an integer seed >= 0; got seed={seed!r}.")
        self.seed = seed

    def __repr__(self) -> str:
        return f"StochasticWeightPerturbation(beta={self.beta}, seed={self.seed})"

    def kept(self, step: int, count: int) -> list[bool]:
        """Which of ``count`` tensors step ``step`` perturbs: tensor ``j`` when ``uniform_draw(seed, step * count +
        j) < beta`` (every tensor for ``beta = 1``)."""
        if self.beta >= 1.0:
            return [True] * count
        start = step * count
        return [uniform_draw(self.seed, start + j) < self.beta for j in range(count)]

    def linear_coefficient(self, rho: float, grad_norm: Tensor | float) -> Tensor | float | None:
        """For ``beta = 1``, SAM's ``e = (rho / ||g||) g`` (so SAM's fused path runs); for ``beta < 1`` the mask makes
        ``e`` no multiple of ``g``."""
        return _SAM_ASCENT.linear_coefficient(rho, grad_norm) if self.beta == 1.0 else None

    def perturb_(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        rho: float,
        grad_norms: list[Tensor] | None = None,
        *,
        context: RuleContext | None = None,
    ) -> None:
        """``grads`` (``g``) becomes ``e``: zero on the dropped tensors, ``rho g / (beta ||g_K||)`` on the kept."""
        if context is None:
            raise TypeError(
                "StochasticWeightPerturbation draws its mask from the step number: call perturb_ with "
                "context=RuleContext(step=...) (SAM passes it)."
            )
        if not grads:
            return
        keep = self.kept(context.step, len(grads))
        dropped = [g for g, k in zip(grads, keep) if not k]
        if dropped:
            torch._foreach_zero_(dropped)
        kept = [g for g, k in zip(grads, keep) if k]
        if not kept:
            return  # no tensor kept: e = 0
        norms = [n for n, k in zip(grad_norms, keep) if k] if grad_norms is not None else tensor_norms(kept)
        norm = global_norm(norms)  # ||g_K||, over every rank's shards under FSDP
        scale = torch.where(norm > 0, rho / (self.beta * norm), torch.zeros_like(norm))
        torch._foreach_mul_(kept, scale)


def selected_count(gamma: float, n: int) -> int:
    """``k = max(1, floor(gamma n))``, the examples SDS keeps of a batch of ``n`` (``floor`` as ``int(gamma * n)``,
    the official code's count)."""
    return min(n, max(1, int(gamma * n)))


class SharpnessSensitiveSelection(BatchRule):
    """ESAM's SDS: the descent pass on the ``k = max(1, floor(gamma n))`` examples whose loss rose most from ``w`` to
    ``w + e`` (``s_i = l_i(w + e) - l_i(w)``), the ascent on the whole batch (see the module).

    ``ascent_weights`` keeps the per-example losses at ``w`` and the step's probe (and returns None: the ascent
    loss is the plain mean); ``descent_sample``, called with the weights at ``w + e``, runs one forward pass
    without gradient there (BatchNorm statistics frozen) and returns the selected examples, in batch order.
    ``gamma = 1`` returns the whole batch with no extra pass; so do a step whose scores are all 0 (the weights did
    not move) and one without losses at ``w`` (the plan takes no pass at ``w`` when no rule reads ``g(w)``: every
    group at ``rho = 0``, or a gradient-free ascent rule such as ``RandomDirection`` or ``MomentumAscent``).

    Attributes:
        indices: the last selection, positions in the batch (ascending), or None (the whole batch).
        scores: the last scores ``s_i`` (float64), or None (none computed).
    """

    needs_per_example_losses = True

    def __init__(self, gamma: float = 0.5) -> None:
        self.gamma = _probability(gamma, "gamma", "the fraction of the batch the descent pass sees")
        self.indices: Tensor | None = None
        self.scores: Tensor | None = None
        self._losses: Tensor | None = None
        self._probe: Probe | None = None

    def __repr__(self) -> str:
        return f"SharpnessSensitiveSelection(gamma={self.gamma})"

    def ascent_sample(self, inputs: Tensor, targets: Tensor, step: int) -> Sample | None:
        """The ascent on the whole batch; nothing of an earlier step (one skipped after its pass at ``w``) is kept."""
        self._losses = self._probe = None
        return None

    def ascent_weights(self, losses: Tensor, probe: Probe) -> Tensor | None:
        """Keep ``l_i(w)`` and the probe for ``descent_sample``; the ascent loss is the plain mean."""
        self._losses, self._probe = (losses.detach(), probe) if self.gamma < 1.0 else (None, None)
        return None

    def descent_sample(self, inputs: Tensor, targets: Tensor) -> Sample | None:
        """The ``k`` examples with the largest ``l_i(w + e) - l_i(w)`` (the weights are at ``w + e`` now)."""
        losses, probe = self._losses, self._probe
        self._losses = self._probe = None  # the batch is not kept alive past the step
        self.indices = self.scores = None
        n = inputs.shape[0]
        k = selected_count(self.gamma, n)
        if k >= n:  # gamma = 1, or a batch of one: the whole batch, no extra pass
            return None
        if losses is None or probe is None:  # no pass at w this step (rho = 0, an ascent that reads no g(w))
            return None
        if losses.shape[0] != n:
            raise ValueError(
                f"SharpnessSensitiveSelection scored {losses.shape[0]} examples at w but is asked to select from "
                f"{n}; the ascent and descent passes must see the same batch."
            )
        after = probe.losses_at([None] * len(probe.params))  # l_i(w + e): the live, perturbed weights
        scores = after.detach().double() - losses.double()
        self.scores = scores
        if not bool((scores != 0).any()):  # the weights did not move: nothing to rank
            return None
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        index = torch.sort(order).values
        self.indices = index
        index = index.to(inputs.device)
        return inputs[index], targets[index.to(targets.device)]


def esam(
    params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
    base_optimizer: type[Optimizer] | Optimizer,
    beta: float = 0.6,
    seed: int = 0,
    **options: Any,
) -> SAM:
    """SAM with ESAM's stochastic weight perturbation (``beta``, drawn from ``(seed, step)``); ``options`` go to
    ``SAM`` (``rho``, ``lr``, ``model``...). The data selection is a batch rule: hand
    ``SharpnessSensitiveSelection(gamma)`` to ``SharpnessAwareStep`` (``batch_rule=``) or set
    it as ``opt.batch_rule``."""
    return SAM(params, base_optimizer, perturbation=StochasticWeightPerturbation(beta, seed), **options)


@dataclass(frozen=True)
class ESAMOptions:
    """ESAM's options (``--esam-*``)."""

    esam_beta: float = option(
        0.6,
        "esam: probability beta that each parameter tensor is perturbed (SWP; 1: every tensor, SAM's ascent)",
        check=lambda v: 0 < v <= 1,
        why="must be in (0, 1] (1: every tensor perturbed, SAM's ascent)",
    )
    esam_gamma: float = option(
        0.5,
        "esam: fraction gamma of the batch whose loss rose most that the descent pass sees (SDS; 1: the batch)",
        check=lambda v: 0 < v <= 1,
        why="must be in (0, 1] (1: the descent on the whole batch)",
    )


# ---------------------------------------------------------------- command line


def _build(request: OptimizerRequest) -> SAM:
    rule = StochasticWeightPerturbation(request.options.esam_beta, seed=request.config.seed)
    return build_sam(request, perturbation=rule)


def _batch_rule(request: OptimizerRequest) -> SharpnessSensitiveSelection:
    return SharpnessSensitiveSelection(request.options.esam_gamma)


register_optimizer(
    "esam",
    "ESAM: SAM perturbing each tensor with probability beta, the descent on the gamma sharpest examples (--esam-*)",
    _build,
    sharpness_aware=True,
    options=ESAMOptions,
    passes="1 + gamma (the second on the selected gamma of the batch), and one forward pass to select",
    batch_rule=_batch_rule,
)
