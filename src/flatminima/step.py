"""The batch-aware SAM step: for the variants that must see the batch, and for every training setting at once.

``SharpnessAwareStep`` owns forward and backward, and with them what SAM makes delicate: BatchNorm running
statistics (one update per step, from the unperturbed pass), autocast and GradScaler, gradient accumulation,
gradient clipping and DistributedDataParallel's ``no_sync``. It runs a ``SAM``
optimiser's plan of each step (``SAM.plan``): every pass on the examples the plan names, then the descent.

m-SAM (Foret et al. 2021, sec. 4.1): with ``group_size=m`` the batch is split into disjoint groups of m
examples; each group is perturbed by its own ``e_k`` (from its own gradient), and the gradients taken at the
``w + e_k`` are averaged, weighted by group size. The perturbed gradients accumulate directly in ``.grad`` (the
unperturbed ones are computed in fresh tensors), so m-SAM needs no buffer beyond SAM's saved copy of ``w``.

DistributedDataParallel: by default the first pass runs under ``no_sync``, so each rank perturbs with its own
gradient and only the second pass all-reduces; this is m-SAM with m = the per-rank batch, as in the original
code. ``sync_perturbation=True`` all-reduces the first pass too (one perturbation for the global batch).

FSDP2 (``fully_shard``): every backward pass reduce-scatters the gradient, so the first pass's gradient is the
global batch's and the step is plain SAM on the global batch (as ``sync_perturbation=True`` under DDP). m-SAM
groups and batch rules, which need per-rank perturbations, are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatminima import running_stats
from flatminima.batch_rules import BatchRule, Probe, make_probe
from flatminima.optim.plan import Descend, Pass, StepPlan
from flatminima.optim.sam import SAM
from flatminima.optim.scaler import already_unscaled
from flatminima.trajectory import TrajectoryLoss

__all__ = ["PlainStep", "Precision", "SharpnessAwareStep"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class Precision:
    """Autocast, loss scaling and the loss reduction, shared by every step class.

    ``loss(model, loss_fn, inputs, targets)`` runs the forward pass under ``torch.autocast`` (when a dtype is
    given) and reduces per-example losses to their mean in float32; ``backward(loss)`` scales it first when a
    GradScaler is enabled.
    """

    def __init__(self, grad_scaler: torch.amp.GradScaler | None, autocast_dtype: torch.dtype | None) -> None:
        self.grad_scaler = grad_scaler
        self.autocast_dtype = autocast_dtype

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler if it is enabled, else None."""
        return self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None

    def loss(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
        with self.autocast(inputs.device.type):
            losses = loss_fn(model(inputs), targets)
        if losses.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 under autocast
            losses = losses.float()
        return losses.mean()

    def losses(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example losses (float32 or wider), for steps that weight the examples."""
        with self.autocast(inputs.device.type):
            losses = loss_fn(model(inputs), targets)
        if losses.dim() != 1 or losses.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"this step weights the examples, so loss_fn must return one loss per example (reduction='none'); "
                f"got shape {tuple(losses.shape)} for a batch of {inputs.shape[0]}"
            )
        return losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses

    def backward(self, loss: Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def autocast(self, device_type: str) -> AbstractContextManager[None]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


class PlainStep:
    """One forward-backward and a step of any optimiser: ``loss = step(inputs, targets)``.

    The counterpart of ``SharpnessAwareStep`` for SGD, AdamW and the like, with the same autocast,
    GradScaler and clipping handling, so a training loop drives both alike. Returns the mean loss, detached.
    ``nonfinite``: on an inf/NaN loss, ``"raise"`` a ``FloatingPointError`` or ``"skip"`` the step (one host sync
    per step; a GradScaler does its own skipping); ``"ignore"`` (default) checks nothing.

    ``trajectory``: a ``TrajectoryLoss`` (SAF's ``PastOutputs``,
    MESA's ``EMATarget``). The step then minimises the mean loss plus
    ``trajectory.penalty(outputs, inputs, indices)`` (under the same autocast), calls ``trajectory.after_step(model)``
    after the optimiser's step, and still returns the mean loss alone (the term is ``trajectory.last_penalty``);
    ``step(inputs, targets, indices=...)`` gives SAF the examples' indices in the training set. The inf/NaN check
    covers the sum; a skipped step calls no ``after_step``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "ignore",
        trajectory: TrajectoryLoss | None = None,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {max_grad_norm}.")
        if nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'ignore'; got {nonfinite!r}.")
        if trajectory is not None and not isinstance(trajectory, TrajectoryLoss):
            raise TypeError(
                f"trajectory must be a flatminima.trajectory.TrajectoryLoss; got {type(trajectory).__name__}."
            )
        if trajectory is not None:
            trajectory.check_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.precision = Precision(grad_scaler, autocast_dtype)
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.trajectory = trajectory

    def __call__(self, inputs: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        opt, scaler = self.optimizer, self.precision.scaler
        opt.zero_grad()
        if self.trajectory is None:
            loss = self.precision.loss(self.model, self.loss_fn, inputs, targets)
            objective = loss
        else:
            loss, objective = self._with_trajectory(inputs, targets, indices)
        if self.nonfinite != "ignore" and scaler is None and not bool(torch.isfinite(objective)):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"the loss is {objective.item()}, so no step was taken")
            return loss.detach()  # skip: no backward, no step
        self.precision.backward(objective)
        if self.max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if self.trajectory is not None:
            self.trajectory.after_step(self.model)
        return loss.detach()

    def _with_trajectory(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor]:
        """The mean loss, and the mean loss plus the trajectory's term (one forward pass, under the autocast)."""
        assert self.trajectory is not None
        self.trajectory.check_batch(inputs, indices)  # before the forward moves BatchNorm's statistics
        with self.precision.autocast(inputs.device.type):
            outputs = self.model(inputs)
            losses = self.loss_fn(outputs, targets)
            penalty = self.trajectory.penalty(outputs, inputs, indices)
        if losses.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 under autocast
            losses = losses.float()
        loss = losses.mean()
        return loss, loss + penalty


class SharpnessAwareStep:
    """One SAM (or m-SAM) step on a batch: ``loss = step(inputs, targets)``.

    Args:
        model: the model, plain, wrapped in DistributedDataParallel, or sharded by FSDP2's ``fully_shard``.
        loss_fn: ``loss_fn(outputs, targets)``, per-example losses (``reduction="none"``) or their mean.
        optimizer: a ``SAM`` over the model's parameters (any rules, any cadence).
        group_size: m of m-SAM; ``None`` (or >= the batch) is plain SAM.
        accumulation_steps: split each pass of plain SAM into this many micro-batches (same result as the whole
            batch at once, less memory).
        grad_scaler: a ``torch.amp.GradScaler``; the step calls ``update()`` on it.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        max_grad_norm: clip the descent direction to this L2 norm.
        sync_perturbation: under DDP, all-reduce the first pass as well (one perturbation for all ranks). A
            descent rule that needs ``g(w)`` always gets it all-reduced, so every rank takes the same step.
        batch_rule: which examples each pass sees (``BatchRule``: n-SAM's ascent
            sample, RW-SAM's weights, a single example); it is set on the optimiser (``optimizer.batch_rule``),
            whose own rule is used when this is None. Default: the batch for both passes.

    The step runs the optimiser's plan (``SAM.plan``), which decides the passes: a step the cadence exempts
    from the ascent is one pass at ``w``; an ascent that needs no gradient at ``w`` skips the first pass (then the
    loss returned is the one at ``w + e``, and BatchNorm keeps that pass's statistics). Returns from a call the
    mean loss at ``w`` over the batch, detached (no host sync).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: SAM,
        *,
        group_size: int | None = None,
        accumulation_steps: int = 1,
        grad_scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        sync_perturbation: bool = False,
        batch_rule: BatchRule | None = None,
    ) -> None:
        if batch_rule is not None and not isinstance(batch_rule, BatchRule):
            raise TypeError(f"batch_rule must be a flatminima.batch_rules.BatchRule; got {type(batch_rule).__name__}.")
        if not isinstance(optimizer, SAM):
            raise TypeError(f"optimizer must be a flatminima.SAM; got {type(optimizer).__name__}.")
        if batch_rule is None:
            batch_rule = optimizer.batch_rule  # the optimiser's own, if one was set on it
        special = batch_rule is not None and not batch_rule.is_default
        if special and (group_size is not None or accumulation_steps > 1):
            raise ValueError(
                f"the batch rule {batch_rule!r} chooses each pass's examples itself; it does not combine with "
                "m-SAM groups (group_size) or accumulation_steps."
            )
        if optimizer.sharded and (group_size is not None or special):
            what = "m-SAM (group_size)" if group_size is not None else f"the batch rule {batch_rule!r}"
            raise ValueError(
                f"{what} needs a perturbation per rank, but with FSDP's sharded parameters every backward pass "
                "reduce-scatters the gradient across ranks; use plain SAM (group_size=None, no batch rule)."
            )
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size (m of m-SAM) must be >= 1 or None for plain SAM; got {group_size}.")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1; got {accumulation_steps}.")
        if group_size is not None and accumulation_steps > 1:
            raise ValueError(
                "m-SAM already processes the batch group by group; drop accumulation_steps, or lower group_size."
            )
        if group_size is not None and sync_perturbation:
            raise ValueError("sync_perturbation (one perturbation for all ranks) cannot be combined with m-SAM.")
        if group_size is not None and optimizer.flat_layout is not None:
            raise ValueError("m-SAM keeps earlier groups' gradients aside, which flatten=True does not allow.")
        if group_size is not None:
            for rule in {optimizer.rules.rule_for(group) for group in optimizer.param_groups}:
                declared = optimizer.rules.declared(rule)
                if declared.needs_state or not declared.needs_gradient:
                    why = "keeps state it would advance once per group" if declared.needs_state else "reads no g(w)"
                    raise ValueError(
                        f"m-SAM takes each group's ascent from that group's g(w), but the ascent rule {rule!r} {why}; "
                        "use group_size=None."
                    )
        if group_size is not None and optimizer.descent.needs_first_gradient:
            raise ValueError(
                f"the descent rule {optimizer.descent!r} combines g(w) with g(w + e), which m-SAM's per-group "
                "passes do not provide; use group_size=None."
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {max_grad_norm}.")
        if isinstance(model, DistributedDataParallel) and model.gradient_as_bucket_view and group_size is not None:
            raise ValueError("m-SAM swaps .grad tensors, which gradient_as_bucket_view=True forbids; turn it off.")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.group_size = group_size
        self.accumulation_steps = accumulation_steps
        self.precision = Precision(grad_scaler, autocast_dtype)
        self.max_grad_norm = max_grad_norm
        self.sync_perturbation = sync_perturbation
        optimizer.batch_rule = batch_rule if special else None  # the plan reads it from the optimiser
        self._norm_layers = running_stats.norm_layers(model)
        self._ddp = isinstance(model, DistributedDataParallel)
        optimizer.watch_running_stats(model)  # SAM owns the freezing of BatchNorm during perturbed passes

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.precision.grad_scaler

    @property
    def batch_rule(self) -> BatchRule | None:
        """The batch rule the optimiser's plan follows (None: the batch for every pass)."""
        return self.optimizer.batch_rule

    def __call__(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One step; if anything in it raises, the weights and BatchNorm statistics are left as they were."""
        start = running_stats.RunningStatsSnapshot(self._norm_layers)
        try:
            return self._step(inputs, targets, start)
        except BaseException:
            self.optimizer.restore()  # never leave the weights at w + e (or BatchNorm frozen)
            start.rollback()  # nor the statistics of the passes that ran
            raise

    def _step(self, inputs: Tensor, targets: Tensor, start: running_stats.RunningStatsSnapshot) -> Tensor:
        """Run the optimiser's plan of this step: each pass on its examples, then the descent."""
        batch = inputs.shape[0]
        if batch == 0 or targets.shape[0] != batch:
            raise ValueError(f"need a non-empty batch with one target per input; got {batch} and {targets.shape[0]}.")
        opt = self.optimizer
        groups = self._groups(batch)
        plan = opt.plan(
            self.precision.scaler,
            batch=(inputs, targets),
            groups=len(groups),
            sync_perturbation=self.sync_perturbation,
        )
        opt.zero_grad()
        stats = running_stats.AveragedRunningStats(self._norm_layers, start=start)
        loss: Tensor | float = 0.0
        for phase in plan:
            if isinstance(phase, Descend):
                if phase.outcome == "skipped":  # a non-finite g(w) under nonfinite="skip": no step at all
                    stats.rollback()
                    opt.second_step()
                    return torch.as_tensor(loss)
                stats.finish()
                return self._descend(torch.as_tensor(loss))
            share = self._run_pass(plan, phase, inputs, targets, groups, stats)
            if phase.reports_loss:
                loss = loss + share
        raise AssertionError("a step plan ends with Descend")  # pragma: no cover

    def _run_pass(
        self,
        plan: StepPlan,
        phase: Pass,
        inputs: Tensor,
        targets: Tensor,
        groups: list[list[tuple[int, int]]],
        stats: running_stats.AveragedRunningStats,
    ) -> Tensor:
        """Forward-backward of ``phase``; returns its share of the step's loss, detached.

        A pass takes the gradient of its examples' mean loss (or the batch rule's weighted sum), in micro-batches
        (``accumulation_steps``; a batch rule's own sample in batch-sized pieces); at ``w + e`` an m-SAM group's
        pass is weighted by its share of the batch, so that the groups' gradients add up to the batch's mean.
        """
        batch = inputs.shape[0]
        x, y = plan.examples(phase, inputs, targets)
        weights = plan.loss_weights(phase, None, None) if phase.weighted and phase.at == "w+e" else None
        if phase.weighted and (phase.at == "w" or weights is not None):  # per-example losses, in one piece
            with self._sync(phase.sync), self._statistics(phase, stats):
                losses = self.precision.losses(self.model, self.loss_fn, x, y)
                if phase.at == "w":
                    weights = plan.loss_weights(phase, losses.detach(), lambda: self._probe(x, y))
                loss = losses.mean() if weights is None else (weights * losses).sum()
                self.precision.backward(loss)
            return losses.detach().mean() if phase.at == "w" else loss.detach()
        n = x.shape[0]
        if phase.group is not None:
            chunks = groups[phase.group]
        elif phase.sample == "batch":
            chunks = self._chunks(n)
        else:
            chunks = [(start, min(start + batch, n)) for start in range(0, n, batch)]
        count = sum(stop - start for start, stop in chunks)
        scale = batch if phase.group is not None and phase.at == "w+e" else count
        total: Tensor | float = 0.0
        for j, (start, stop) in enumerate(chunks):
            with self._sync(phase.sync and j == len(chunks) - 1), self._statistics(phase, stats):
                loss = self._loss(x[start:stop], y[start:stop]) * ((stop - start) / scale)
                self.precision.backward(loss)
            total = total + loss.detach()
        return torch.as_tensor(total) * (count / batch) if phase.group is not None and phase.at == "w" else total

    @contextmanager
    def _statistics(self, phase: Pass, stats: running_stats.AveragedRunningStats) -> Iterator[None]:
        """Every pass that updates BatchNorm statistics starts from the step's; they are averaged at the end."""
        if not phase.updates_running_stats:
            yield
            return
        stats.before_pass()
        yield
        stats.after_pass()

    def _probe(self, inputs: Tensor, targets: Tensor) -> Probe:
        module = self.model.module if self._ddp else self.model
        return make_probe(module, self.loss_fn, inputs, targets, self.precision.autocast(inputs.device.type))

    def _descend(self, loss: Tensor) -> Tensor:
        opt, scaler = self.optimizer, self.precision.scaler
        if self.max_grad_norm is not None:
            opt.apply_descent_rule(scaler)  # clip the final direction
            if scaler is not None and not already_unscaled(scaler, opt):
                scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        opt.second_step(zero_grad=False, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()
        return loss

    def _chunks(self, batch: int) -> list[tuple[int, int]]:
        bounds = torch.linspace(0, batch, min(self.accumulation_steps, batch) + 1).round().long().tolist()
        return [(a, b) for a, b in pairwise(bounds) if b > a]

    def _groups(self, batch: int) -> list[list[tuple[int, int]]]:
        """Each group is a list of (start, stop) chunks: one group of k chunks for SAM, one chunk per m-SAM group."""
        if self.group_size is None or self.group_size >= batch:
            return [self._chunks(batch)]
        return [[(start, min(start + self.group_size, batch))] for start in range(0, batch, self.group_size)]

    def _loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.precision.loss(self.model, self.loss_fn, inputs, targets)

    def _sync(self, sync: bool) -> AbstractContextManager[None]:
        if self._ddp and not sync:
            return self.model.no_sync()
        return nullcontext()
