"""m-sharpness (Foret et al. 2021, "Sharpness-Aware Minimization", sec. 4.1).

The examples are split into consecutive groups of ``m``; for each group ``k`` the sharpness is the increase of the
group's mean loss ``L_k`` when the weights ``w`` are perturbed by ``e``:

* worst case: ``max_{||e|| <= rho} L_k(w + e) - L_k(w)``, estimated by projected gradient ascent in the L2 or
  L-inf ball. With ``adaptive=True`` the ball lives in the ``|w|``-scaled space (ASAM): ``e = T e'`` with
  ``||e'|| <= rho`` and ``T = |w| + eta`` elementwise.
* average case: ``E_e L_k(w + e) - L_k(w)`` with Gaussian ``e ~ N(0, sigma^2 I)``, ``sigma = rho / sqrt(dim)`` so
  that ``E||e||^2 = rho^2`` (``dim`` = number of trainable weights); adaptive: ``e = T e'`` with ``e'`` as above.

Both are reported for the loss and for the 0-1 error, averaged over groups with their standard error.

The model's own parameters are never written: perturbed weights are passed with
:func:`torch.func.functional_call`. Parameters, buffers (BatchNorm running statistics, which update in train
mode) and the train/eval mode of every submodule are still saved and restored exactly, also on exceptions.

The helpers in this module (data handling, model preservation, evaluation) are shared with
:mod:`flatminima.sharpness.landscape`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["MSharpnessResult", "m_sharpness"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
Data = Batch | Iterable[Batch]

_KINDS = ("worst", "average")
_NORMS = ("l2", "linf")


@dataclass
class MSharpnessResult:
    """m-sharpness of a model; increases are means over groups, ``*_stderr`` their standard errors.

    ``per_group`` has shape ``(num_groups, 2)``: the loss increase and the error increase of each group. The
    standard errors are ``std / sqrt(num_groups)`` (NaN for a single group). Error values are NaN when the task
    is not classification (targets not integer class indices matching ``outputs.argmax(1)``).
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


# ---------------------------------------------------------------------------------------------------------------
# shared helpers (also used by landscape.py)


def _check_batch(batch: object) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"each batch must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
    inputs, targets = batch
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"each batch must be a pair (inputs, targets) of tensors, got ({type(inputs).__name__}, "
            f"{type(targets).__name__})"
        )
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets need the same leading (batch) dimension, got shapes {tuple(inputs.shape)} and "
            f"{tuple(targets.shape)}"
        )
    return inputs, targets


def _is_single_batch(data: object) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def _iter_batches(data: Data) -> Iterator[Batch]:
    """Yield the (inputs, targets) batches of ``data``: one pair of tensors, or an iterable of such pairs."""
    if _is_single_batch(data):
        yield _check_batch(data)
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a pair (inputs, targets) of tensors or an iterable of such pairs, got {type(data).__name__}"
        )
    for batch in data:
        inputs, targets = _check_batch(batch)
        if inputs.shape[0] > 0:
            yield inputs, targets


def _reiterable(data: Data) -> Data:
    """``data`` in a form that can be iterated more than once (a one-shot iterator is read into a list)."""
    if _is_single_batch(data):
        return data
    if isinstance(data, Iterator):
        return list(data)
    return data


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name, in ``model.parameters()`` order (shared parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True) to perturb")
    return params


