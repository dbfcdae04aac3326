"""BatchNorm running statistics across SAM's two passes.

SAM runs forward twice per step. Left alone, normalisation layers would update their running mean and variance
in both passes, the second time with statistics of the *perturbed* network. The SAM paper's code keeps the
statistics of the first, unperturbed pass. The tools here do that without copying a buffer: while frozen, a
layer's ``track_running_stats`` is off, so in training mode it normalises with the batch statistics (exactly as
before) but writes nothing, ``num_batches_tracked`` included. Inside a ``torch.compile``'d module, which no
forward hook reaches, ``freeze_everywhere`` copies the statistics instead and puts them back after the pass.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "AveragedRunningStats",
    "FrozenPass",
    "RunningStatsFreezer",
    "RunningStatsSnapshot",
    "compiled_module_inner",
    "freeze_everywhere",
    "frozen",
    "norm_layers",
]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that keep running statistics: BatchNorm 1d/2d/3d and SyncBatchNorm.

    InstanceNorm with ``track_running_stats=True`` is not handled: it updates its buffers whatever the flag says.
    """
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def frozen(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, ``layers`` use batch statistics but leave their running statistics untouched."""
    previous = [layer.track_running_stats for layer in layers]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous):
            layer.track_running_stats = flag


class RunningStatsFreezer:
    """The one owner of "BatchNorm frozen during the perturbed pass" for a SAM optimiser.

    ``freeze()`` switches the watched layers' ``track_running_stats`` off (idempotent: a second call keeps the
    flags saved by the first), ``thaw()`` puts the saved flags back. Models are watched from ``SAM(model=)``
    or ``SAM.watch_running_stats(model)`` (what the batch-aware step does); watching one twice changes nothing.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._layers: list[nn.Module] = []
        self._saved: list[bool] | None = None
        if model is not None:
            self.watch(model)

    @property
    def watching(self) -> bool:
        return bool(self._layers)

    def watch(self, model: nn.Module) -> None:
        known = {id(layer) for layer in self._layers}
        self._layers.extend(layer for layer in norm_layers(model) if id(layer) not in known)

    def freeze(self) -> None:
        if self._saved is not None or not self._layers:
            return
        self._saved = [layer.track_running_stats for layer in self._layers]
        for layer in self._layers:
            layer.track_running_stats = False

    def thaw(self) -> None:
        if self._saved is not None:
            for layer, flag in zip(self._layers, self._saved):
                layer.track_running_stats = flag
            self._saved = None


class FrozenPass:
    """What ``freeze_everywhere`` saw: ``modules_ran`` is False when no ``nn.Module`` was called in eager mode
    inside the block (a model without modules, or one called from inside a ``torch.compile``'d function, where
    no hook can reach its layers)."""

    def __init__(self) -> None:
        self.modules_ran = False


def compiled_module_inner(module: nn.Module) -> nn.Module | None:
    """The module whose layers run inside a compiled graph when ``module`` is called, else None: what a
    ``torch.compile(module)`` wrapper (dynamo's ``OptimizedModule``) runs, or ``module`` itself when it was compiled
    in place (``module.compile()``: its own forward pre-hooks still fire, its submodules' may not)."""
    if getattr(module, "_compiled_call_impl", None) is not None:
        return module
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing was compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return module._orig_mod if optimized is not None and isinstance(module, optimized) else None


@contextmanager
def freeze_everywhere() -> Iterator[FrozenPass]:
    """Freeze every normalisation layer that runs forward inside the block, whatever model it belongs to.

    For ``SAM.step(closure)`` when no model was handed to the optimiser: a global forward pre-hook switches
    each layer off as it is called; all are switched back when the block ends, even if the forward raised.

    A compiled module (``torch.compile(model)``) runs its layers inside a graph that no hook reaches (dynamo
    does not re-trace for a hook added later). When the hook meets one, it takes a
    ``RunningStatsSnapshot`` of the BatchNorm layers inside it instead, and the block's end puts those
    statistics back: the same result as frozen layers (in training mode the layers normalise with the batch
    statistics either way), with no recompilation.
    """
    report = FrozenPass()
    switched: list[nn.Module] = []
    snapshots: list[RunningStatsSnapshot] = []
    compiled: set[int] = set()

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if not isinstance(module, torch.fx.GraphModule):  # what a compiler backend runs is no model's module
            report.modules_ran = True
        inner = compiled_module_inner(module)
        if inner is not None:
            if id(module) not in compiled:
                compiled.add(id(module))
                snapshots.append(RunningStatsSnapshot(norm_layers(inner)))
            return
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            module.track_running_stats = False
            switched.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        with warnings.catch_warnings():
            # torch warns that a global hook also fires for the compiled wrapper: this one expects it
            warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks")
            yield report
    finally:
        handle.remove()
        for snapshot in reversed(snapshots):  # the earliest snapshot holds the statistics from before the block
            snapshot.rollback()
        for layer in switched:
            layer.track_running_stats = True


class RunningStatsSnapshot:
    """The running statistics of ``layers`` as they are now (``running_mean``, ``running_var``,
    ``num_batches_tracked``); ``rollback()`` puts them back, so a failed or skipped step leaves no trace.

    Only layers that can change them are copied: in training mode, tracking, with buffers.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        active = [m for m in layers if m.training and m.track_running_stats and m.running_mean is not None]
        self._buffers: list[Tensor] = [b for m in active for b in (m.running_mean, m.running_var)]
        self._start: list[Tensor] = [b.clone() for b in self._buffers]
        self._counters: list[Tensor] = [m.num_batches_tracked for m in active if m.num_batches_tracked is not None]
        self._counters_start: list[Tensor] = [c.clone() for c in self._counters]

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the statistics the snapshot was taken with."""
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._start)
        if self._counters:
            torch._foreach_copy_(self._counters, self._counters_start)


class AveragedRunningStats(RunningStatsSnapshot):
    """One running-statistics update per step from several unperturbed passes (micro-batches or m-SAM groups).

    Every pass starts from the statistics the step began with; at the end the layers keep the average of the
    states the passes produced. For equal-sized parts the running mean then equals the update a single pass
    over the whole batch would give, and ``num_batches_tracked`` advances by one. ``start``: a snapshot taken
    earlier from the same layers, with the statistics unchanged since, to reuse instead of copying them again.
    """

    def __init__(self, layers: list[nn.Module], start: RunningStatsSnapshot | None = None) -> None:
        if start is None:
            super().__init__(layers)
        else:
            self._buffers, self._start = start._buffers, start._start
            self._counters, self._counters_start = start._counters, start._counters_start
        self._sum: list[Tensor] = [torch.zeros_like(b) for b in self._buffers]
        self._passes = 0

    def before_pass(self) -> None:
        if self._buffers and self._passes:
            torch._foreach_copy_(self._buffers, self._start)
            if self._counters:
                torch._foreach_copy_(self._counters, self._counters_start)

    def after_pass(self) -> None:
        if self._buffers:
            torch._foreach_add_(self._sum, self._buffers)
        self._passes += 1

    def finish(self) -> None:
        if self._buffers and self._passes > 1:
            torch._foreach_div_(self._sum, float(self._passes))
            torch._foreach_copy_(self._buffers, self._sum)
