"""How a measurement reads a model and its data: batches, size weighting, casting, tuple inputs and model modes.

Every measure of the package (the Hessian operator, m-sharpness, loss landscapes) takes ``data`` in one form:

* one batch ``(inputs, targets)``, or an iterable of batches (a list, a DataLoader, a generator: a one-shot
  iterator is read into a list once, so it can be iterated again);
* ``inputs`` is a tensor or a tuple/list of tensors (the model is called as ``model(*inputs)``); ``targets`` is a
  tensor or a tuple/list of tensors. All of them share the leading (batch) dimension;
* batches with no examples are skipped, and a short last batch counts exactly as much as its examples: batch
  ``b`` of a mean loss has weight ``n_b / N`` (``N`` the global count, over all ranks when distributed).

A measurement runs the model in eval mode unless asked for train mode (BatchNorm batch statistics), and leaves
every module's mode and every buffer (and, on request, parameter) exactly as it found it, also on exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatminima import running_stats

__all__ = [
    "Batch",
    "Batches",
    "Inputs",
    "WeightedBatch",
    "batch_size",
    "cast",
    "check_batch",
    "concat",
    "forward",
    "groups_of",
    "is_batch",
    "measuring",
    "narrow",
    "trainable_parameters",
]

Inputs = Tensor | Sequence[Tensor]
Batch = tuple[Any, Any]


class WeightedBatch(NamedTuple):
    """A batch cast to the measurement's device and dtype, with its weight ``n_b / N`` in the mean loss."""

    inputs: Any
    targets: Any
    weight: float


def _is_tensors(x: object) -> bool:
    """A tensor, or a non-empty tuple/list of tensors."""
    if isinstance(x, Tensor):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def is_batch(data: object) -> bool:
    """One ``(inputs, targets)`` batch rather than an iterable of batches.

    A pair whose first item is a tensor, or a tuple/list of tensors followed by a tensor (so that a list of two
    batches, whose items are pairs, is never read as one batch).
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    return isinstance(inputs, Tensor) or (_is_tensors(inputs) and isinstance(targets, Tensor))


def _leading_sizes(x: Any) -> list[int] | None:
    tensors = [x] if isinstance(x, Tensor) else list(x)
    if any(t.dim() == 0 for t in tensors):
        return None
    return [int(t.shape[0]) for t in tensors]


def check_batch(batch: object) -> Batch:
    """``batch`` as an ``(inputs, targets)`` pair, after checking its types and that the batch sizes agree."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"each batch must be a pair (inputs, targets) of tensors, got {type(batch).__name__}")
    inputs, targets = batch
    if not _is_tensors(inputs) or not _is_tensors(targets):
        raise TypeError(
            "each batch must be a pair (inputs, targets) of tensors (or tuples of tensors), got "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        )
    sizes = (_leading_sizes(inputs), _leading_sizes(targets))
    if sizes[0] is None or sizes[1] is None or len(set(sizes[0] + sizes[1])) != 1:
        shapes = [tuple(t.shape) for part in (inputs, targets) for t in ([part] if isinstance(part, Tensor) else part)]
        raise ValueError(f"inputs and targets need the same leading (batch) dimension, got shapes {shapes}")
    return inputs, targets


def batch_size(inputs: Inputs) -> int:
    """The number of examples of a batch's inputs (the leading dimension)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if _is_tensors(inputs):
        return int(inputs[0].shape[0])
    raise TypeError(f"inputs must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}")


def cast(x: Any, device: torch.device | None, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (also inside tuples/lists) to ``device``, and floating ones to ``dtype`` when given."""
    if isinstance(x, Tensor):
        if device is not None:
            x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(cast(item, device, dtype) for item in x)
    return x


