"""m-sharpness (Foret et al. 2021, "Sharpness-Aware Minimization", sec. 4.1).

The examples are split into consecutive groups of ``m``; for each group ``k`` the sharpness is the increase of the
group's mean loss ``L_k`` when the weights ``w`` are perturbed by ``e``:

* worst case: ``max_{||e||_p <= rho} L_k(w + e) - L_k(w)``, estimated by projected gradient ascent in the L_p ball
  for any ``p`` in ``[1, inf]``. With ``adaptive=True`` the ball lives in the ``|w|``-scaled space (ASAM):
  ``||e / T||_p <= rho`` with ``T = |w| + eta`` elementwise.
* average case: ``E_e L_k(w + e) - L_k(w)`` with Gaussian ``e ~ N(0, sigma^2 I)``, ``sigma = rho / sqrt(dim)`` so
  that ``E||e||^2 = rho^2`` (``dim`` = number of trainable weights); adaptive: ``e = T e'`` with ``e'`` as above.

Both are reported for the loss and for the 0-1 error, averaged over groups with their standard error.

The ascent steps are the training rules of ``flatminima.optim.perturb``: ``DualNorm(p)``, wrapped in
``Adaptive(., eta)`` when adaptive, so that every geometry SAM can be trained in can be measured in, and measured
with the same maths. Each step of the worst case is the rule's perturbation at the step size, added to the
current ``e`` and brought back into the ball: for ``p = 2`` by rescaling and for ``p = inf`` by clipping (both the
Euclidean projection, in the scaled space when adaptive), and for other ``p`` by rescaling onto the sphere (a
retraction, not the Euclidean projection, which has no closed form). Every iterate is feasible and the reported
loss is the maximum over the iterates, so the estimate is a lower bound of the worst case, as any finite ascent is.

The model's own parameters are never written: perturbed weights are passed with
``torch.func.functional_call``. Parameters, buffers (BatchNorm running statistics, which update in train
mode) and the train/eval mode of every submodule are still saved and restored exactly, also on exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.optim.perturb import Adaptive, DualNorm
from flatminima.sharpness.checks import nonnegative_float, positive_int
from flatminima.sharpness.data import (
    Batch,
    Batches,
    batch_size,
    cast,
    forward,
    groups_of,
    measuring,
    trainable_parameters,
)
from flatminima.sharpness.losses import LossFn, error_rate, per_example_losses
from flatminima.sharpness.results import mean_stderr

__all__ = ["MSharpnessResult", "m_sharpness"]

Data = Batch | Iterable[Batch]

_KINDS = ("worst", "average")
_NORMS = {"l2": 2.0, "linf": math.inf}


@dataclass
class MSharpnessResult:
    """m-sharpness of a model; increases are means over groups, ``*_stderr`` their standard errors.

    ``per_group`` has shape ``(num_groups, 2)``: the loss increase and the error increase of each group. The
    standard errors are ``std / sqrt(num_groups)`` (NaN for a single group). Error values are NaN when the task
    is not classification (targets not integer class indices matching ``outputs.argmax(1)``). ``p`` is the norm
    of the ball (2 for the average case).
    """

    m: int
    rho: float
    kind: str
    loss_increase: float
    loss_increase_stderr: float
    error_increase: float
    error_increase_stderr: float
    base_loss: float
    base_error: float
    num_groups: int
    per_group: Tensor
    p: float = 2.0


class _Group:
    """Evaluates one group's mean loss and error at perturbed weights ``w + e``."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, weights: dict[str, Tensor], inputs: Any, targets: Any
    ) -> None:
        self.model, self.loss_fn, self.weights = model, loss_fn, weights
        self.inputs, self.targets = inputs, targets
        self.size = batch_size(inputs)

    def __call__(self, e: list[Tensor] | None) -> tuple[Tensor, float]:
        params = self.weights if e is None else {name: w + t for (name, w), t in zip(self.weights.items(), e)}
        outputs = forward(self.model, self.inputs, params)
        loss = per_example_losses(self.loss_fn, outputs, self.targets, self.size).mean()
        return loss, error_rate(outputs.detach() if isinstance(outputs, Tensor) else outputs, self.targets)


