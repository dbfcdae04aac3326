"""Hessian-vector products of the full-data training loss, for any ``nn.Module`` and loss.

The loss is the size-weighted mean of the per-batch mean losses, ``L = sum_b (n_b / N) * loss_fn(model(x_b), y_b)``,
so a short last batch counts exactly as much as its examples; under ``torch.distributed`` each rank holds a shard
of the data, ``N`` is the global count and the products are all-reduced.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import grad, jvp

from flatminima.sharpness.data import Batches, WeightedBatch, forward, measuring, trainable_parameters
from flatminima.sharpness.losses import LossFn

__all__ = ["METHODS", "HessianOperator"]

METHODS = ("double_backward", "forward_over_reverse", "auto")


class HessianOperator:
    """The Hessian of the full-data loss w.r.t. the trainable parameters, a ``
    LinearOperator`` on flat vectors.

    Args:
        model: any module; its parameters with ``requires_grad`` are the variables (error if there are none).
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of a batch.
        data: one batch ``(inputs, targets)`` or an iterable of batches (a DataLoader, a list); inputs may be a
            tuple of tensors (see ``flatminima.sharpness.data``). It is iterated once at construction to count
            examples and once per product (or per ``matmat``), so it should yield the same data each time (no random
            augmentation); a one-shot iterator is materialised into a list.
        dtype: run products in this dtype; ``torch.float64`` uses a float64 *copy* of the model (a snapshot:
            later changes to the model are not seen) and casts floating inputs and targets.
        train_mode: by default the model is put in eval mode during products (and its modes restored afterwards):
            BatchNorm then uses its running statistics, so the loss is a sum over examples whose Hessian does not
            depend on how the data is batched, and Dropout is off, so the operator is deterministic and symmetric.
            With ``train_mode=True`` batch statistics are used; buffers (running statistics) are restored after
            each product so that measuring does not change the model.
        method: ``"double_backward"`` (autograd.grad twice), ``"forward_over_reverse"`` (torch.func jvp of grad),
            or ``"auto"``: time one product of each on the first batch and keep the faster (see ``benchmark``).
        distributed: all-reduce counts, products, gradient and loss across ranks; default: True when
            torch.distributed is initialised with more than one process.

    ``num_hvp`` counts products: one per ``matvec``, ``k`` per ``matmat`` of ``k`` columns.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        method: str = "double_backward",
        distributed: bool | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        trainable = trainable_parameters(model)
        if dtype is not None and any(p.dtype != dtype for p in trainable.values()):
            model = copy.deepcopy(model).to(dtype)
            trainable = trainable_parameters(model)
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        self.cast_dtype = dtype
        self._named = list(trainable.items())
        self._params = [p for _, p in self._named]
        self._numels = [p.numel() for p in self._params]
        self.dim = sum(self._numels)
        self.dtype = self._params[0].dtype
        self.device = self._params[0].device
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.distributed = bool(distributed)

        self.batches = Batches(data)
        self.data = self.batches.source
        self.local_count = self.batches.count()
        count = torch.tensor(self.local_count, dtype=torch.int64, device=self.device)
        if self.distributed:
            dist.all_reduce(count)
        self.total_count = int(count)
        if self.total_count == 0:
            raise ValueError("the data set is empty (0 examples): the loss and its Hessian are undefined")
        self.num_hvp = 0
        self.benchmark: dict[str, float] = {}
        self.method = self._choose_method() if method == "auto" else method

    # ------------------------------------------------------------------ helpers

    def _batches(self) -> Iterator[WeightedBatch]:
        """(inputs, targets, weight) on the operator's device and dtype, weight = batch size / global count."""
        return self.batches.weighted(self.total_count, self.device, self.cast_dtype)

    def _mode(self) -> contextlib.AbstractContextManager[None]:
        """Train/eval mode for a product; every module's mode and buffer restored afterwards."""
        return measuring(self.model, self.train_mode)

    def _reduce(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` meaning zeros) into one flat vector."""
        return torch.cat(
            [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, self._params, strict=True)]
        )

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into tensors shaped like the trainable parameters."""
        return [chunk.view_as(p) for chunk, p in zip(vector.split(self._numels), self._params, strict=True)]

    # ------------------------------------------------------------------ products

    def _batch_products(self, inputs: Any, targets: Any, weight: float, matrix: Tensor, method: str) -> Tensor:
        """``weight * H_b V`` for one batch and the ``(dim, k)`` matrix ``V``: the forward pass (and, by double
        backward, the first backward) is shared by the ``k`` columns."""
        columns = []
        rows = matrix.T.contiguous()  # the k vectors, each contiguous
        if method == "double_backward":
            loss = self.loss_fn(forward(self.model, inputs), targets)
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            last = matrix.shape[1] - 1
            for j, v in enumerate(rows):
                tangents = self.unflatten(v)
                dot = sum(((g * t).sum() for g, t in zip(grads, tangents, strict=True) if g is not None), zero)
                if not dot.requires_grad:  # the gradient does not depend on the parameters: zero curvature
                    columns.append(torch.zeros_like(v))
                    continue
                hv = torch.autograd.grad(dot, self._params, retain_graph=j < last, allow_unused=True)
                columns.append(self.flatten(hv) * weight)
            return torch.stack(columns, dim=1)
        names = [name for name, _ in self._named]
        primals = {name: p.detach() for name, p in self._named}

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return self.loss_fn(forward(self.model, inputs, params), targets)

        for v in rows:
            tangents = dict(zip(names, self.unflatten(v), strict=True))
            _, hv = jvp(grad(loss_of), (primals,), (tangents,))
            columns.append(self.flatten([hv[name] for name in names]) * weight)
        return torch.stack(columns, dim=1)

    def matmat(self, matrix: Tensor) -> Tensor:
        """``H V`` for a ``(dim, k)`` matrix: one pass over the data, ``k`` products per batch (counted as ``k``)."""
        if matrix.dim() != 2 or matrix.shape[0] != self.dim:
            raise ValueError(f"expected a matrix of shape ({self.dim}, k), got {tuple(matrix.shape)}")
        matrix = matrix.to(device=self.device, dtype=self.dtype)
        out = torch.zeros_like(matrix)
        if matrix.shape[1] == 0:
            return out
        with self._mode():
            for inputs, targets, weight in self._batches():
                out += self._batch_products(inputs, targets, weight, matrix, self.method).detach()
        self.num_hvp += int(matrix.shape[1])
        return self._reduce(out)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (one pass over the data; counted in ``num_hvp``)."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, v: Tensor) -> Tensor:
        """``H @ v`` for a vector, or ``H @ V`` for a ``(dim, k)`` matrix (one pass over the data)."""
        return self.matmat(v) if v.dim() == 2 else self.matvec(v)

    def gradient(self) -> Tensor:
        """The flat gradient of the full-data loss."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with self._mode():
            for inputs, targets, weight in self._batches():
                loss = self.loss_fn(forward(self.model, inputs), targets)
                out += self.flatten(torch.autograd.grad(loss, self._params, allow_unused=True)) * weight
        return self._reduce(out)

    def loss(self) -> float:
        """The full-data loss (size-weighted mean over batches)."""
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self._mode():
            for inputs, targets, weight in self._batches():
                out += self.loss_fn(forward(self.model, inputs), targets).to(self.dtype) * weight
        return float(self._reduce(out))

    def _choose_method(self) -> str:
        """Time one product of each method on the first non-empty batch (after a warm-up) and keep the faster."""
        batch = next(self._batches(), None)
        if batch is None:  # this rank holds no data; agree with the others on the default
            self.benchmark = {}
            choice = 0
        else:
            v = torch.randn(self.dim, 1, dtype=self.dtype, device=self.device)
            for method in METHODS[:2]:
                with self._mode():
                    self._batch_products(*batch, v, method)  # warm-up
                    start = time.perf_counter()
                    self._batch_products(*batch, v, method)
                    self.benchmark[method] = time.perf_counter() - start
            choice = int(self.benchmark["forward_over_reverse"] < self.benchmark["double_backward"])
        if self.distributed:  # every rank must use the same method: take rank 0's choice
            flag = torch.tensor(choice, device=self.device)
            dist.broadcast(flag, src=0)
            choice = int(flag)
        return METHODS[choice]

    def dense_hessian(self) -> Tensor:
        """The dense ``(dim, dim)`` Hessian by ``torch.autograd.functional.hessian`` (for tests on small models)."""
        names = [name for name, _ in self._named]
        flat0 = torch.cat([p.detach().reshape(-1) for p in self._params])
        out = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        with self._mode():
            for inputs, targets, weight in self._batches():

                def loss_of(flat: Tensor, inputs: Any = inputs, targets: Any = targets) -> Tensor:
                    params = dict(zip(names, self.unflatten(flat), strict=True))
                    return self.loss_fn(forward(self.model, inputs, params), targets)

                out += torch.autograd.functional.hessian(loss_of, flat0) * weight
        return self._reduce(out)
