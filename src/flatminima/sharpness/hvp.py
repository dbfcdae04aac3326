"""Hessian-vector products of the full-data training loss, for any ``nn.Module`` and loss.

The loss is the size-weighted mean of the per-batch mean losses, ``L = sum_b (n_b / N) * loss_fn(model(x_b), y_b)``,
so a short last batch counts exactly as much as its examples; under ``torch.distributed`` each rank holds a shard
of the data, ``N`` is the global count and the products are all-reduced.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

__all__ = ["METHODS", "HessianOperator"]

METHODS = ("double_backward", "forward_over_reverse", "auto")

LossFn = Callable[[Any, Any], Tensor]


def _is_batch(data: Any) -> bool:
    """A single ``(inputs, targets)`` batch (a 2-sequence whose inputs are a tensor) rather than batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], Tensor):
        return int(inputs[0].shape[0])
    raise TypeError(f"inputs must be a tensor (or a sequence of tensors), got {type(inputs).__name__}")


def _cast(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(x, Tensor):
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(item, device, dtype) for item in x)
    return x


class HessianOperator:
    """The Hessian of the full-data loss w.r.t. the trainable parameters, as a linear operator on flat vectors.

    Args:
        model: any module; its parameters with ``requires_grad`` are the variables (error if there are none).
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of a batch.
        data: one batch ``(inputs, targets)`` or an iterable of batches (a DataLoader, a list). It is iterated once
            at construction to count examples and once per product, so it should yield the same data each time
            (no random augmentation); a one-shot iterator is materialised into a list.
        dtype: run products in this dtype; ``torch.float64`` uses a float64 *copy* of the model (a snapshot:
            later changes to the model are not seen) and casts floating inputs and targets.
        train_mode: by default the model is put in eval mode during products (and its modes restored afterwards):
            BatchNorm then uses its running statistics, so the loss is a sum over examples whose Hessian does not
            depend on how the data is batched, and Dropout is off, so the operator is deterministic and symmetric.
            With ``train_mode=True`` batch statistics are used and buffers (running statistics) are restored after
            each product so that measuring does not change the model.
        method: ``"double_backward"`` (autograd.grad twice), ``"forward_over_reverse"`` (torch.func jvp of grad),
            or ``"auto"``: time one product of each on the first batch and keep the faster (see ``benchmark``).
        distributed: all-reduce counts, products, gradient and loss across ranks; default: True when
            torch.distributed is initialised with more than one process.
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
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no parameters that require grad: there is no Hessian to measure")
        if dtype is not None and any(p.dtype != dtype for p in trainable):
            model = copy.deepcopy(model).to(dtype)
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        self.cast_dtype = dtype
        self._named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
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

        if _is_batch(data):
            data = [tuple(data)]
        elif isinstance(data, Iterator):
            data = list(data)
        elif not isinstance(data, Iterable):
            raise TypeError(f"data must be an (inputs, targets) batch or an iterable of batches, got {type(data)}")
        self.data = data
        self.local_count = sum(_batch_size(batch[0]) for batch in self.data)
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

    def _batches(self) -> Iterator[tuple[Any, Any, float]]:
        """(inputs, targets, weight) on the operator's device and dtype, weight = batch size / global count."""
        for inputs, targets in self.data:
            size = _batch_size(inputs)
            if size == 0:
                continue
            yield (
                _cast(inputs, self.device, self.cast_dtype),
                _cast(targets, self.device, self.cast_dtype),
                size / self.total_count,
            )

    def _forward_loss(self, inputs: Any, targets: Any) -> Tensor:
        outputs = self.model(*inputs) if isinstance(inputs, (tuple, list)) else self.model(inputs)
        return self.loss_fn(outputs, targets)

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Set train/eval mode for a product and restore every module's mode (and, in train mode, the buffers)."""
        modes = [(module, module.training) for module in self.model.modules()]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()] if self.train_mode else []
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

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

    def _check_vector(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of shape ({self.dim},), got {tuple(v.shape)}")
        return v.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ products

    def _batch_hvp(self, inputs: Any, targets: Any, weight: float, v: Tensor, method: str) -> Tensor:
        tangents = self.unflatten(v)
        if method == "double_backward":
            loss = self._forward_loss(inputs, targets)
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            dot = sum(((g * t).sum() for g, t in zip(grads, tangents, strict=True) if g is not None), zero)
            if not dot.requires_grad:  # the gradient does not depend on the parameters: zero curvature
                return torch.zeros_like(v)
            hv = torch.autograd.grad(dot, self._params, allow_unused=True)
            return self.flatten(hv) * weight
        names = [name for name, _ in self._named]
        primals = {name: p.detach() for name, p in self._named}

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            outputs = (
                functional_call(self.model, params, tuple(inputs))
                if isinstance(inputs, (tuple, list))
                else functional_call(self.model, params, (inputs,))
            )
            return self.loss_fn(outputs, targets)

        _, hv = jvp(grad(loss_of), (primals,), (dict(zip(names, tangents, strict=True)),))
        return self.flatten([hv[name] for name in names]) * weight

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (one pass over the data; counted in ``num_hvp``)."""
        v = self._check_vector(v)
        out = torch.zeros_like(v)
        with self._mode():
            for inputs, targets, weight in self._batches():
                out += self._batch_hvp(inputs, targets, weight, v, self.method).detach()
        self.num_hvp += 1
        return self._reduce(out)

    def __matmul__(self, v: Tensor) -> Tensor:
        """``H @ v`` for a vector, or column by column for a ``(dim, n)`` matrix."""
        if v.dim() == 2:
            return torch.stack([self.matvec(column) for column in v.T], dim=1)
        return self.matvec(v)

    def gradient(self) -> Tensor:
        """The flat gradient of the full-data loss."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with self._mode():
            for inputs, targets, weight in self._batches():
                grads = torch.autograd.grad(self._forward_loss(inputs, targets), self._params, allow_unused=True)
                out += self.flatten(grads) * weight
        return self._reduce(out)

    def loss(self) -> float:
        """The full-data loss (size-weighted mean over batches)."""
        out = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad(), self._mode():
            for inputs, targets, weight in self._batches():
                out += self._forward_loss(inputs, targets).to(self.dtype) * weight
        return float(self._reduce(out))

    def _choose_method(self) -> str:
        """Time one product of each method on the first non-empty batch (after a warm-up) and keep the faster."""
        batch = next(self._batches(), None)
        if batch is None:  # this rank holds no data; agree with the others on the default
            self.benchmark = {}
            choice = 0
        else:
            v = torch.randn(self.dim, dtype=self.dtype, device=self.device)
            for method in METHODS[:2]:
                with self._mode():
                    self._batch_hvp(*batch, v, method)  # warm-up
                    start = time.perf_counter()
                    self._batch_hvp(*batch, v, method)
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
                    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
                    return self.loss_fn(functional_call(self.model, params, args), targets)

                out += torch.autograd.functional.hessian(loss_of, flat0) * weight
        return self._reduce(out)
