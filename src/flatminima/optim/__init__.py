"""Sharpness-aware optimisers: the SAM protocol, the rules it composes, and the maths behind them."""

from flatminima.optim.perturb import Adaptive, DualNorm, RandomDirection, Unnormalized
from flatminima.optim.rules import (
    AscentRule,
    Cadence,
    DescentRule,
    EveryKSteps,
    EveryStep,
    PerturbationRule,
    PerturbedGradient,
)
from flatminima.optim.sam import SAM

__all__ = [
    "SAM",
    "Adaptive",
    "AscentRule",
    "Cadence",
    "DescentRule",
    "DualNorm",
    "EveryKSteps",
    "EveryStep",
    "PerturbationRule",
    "PerturbedGradient",
    "RandomDirection",
    "Unnormalized",
]
