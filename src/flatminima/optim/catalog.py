"""The built-in optimiser names: the base optimisers and SAM with its three ascent geometries.

Each variant module registers its own name beside its rules; this module holds the ones that have no module of
their own (torch's optimisers, and SAM configured by ``adaptive`` / ``normalize``).
"""

from __future__ import annotations

from typing import Any

import torch

from flatminima.optim.registry import OptimizerRequest, register_optimizer
from flatminima.optim.sam import SAM

__all__ = ["build_sam"]


def _base(request: OptimizerRequest) -> torch.optim.Optimizer:
    return request.base()


def build_sam(request: OptimizerRequest, **options: Any) -> SAM:
    """``request.sam(**options)`` (``OptimizerRequest.sam``), kept for variants written against it."""
    return request.sam(**options)


def _sam(adaptive: bool = False, normalize: bool = True):
    def build(request: OptimizerRequest) -> torch.optim.Optimizer:
        return build_sam(request, adaptive=adaptive, normalize=normalize)

    return build


register_optimizer("sgd", "SGD with momentum", _base, sharpness_aware=False)
register_optimizer("adamw", "AdamW", _base, sharpness_aware=False)
register_optimizer("sam", "SAM, ascent rho g/||g|| in the L_p ball", _sam(), sharpness_aware=True)
register_optimizer("asam", "adaptive SAM", _sam(adaptive=True), sharpness_aware=True)
register_optimizer("usam", "unnormalised SAM", _sam(normalize=False), sharpness_aware=True)
