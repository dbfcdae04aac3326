"""The optimiser names that the command line, the training config and ``--help`` offer.

A variant registers itself once, in the module that defines it:

    register_optimizer("rsam", "SAM along a random direction (no first pass)", build_random, sharpness_aware=True)

``build`` receives an ``OptimizerRequest`` (the model, the base optimiser chosen by the config with its
options, rho, p, the whole training config for a variant's own fields, and a sampler of training examples) and
returns the optimiser, most simply ``request.sam(perturbation=..., descent=..., cadence=...)``, which applies every
setting the run gives (rho, p, the model, the non-finite policy, the base optimiser and its options); an optional
``batch_rule`` builder does the same for the variant's ``BatchRule``, and an optional
``trajectory`` builder, for a name the plain step drives, for its ``TrajectoryLoss``
(SAF, MESA: a term added to the loss, from the batch's outputs).

Registering a name again from the module that registered it (a module imported twice, a notebook cell run again)
replaces the entry; from another module it is an error. Variants installed as packages of their own are found
through the entry-point group ``flatminima.variants`` (each entry a module, or a function taking no argument,
that registers its names), loaded the first time a name is looked up.
``sharpness_aware`` tells the training loop which batch step drives it: ``SharpnessAwareStep``
(two passes, m-SAM groups, rho schedule) or ``PlainStep``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OptimizerRequest",
    "OptimizerSpec",
    "load_plugins",
    "optimizer_help",
    "optimizer_names",
    "optimizer_spec",
    "option",
    "option_fields",
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
    options: Any = None  # the variant's options (an instance of its registered dataclass), or None
    nonfinite: str = "raise"  # SAM's policy for inf/NaN gradients (request.sam passes it)

    def base(self) -> torch.optim.Optimizer:
        """The base optimiser alone, on the model's parameters, with the run's options."""
        return self.base_class(self.model.parameters(), **self.base_options)

    def sam(self, **options: Any) -> torch.optim.Optimizer:
        """A ``SAM`` around the requested base optimiser with every setting of the run:
        rho, p, the model (its BatchNorm statistics kept from the first pass) and the non-finite policy;
        ``options`` go to ``SAM`` and win (``perturbation=``, ``descent=``, ``cadence=``, ``adaptive=``...)."""
        from flatminima.optim.sam import SAM

        settings: dict[str, Any] = dict(rho=self.rho, p=self.p, model=self.model, nonfinite=self.nonfinite)
        settings.update(options)
        return SAM(self.model.parameters(), self.base_class, **settings, **self.base_options)


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered name: its one-line help, its builder, and which batch step drives it."""

    name: str
    help: str
    build: Callable[[OptimizerRequest], torch.optim.Optimizer]
    sharpness_aware: bool
    batch_rule: Callable[[OptimizerRequest], Any] | None = None  # -> a flatminima.batch_rules.BatchRule
    passes: str = "1"  # forward-backward passes per step, as the variant states them (flatminima variants)
    module: str = ""  # the module that registered the name
    options: type | None = None  # the dataclass of the variant's own options (command-line flags, YAML fields)
    trajectory: Callable[[OptimizerRequest], Any] | None = None  # -> a flatminima.trajectory.TrajectoryLoss


_REGISTRY: dict[str, OptimizerSpec] = {}
_PLUGIN_GROUP = "flatminima.variants"
_plugins_loaded = False