@contextmanager
def _preserved(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode; afterwards restore every module's mode, parameter and buffer exactly."""
    modes = [(module, module.training) for module in model.modules()]
    saved = [(t, t.detach().clone()) for t in chain(model.parameters(), model.buffers())]
    try:
        model.train(train_mode)
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
        for module, mode in modes:
            module.training = mode


def _forward(model: nn.Module, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
    return functional_call(model, params, (inputs,))


def _per_example_loss(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn``'s per-example losses as a 1-D tensor (extra dimensions are averaged)."""
    losses = loss_fn(outputs, targets)
    n = targets.shape[0]
    if not isinstance(losses, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(losses).__name__}")
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(
            f"loss_fn must return per-example losses (reduction='none') of leading size {n}, got shape "
            f"{tuple(losses.shape)}"
        )
    return losses.reshape(n, -1).mean(dim=1) if losses.dim() > 1 else losses


def _error_rate(outputs: Tensor, targets: Tensor) -> float:
    """0-1 error of ``outputs.argmax(1)`` against integer ``targets``; NaN when that is not defined."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return math.nan
    if outputs.dim() != targets.dim() + 1 or outputs.shape[0] != targets.shape[0]:
        return math.nan
    if outputs.shape[2:] != targets.shape[1:]:
        return math.nan
    return (outputs.argmax(dim=1) != targets).double().mean().item()


def _device(params: dict[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


# ---------------------------------------------------------------------------------------------------------------
# m-sharpness


def _groups(data: Data, m: int, device: torch.device) -> Iterator[Batch]:
    """Consecutive groups of exactly ``m`` examples across batch boundaries; a last short group is dropped."""
    buf_x: list[Tensor] = []
    buf_y: list[Tensor] = []
    count = 0
    for inputs, targets in _iter_batches(data):
        buf_x.append(inputs)
        buf_y.append(targets)
        count += inputs.shape[0]
        if count < m:
            continue
        x, y = torch.cat(buf_x), torch.cat(buf_y)
        full = (count // m) * m
        for start in range(0, full, m):
            yield x[start : start + m].to(device), y[start : start + m].to(device)
        buf_x, buf_y = [x[full:]], [y[full:]]
        count -= full


def _normalized(grads: list[Tensor], norm: str) -> list[Tensor]:
    """The steepest-ascent unit step for ``grads``: ``g / ||g||_2`` (zero for zero g) or ``sign(g)``."""
    if norm == "linf":
        return [g.sign() for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if total == 0:
        return [torch.zeros_like(g) for g in grads]
    return [g / total for g in grads]


def _project(e: list[Tensor], rho: float, norm: str) -> list[Tensor]:
    """Euclidean projection onto the ``norm`` ball of radius ``rho``."""
    if norm == "linf":
        return [t.clamp(-rho, rho) for t in e]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in e])).item()
    if total <= rho:
        return e
    return [t * (rho / total) for t in e]


class _Group:
    """Evaluates one group's mean loss and error at perturbed weights ``w + T e``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        weights: dict[str, Tensor],
        scale: list[Tensor] | None,
        inputs: Tensor,
        targets: Tensor,
    ) -> None:
        self.model, self.loss_fn, self.weights, self.scale = model, loss_fn, weights, scale
        self.inputs, self.targets = inputs, targets

    def __call__(self, e: list[Tensor] | None) -> tuple[Tensor, float]:
        if e is None:
            params = self.weights
        else:
            steps = e if self.scale is None else [s * t for s, t in zip(self.scale, e)]
            params = {name: w + t for (name, w), t in zip(self.weights.items(), steps)}
        outputs = _forward(self.model, params, self.inputs)
        loss = _per_example_loss(self.loss_fn, outputs, self.targets).mean()
        return loss, _error_rate(outputs.detach(), self.targets)


def _worst_case(
    group: _Group, rho: float, norm: str, steps: int, step_size: float, base: tuple[float, float]
) -> tuple[float, float]:
    """Projected gradient ascent from ``e = 0`` (the first step is the SAM step onto the sphere)."""
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
        direction = _normalized([torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)], norm)
        with torch.no_grad():
            if step == 0:
                e = [rho * d for d in direction]
            else:
                e = _project([t + step_size * d for t, d in zip(e, direction)], rho, norm)
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
            loss, err = group(e)
            total_loss += loss.item() - base[0]
            total_err += err - base[1]
    return total_loss / num_samples, total_err / num_samples


def _mean_stderr(values: Tensor) -> tuple[float, float]:
    mean = values.mean().item()
    if values.numel() < 2:
        return mean, math.nan
    return mean, (values.std(unbiased=True) / math.sqrt(values.numel())).item()


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_nonneg_float(name: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    m: int,
    rho: float,
    *,
    kind: str = "worst",
    norm: str = "l2",
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
        data: ``(inputs, targets)`` or an iterable of such batches (read once). Examples are taken in order and
            split into consecutive groups of ``m``; a last incomplete group is dropped.
        m: group size (>= 1 and at most the number of examples).
        rho: radius of the perturbation (>= 0).
        kind: ``"worst"`` (projected gradient ascent) or ``"average"`` (Gaussian perturbations).
        norm: ball of the worst case, ``"l2"`` or ``"linf"``; the average case is Gaussian and needs ``"l2"``.
        adaptive: perturb in the ``|w|``-scaled space, ``e = (|w| + adaptive_eta) * e'`` with ``||e'|| <= rho``.
        adaptive_eta: the ``eta`` of the adaptive scaling.
        steps: gradient steps of the worst case (the first is the SAM step ``rho g/||g||`` or ``rho sign g``;
            ``steps=1`` is plain SAM). The loss is the maximum over all iterates, ``e = 0`` included.
        step_size: size of the later normalised steps before projection (default ``2 * rho / steps``).
        num_samples: Gaussian draws per group for the average case.
        seed: seed of the Gaussian draws.
        train_mode: measure in train mode (BatchNorm batch statistics over each group) instead of eval mode.
    """
    m = _check_positive_int("m", m)
    rho = _check_nonneg_float("rho", rho)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if kind == "average" and norm != "l2":
        raise ValueError("the average case uses Gaussian perturbations; norm='linf' applies to kind='worst' only")
    adaptive_eta = _check_nonneg_float("adaptive_eta", adaptive_eta)
    steps = _check_positive_int("steps", steps)
    num_samples = _check_positive_int("num_samples", num_samples)
    step_size = 2.0 * rho / steps if step_size is None else _check_nonneg_float("step_size", step_size, positive=True)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")

    trainable = _trainable(model)
    device = _device(trainable)
    dim = sum(p.numel() for p in trainable.values())
    generator = torch.Generator().manual_seed(seed)

    rows: list[tuple[float, float, float, float]] = []
    with _preserved(model, train_mode):
        weights = {name: p.detach() for name, p in trainable.items()}
        scale = [w.abs() + adaptive_eta for w in weights.values()] if adaptive else None
        for inputs, targets in _groups(data, m, device):
            group = _Group(model, loss_fn, weights, scale, inputs, targets)
            with torch.no_grad():
                base_loss_t, base_err = group(None)
            base_loss = base_loss_t.item()
            if not math.isfinite(base_loss):
                raise ValueError(f"the loss of group {len(rows)} at the unperturbed weights is {base_loss}")
            if kind == "worst":
                loss, err = _worst_case(group, rho, norm, steps, step_size, (base_loss, base_err))
                loss_inc, err_inc = loss - base_loss, err - base_err
            else:
                base = (base_loss, base_err)
                loss_inc, err_inc = _average_case(group, rho, num_samples, generator, 1.0 / math.sqrt(dim), base)
            rows.append((loss_inc, err_inc, base_loss, base_err))

    if not rows:
        raise ValueError(f"m={m} exceeds the number of examples in data: no complete group of m examples")
    table = torch.tensor(rows, dtype=torch.float64)
    loss_inc, loss_se = _mean_stderr(table[:, 0])
    err_inc, err_se = _mean_stderr(table[:, 1])
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
    )
