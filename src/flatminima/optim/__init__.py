"""Sharpness-aware optimisers and the perturbation rules they compose."""

from flatminima.optim.perturb import Adaptive, DualNorm, PerturbationRule, Unnormalized
from flatminima.optim.sam import SAM

__all__ = ["SAM", "Adaptive", "DualNorm", "PerturbationRule", "Unnormalized"]
