"""flatminima: sharpness-aware training (SAM and its variants) and sharpness measurement for PyTorch."""

from flatminima.optim import SAM, Adaptive, DualNorm, PerturbationRule, Unnormalized
from flatminima.step import SharpnessAwareStep

__version__ = "0.1.0"

__all__ = ["SAM", "Adaptive", "DualNorm", "PerturbationRule", "SharpnessAwareStep", "Unnormalized", "__version__"]
