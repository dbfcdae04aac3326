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
from flatminima.trajectory import EMATarget, PastOutputs, TrajectoryLoss
from flatminima.variants import (
    AdaptivePolicy,
    AscentSample,
    FriendlyAscent,
    GibbsReweighting,
    GSAMDescent,
    LookSAMDescent,
    MomentumAscent,
    OrthogonalEscape,
    RandomCadence,
    RandomSign,
    SharpnessSensitiveSelection,
    SingleExample,
    StochasticWeightPerturbation,
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "Adaptive",
    "AdaptivePolicy",
    "AscentRule",
    "AscentSample",
    "BatchRule",
    "Cadence",
    "DescentRule",
    "DualNorm",
    "EMATarget",
    "EveryKSteps",
    "EveryStep",
    "FriendlyAscent",
    "GSAMDescent",
    "GibbsReweighting",
    "LookSAMDescent",
    "MomentumAscent",
    "OrthogonalEscape",
    "PastOutputs",
    "PerturbationRule",
    "PerturbedGradient",
    "PlainStep",
    "RandomCadence",
    "RandomDirection",
    "RandomSign",
    "SharpnessAwareStep",
    "SharpnessSensitiveSelection",
    "SingleExample",
    "StochasticWeightPerturbation",
    "TrajectoryLoss",
    "Unnormalized",
    "__version__",
]