def register_optimizer(
    name: str,
    help: str,
    build: Callable[[OptimizerRequest], torch.optim.Optimizer],
    *,
    sharpness_aware: bool,
    batch_rule: Callable[[OptimizerRequest], Any] | None = None,
    passes: str | None = None,
    options: type | None = None,
    trajectory: Callable[[OptimizerRequest], Any] | None = None,
) -> OptimizerSpec:
    """Offer ``name`` to ``flatminima train --optimizer``; a name is registered once (a second is an error).

    ``batch_rule``, for variants that choose the examples of each pass (n-SAM, RW-SAM, a single example):
    ``batch_rule(request)`` returns the ``BatchRule`` the batch step is given.
    ``passes``: the forward-backward passes per step, in words (default "2" for a sharpness-aware name, else "1"),
    listed by ``flatminima variants``. ``options``: a dataclass of the variant's own settings, each field made
    with ``option`` (default, help, a check); every field becomes a ``flatminima train`` flag and a YAML field
    of the same name, validated and listed in ``--help``, and the builder reads them as ``request.options``.
    ``trajectory``, for variants that add a term to the loss (SAF, MESA; the plain step only, so
    ``sharpness_aware=False``): ``trajectory(request)`` returns the ``TrajectoryLoss``
    the plain step is given.
    """
    module = sys._getframe(1).f_globals.get("__name__", "")
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"an optimiser name is lower-case letters, digits, '-' or '_'; got {name!r}")
    if name in _REGISTRY and _REGISTRY[name].module != module:
        raise ValueError(f"optimiser {name!r} is already registered (by {_REGISTRY[name].module})")
    if not callable(build):
        raise TypeError(f"build must be callable as build(request) -> optimizer, got {type(build).__name__}")
    if options is not None:
        _check_options(name, options)
    if batch_rule is not None and not sharpness_aware:
        raise ValueError(f"optimiser {name!r}: a batch rule needs the sharpness-aware step (sharpness_aware=True)")
    if trajectory is not None and sharpness_aware:
        raise ValueError(f"optimiser {name!r}: a trajectory loss is driven by the plain step (sharpness_aware=False)")
    if trajectory is not None and not callable(trajectory):
        raise TypeError(f"trajectory must be callable as trajectory(request) -> TrajectoryLoss, got {trajectory!r}")
    passes = passes if passes is not None else ("2" if sharpness_aware else "1")
    spec = OptimizerSpec(name, help, build, sharpness_aware, batch_rule, passes, module, options, trajectory)
    _REGISTRY[name] = spec
    return spec


def unregister_optimizer(name: str) -> None:
    """Withdraw ``name`` (a plugin unloading, a test cleaning up); an unknown name is an error."""
    optimizer_spec(name)
    del _REGISTRY[name]


def optimizer_names() -> tuple[str, ...]:
    """The registered names, in registration order (those of installed plugins included)."""
    load_plugins()
    return tuple(_REGISTRY)


def optimizer_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; an unknown name is an error that lists the known ones."""
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(_REGISTRY)}") from None


def option(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], bool] | None = None,
    why: str = "",
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A field of a variant's options dataclass: its default, its help text, and what makes a value valid
    (``check(value)``, with ``why``, e.g. ``"must be >= 1"``, for the error message) or the ``choices``."""
    return field(default=default, metadata={"help": help, "check": check, "why": why, "choices": choices})


def option_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every registered variant's option fields: name -> (its dataclass, the field), in registration order."""
    load_plugins()
    found: dict[str, tuple[type, dataclasses.Field]] = {}
    for spec in _REGISTRY.values():
        if spec.options is not None:
            for option_field in dataclasses.fields(spec.options):
                found.setdefault(option_field.name, (spec.options, option_field))
    return found


def _check_options(name: str, options: type) -> None:
    if not dataclasses.is_dataclass(options) or not isinstance(options, type):
        raise TypeError(f"optimiser {name!r}: options must be a dataclass (fields made with option()); got {options!r}")
    for option_field in dataclasses.fields(options):
        if "help" not in option_field.metadata:
            raise TypeError(f"optimiser {name!r}: option {option_field.name!r} needs a help text: use option()")
        owner = next(
            (spec for spec in _REGISTRY.values() if spec.options is not None and spec.options is not options
             and spec.name != name and option_field.name in {f.name for f in dataclasses.fields(spec.options)}),
            None,
        )  # fmt: skip
        if owner is not None:
            raise ValueError(
                f"optimiser {name!r}: option {option_field.name!r} is already an option of {owner.name!r}; "
                "prefix the variant's options with its name"
            )


def load_plugins() -> None:
    """Load, once, the variants installed under the ``flatminima.variants`` entry-point group; a plugin that fails
    to load is reported with its name and error, not hidden."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=_PLUGIN_GROUP):
        try:
            loaded = entry.load()
            if callable(loaded) and not isinstance(loaded, type(sys)):
                loaded()
        except Exception as error:
            raise RuntimeError(
                f"the flatminima variant plugin {entry.name!r} ({entry.value}) failed to load: {error}"
            ) from error


def optimizer_help() -> str:
    """``name (help), ...`` for every registered optimiser: the ``--optimizer`` help text."""
    return ", ".join(f"{spec.name} ({spec.help})" for spec in _REGISTRY.values())
