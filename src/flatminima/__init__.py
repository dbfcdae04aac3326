"""flatminima: sharpness-aware training (SAM and its variants) and sharpness measurement for PyTorch."""

from flatminima.batch_rules import BatchRule
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
from flatminima.variants import (
    AscentSample,
    FriendlyAscent,
    GibbsReweighting,
    GSAMDescent,
    LookSAMDescent,
    MomentumAscent,
    OrthogonalEscape,
    RandomCadence,
    RandomSign,
    SingleExample,
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "Adaptive",
    "AscentRule",
    "AscentSample",
    "BatchRule",
    "Cadence",
    "DescentRule",
    "DualNorm",
    "EveryKSteps",
    "EveryStep",
    "FriendlyAscent",
    "GSAMDescent",
    "GibbsReweighting",
    "LookSAMDescent",
    "MomentumAscent",
    "OrthogonalEscape",
    "PerturbationRule",
    "PerturbedGradient",
    "PlainStep",
    "RandomCadence",
    "RandomDirection",
    "RandomSign",
    "SharpnessAwareStep",
    "SingleExample",
    "Unnormalized",
    "__version__",
]
