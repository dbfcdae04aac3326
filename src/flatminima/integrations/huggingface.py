"""SAM under the Hugging Face ``transformers.Trainer`` and in a plain Accelerate loop (``pip install
flatminima[huggingface]``).

The Trainer does one forward-backward per micro-batch (``training_step``), then clips and calls
``optimizer.step()``, which Accelerate forwards as ``SAM.step(None)``: SAM's two passes do not fit. Here:

- ``SAMTrainer`` runs each optimizer step as SAM's plan (``SAM.plan``): the Trainer's own passes over
  the step's k micro-batches are the plan's first pass (at ``w``, or at ``w + e`` for a rule that reads no
  ``g(w)``; the inputs are kept until the step), the plan's later pass replays the same k micro-batches at
  ``w + e`` (same loss scaling, ``num_items_in_batch`` included), ``w`` is restored exactly; then the Trainer
  clips the descent direction and its ``optimizer.step()`` takes SAM's descent step (``SAM.second_step``),
  through Accelerate's GradScaler under fp16. An optimiser with a batch rule is refused when the Trainer is
  built.
- ``sam_step`` is one SAM step in your own Accelerate loop.

Supported: one process or DDP (``accelerate launch`` / ``torchrun``), fp32, bf16 autocast, fp16 with Accelerate's
GradScaler; and FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``), where ``prepare`` shards the model and
swaps the parameters in SAM's groups for their DTensor shards: SAM takes them over at its first step (norms over
all ranks' shards, ``w + e`` written into the shards), so a step is SAM on the global batch. Under FSDP2 the
Trainer refuses ``optimizers=``: let ``SAMTrainer`` build SAM from ``TrainingArguments`` (``sam_rho``...); its
checkpoints hold the base optimiser's sharded state and SAM's step counter (``sam_state.json``). Tested in float32
on CPU processes (Accelerate itself enables FSDP on accelerators only); FSDP2's bf16 ``MixedPrecisionPolicy`` is
not tested. Refused with an error: FSDP1 (its flat parameters hold slices of several tensors), fp16 under FSDP2 (a
GradScaler's inf/NaN check would differ between ranks), rules not declared ``shard_aware`` under FSDP2, DeepSpeed,
XLA and Megatron-LM, whose engines own the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

try:
    import transformers
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatminima.integrations.huggingface needs transformers and accelerate: pip install 'flatminima[huggingface]'"
    ) from error

from flatminima.optim import scaler as amp
from flatminima.optim import sharded
from flatminima.optim.plan import Descend, Pass
from flatminima.optim.sam import SAM

__all__ = ["SAMTrainer", "sam_step", "unwrap_sam"]

# Backends whose engines own the optimizer step (FSDP is checked apart: FSDP2 is supported, FSDP1 is not).
_UNSUPPORTED = ("DEEPSPEED", "XLA", "MEGATRON_LM")

LossFn = Callable[[nn.Module, Any], Tensor]

# Under FSDP2 the Trainer's checkpoint holds the base optimiser's sharded state; SAM's step counter goes here
_SAM_STATE_NAME = "sam_state.json"


def unwrap_sam(optimizer: Optimizer) -> SAM:
    """The ``SAM`` inside ``optimizer`` (itself, or what ``accelerator.prepare`` wrapped); TypeError if none."""
    inner = optimizer
    while isinstance(inner, AcceleratedOptimizer):
        inner = inner.optimizer
    if not isinstance(inner, SAM):
        raise TypeError(
            f"expected a flatminima.SAM (or the AcceleratedOptimizer wrapping one); got {type(optimizer).__name__}"
            + (f" wrapping {type(inner).__name__}" if inner is not optimizer else "")
            + ". Build it as SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=...)."
        )
    return inner


def sam_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    *batches: Any,
    max_grad_norm: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """One SAM step in a plain Accelerate loop: ``loss = sam_step(accelerator, model, optimizer, loss_fn, batch)``.

    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned (the optimizer wraps a ``SAM``);
    ``loss_fn(model, batch)`` runs the forward pass and returns the scalar loss. Pass several batches to accumulate
    micro-batches: the ascent uses the gradient of all of them at ``w`` and the descent the gradient of all of them
    at ``w + e``. ``reduction="mean"`` minimises the mean of their losses, ``"sum"`` their sum (for losses already
    normalised over the whole step, e.g. by a token count). Do not wrap the call in ``accelerator.accumulate``: the
    call is the whole step, gradients zeroed before and after.

    The passes are SAM's plan of the step (``SAM.plan``): two, or one when the cadence exempts the step or
    the ascent reads no ``g(w)`` (Momentum-SAM, a random direction; the loss returned is then the one at
    ``w + e``). An optimiser with a batch rule (n-SAM, RW-SAM, Ahn et al.'s SA) is refused: those pick examples
    from ``(inputs, targets)`` tensors, which this loop does not hand over; use ``SharpnessAwareStep``.

    ``max_grad_norm`` clips the descent direction (after unscaling under fp16). Under fp16 the first gradient is
    unscaled before the ascent, an inf/NaN step is skipped by the GradScaler (``optimizer.step_was_skipped`` is
    set, so a prepared scheduler does not advance) and the scaler is updated. Under DDP the last micro-batch of
    each pass all-reduces (one perturbation for the global batch). Under FSDP2 the last micro-batch of each pass
    reduce-scatters (the earlier ones accumulate unsynchronised), SAM's norms are taken over all ranks' shards and
    the step is SAM on the global batch; its rules must be ``shard_aware`` (the built-in ascent rules are, not
    ``RandomDirection``; no descent rule but SAM's own). Returns the loss at ``w``, detached (this rank's).
    """
    if not batches:
        raise ValueError("sam_step needs at least one batch: sam_step(accelerator, model, optimizer, loss_fn, batch).")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None; got {max_grad_norm}.")
    _check_backend(accelerator)
    _check_processes(accelerator)
    _check_not_accumulating(model)
    sam = unwrap_sam(optimizer)
    _adopt_shards(sam)
    scaler = _active(accelerator.scaler)
    # accelerator.backward divides by its gradient_accumulation_steps; this call owns the accumulation instead
    weight = accelerator.gradient_accumulation_steps / (len(batches) if reduction == "mean" else 1)

    def passes() -> Tensor:
        total: Tensor | float = 0.0
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1  # DDP all-reduces once, on the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss * weight if weight != 1 else loss)
            total = total + loss.detach()
        return total / len(batches) if reduction == "mean" else total

    plan = sam.plan(scaler, sync_perturbation=True)  # refuses a batch rule, which needs (inputs, targets)
    sam.zero_grad()
    loss: Tensor | None = None
    try:
        for phase in plan:  # the passes at w and w + e, or fewer (a cadence, a rule that reads no g(w))
            if isinstance(phase, Descend):
                break
            value = passes()
            if phase.reports_loss:
                loss = value
    finally:
        sam.restore()
    if max_grad_norm is not None and plan.outcome != "skipped":
        sam.apply_descent_rule(scaler)  # clip the final direction, as SharpnessAwareStep does
        if scaler is not None and not amp.already_unscaled(scaler, sam):
            scaler.unscale_(sam)
        params = [p for group in sam.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    skipped = _descend(sam, scaler)
    if isinstance(optimizer, AcceleratedOptimizer):
        optimizer._is_overflow = skipped  # what AcceleratedOptimizer.step records, read by AcceleratedScheduler
    sam.zero_grad()
    return loss


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are SAM steps; same constructor, plus three keywords.

    Either pass the optimizer, ``optimizers=(SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=...),
    scheduler_or_None)`` (a scheduler built on the SAM object, or None for the one ``TrainingArguments`` asks
    for), or let the Trainer build its usual optimizer from ``TrainingArguments`` (``optim``, ``learning_rate``,
    ``weight_decay`` groups...) and wrap it in SAM with ``sam_rho`` (default 0.05), ``sam_adaptive`` (ASAM) and
    ``sam_kwargs`` (any other ``SAM`` option: ``p``, ``perturbation``, ``descent``, ``cadence``,
    ``nonfinite``...).

    Each optimizer step runs SAM's plan: the Trainer's passes over the k = ``gradient_accumulation_steps`` micro-batches
    (at ``w``, or at ``w + e`` for a rule that reads no ``g(w)``; the loss logged is this one), the ascent from their
    accumulated gradient, the same k micro-batches at ``w + e`` with the same loss scaling, ``w`` restored exactly
    before ``training_step`` returns, then the Trainer's clipping (``max_grad_norm``) of the descent direction and its
    ``optimizer.step()``, which is SAM's descent step. The inputs of the step's micro-batches are kept until its last
    one. BatchNorm running statistics come from the first pass only. Under fp16 the first gradient is unscaled before
    the ascent and an overflow in either pass skips the step (no perturbation is left behind, the LR scheduler does not
    advance).
    """

    def __init__(
        self,
        *args: Any,
        sam_rho: float | None = None,
        sam_adaptive: bool | None = None,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        options = dict(sam_kwargs or {})
        if sam_rho is not None:
            options["rho"] = sam_rho
        if sam_adaptive is not None:
            options["adaptive"] = sam_adaptive
        self.sam_options = options
        self._sam_micro_batches: list[tuple[Any, Any]] = []
        self._sam_phases: Any = iter(())
        self._sam_ready = False
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            if options:
                raise ValueError(
                    "sam_rho, sam_adaptive and sam_kwargs configure the SAM that SAMTrainer builds from "
                    "TrainingArguments; with optimizers=(SAM(...), ...) set these options on your SAM instead."
                )
            _check_no_batch_rule(unwrap_sam(self.optimizer))
        _check_backend(self.accelerator)

    # ------------------------------------------------------------------ the Trainer's seams

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._sam_micro_batches = []
        self._sam_ready = False
        try:
            return super().train(*args, **kwargs)
        finally:
            self._sam_micro_batches = []
            if self.optimizer is not None:
                with contextlib.suppress(TypeError):
                    unwrap_sam(self.optimizer).restore()  # never leave w + e behind, whatever stopped the loop

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Optimizer:
        """The Trainer's optimizer from ``TrainingArguments``, wrapped in ``SAM`` (unless one was given)."""
        build = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if build and not isinstance(optimizer, SAM):
            self.optimizer = SAM(None, optimizer, **self.sam_options)
        _check_no_batch_rule(unwrap_sam(self.optimizer))
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> Any:
        if optimizer is None and self.optimizer is not None:
            self._route_optimizer_step()  # before the scheduler wraps optimizer.step
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """The Trainer's forward-backward, the first pass of SAM's plan; on the step's last micro-batch, the rest.

        The first pass is at ``w``, or at ``w + e`` when the plan ascends first (a rule that reads no ``g(w)``).
        The plan's later passes replay the step's micro-batches, with the same loss scaling; ``w`` is restored
        before the Trainer clips and calls ``optimizer.step()``, SAM's descent.
        """
        sam = self._prepare_sam(model)
        if not self._sam_micro_batches:  # the step's first micro-batch: its plan, up to the first pass
            # with k > 1 micro-batches the plan keeps a pass at w (the weights stay at w between micro-batches)
            first_pass = self.args.gradient_accumulation_steps > 1
            scaler = _active(self.accelerator.scaler)
            self._sam_phases = iter(sam.plan(scaler, sync_perturbation=True, first_pass=first_pass))
            first = next(self._sam_phases)
            if not isinstance(first, Pass):  # pragma: no cover - every plan has a pass
                raise AssertionError("a SAM step plan begins with a pass")
        self._sam_micro_batches.append((inputs, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:
            return loss
        micro_batches, self._sam_micro_batches = self._sam_micro_batches, []
        phases, self._sam_phases = self._sam_phases, iter(())
        try:
            for phase in phases:  # the plan's later passes; declined or skipped: straight to Descend
                if isinstance(phase, Descend):
                    if phase.outcome != "skipped" and _active(self.accelerator.scaler) is None:
                        sam.restore()
                        sam.apply_descent_rule()  # so that the Trainer clips the final direction
                    break
                for index, (batch, items) in enumerate(micro_batches):
                    last = index == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        super().training_step(model, batch, items)  # same scaling as at w; its loss is not logged
        finally:
            sam.restore()  # w exactly, before the Trainer clips, calls callbacks or raises
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP2, Accelerate's ``save_fsdp_optimizer`` saves through torch's ``get_optimizer_state_dict``, which
        keeps only the state and the parameter groups: SAM's step counter is written beside."""
        sam = self._sharded_sam()
        if sam is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            with open(os.path.join(output_dir, _SAM_STATE_NAME), "w", encoding="utf-8") as file:
                json.dump({"steps": sam.steps}, file)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        sam = self._sharded_sam() if checkpoint is not None else None
        if sam is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, _SAM_STATE_NAME)
        steps = sam.steps
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                steps = int(json.load(file)["steps"])
        sam.steps = steps  # torch's optimiser state dict keeps only the state and the groups

    # ------------------------------------------------------------------ internals

    def _sharded_sam(self) -> SAM | None:
        """The SAM, if the Trainer runs FSDP2 and its parameters are shards (taken over here if not yet)."""
        if not getattr(self, "is_fsdp_enabled", False) or self.optimizer is None:
            return None
        sam = unwrap_sam(self.optimizer)
        _adopt_shards(sam)
        return sam if sam.sharded else None

    def _prepare_sam(self, model: nn.Module) -> SAM:
        sam = self._route_optimizer_step()
        _adopt_shards(sam)  # FSDP2: prepare swapped SAM's parameters for their shards
        if not self._sam_ready:
            scaler = _active(self.accelerator.scaler)
            if scaler is not None and not sam.descent.is_identity and self.args.max_grad_norm > 0:
                raise ValueError(
                    f"with fp16 (a GradScaler) the Trainer would clip g(w + e) before the descent rule "
                    f"{sam.descent!r} combines it with g(w); set max_grad_norm=0, or train in bf16 or fp32."
                )
            if getattr(self, "is_distributed_loading_by_transformers", False):
                raise NotImplementedError("SAMTrainer does not support models sharded at load time (tp_plan/FSDP).")
            sam.watch_running_stats(self.accelerator.unwrap_model(model))
            self._sam_ready = True
        return sam

    def _route_optimizer_step(self) -> SAM:
        """Make the Trainer's ``optimizer.step()`` SAM's descent step (the prepared optimizer's class, once)."""
        optimizer = self.optimizer
        sam = unwrap_sam(optimizer)
        if isinstance(optimizer, AcceleratedOptimizer) and not isinstance(optimizer, _SAMAcceleratedOptimizer):
            if type(optimizer) is not AcceleratedOptimizer:
                raise TypeError(f"SAMTrainer cannot drive the optimizer wrapper {type(optimizer).__name__}.")
            if "step" in vars(optimizer):
                raise RuntimeError(
                    "a learning-rate scheduler was built on the prepared optimizer before SAMTrainer could route its "
                    "step() to SAM; build the scheduler on the SAM object, or let the Trainer build it."
                )
            if optimizer.scaler is not self.accelerator.scaler:
                raise NotImplementedError("SAMTrainer supports Accelerate's own GradScaler only (not MS-AMP).")
            optimizer.__class__ = _SAMAcceleratedOptimizer
        return sam


class _SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper whose ``step()`` (no closure) is SAM's descent step, GradScaler included."""

    def step(self, closure: Callable[[], Tensor] | None = None) -> Any:
        if closure is not None:
            return super().step(closure)
        if self.gradient_state.sync_gradients:
            self._is_overflow = _descend(unwrap_sam(self.optimizer), _active(self.scaler))
        return None


def _descend(sam: SAM, scaler: torch.amp.GradScaler | None) -> bool:
    """SAM's second step (weights already restored); returns whether the GradScaler skipped it."""
    if scaler is None:
        sam.second_step()
        return False
    before = scaler.get_scale()
    sam.second_step(grad_scaler=scaler)  # the scaler unscales (unless clipping did), checks and steps or skips
    scaler.update()
    return scaler.get_scale() < before  # update() lowers the scale exactly when it found inf/NaN


def _active(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    return scaler if amp.is_active(scaler) else None


def _check_no_batch_rule(sam: SAM) -> None:
    """Refuse, when the Trainer is built, an optimiser whose batch rule needs the step's tensors."""
    if sam.batch_rule is not None:
        raise ValueError(
            f"SAMTrainer cannot run the batch rule {sam.batch_rule!r}, which picks each pass's examples from "
            "(inputs, targets) tensors; train with flatminima.SharpnessAwareStep, or set optimizer.batch_rule = None."
        )


def _check_processes(accelerator: Accelerator) -> None:
    """Under torchrun, Accelerate must see the processes: on a CPU-only machine without ``cpu=True`` it reports
    ``DistributedType.NO``, and each rank would train on all the data with no all-reduce."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"this process is one of {world} (WORLD_SIZE), but Accelerate runs as one process "
            f"({accelerator.distributed_type}): each rank would train on all the data and never all-reduce. On a "
            "CPU-only machine create Accelerator(cpu=True), or launch with accelerate launch."
        )


def _check_not_accumulating(model: nn.Module) -> None:
    """``sam_step`` is a whole step: inside ``accelerator.accumulate(...)`` (or ``no_sync``) its passes would not
    all-reduce, and the ranks' weights drift apart. (On one process the context changes nothing for sam_step.)"""
    if not getattr(model, "require_backward_grad_sync", True) or not _fsdp2_syncs(model):  # off inside no_sync
        raise RuntimeError(
            "sam_step was called inside accelerator.accumulate(...) (or no_sync): its gradients would not be "
            "all-reduced, and under DDP the processes' weights drift apart. Call it outside; to accumulate, pass the "
            "micro-batches to one call: sam_step(accelerator, model, optimizer, loss_fn, *batches)."
        )


def _fsdp2_syncs(model: nn.Module) -> bool:
    """Whether an FSDP2 model reduce-scatters its gradients (``set_requires_gradient_sync(False)``, what
    ``accelerator.no_sync`` and ``accumulate`` set under FSDP2, turns it off); True for any other model."""
    get_state = getattr(model, "_get_fsdp_state", None)  # FSDPModule's; the flag has no public getter
    if get_state is None:
        return True
    groups = getattr(get_state(), "_fsdp_param_groups", None) or []
    return all(getattr(group, "reduce_grads", True) for group in groups)


def _adopt_shards(sam: SAM) -> None:
    """Under FSDP2, ``accelerator.prepare`` shards the model after SAM was built and swaps the parameters in SAM's
    groups for the DTensor shards: SAM takes them over (the process groups its norms reduce over, the checks of
    its rules, weights copied in and out of the shards), as it would have had it been built after sharding."""
    if sam.sharded:
        return
    groups = sharded.shard_groups(p for group in sam.param_groups for p in group["params"])
    if groups is None:  # plain parameters: one process, DDP
        return
    if sam.is_perturbed:  # pragma: no cover - prepare runs before any step
        raise RuntimeError("SAM holds w + e while its parameters were sharded; restore() before prepare().")
    sharded.check_shardable(sam.rules, sam.descent, sam.param_groups, sam.flat_layout is not None)
    sam.shard_groups = groups
    sam._weights = sam._plain_store()  # w copied in and out of the local shards (optim.groups.add_group does so)


def _check_backend(accelerator: Accelerator) -> None:
    kind = accelerator.distributed_type
    name = str(getattr(kind, "value", kind))
    if name in _UNSUPPORTED:
        raise NotImplementedError(
            f"SAM with Accelerate's {name} backend is not supported: its engine owns the optimizer step. "
            "Use one process, DDP (MULTI_GPU / MULTI_CPU) or FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2))."
        )
    if name == "FSDP" and not accelerator.is_fsdp2:
        raise NotImplementedError(
            "SAM with Accelerate's FSDP1 (fsdp_version=1) is not supported: its flat parameters hold slices of "
            "several tensors, so SAM's per-tensor rules and norms would see this rank's slice only. Use "
            "FullyShardedDataParallelPlugin(fsdp_version=2), whose DTensor shards SAM takes its norms over."
        )
    if name == "FSDP" and _active(accelerator.scaler) is not None:
        raise NotImplementedError(
            "SAM under FSDP2 with fp16 (a GradScaler) is not supported: the scaler's inf/NaN check would differ "
            "between ranks, each seeing its own shards. Use mixed_precision='bf16' or 'no' with FSDP2."
        )