class _Ball:
    """The ascent geometry: steps from the training rule, and the L_p ball of radius rho they are kept in.

    ``scale`` is ``T = |w| + eta`` when adaptive (the ball is ``||e / T||_p <= rho``), else None.
    """

    def __init__(self, weights: list[Tensor], p: float, rho: float, adaptive: bool, eta: float) -> None:
        self.weights, self.p, self.rho = weights, p, rho
        self.rule = Adaptive(DualNorm(p), eta) if adaptive else DualNorm(p)
        self.scale = [w.abs() + eta for w in weights] if adaptive else None

    def step(self, grads: list[Tensor], size: float) -> list[Tensor]:
        """The rule's perturbation of norm ``size`` for the gradients ``grads`` (which it overwrites)."""
        self.rule.perturb_(self.weights, grads, size)
        return grads

    def project(self, e: list[Tensor]) -> list[Tensor]:
        """``e`` brought back into the ball: clipped for p = inf, else rescaled when outside."""
        rho = self.rho
        if math.isinf(self.p):
            if self.scale is None:
                return [t.clamp(-rho, rho) for t in e]
            return [t.clamp(-rho * s, rho * s) for t, s in zip(e, self.scale)]
        scaled = (
            e if self.scale is None else [torch.where(s > 0, t / s, torch.zeros_like(t)) for t, s in zip(e, self.scale)]
        )
        norms = torch.stack([torch.linalg.vector_norm(t, ord=self.p) for t in scaled])
        total = torch.linalg.vector_norm(norms, ord=self.p).item()
        if total <= rho:
            return e
        return [t * (rho / total) for t in e]


def _worst_case(
    group: _Group, ball: _Ball, steps: int, step_size: float, base: tuple[float, float]
) -> tuple[float, float]:
    """Projected gradient ascent from ``e = 0`` (the first step is the SAM step of the rule at radius rho)."""
    best_loss, best_err = base
    e = [torch.zeros_like(w) for w in group.weights.values()]
    for step in range(steps):
        leaves = [t.detach().requires_grad_(True) for t in e]
        loss, err = group(leaves)
        if step > 0 and loss.item() > best_loss:
            best_loss, best_err = loss.item(), err
        if not loss.requires_grad:
            raise ValueError("the worst case needs a loss_fn that is differentiable in the model's outputs")
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        with torch.no_grad():
            if step == 0:
                e = ball.step(grads, ball.rho)
            else:
                e = ball.project([t + d for t, d in zip(e, ball.step(grads, step_size))])
    with torch.no_grad():
        loss, err = group(e)
    if loss.item() > best_loss:
        best_loss, best_err = loss.item(), err
    return best_loss, best_err


def _average_case(
    group: _Group,
    rho: float,
    num_samples: int,
    generator: torch.Generator,
    sigma_scale: float,
    scale: list[Tensor] | None,
    base: tuple[float, float],
) -> tuple[float, float]:
    """Mean loss and error increase over Gaussian draws (increases are averaged, so rho = 0 gives exactly 0)."""
    total_loss, total_err = 0.0, 0.0
    with torch.no_grad():
        for _ in range(num_samples):
            e = [
                torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) * (rho * sigma_scale)
                for w in group.weights.values()
            ]
            if scale is not None:
                e = [s * t for s, t in zip(scale, e)]
            loss, err = group(e)
            total_loss += loss.item() - base[0]
            total_err += err - base[1]
    return total_loss / num_samples, total_err / num_samples