def concat(parts: Sequence[Any]) -> Any:
    """Concatenate batch parts (tensors, or tuples of tensors item by item) along the batch dimension."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    return type(first)(torch.cat([part[i] for part in parts]) for i in range(len(first)))


def narrow(x: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of a batch part (a tensor, or a tuple of tensors)."""
    if isinstance(x, Tensor):
        return x[start:stop]
    return type(x)(t[start:stop] for t in x)


def forward(model: nn.Module, inputs: Inputs, params: dict[str, Tensor] | None = None) -> Any:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple of inputs; with ``params`` by ``functional_call``
    (the given tensors replace the named parameters for this call only, the model is not written)."""
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if params is None:
        return model(*args)
    return functional_call(model, params, args)


class Batches:
    """The batches of ``data``: one batch, or an iterable of batches (see the module docstring).

    Iterating yields the checked ``(inputs, targets)`` pairs with at least one example, as given (not cast). A
    one-shot iterator is read into a list so that it can be iterated again, unless ``once`` says it will be read
    only once (then it streams).
    """

    def __init__(self, data: object, *, once: bool = False) -> None:
        if is_batch(data):
            self.source: Iterable[Any] = [tuple(data)]  # type: ignore[arg-type]
        elif isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                "data must be one (inputs, targets) pair of tensors or an iterable of such pairs, "
                f"got {type(data).__name__}"
            )
        elif isinstance(data, Iterator) and not once:
            self.source = list(data)
        else:
            self.source = data

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.source:
            inputs, targets = check_batch(batch)
            if batch_size(inputs) > 0:
                yield inputs, targets

    def count(self) -> int:
        """The number of examples (one pass over the data)."""
        return sum(batch_size(inputs) for inputs, _ in self)

    def weighted(
        self, total: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[WeightedBatch]:
        """The batches cast to ``device`` and (floating tensors) ``dtype``, each with weight ``n_b / total``."""
        for inputs, targets in self:
            weight = batch_size(inputs) / total
            yield WeightedBatch(cast(inputs, device, dtype), cast(targets, device, dtype), weight)


def groups_of(batches: Iterable[Batch], m: int) -> Iterator[Batch]:
    """Consecutive groups of exactly ``m`` examples, across batch boundaries; a last short group is dropped."""
    pending: list[Batch] = []
    count = 0
    for inputs, targets in batches:
        pending.append((inputs, targets))
        count += batch_size(inputs)
        if count < m:
            continue
        x, y = concat([b[0] for b in pending]), concat([b[1] for b in pending])
        full = (count // m) * m
        for start in range(0, full, m):
            yield narrow(x, start, start + m), narrow(y, start, start + m)
        pending = [(narrow(x, full, count), narrow(y, full, count))]
        count -= full


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad`` by name, in ``model.parameters()`` order (shared ones once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "the model has no trainable parameters (no parameters that require grad): there is nothing to measure"
        )
    return params


@contextmanager
def measuring(model: nn.Module, train_mode: bool = False, *, restore_parameters: bool = False) -> Iterator[None]:
    """Run the block with ``model`` in train or eval mode; afterwards restore every module's mode and every buffer
    (BatchNorm running statistics move in train mode), and with ``restore_parameters`` every parameter, exactly."""
    modes = [(module, module.training) for module in model.modules()]
    tensors = [*model.buffers(), *(model.parameters() if restore_parameters else ())]
    saved = [(t, t.detach().clone()) for t in tensors]
    try:
        model.train(train_mode)
        # in train mode BatchNorm uses batch statistics; it must not also update its running statistics in place,
        # which torch.func transforms (forward-over-reverse products) forbid and the restore below would undo
        with running_stats.frozen(running_stats.norm_layers(model)) if train_mode else nullcontext():
            yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved:
                # only what changed is written back: a write bumps the tensor's version, which would invalidate a
                # gradient graph that saved it (the Hessian operator keeps those graphs across products)
                if not torch.equal(tensor, copy):
                    tensor.copy_(copy)
        for module, mode in modes:
            module.training = mode
