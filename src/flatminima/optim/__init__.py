"""Sharpness-aware optimisers: the SAM protocol, the rules it composes, and the maths behind them."""

from flatminima.optim import catalog  # noqa: F401  (registers the built-in names)
from flatminima.optim.perturb import Adaptive, DualNorm, RandomDirection, Unnormalized
from flatminima.optim.plan import Descend, Pass, StepPlan
from flatminima.optim.registry import (
    OptimizerRequest,
    OptimizerSpec,
    optimizer_names,
    optimizer_spec,
    register_optimizer,
)
from flatminima.optim.rho_scheduler import (
    RhoScheduler,
    constant_rho,
    cosine_rho,
    linear_warmup_rho,
    lr_proportional_rho,
    step_rho,
)
from flatminima.optim.rules import (
    AscentCapabilities,
    AscentRule,
    AscentWrapper,
    Cadence,
    DescentCapabilities,
    DescentRule,
    EveryKSteps,
    EveryStep,
    PerturbationRule,
    PerturbedGradient,
    RuleContext,
)
from flatminima.optim.sam import SAM

__all__ = [
    "SAM",
    "Adaptive",
    "AscentCapabilities",
    "AscentRule",
    "AscentWrapper",
    "Cadence",
    "Descend",
    "DescentCapabilities",
    "DescentRule",
    "DualNorm",
    "EveryKSteps",
    "EveryStep",
    "OptimizerRequest",
    "OptimizerSpec",
    "Pass",
    "PerturbationRule",
    "PerturbedGradient",
    "RandomDirection",
    "RhoScheduler",
    "RuleContext",
    "StepPlan",
    "Unnormalized",
    "constant_rho",
    "cosine_rho",
    "linear_warmup_rho",
    "lr_proportional_rho",
    "optimizer_names",
    "optimizer_spec",
    "register_optimizer",
    "step_rho",
]