def _resolve_p(norm: str | None, p: float | None) -> float:
    """The ball's ``p`` from ``norm`` ("l2", "linf") or ``p`` (any number in [1, inf]); 2 when neither is given."""
    if norm is not None and norm not in _NORMS:
        raise ValueError(f"norm must be one of {tuple(_NORMS)}, got {norm!r} (use p= for other L_p balls)")
    if p is None:
        return _NORMS[norm] if norm is not None else 2.0
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be a number in [1, inf], got {type(p).__name__}")
    if not float(p) >= 1.0:  # also rejects NaN
        raise ValueError(f"p must be a number in [1, inf] (p = inf for the L-inf ball), got {p}")
    if norm is not None and _NORMS[norm] != float(p):
        raise ValueError(f"norm={norm!r} and p={p} disagree; give one of them")
    return float(p)


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    m: int,
    rho: float,
    *,
    kind: str = "worst",
    norm: str | None = None,
    p: float | None = None,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    steps: int = 5,
    step_size: float | None = None,
    num_samples: int = 10,
    seed: int = 0,
    train_mode: bool = False,
) -> MSharpnessResult:
    """m-sharpness of ``model``: the loss and error increase under a perturbation of radius ``rho``, per group of m.

    Args:
        model: the network; its weights and modes are left exactly as they were.
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses (``reduction="none"``).
        data: ``(inputs, targets)`` or an iterable of such batches (read once); inputs may be a tuple of tensors
            (see ``flatminima.sharpness.data``). Examples are taken in order and split into consecutive groups
            of ``m``; a last incomplete group is dropped.
        m: group size (>= 1 and at most the number of examples).
        rho: radius of the perturbation (>= 0).
        kind: ``"worst"`` (projected gradient ascent) or ``"average"`` (Gaussian perturbations).
        norm: ball of the worst case by name, ``"l2"`` (p = 2) or ``"linf"`` (p = inf).
        p: ball of the worst case, any ``p`` in ``[1, inf]`` (the general form of ``norm``; default 2). The
            average case is Gaussian and needs ``p = 2``.
        adaptive: perturb in the ``|w|``-scaled space, ``e = (|w| + adaptive_eta) * e'`` with ``||e'||_p <= rho``.
        adaptive_eta: the ``eta`` of the adaptive scaling.
        steps: gradient steps of the worst case (the first is the SAM step of ``DualNorm(p)``: ``rho g/||g||`` for
            p = 2, ``rho sign g`` for p = inf; ``steps=1`` is plain SAM). The loss is the maximum over all
            iterates, ``e = 0`` included.
        step_size: norm of the later ascent steps before projection (default ``2 * rho / steps``).
        num_samples: Gaussian draws per group for the average case.
        seed: seed of the Gaussian draws.
        train_mode: measure in train mode (BatchNorm batch statistics over each group) instead of eval mode.
    """
    m = positive_int("m", m)
    rho = nonnegative_float("rho", rho)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    p = _resolve_p(norm, p)
    if kind == "average" and p != 2.0:
        raise ValueError(
            f"the average case uses Gaussian perturbations (p = 2); p={p} (norm='linf' is p = inf) applies to "
            "kind='worst' only"
        )
    adaptive_eta = nonnegative_float("adaptive_eta", adaptive_eta)
    steps = positive_int("steps", steps)
    num_samples = positive_int("num_samples", num_samples)
    step_size = 2.0 * rho / steps if step_size is None else nonnegative_float("step_size", step_size, positive=True)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")

    trainable = trainable_parameters(model)
    device = next(iter(trainable.values())).device
    dim = sum(t.numel() for t in trainable.values())
    generator = torch.Generator().manual_seed(seed)
    batches = Batches(data, once=True)

    rows: list[tuple[float, float, float, float]] = []
    with measuring(model, train_mode, restore_parameters=True):
        weights = {name: t.detach() for name, t in trainable.items()}
        ball = _Ball(list(weights.values()), p, rho, adaptive, adaptive_eta)
        for inputs, targets in groups_of(batches, m):
            group = _Group(model, loss_fn, weights, cast(inputs, device), cast(targets, device))
            with torch.no_grad():
                base_loss_t, base_err = group(None)
            base_loss = base_loss_t.item()
            if not math.isfinite(base_loss):
                raise ValueError(f"the loss of group {len(rows)} at the unperturbed weights is {base_loss}")
            base = (base_loss, base_err)
            if kind == "worst":
                loss, err = _worst_case(group, ball, steps, step_size, base)
                loss_inc, err_inc = loss - base_loss, err - base_err
            else:
                sigma_scale = 1.0 / math.sqrt(dim)
                loss_inc, err_inc = _average_case(group, rho, num_samples, generator, sigma_scale, ball.scale, base)
            rows.append((loss_inc, err_inc, base_loss, base_err))

    if not rows:
        raise ValueError(f"m={m} exceeds the number of examples in data: no complete group of m examples")
    table = torch.tensor(rows, dtype=torch.float64)
    loss_inc, loss_se = mean_stderr(table[:, 0])
    err_inc, err_se = mean_stderr(table[:, 1])
    return MSharpnessResult(
        m=m,
        rho=rho,
        kind=kind,
        loss_increase=loss_inc,
        loss_increase_stderr=loss_se,
        error_increase=err_inc,
        error_increase_stderr=err_se,
        base_loss=table[:, 2].mean().item(),
        base_error=table[:, 3].mean().item(),
        num_groups=len(rows),
        per_group=table[:, :2].clone(),
        p=p,
    )
