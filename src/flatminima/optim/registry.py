"""The optimiser names that the command line, the training config and ``--help`` offer.

A variant registers itself once, in the module that defines it:

    register_optimizer("rsam", "SAM along a random direction (no first pass)", build_random, sharpness_aware=True)

``build`` receives an :class:`OptimizerRequest` (the model, the base optimiser chosen by the config with its
options, rho, p, the whole training config for a variant's own fields, and a sampler of training examples) and
returns the optimiser; an optional ``batch_rule`` builder does the same for the variant's
:class:`~flatminima.batch_rules.BatchRule`.
``sharpness_aware`` tells the training loop which batch step drives it: :class:`~flatminima.step.SharpnessAwareStep`
(two passes, m-SAM groups, rho schedule) or :class:`~flatminima.step.PlainStep`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OptimizerRequest",
    "OptimizerSpec",
    "optimizer_help",
    "optimizer_names",
    "optimizer_spec",
    "register_optimizer",
    "unregister_optimizer",
]


@dataclass(frozen=True)
class OptimizerRequest:
    """What a builder gets: build ``base_class(params, **base_options)`` itself, or a SAM around it."""

    model: nn.Module
    base_class: type[torch.optim.Optimizer]
    base_options: dict[str, Any]
    rho: float
    p: float
    config: Any  # the full training config (a TrainConfig), for fields of a variant's own
    draw_examples: Callable[[int | None, torch.Generator], tuple[Tensor, Tensor]] | None = None
    train_size: int = 0  # examples in the training split (what draw_examples draws from)
    rank: int = 0  # this process's rank under torchrun, for per-rank draws
    nonfinite: str = "raise"  # SAM's policy for inf/NaN gradients (pass it as SAM(nonfinite=...))


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered name: its one-line help, its builder, and which batch step drives it."""

    name: str
    help: str
    build: Callable[[OptimizerRequest], torch.optim.Optimizer]
    sharpness_aware: bool
    batch_rule: Callable[[OptimizerRequest], Any] | None = None  # -> a flatminima.batch_rules.BatchRule


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(
    name: str,
    help: str,
    build: Callable[[OptimizerRequest], torch.optim.Optimizer],
    *,
    sharpness_aware: bool,
    batch_rule: Callable[[OptimizerRequest], Any] | None = None,
) -> OptimizerSpec:
    """Offer ``name`` to ``flatminima train --optimizer``; a name is registered once (a second is an error).

    ``batch_rule``, for variants that choose the examples of each pass (n-SAM, RW-SAM, a single example):
    ``batch_rule(request)`` returns the :class:`~flatminima.batch_rules.BatchRule` the batch step is given.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"an optimiser name is lower-case letters, digits, '-' or '_'; got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"optimiser {name!r} is already registered (by {_REGISTRY[name].build.__module__})")
    if not callable(build):
        raise TypeError(f"build must be callable as build(request) -> optimizer, got {type(build).__name__}")
    if batch_rule is not None and not sharpness_aware:
        raise ValueError(f"optimiser {name!r}: a batch rule needs the sharpness-aware step (sharpness_aware=True)")
    spec = OptimizerSpec(name, help, build, sharpness_aware, batch_rule)
    _REGISTRY[name] = spec
    return spec


def unregister_optimizer(name: str) -> None:
    """Withdraw ``name`` (a plugin unloading, a test cleaning up); an unknown name is an error."""
    optimizer_spec(name)
    del _REGISTRY[name]


def optimizer_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def optimizer_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name is an error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(_REGISTRY)}") from None


def optimizer_help() -> str:
    """``name (help), ...`` for every registered optimiser: the ``--optimizer`` help text."""
    return ", ".join(f"{spec.name} ({spec.help})" for spec in _REGISTRY.values())
