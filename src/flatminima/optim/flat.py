"""Parameters and gradients as views into one contiguous buffer, so SAM's maths is one kernel per operation.

On a CPU, and for models of many small tensors on a GPU, the per-tensor cost of an operation dominates the
arithmetic: ResNet-56 has 167 parameter tensors. With a flat layout, the norm of the gradient, saving ``w``,
moving to ``w + e`` and restoring ``w`` are each a single operation over one buffer. This is the layout
DistributedDataParallel's ``gradient_as_bucket_view`` and apex's fused optimisers use.

The layout re-points each parameter's ``.data`` to a view of the flat buffer (values unchanged), and keeps
gradients as views of a second buffer, zeroed in place (as ``zero_grad(set_to_none=False)`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FlatLayout"]


class FlatLayout:
    """One flat weight buffer and one flat gradient buffer for ``params`` (same device and dtype, dense)."""

    def __init__(self, params: list[Tensor]) -> None:
        if not params:
            raise ValueError("flatten=True needs at least one parameter.")
        device, dtype = params[0].device, params[0].dtype
        if any(p.device != device or p.dtype != dtype for p in params):
            raise ValueError(
                "flatten=True needs all parameters on one device with one dtype; got several. "
                "Use flatten=False (the default), or one SAM optimiser per device/dtype."
            )
        if any(p.is_sparse for p in params):
            raise ValueError("flatten=True does not support sparse parameters.")
        self.params = params
        with torch.no_grad():
            self.weights = torch.cat([p.detach().reshape(-1) for p in params])
        self.grads = torch.zeros_like(self.weights)
        self.weight_views = self._views(self.weights)
        self.grad_views = self._views(self.grads)
        for param, view in zip(params, self.weight_views):
            param.data = view

    def _views(self, flat: Tensor) -> list[Tensor]:
        views, offset = [], 0
        for param in self.params:
            views.append(flat[offset : offset + param.numel()].view(param.shape))
            offset += param.numel()
        return views

    def weights_in_place(self) -> bool:
        """False if someone replaced a parameter's tensor (e.g. ``model.to()``): the layout no longer holds."""
        return all(p.data.data_ptr() == v.data_ptr() for p, v in zip(self.params, self.weight_views))

    @torch.no_grad()
    def adopt_gradients(self) -> bool:
        """Make every gradient a view of the flat buffer, copying any that autograd created anew.

        Returns False (and changes nothing) if some parameter has no gradient: then this step cannot be flat,
        because giving it a zero gradient would change what the base optimiser does.
        """
        if any(p.grad is None for p in self.params):
            return False
        for param, view in zip(self.params, self.grad_views):
            if param.grad is not view:
                view.copy_(param.grad)
                param.grad = view
        return True

    def gradients_are_views(self) -> bool:
        return all(p.grad is v for p, v in zip(self.params, self.grad_views))

    @torch.no_grad()
    def zero_gradients(self) -> None:
        """Zero in place; gradients that are not views of the buffer, or of frozen parameters, become None."""
        for param, view in zip(self.params, self.grad_views):
            if param.grad is not None and (param.grad is not view or not param.requires_grad):
                param.grad = None
        self.grads.zero_()
