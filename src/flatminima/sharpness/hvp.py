"""Hessian-vector products of the full-data training loss, for any ``nn.Module`` and loss.

The loss is the size-weighted mean of the per-batch mean losses, ``L = sum_b (n_b / N) * loss_fn(model(x_b), y_b)``,
so a short last batch counts exactly as much as its examples; under ``torch.distributed`` each rank holds a shard
of the data, ``N`` is the global count and the products are all-reduced.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

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
            or ``"auto"``: time one product of each on the first batch and keep the faster (see ``benchmark``;
            double backward is timed on a kept graph when ``reuse_graph`` allows it).
        reuse_graph: by double backward, build each batch's gradient graph (forward pass and create-graph
            backward) once and differentiate it again for every product, as PyHessian does: a product then costs
            one backward through that graph instead of a forward and two backwards (about 1.5x faster on the
            digits CNN, see docs/sharpness.md). The kept graphs hold each batch's activations and first-backward
            intermediates until the operator is dropped (or ``release_graph``): memory grows linearly with the
            number of examples, about 60 KB per digits image on the SmallCNN. They are rebuilt when any parameter
            (frozen ones too) or buffer of the model is changed: an optimiser step or ``load_state_dict`` (seen by
            each tensor's storage and in-place version), or a write through ``.data`` (seen by a per-tensor
            checksum, the float64 sum and norm of every parameter and buffer, computed before every product on a
            kept graph and compared with one device sync). They are not rebuilt when ``data`` would yield other
            batches, nor after a write that keeps every tensor's sum and norm (a permutation of its entries): call
            ``release_graph()`` to drop the graphs explicitly.
        graph_budget: the most bytes the kept graphs may hold (default 1 GiB; ``math.inf`` for no limit), counted
            from the tensors autograd saves; beyond it the graphs are dropped and from then on every product
            rebuilds them batch by batch without trying to keep them, as with ``reuse_graph=False``
            (``graph_over_budget`` then says so; ``graph_bytes`` holds what was kept).
        vectorize: ``matmat`` differentiates all ``k`` columns in one batched backward (``is_grads_batched``;
            ``vmap`` of the jvp for forward-over-reverse) instead of one backward per column: more memory, and
            faster only where one product leaves the device idle (slower on the CPU, see docs/sharpness.md).
        distributed: all-reduce counts, products, gradient and loss across ranks; default: True when
            torch.distributed is initialised with more than one process.

    ``num_hvp`` counts products: one per ``matvec``, ``k`` per ``matmat`` of ``k`` columns; ``graph_reused``
    counts the passes that ran on kept graphs, ``graph_builds`` those that built the graphs (or rebuilt them,
    for every pass, beyond the budget).
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
        reuse_graph: bool = True,
        graph_budget: float = 2**30,
        vectorize: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if not isinstance(graph_budget, numbers.Real) or isinstance(graph_budget, bool):
            raise TypeError(
                f"graph_budget must be a number of bytes (an int or float, e.g. 2**30 for 1 GiB, math.inf for no "
                f"limit), got {graph_budget!r} of type {type(graph_budget).__name__}"
            )
        if math.isnan(graph_budget) or graph_budget < 0:
            raise ValueError(
                f"graph_budget must be a number of bytes >= 0 (0 never keeps a graph, math.inf for no limit), "
                f"got {graph_budget!r}"
            )
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
        self.reuse_graph, self.graph_budget, self.vectorize = bool(reuse_graph), float(graph_budget), bool(vectorize)
        self._graphs: list[tuple[tuple[Tensor | None, ...], float]] | None = None
        self._kept_key: tuple[tuple[int, int, int], ...] | None = None
        self._kept_sums: Tensor | None = None
        self.graph_bytes = 0
        self.graph_over_budget = False
        self.graph_reused = 0
        self.graph_builds = 0
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

    def _model_tensors(self) -> list[Tensor]:
        """What a kept graph depends on: every parameter of the model (the frozen ones too) and every buffer."""
        return [*self.model.parameters(), *self.model.buffers()]

    @staticmethod
    def _graph_key(tensors: Sequence[Tensor]) -> tuple[tuple[int, int, int], ...]:
        """Each tensor's identity, storage and in-place version: an optimiser step, ``load_state_dict`` or
        ``p.data = ...`` changes one of them (the cheap check, no device work)."""
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)

    def _checksums(self, tensors: Sequence[Tensor]) -> Tensor:
        """Each tensor's sum and 2-norm, accumulated in float64 (float32 on MPS), stacked on the operator's device:
        a write through ``.data`` (``p.data.add_(1)``) bumps neither the version nor the storage, but moves these."""
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        sums = []
        for tensor in tensors:
            t = tensor.detach()
            if t.is_complex():
                t = torch.view_as_real(t)
            sums.append(t.sum(dtype=acc))
            if t.is_floating_point():
                sums.append(torch.linalg.vector_norm(t, dtype=acc))
        return torch.stack([s.to(self.device) for s in sums]) if sums else torch.zeros(0, dtype=acc)

    def _gradient_graph(
        self, inputs: Any, targets: Any, saved: dict[int, int]
    ) -> tuple[tuple[Tensor | None, ...], int]:
        """The batch gradient with its graph (``create_graph=True``), and the bytes it adds to what the graphs keep.

        A saved-tensors hook records every storage autograd keeps for the backward (activations, first-backward
        intermediates, the inputs; the parameters not counted) into ``saved``, shared by the batches of a pass so
        that a storage several batches view is counted once; the gradient itself is counted too."""
        before = sum(saved.values())
        own = {p.untyped_storage().data_ptr() for p in self._params}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            # detached: autograd restores the metadata on unpacking; handing the tensor itself back made the build
            # of the digits CNN's graph 3 ms (12 %) slower than without hooks, the detached one costs nothing
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.loss_fn(forward(self.model, inputs), targets)
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        kept = sum(g.numel() * g.element_size() for g in grads if g is not None)
        return grads, sum(saved.values()) - before + kept

    def _graph_products(self, grads: Sequence[Tensor | None], weight: float, matrix: Tensor, retain: bool) -> Tensor:
        """``weight * H_b V`` by differentiating the batch gradient ``grads`` (built with its graph) against each
        column of ``V`` as ``grad_outputs``; one backward per column, or one for all with ``vectorize``."""
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the gradient does not depend on the parameters: zero curvature
            return torch.zeros_like(matrix)
        outputs = [grads[i] for i in live]
        rows = matrix.T.contiguous()  # the k vectors, each contiguous
        if self.vectorize and rows.shape[0] > 1:
            chunks = rows.split(self._numels, dim=1)
            batched = [chunks[i].reshape(rows.shape[0], *self._params[i].shape) for i in live]
            hv = torch.autograd.grad(
                outputs, self._params, batched, retain_graph=retain, allow_unused=True, is_grads_batched=True
            )
            flat = [
                (torch.zeros(rows.shape[0], n, dtype=self.dtype, device=self.device) if h is None else h.flatten(1))
                for h, n in zip(hv, self._numels, strict=True)
            ]
            return torch.cat(flat, dim=1).T * weight
        columns = []
        last = rows.shape[0] - 1
        for j, v in enumerate(rows):
            tangents = self.unflatten(v)
            hv = torch.autograd.grad(
                outputs, self._params, [tangents[i] for i in live], retain_graph=retain or j < last, allow_unused=True
            )
            columns.append(self.flatten(hv))
        out = columns[0][:, None] if len(columns) == 1 else torch.stack(columns).T  # (dim, k): each column contiguous
        return out if weight == 1.0 else out * weight  # (x * 1.0 is x: skipping it changes no bit)

    def _batch_products(self, inputs: Any, targets: Any, weight: float, matrix: Tensor, method: str) -> Tensor:
        """``weight * H_b V`` for one batch and the ``(dim, k)`` matrix ``V``, the graph built for this call only:
        the forward pass (and, by double backward, the first backward) is shared by the ``k`` columns."""
        if method == "double_backward":
            grads, _ = self._gradient_graph(inputs, targets, {})
            return self._graph_products(grads, weight, matrix, retain=False)
        names = [name for name, _ in self._named]
        primals = {name: p.detach() for name, p in self._named}

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return self.loss_fn(forward(self.model, inputs, params), targets)

        def product(v: Tensor) -> Tensor:
            tangents = dict(zip(names, self.unflatten(v), strict=True))
            _, hv = jvp(grad(loss_of), (primals,), (tangents,))
            return self.flatten([hv[name] for name in names])

        rows = matrix.T.contiguous()
        if self.vectorize and rows.shape[0] > 1:
            return vmap(product)(rows).T * weight
        return torch.stack([product(v) for v in rows], dim=1) * weight

    def release_graph(self) -> None:
        """Free the kept gradient graphs (they are rebuilt by the next product): the explicit way to drop them, for
        a change the automatic checks miss (see ``reuse_graph``) or to give their memory back."""
        self._graphs = None
        self._kept_key = None
        self._kept_sums = None

    def _kept_products(self, matrix: Tensor) -> Tensor | None:
        """``H V`` on the kept graphs, or None when there are none or the model changed since they were built."""
        if self._graphs is None:
            return None
        tensors = self._model_tensors()
        if (
            self._kept_sums is None
            or self._kept_key != self._graph_key(tensors)
            or not torch.equal(self._kept_sums, self._checksums(tensors))  # one device sync
        ):
            self.release_graph()
            return None
        out: Tensor | None = None
        for grads, weight in self._graphs:
            products = self._graph_products(grads, weight, matrix, retain=True)
            out = products if out is None else out.add_(products)
        return torch.zeros_like(matrix) if out is None else out

    def _products(self, matrix: Tensor) -> Tensor:
        """``H V`` summed over this rank's batches, keeping the gradient graphs for the next products where the
        method and ``graph_budget`` allow (a budget exceeded mid-pass drops the graphs kept so far and rebuilds
        the remaining batches, so no work is lost; every later product then rebuilds per batch, keeping nothing)."""
        kept = self._kept_products(matrix)
        if kept is not None:
            self.graph_reused += 1
            return kept
        self.graph_builds += 1
        keep = self.reuse_graph and self.method == "double_backward" and not self.graph_over_budget
        graphs: list[tuple[tuple[Tensor | None, ...], float]] = []
        total, saved = 0, dict[int, int]()
        out = torch.zeros_like(matrix)
        with self._mode():
            for inputs, targets, weight in self._batches():
                if not keep:
                    out += self._batch_products(inputs, targets, weight, matrix, self.method)
                    continue
                grads, nbytes = self._gradient_graph(inputs, targets, saved)
                total += nbytes
                if total > self.graph_budget:
                    keep, graphs = False, []
                    self.graph_over_budget = True
                else:
                    graphs.append((grads, weight))
                out += self._graph_products(grads, weight, matrix, retain=keep)
        if keep:
            self._graphs, self.graph_bytes = graphs, total
            tensors = self._model_tensors()  # after the mode context: the buffers are as they will stay
            self._kept_key, self._kept_sums = self._graph_key(tensors), self._checksums(tensors)
        return out

    def matmat(self, matrix: Tensor) -> Tensor:
        """``H V`` for a ``(dim, k)`` matrix: ``k`` products (counted as ``k``), one pass over the data (or over
        the kept gradient graphs). The result may be the transposed view of its ``k`` contiguous rows (contiguous
        when ``distributed``, for the all-reduce)."""
        if matrix.dim() != 2 or matrix.shape[0] != self.dim:
            raise ValueError(f"expected a matrix of shape ({self.dim}, k), got {tuple(matrix.shape)}")
        matrix = matrix.to(device=self.device, dtype=self.dtype)
        if matrix.shape[1] == 0:
            return torch.zeros_like(matrix)
        out = self._products(matrix).detach()  # (dim, k), possibly the transposed view of its rows
        self.num_hvp += int(matrix.shape[1])
        return self._reduce(out.contiguous() if self.distributed else out)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (one pass over the data or the kept graphs; counted in ``num_hvp``)."""
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
        """Time one product of each method on the first non-empty batch (after a warm-up) and keep the faster;
        double backward on a graph built once, as the products will run when ``reuse_graph`` keeps it."""
        batch = next(self._batches(), None)
        if batch is None:  # this rank holds no data; agree with the others on the default
            self.benchmark = {}
            choice = 0
        else:
            inputs, targets, weight = batch
            v = torch.randn(self.dim, 1, dtype=self.dtype, device=self.device)
            grads: tuple[Tensor | None, ...] | None = None
            with self._mode():
                if self.reuse_graph:
                    grads, nbytes = self._gradient_graph(inputs, targets, {})
                    if nbytes > self.graph_budget:
                        grads = None
            for method in METHODS[:2]:
                with self._mode():
                    if method == "double_backward" and grads is not None:
                        timed = lambda: self._graph_products(grads, weight, v, retain=True)  # noqa: E731
                    else:
                        timed = lambda m=method: self._batch_products(inputs, targets, weight, v, m)  # noqa: E731
                    timed()  # warm-up
                    start = time.perf_counter()
                    timed()
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
