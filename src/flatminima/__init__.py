"""flatminima: sharpness-aware training (SAM and its variants) and sharpness measurement for PyTorch."""

from flatminima.optim import (
    SAM,
    Adaptive,
    AscentRule,
    Cadence,
    DescentRule,
    DualNorm,
    EveryKSteps,
    EveryStep,
    PerturbationRule,
    PerturbedGradient,
    RandomDirection,
    Unnormalized,
)
from flatminima.step import PlainStep, SharpnessAwareStep

__version__ = "0.1.0"

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
    "PlainStep",
    "RandomDirection",
    "SharpnessAwareStep",
    "Unnormalized",
    "__version__",
]
