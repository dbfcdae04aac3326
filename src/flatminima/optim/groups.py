"""SAM's per-group options: checked, defaulted, and turned into the ascent rules they describe.

Per-group options are plain values, so that a ``state_dict`` loads with ``torch.load(weights_only=True)``:

- ``rho``: radius (0 or ``perturb=False`` excludes the group from the perturbation, e.g. norms and biases);
- ``p``: the L_p ball of the ascent (``DualNorm``);
- ``adaptive`` and ``adaptive_eta``: ASAM scaling (``Adaptive``), ``T_w = |w| + eta``
  with the ASAM paper's ``eta = 0.01`` by default; ``adaptive_eta=0`` is the reference code's (davda54/sam,
  pytorch_optimizer) ``T_w = |w|`` (the Variants page of the documentation);
- ``normalize``: ``False`` gives USAM, ``e = rho g`` (``Unnormalized``).

Groups whose rules coincide share one rule object, so they are normalised together (one global norm, as in the
paper); a rule passed as ``perturbation=`` replaces these for every group.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from flatminima.optim.perturb import Adaptive, DualNorm, Unnormalized
from flatminima.optim.rules import AscentCapabilities, AscentRule

__all__ = [
    "GROUP_KEYS",
    "RuleBook",
    "add_group",
    "build_base",
    "check_dense",
    "check_group",
    "check_lrs",
    "check_rho",
    "check_seams",
    "fill_group",
]

_RULE_KEYS = ("p", "adaptive", "adaptive_eta", "normalize")
GROUP_KEYS = ("rho", *_RULE_KEYS, "perturb")


class RuleBook:
    """The ascent rule of each parameter group (``perturbation``, or one built from the group's options), and what
    each rule declares, both read once and cached."""

    def __init__(self, perturbation: Any = None) -> None:
        self.perturbation = perturbation
        self._rules: dict[tuple, AscentRule] = {}
        self._declared: dict[tuple[Any, type], Any] = {}

    def rule_for(self, group: dict[str, Any]) -> AscentRule:
        if self.perturbation is not None:
            return self.perturbation
        key = tuple(group[k] for k in _RULE_KEYS)
        rule = self._rules.get(key)
        if rule is None:
            rule = DualNorm(group["p"]) if group["normalize"] else Unnormalized()
            if group["adaptive"]:
                rule = Adaptive(rule, eta=group["adaptive_eta"])
            self._rules[key] = rule
        return rule

    def declared(self, rule: Any, kind: type = AscentCapabilities) -> Any:
        """What ``rule`` declares (for ``None``, no rule: nothing), read once per rule."""
        declared = self._declared.get((rule, kind))
        if declared is None:
            declared = self._declared[(rule, kind)] = kind.of(rule)
        return declared

    def active(self, groups: list[dict[str, Any]]) -> set[Any]:
        """The rules of the groups that are perturbed now (``perturb`` and ``rho > 0``)."""
        return {self.rule_for(g) for g in groups if g["perturb"] and g["rho"] != 0}


def build_base(
    params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer, base_kwargs: dict[str, Any]
) -> Optimizer:
    """The base optimiser: ``base_optimizer`` itself when it is an instance, else built on ``params``."""
    from flatminima.optim.sam import SAM

    if isinstance(base_optimizer, Optimizer):
        if isinstance(base_optimizer, SAM):
            raise TypeError("base_optimizer is already a SAM optimiser; wrap the plain optimiser instead.")
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an instance, so its options must go to its own constructor; "
                f"got extra keyword arguments {sorted(base_kwargs)}."
            )
        if params is not None:
            given = {id(p) for p in _flatten_params(params)}
            held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != held:
                raise ValueError(
                    "params differ from the parameters the base optimiser instance holds; pass params=None "
                    "to use the instance's parameter groups."
                )
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if params is None:
            raise ValueError("params is None but base_optimizer is a class: pass the parameters to optimise.")
        return base_optimizer(params, **base_kwargs)
    raise TypeError(
        f"base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance of "
        f"one; got {base_optimizer!r}."
    )


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    flat: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            value = item["params"]
            flat.extend([value] if isinstance(value, Tensor) else list(value))
        else:
            flat.append(item)
    return flat


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_rho(rho: Any, where: str = "got") -> None:
    """A radius is a finite float >= 0 (a tensor would make each step sync; inf or NaN ruin the weights)."""
    if not _is_real(rho) or not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(
            f"rho must be a finite float >= 0 (0 gives the base optimiser); {where} rho={rho!r}. "
            "Fix the value, the param group or the rho scheduler."
        )


def check_lrs(groups: list[dict[str, Any]], where: str = "a param group has") -> None:
    """Every group's learning rate is a finite number >= 0, checked before the base optimiser steps: a NaN or
    infinite lr would turn every weight NaN in one step. (A tensor lr, for capturable optimisers, is the user's
    to keep finite: reading it would synchronise every step.)"""
    for group in groups:
        lr = group.get("lr", 0.0)
        if isinstance(lr, Tensor):
            continue
        if not _is_real(lr) or not (math.isfinite(lr) and lr >= 0):
            raise ValueError(
                f"lr must be a finite number >= 0; {where} lr={lr!r}. Fix the value, the param group or the "
                "learning-rate scheduler."
            )


def check_dense(params: list[Tensor]) -> None:
    """The clear message for sparse gradients (nn.Embedding(sparse=True)), on every path."""
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise RuntimeError("SAM does not support sparse gradients; use dense embeddings.")


def check_group(group: dict[str, Any]) -> None:
    p, eta = group["p"], group["adaptive_eta"]
    check_rho(group["rho"])
    check_lrs([group], "got")
    if not _is_real(p) or not p >= 1:
        raise ValueError(f"p must be a number in [1, inf] (2 is SAM, inf the sign rule); got p={p!r}.")
    if not _is_real(eta) or not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"adaptive_eta must be a finite number >= 0; got {eta!r}.")


def fill_group(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Give ``group`` the SAM options it does not set, then check them."""
    for key, value in defaults.items():
        group.setdefault(key, value)
    check_group(group)


def check_seams(perturbation: Any, descent: Any, cadence: Any) -> None:
    """The three seams given to SAM are what they claim to be (or None, for SAM's own)."""
    if perturbation is not None and not callable(getattr(perturbation, "perturb_", None)):
        raise TypeError(f"perturbation must have a perturb_(params, grads, rho) method; got {perturbation!r}.")
    if descent is not None and not callable(getattr(descent, "direction_", None)):
        raise TypeError(f"descent must be a DescentRule (a direction_ method); got {descent!r}.")
    if cadence is not None and not callable(getattr(cadence, "takes_ascent", None)):
        raise TypeError(f"cadence must be a Cadence (a takes_ascent(step) method); got {cadence!r}.")


def add_group(sam: Any, param_group: dict[str, Any]) -> None:
    """``SAM.add_param_group``: the group gets SAM's options, is checked, and joins the base optimiser's."""
    from flatminima.optim import sharded

    if sam.flat_layout is not None:
        raise ValueError("add_param_group is not supported with flatten=True; build SAM with all groups.")
    fill_group(param_group, {key: sam.defaults[key] for key in GROUP_KEYS})
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    groups = sharded.shard_groups([*params, *(p for g in sam.param_groups for p in g["params"])])
    if groups is not None:
        sharded.check_shardable(sam.rules, sam.descent, [*sam.param_groups, param_group])
    sam.base_optimizer.add_param_group(param_group)
    sam.shard_groups = groups
    if not sam.is_perturbed:  # the weights' storage follows how the parameters are stored now
        sam._weights = sam._plain_store()
