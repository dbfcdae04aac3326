"""The Gaussian posterior ``N(w, 1/(N s))`` that bSAM's base optimiser keeps: its variance, draws, predictive.

bSAM (Möllenhoff and Khan 2023) trains the mean ``w`` (the model's weights) and, per parameter, the precision
``s`` (``flatminima.optim.bsam_base``); with the data-set size ``N`` they give a diagonal Gaussian over the
weights, for free. These functions read it from a ``BSAMBase`` or from a ``BSAM`` around one (any optimiser whose
groups hold ``num_data`` and whose state holds ``"precision"``):

- ``posterior_variance(optimizer)``: ``1 / (N s)`` per parameter, in the optimiser's parameter order;
- ``posterior_sample(optimizer)``: new tensors ``w + sqrt(1 / (N s)) z``, ``z ~ N(0, I)``, the weights untouched;
- ``sample_weights(optimizer)``: a context manager in which the parameters hold such a draw, restored exactly
  on leaving it;
- ``predictive(model, optimizer, inputs, samples=K)``: the Bayesian model average, the mean of the softmax
  outputs over ``K`` draws (the authors' ``test.py`` reports it with ``K = 32``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.optim.bsam_base import PRECISION

__all__ = ["posterior_sample", "posterior_std", "posterior_variance", "predictive", "sample_weights"]


def _posterior(optimizer: Any, params: list[Tensor] | None = None) -> list[tuple[Tensor, Tensor, float]]:
    """``(parameter, s, N)`` for each parameter of ``optimizer`` (or of ``params``, which it must hold)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None or any("num_data" not in group for group in groups):
        raise TypeError(
            f"{type(optimizer).__name__} keeps no posterior: build it as flatminima.variants.bsam.BSAM or "
            "flatminima.optim.bsam_base.BSAMBase (its groups hold num_data, its state the precision s)."
        )
    entries = []
    for group in groups:
        for p in group["params"]:
            s = optimizer.state[p].get(PRECISION)
            if s is None:
                raise RuntimeError(
                    "a parameter of the optimiser has no precision s in its state; was it built as BSAM?"
                )
            entries.append((p, s, float(group["num_data"])))
    if params is None:
        return entries
    wanted = {id(p) for p in params}
    chosen = [entry for entry in entries if id(entry[0]) in wanted]
    if len(chosen) != len(wanted):
        raise ValueError("posterior_sample: params must be parameters of the optimiser.")
    return chosen


def posterior_std(precision: Tensor, num_data: float) -> Tensor:
    """``sqrt(1 / (N s))``, the posterior's standard deviation."""
    return (precision * num_data).reciprocal().sqrt()


def posterior_variance(optimizer: Any) -> list[Tensor]:
    """``1 / (N s)`` for each parameter, in the order of the optimiser's groups (new tensors)."""
    return [(s * n).reciprocal() for _, s, n in _posterior(optimizer)]


@torch.no_grad()
def posterior_sample(
    optimizer: Any, *, generator: torch.Generator | None = None, params: list[Tensor] | None = None
) -> list[Tensor]:
    """A draw ``w + sqrt(1 / (N s)) z`` for each parameter (or each of ``params``), ``z`` from ``generator``
    (torch's default generator of each parameter's device when None), drawn in parameter order in the
    parameter's dtype on the generator's device; the weights are not touched."""
    drawn = []
    for p, s, n in _posterior(optimizer, params):
        device = generator.device if generator is not None else p.device
        z = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device).to(p.device)
        drawn.append(torch.addcmul(p, posterior_std(s, n), z))
    return drawn


@contextlib.contextmanager
def sample_weights(optimizer: Any, *, generator: torch.Generator | None = None) -> Iterator[list[Tensor]]:
    """Inside the block the parameters hold a draw from the posterior (yielded); on leaving it the weights are
    the mean again, exactly (each parameter's own tensor is put back). Not during a SAM step."""
    if getattr(optimizer, "is_perturbed", False):
        raise RuntimeError("sample_weights: the optimiser is in the middle of a step (weights at w + e); finish it.")
    params = [p for p, _, _ in _posterior(optimizer)]
    drawn = posterior_sample(optimizer, generator=generator)
    own = [p.data for p in params]
    try:
        for p, sample in zip(params, drawn):
            p.data = sample
        yield drawn
    finally:
        for p, mean in zip(params, own):
            p.data = mean


@torch.no_grad()
def predictive(
    model: nn.Module, optimizer: Any, inputs: Tensor, *, samples: int = 32, generator: torch.Generator | None = None
) -> Tensor:
    """The mean over ``samples`` posterior draws of ``softmax(model(inputs))`` (in at least float32); set the
    model's mode (``model.eval()``) first. ``optimizer`` holds ``model``'s parameters."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"predictive: samples (K, the draws averaged) must be an integer >= 1; got {samples!r}.")
    total: Tensor | None = None
    for _ in range(samples):
        with sample_weights(optimizer, generator=generator):
            logits = model(inputs)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.div_(samples)
