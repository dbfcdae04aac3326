"""Where ``w`` is kept while the parameters hold ``w + e``, and how it is put back: one strategy an optimiser.

SAM picks the strategy once, when it is built, from how the parameters are stored; the step itself only says
"hold these new weights" and "restore". Every strategy restores ``w`` exactly (no ``w + e - e`` arithmetic):

- ``SwappedWeights`` (plain tensors): each parameter's own tensor is set aside and ``w + e``, a new tensor,
  swapped in; restoring swaps the pointers back, so it is free.
- ``CopiedShards`` (FSDP2's sharded DTensors): FSDP gathers the weights from the shards' storage, so ``w + e``
  is copied into the local shards and a copy of ``w`` kept.
- ``FlatWeights`` (``flatten=True``): the parameters are views of one buffer; ``w + c g`` is formed in the
  buffer in one operation after ``w`` is copied aside. Steps that do not fit the flat path swap, as above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatminima.optim import functional as F
from flatminima.optim.flat import FlatLayout

__all__ = ["CopiedShards", "FlatWeights", "SwappedWeights", "WeightStore"]


class WeightStore:
    """The interface: ``hold`` ``w + e``, ``restore`` ``w``, and whether the weights are now moved."""

    @property
    def perturbed(self) -> bool:
        raise NotImplementedError

    def hold(self, params: list[Tensor], moved: list[Tensor]) -> None:
        """Make ``params`` hold ``moved`` (``w + e``), keeping their ``w`` to restore."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put ``w`` back exactly; a no-op when not perturbed."""
        raise NotImplementedError


class SwappedWeights(WeightStore):
    """Plain parameters: ``w + e`` swapped in for each parameter's own tensor, which is kept untouched."""

    def __init__(self) -> None:
        self._params: list[Tensor] = []  # parameters now holding w + e
        self._own: list[Tensor] = []  # their own tensors, w

    @property
    def perturbed(self) -> bool:
        return bool(self._params)

    def hold(self, params: list[Tensor], moved: list[Tensor]) -> None:
        self._params, self._own = params, [p.data for p in params]
        for param, weights in zip(params, moved):
            param.data = weights

    def restore(self) -> None:
        for param, weights in zip(self._params, self._own):
            param.data = weights
        self._params, self._own = [], []


class CopiedShards(WeightStore):
    """Sharded parameters: ``w + e`` written into the local shards (where FSDP gathers from), copies of ``w`` kept."""

    def __init__(self) -> None:
        self._shards: list[Tensor] = []
        self._saved: list[Tensor] = []

    @property
    def perturbed(self) -> bool:
        return bool(self._shards)

    def hold(self, params: list[Tensor], moved: list[Tensor]) -> None:
        self._saved = [p.clone() for p in params]
        self._shards = params
        torch._foreach_copy_(params, moved)

    def restore(self) -> None:
        if self._shards:
            torch._foreach_copy_(self._shards, self._saved)
        self._shards, self._saved = [], []


class FlatWeights(SwappedWeights):
    """``flatten=True``: ``hold_flat`` forms ``w + c g`` in the flat buffer; other steps swap (the parent)."""

    def __init__(self, layout: FlatLayout) -> None:
        super().__init__()
        self.layout = layout
        self._saved = torch.empty_like(layout.weights)
        self._flat_held = False

    @property
    def perturbed(self) -> bool:
        return self._flat_held or super().perturbed

    def hold_flat(self, coefficient: Tensor | float) -> None:
        """``w <- w + c g`` on the whole buffer, ``w`` copied aside first: one operation each."""
        F.perturb_flat_(self.layout.weights, self.layout.grads, self._saved, coefficient)
        self._flat_held = True

    def restore(self) -> None:
        super().restore()
        if self._flat_held:
            self.layout.weights.copy_(self._saved)
            self._flat_held = False
