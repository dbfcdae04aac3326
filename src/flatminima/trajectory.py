"""Trajectory losses: a term added to the batch's mean loss that pulls the outputs toward earlier ones.

SAF and MESA (Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083)
replace SAM's sharpness term by

    L = mean_i l(f_w(x_i), y_i) + lambda tau^2 mean_i KL( softmax(z_i / tau) || softmax(f_w(x_i) / tau) )

with ``z_i`` a constant target: the example's own logits from ``E~`` visits earlier (SAF, ``PastOutputs``),
or the logits of an exponential moving average of the weights (MESA, ``EMATarget``). One forward-backward
per step (MESA adds one forward of the averaged model, without gradient).

A ``TrajectoryLoss`` is what ``PlainStep`` asks for (``trajectory=``): at each step
``penalty(outputs, inputs, indices)`` returns the scalar added to the mean loss (and records what it must: SAF
writes the batch's detached logits), and ``after_step(model)`` runs after the optimiser's step (MESA's average;
SAF nothing). ``state_dict()`` / ``load_state_dict()`` hold tensors only (``torch.load(weights_only=True)``
reads them), so a checkpoint carries the record or the average and a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from flatminima.optim.sharded import is_sharded

__all__ = ["EMATarget", "PastOutputs", "TrajectoryLoss", "kl_to_target"]


def kl_to_target(outputs: Tensor, target: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """``tau^2 mean_i KL(softmax(target_i / tau) || softmax(outputs_i / tau))`` over the batch (rows), reduced in
    float32 at least (float64 for float64 outputs). ``target`` carries no gradient. ``mask`` (bool, one per row):
    the rows whose term counts; the others contribute 0, and the mean is still over the whole batch.

    The same as the official code's ``F.kl_div(log softmax(outputs / tau), softmax(target / tau))`` summed over
    classes, with both sides as log-softmax (no ``log(0)`` for a saturated softmax)."""
    if outputs.dim() != 2:
        raise ValueError(f"a trajectory loss compares logits of shape (batch, classes); got {tuple(outputs.shape)}")
    if target.shape != outputs.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match the outputs' {tuple(outputs.shape)}")
    wide = torch.promote_types(outputs.dtype, torch.float32)
    log_p = F.log_softmax(outputs.to(wide) / tau, dim=1)
    log_q = F.log_softmax(target.detach().to(device=outputs.device, dtype=wide) / tau, dim=1)
    per_example = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(dim=1)
    if mask is not None:
        per_example = torch.where(mask.to(per_example.device), per_example, 0.0)
    return per_example.mean() * tau**2


def _check_weight(lam: float, tau: float) -> tuple[float, float]:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (lambda, the weight of the trajectory loss) must be a finite number >= 0; got {lam!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau (the temperature of the softmax) must be a finite number > 0; got {tau!r}")
    return float(lam), float(tau)


def _check_count(value: int, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _distributed(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class TrajectoryLoss:
    """The term a step adds to the batch's mean loss, from the batch's outputs (and, for SAF, its examples' indices).

    Attributes: ``lam`` (lambda, the weight), ``tau`` (the temperature), ``needs_indices`` (whether
    ``penalty`` needs the examples' indices in the training set), ``last_penalty`` (the last step's term,
    detached; 0 before any).
    """

    needs_indices = False

    def __init__(self, lam: float, tau: float) -> None:
        self.lam, self.tau = _check_weight(lam, tau)
        self.last_penalty: Tensor = torch.zeros(())

    def penalty(self, outputs: Tensor, inputs: Tensor, indices: Tensor | None) -> Tensor:
        """The scalar added to the batch's mean loss (with a gradient through ``outputs``)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimiser step, with the model the step trains (wrapped in DDP or not)."""

    def check_batch(self, inputs: Tensor, indices: Tensor | None) -> None:
        """Refuse a batch the term cannot use before the forward pass runs (SAF: missing or bad indices)."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse what the loss cannot follow: FSDP's sharded parameters (DTensor)."""
        if any(is_sharded(p) for p in model.parameters()):
            raise ValueError(
                f"{type(self).__name__} does not support FSDP's sharded parameters (DTensor): train with "
                "DistributedDataParallel (no --fsdp), or with another optimiser"
            )

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the state this loss keeps (its record or average), as allocated now."""
        raise NotImplementedError

    def _zero(self, outputs: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=torch.promote_types(outputs.dtype, torch.float32), device=outputs.device)
        self.last_penalty = zero
        return zero


class PastOutputs(TrajectoryLoss):
    """SAF: the target of an example is its own logits from ``epochs_back`` (E~) visits earlier.

    Each example ``i`` keeps a visit count ``c_i`` (its forward passes in training so far). At a visit the step
    reads the record written ``E~`` visits earlier, slot ``(c_i - E~) mod (E~ + 1)``, and writes the detached
    logits at slot ``c_i mod (E~ + 1)``; the term counts for the example when ``c_i > start_visit`` (and a record
    ``E~`` visits old exists: ``c_i >= E~``). With one visit per epoch this is the official code's per-epoch
    buffer with ``epoch > kl_start_epoch``; an example left out of an epoch (the last incomplete batch is dropped)
    is not counted, so it never reads a stale record. Logits that are not finite are not recorded (the count does
    not advance), so a skipped step's inf/NaN never becomes a target.

    Args:
        num_examples: N, the training set's size; ``indices`` are positions in it, 0..N-1.
        epochs_back: E~ >= 1 (the official default is 3).
        start_visit: the term counts from visit ``start_visit + 1`` on (visits counted from 0; official: 5 epochs).
        lam: the weight lambda of the term.
        tau: the softmax temperature.
        device: where the record lives (default the CPU, as the official code keeps it; ``(E~+1) N C`` floats).
        dtype: the record's dtype (float32; float64 for an exact reference).
        distributed: under DDP all-gather each step's (indices, logits), so that every rank's record is complete
            and equal (None: when torch.distributed is initialised with more than one process).

    Memory: ``(E~ + 1) N C`` values of ``dtype`` (allocated at the first step, from the outputs' C) and ``N``
    int64 counts.
    """

    needs_indices = True

    def __init__(
        self,
        num_examples: int,
        *,
        epochs_back: int = 3,
        start_visit: int = 5,
        lam: float = 0.3,
        tau: float = 5.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(lam, tau)
        self.num_examples = _check_count(num_examples, "num_examples", 1)
        self.epochs_back = _check_count(epochs_back, "epochs_back (E~)", 1)
        self.start_visit = _check_count(start_visit, "start_visit", 0)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got {dtype}")
        self.device, self.dtype, self.distributed = torch.device(device), dtype, distributed
        self.slots = self.epochs_back + 1
        self.visits = torch.zeros(self.num_examples, dtype=torch.int64, device=self.device)
        self.outputs: Tensor | None = None  # (slots, N, C), allocated at the first step
        self._checked: tuple[Tensor | None, Tensor] | None = None  # (indices as given, as checked) by check_batch

    def __repr__(self) -> str:
        return (
            f"PastOutputs(num_examples={self.num_examples}, epochs_back={self.epochs_back}, "
            f"start_visit={self.start_visit}, lam={self.lam}, tau={self.tau}, device={str(self.device)!r})"
        )

    def penalty(self, outputs: Tensor, inputs: Tensor, indices: Tensor | None) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(f"SAF records logits of shape (batch, classes); got outputs of {tuple(outputs.shape)}")
        checked, self._checked = self._checked, None
        reuse = checked is not None and checked[0] is indices
        local = checked[1] if reuse else self._indices(indices, outputs.shape[0])
        if self.outputs is None:
            self.outputs = torch.zeros(
                self.slots, self.num_examples, outputs.shape[1], dtype=self.dtype, device=self.device
            )
        elif self.outputs.shape[2] != outputs.shape[1]:
            raise ValueError(f"the outputs have {outputs.shape[1]} classes; SAF's record has {self.outputs.shape[2]}")
        record = outputs.detach().to(self.dtype)
        if _distributed(self.distributed):
            every, records = _all_gather(local.to(outputs.device), record)
            every = every.to(self.device)
            self._check_distinct(every, "the global batch (all ranks together)")
        else:
            every, records = local, record
        visits = self.visits[local]
        active = (visits > self.start_visit) & (visits >= self.epochs_back)
        if self.lam == 0 or not bool(active.any()):
            term = self._zero(outputs)
        else:
            target = self.outputs[(visits - self.epochs_back) % self.slots, local]
            term = self.lam * kl_to_target(outputs, target.to(outputs.device), self.tau, active.to(outputs.device))
            self.last_penalty = term.detach()
        self._write(every, records.to(self.device))
        return term

    def check_batch(self, inputs: Tensor, indices: Tensor | None) -> None:
        # the step's penalty call that follows reuses the checked indices (no second min, max and unique)
        self._checked = (indices, self._indices(indices, inputs.shape[0]))

    def _indices(self, indices: Tensor | None, batch: int) -> Tensor:
        if indices is None:
            raise ValueError(
                "SAF (PastOutputs) records each example's logits, so it needs the examples' indices in the training "
                "set: call step(inputs, targets, indices=...) with their positions 0..N-1 (or penalty(..., indices))"
            )
        indices = torch.as_tensor(indices)
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.shape != (batch,):
            raise ValueError(
                f"indices must be one integer per example, shape ({batch},); got {indices.dtype} {tuple(indices.shape)}"
            )
        indices = indices.to(device=self.device, dtype=torch.int64)
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.num_examples:
            bad = low if low < 0 else high
            raise ValueError(
                f"index {bad} is out of range for SAF's record of {self.num_examples} examples "
                f"(0..{self.num_examples - 1})"
            )
        self._check_distinct(indices, "a batch")
        return indices

    @staticmethod
    def _check_distinct(indices: Tensor, where: str) -> None:
        if torch.unique(indices).numel() != indices.numel():
            raise ValueError(f"an example appears twice in {where}: SAF records one set of logits per example visit")

    def _write(self, indices: Tensor, records: Tensor) -> None:
        assert self.outputs is not None
        finite = torch.isfinite(records).all(dim=1)
        slots = self.visits[indices] % self.slots
        kept = self.outputs[slots, indices]
        self.outputs[slots, indices] = torch.where(finite[:, None], records, kept)
        self.visits[indices] += finite.to(torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """The counts and the record (the tensors themselves, as ``Module.state_dict``: no copy of the record)."""
        state: dict[str, Any] = {"visits": self.visits}
        if self.outputs is not None:
            state["outputs"] = self.outputs
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        visits = state["visits"]
        if visits.shape != (self.num_examples,):
            raise ValueError(
                f"the SAF state is for {visits.numel()} examples; this run's training set has {self.num_examples}"
            )
        outputs = state.get("outputs")
        if outputs is not None and (outputs.dim() != 3 or outputs.shape[:2] != (self.slots, self.num_examples)):
            raise ValueError(
                f"the SAF record has shape {tuple(outputs.shape)}; this run needs "
                f"({self.slots}, {self.num_examples}, C) (epochs_back {self.epochs_back})"
            )
        self.visits.copy_(visits)
        if outputs is None:
            self.outputs = None
            return
        if self.outputs is None or self.outputs.shape != outputs.shape:
            self.outputs = torch.empty(outputs.shape, dtype=self.dtype, device=self.device)
        self.outputs.copy_(outputs)

    def state_bytes(self) -> int:
        size = self.visits.numel() * self.visits.element_size()
        if self.outputs is not None:
            size += self.outputs.numel() * self.outputs.element_size()
        return size


def _all_gather(indices: Tensor, records: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's (indices, records) in rank order; the ranks' batches may differ in size."""
    world = dist.get_world_size()
    size = torch.tensor([indices.numel()], dtype=torch.int64, device=records.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    most = max(counts)
    pad = most - indices.numel()
    indices = F.pad(indices.to(records.device), (0, pad))
    padded = F.pad(records, (0, 0, 0, pad))
    all_indices = [torch.empty_like(indices) for _ in range(world)]
    all_records = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(all_indices, indices)
    dist.all_gather(all_records, padded)
    return (
        torch.cat([t[:n] for t, n in zip(all_indices, counts, strict=True)]),
        torch.cat([t[:n] for t, n in zip(all_records, counts, strict=True)]),
    )


class EMATarget(TrajectoryLoss):
    """MESA: the target is the output of an exponential moving average of the model, run in eval mode.

    ``ema <- decay ema + (1 - decay) w`` over every floating-point parameter and buffer (BatchNorm's running
    statistics included), after every optimiser step from the first (timm's ``ModelEmaV2``); integer buffers
    (BatchNorm's ``num_batches_tracked``) are copied. The averaged model is the model's own module run with the
    averaged tensors (``torch.func.functional_call``) in eval mode, without gradient; the modules' modes are restored
    afterwards. The term counts on steps ``t >= start_step`` (steps counted from 0).

    Args:
        model: the model (plain or in DDP); the average starts from its current weights.
        decay: in [0, 1) (official 0.9998).
        lam: the weight lambda of the term.
        tau: the softmax temperature.
        start_step: the first step whose term counts.
        distributed: under DDP, take the buffers' average from rank 0's buffers (DDP broadcasts rank 0's at every
            forward, so the model's are rank 0's), keeping every rank's average equal (None: when
            torch.distributed is initialised with more than one process).

    Memory: one copy of the model's parameters and buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9998,
        lam: float = 0.8,
        tau: float = 5.0,
        start_step: int = 0,
        distributed: bool | None = None,
    ) -> None:
        super().__init__(lam, tau)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1); got {decay!r}")
        self.decay = float(decay)
        self.start_step = _check_count(start_step, "start_step", 0)
        self.distributed = distributed
        module = _unwrap(model)
        self.check_model(module)
        self.module = module
        with torch.no_grad():
            self.average: dict[str, Tensor] = {
                name: value.detach().clone() for name, value in _named_tensors(module).items()
            }
        self._floating = [name for name, value in self.average.items() if value.is_floating_point()]
        self._buffers = [name for name, _ in module.named_buffers()]  # a list: every rank broadcasts in one order
        self.steps = 0

    def __repr__(self) -> str:
        return f"EMATarget(decay={self.decay}, lam={self.lam}, tau={self.tau}, start_step={self.start_step})"

    @property
    def active(self) -> bool:
        """Whether the term counts on the coming step."""
        return self.lam != 0 and self.steps >= self.start_step

    def forward(self, inputs: Tensor) -> Tensor:
        """The averaged model's outputs on ``inputs`` (eval mode, no gradient)."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(self.module, self.average, (inputs,))
        finally:
            for m, training in modes:
                m.training = training

    def penalty(self, outputs: Tensor, inputs: Tensor, indices: Tensor | None) -> Tensor:
        if not self.active:
            return self._zero(outputs)
        term = self.lam * kl_to_target(outputs, self.forward(inputs), self.tau)
        self.last_penalty = term.detach()
        return term

    def after_step(self, model: nn.Module) -> None:
        current = _named_tensors(_unwrap(model))
        if current.keys() != self.average.keys():
            raise ValueError("after_step got a model whose parameters and buffers are not the averaged model's")
        with torch.no_grad():
            floating = [self.average[n] for n in self._floating]
            if floating:
                torch._foreach_mul_(floating, self.decay)
                torch._foreach_add_(floating, [current[n].detach() for n in self._floating], alpha=1.0 - self.decay)
            for name, value in self.average.items():
                if not value.is_floating_point():
                    value.copy_(current[name])
            if _distributed(self.distributed):
                for name in self._buffers:  # rank 0's, as DDP's next forward makes the model's
                    dist.broadcast(self.average[name], src=0)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The average (the tensors themselves, as ``Module.state_dict``) and the steps taken."""
        return {"average": dict(self.average), "steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state["average"]
        if average.keys() != self.average.keys():
            missing = sorted(set(self.average) ^ set(average))[:3]
            raise ValueError(f"the MESA state does not match the model: {', '.join(missing)} differ")
        with torch.no_grad():
            for name, value in self.average.items():
                value.copy_(average[name])
        self.steps = int(state["steps"])

    def state_bytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in self.average.values())


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters and buffers by name (a tied parameter once), as ``functional_call`` takes them."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
