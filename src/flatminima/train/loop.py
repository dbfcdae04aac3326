"""The training loop behind ``flatminima train``: data, model, optimiser, epochs, checkpoints, resume, DDP, FSDP.

Reproducibility is by construction: each epoch's data order and augmentation draw from generators seeded by
(seed, epoch), and the checkpoint written after every epoch holds everything else that evolves (weights,
optimiser and scheduler state, GradScaler, the global RNG), so a killed run resumed from its last checkpoint ends
with the same weights as one left alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatminima.data.dataset import ImageDataset
from flatminima.optim import optimizer_spec, sharded
from flatminima.optim.norms import is_finite
from flatminima.output_folder import LOCK_NAME, MANIFEST_NAME, FolderLock, write_atomically
from flatminima.sharpness.tracking import SharpnessTracker
from flatminima.step import PlainStep, SharpnessAwareStep
from flatminima.train import distributed_fsdp as fsdp
from flatminima.train.batches import BatchPipeline, evaluate
from flatminima.train.builders import (
    build_batch_rule,
    build_loss,
    build_optimizer,
    build_rho_scheduler,
    build_scheduler,
    build_trajectory,
    optimizer_request,
)
from flatminima.train.checkpoint import check_resume_state, check_schedule_steps, load_checkpoint, save_checkpoint
from flatminima.train.config import RESUMABLE, TrainConfig, config_fields
from flatminima.train.distributed import Distributed
from flatminima.train.metrics import MetricsLog
from flatminima.train.prepare import PreparedData, model_for, prepare_data
from flatminima.train.run_state import RunState
from flatminima.train.summary import plot_curves, write_summary
from flatminima.trajectory import TrajectoryLoss

__all__ = [
    "RUN_FILES",
    "HorizonWarning",
    "PreparedData",
    "TrainResult",
    "model_for",
    "prepare_data",
    "run_folder_foreign_files",
    "train",
]

# what a run writes in its output folder; --overwrite replaces these and nothing else
RUN_FILES = frozenset(
    {"config.yaml", "metrics.jsonl", "checkpoint.pt", "model.pt", "summary.md", "test_accuracy.png", "tensorboard"}
    | {LOCK_NAME, MANIFEST_NAME}
)


@dataclass
class TrainResult:
    """What a run returns: its per-epoch history and where it wrote its files."""

    config: TrainConfig
    history: list[dict[str, Any]]
    output: Path
    model: nn.Module

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


def device_for(config: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device ``config.device`` names (``auto``: this rank's GPU if torch sees one, else the CPU)."""
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device; use --device cpu.")
    return torch.device(f"cuda:{local_rank}" if config.device == "cuda" else config.device)


def _tracker(config: TrainConfig, data: PreparedData, batches: BatchPipeline) -> SharpnessTracker | None:
    """lambda_max every ``track_sharpness`` steps, on the first ``track_examples`` training examples as trained
    (labels as corrupted, no augmentation), of the mean cross-entropy (without label smoothing or weight decay)."""
    if not config.track_sharpness:
        return None
    count = min(config.track_examples, data.train_images.shape[0])
    inputs = batches(data.train_images[:count], None)
    targets = data.train_labels[:count].to(batches.device)
    chunks = list(zip(inputs.split(256), targets.split(256), strict=True))
    return SharpnessTracker(
        torch.nn.functional.cross_entropy,
        chunks,
        config.track_sharpness,
        trace_probes=config.track_trace_probes,
        seed=config.seed,
    )


def _example_sampler(data: PreparedData, batches: BatchPipeline):
    """``draw(n, generator)``: ``n`` training examples drawn without replacement (all of them for ``None``),
    augmented with the same generator as a batch would be, on the device."""
    images, labels = data.train_images, data.train_labels

    def draw(n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(images.shape[0], generator=generator)
        index = index if n is None else index[:n]
        return batches(images[index], generator), labels[index].to(batches.device)

    return draw


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + stream)


def train(config: TrainConfig, dataset: ImageDataset | None = None) -> TrainResult:
    """Run training as configured; see ``TrainConfig``. Under torchrun, every rank calls this.

    ``dataset`` replaces the dataset ``config.dataset`` names (the config still records that name).
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = Distributed.from_environment("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    lock = FolderLock(Path(config.output))
    try:
        return _train(config, ctx, dataset, lock)
    finally:
        lock.release()
        ctx.close()


@dataclass
class _Run:
    """A run's parts, built once (``_setup``) and used by each phase of ``_train``."""

    config: TrainConfig
    ctx: Distributed
    output: Path
    checkpoint_path: Path
    device: torch.device
    data: PreparedData
    model: nn.Module
    network: nn.Module
    batches: BatchPipeline
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rho_scheduler: Any
    step: PlainStep | SharpnessAwareStep
    tracker: SharpnessTracker | None
    state: RunState
    per_epoch: int
    trajectory: TrajectoryLoss | None = None  # SAF's record or MESA's average; the step is then given indices


def _train(config: TrainConfig, ctx: Distributed, dataset: ImageDataset | None, lock: FolderLock) -> TrainResult:
    """The phases of a run: build its parts, resume if asked, train epoch by epoch (a checkpoint after each), and
    write the final model and summary. Rank 0 holds ``lock`` on the output folder from its check to the end."""
    run = _setup(config, ctx, dataset, lock)
    history, start_epoch = _resume(run) if config.resume else ([], 0)
    metrics = MetricsLog(run.output, enabled=ctx.is_main)
    if ctx.is_main:
        run.output.mkdir(parents=True, exist_ok=True)
        _write_config(run.output / "config.yaml", config)
        metrics.truncate_after(start_epoch)
    progress = _progress(config, ctx, start_epoch, run.per_epoch)
    run.model.train()
    for epoch in range(start_epoch, config.epochs):
        record = _epoch(run, epoch, progress)
        history.append(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{100 * record['test_accuracy']:.1f}%")
        state = run.state.save()  # on every rank: under --fsdp the model and optimiser are gathered together
        if ctx.is_main:
            metrics.write(record)
            state.update(epoch=epoch + 1, history=history, config=config.to_dict(), world_size=ctx.world_size)
            save_checkpoint(state, run.checkpoint_path)
        ctx.barrier()
    if progress is not None:
        progress.close()
    metrics.close()
    _finish(run, history)
    return TrainResult(config, history, run.output, run.model)


def _setup(config: TrainConfig, ctx: Distributed, dataset: ImageDataset | None, lock: FolderLock) -> _Run:
    """Check the output folder and the data, then build the model, optimiser, schedules and batch step."""
    if config.fsdp and not ctx.enabled:
        raise ValueError(
            "--fsdp shards the model across torchrun processes, and this run has one: start it with torchrun "
            "(e.g. torchrun --nproc-per-node 2 -m flatminima train --fsdp ...), or drop --fsdp."
        )
    output = Path(config.output)
    checkpoint_path = output / "checkpoint.pt"
    _check_output(config, output, checkpoint_path, ctx.is_main, lock)
    device = device_for(config, ctx.local_rank)
    data = prepare_data(config, dataset)
    _check_data_fits(config, data, ctx)
    torch.manual_seed(config.seed)
    model = model_for(config, data.dataset).to(device)
    network: nn.Module
    if config.fsdp:  # in place: the model's parameters become shards; the optimiser is built on those
        network = fsdp.shard_model(model, device.type)
    else:
        network = DistributedDataParallel(model) if ctx.enabled else model
    loss_fn = build_loss(config, model)
    spec = optimizer_spec(config.optimizer)
    batches = BatchPipeline(data.dataset, config, device)
    request = optimizer_request(
        config,
        model,
        draw_examples=_example_sampler(data, batches),
        train_size=data.train_images.shape[0],
        rank=ctx.rank,
    )
    optimizer = build_optimizer(config, model, request)
    batch_rule = build_batch_rule(config, request)
    trajectory = build_trajectory(config, request)
    count = data.train_images.shape[0]
    per_epoch = count // config.batch_size  # the last incomplete batch is dropped, as DDP must: runs compare
    scheduler = build_scheduler(config, optimizer, per_epoch)
    # after the LR scheduler, which sets the lr of step 0 that the lr-proportional rho schedule reads
    rho_scheduler = build_rho_scheduler(config, optimizer, per_epoch) if spec.sharpness_aware else None
    autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    step: PlainStep | SharpnessAwareStep
    if spec.sharpness_aware:
        step = SharpnessAwareStep(
            network,
            loss_fn,
            optimizer,
            group_size=config.group_size,
            grad_scaler=scaler,
            autocast_dtype=autocast_dtype,
            batch_rule=batch_rule,
        )
    else:
        step = PlainStep(
            network,
            loss_fn,
            optimizer,
            grad_scaler=scaler,
            autocast_dtype=autocast_dtype,
            nonfinite=config.nonfinite,
            trajectory=trajectory,
        )

    tracker = _tracker(config, data, batches)
    state = _run_state(config, ctx, model, optimizer, scheduler, rho_scheduler, scaler, tracker, trajectory)
    return _Run(config, ctx, output, checkpoint_path, device, data, model, network, batches, optimizer, scheduler,
                rho_scheduler, step, tracker, state, per_epoch, trajectory)  # fmt: skip


def _resume(run: _Run) -> tuple[list[dict[str, Any]], int]:
    """The run's state back from its checkpoint; returns the history so far and the epoch to continue from."""
    config, ctx = run.config, run.ctx
    state = load_checkpoint(run.checkpoint_path, map_location=run.device)
    check_resume_state(state, run.checkpoint_path)
    _check_resumable(state["config"], config)
    check_schedule_steps(state, run.checkpoint_path, run.per_epoch)
    _check_world_size(state, ctx.world_size, config.allow_world_size_change, config.fsdp)
    if ctx.is_main:  # the resume goes ahead
        _warn_if_the_horizon_moves(state, config, run.per_epoch)
        for stale in run.output.glob("*.pt.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    run.state.load(state)
    return list(state["history"]), int(state["epoch"])


class HorizonWarning(UserWarning):
    """A resumed run trains for a different number of epochs than its checkpoint's: the schedules stretch."""


def _warn_if_the_horizon_moves(state: dict[str, Any], config: TrainConfig, per_epoch: int) -> None:
    """Extending a run (``--resume --epochs N``) stretches an lr or rho schedule that depends on the run's length:
    the learning rate jumps at the resume, and the run is not the one a straight N-epoch run would have been (its
    first epochs followed the shorter schedule). Say so, with the numbers."""
    before = state["config"]["epochs"]
    stretched = [
        name
        for name, schedule in (("lr", config.lr_schedule), ("rho", config.rho_schedule))
        if before != config.epochs and schedule in ("cosine", "step")
    ]
    if not stretched:
        return
    step = state["epoch"] * per_epoch
    was, now = (
        c.lr * build_scheduler(c, torch.optim.SGD([torch.zeros(1)], lr=c.lr), per_epoch).lr_lambdas[0](step)
        for c in (dataclasses.replace(config, epochs=before), config)
    )
    verb = "s stretch" if len(stretched) > 1 else " stretches"
    warnings.warn(
        f"resuming with {config.epochs} epochs a run started for {before}: the {' and '.join(stretched)} "
        f"schedule{verb} to the new length (the learning rate at step {step} goes from {was:.4g} to {now:.4g}), so "
        f"the run differs from a straight {config.epochs}-epoch run; to continue a run exactly, resume with its own "
        "--epochs",
        HorizonWarning,
        stacklevel=2,
    )


def _epoch(run: _Run, epoch: int, progress: Any) -> dict[str, Any]:
    """One epoch of steps, then its record: train loss (finite steps only), lr, test (and validation) metrics."""
    config, ctx, data, model, network, step = run.config, run.ctx, run.data, run.model, run.network, run.step
    device, batches, per_epoch = run.device, run.batches, run.per_epoch
    scheduler, rho_scheduler, tracker = run.scheduler, run.rho_scheduler, run.tracker
    count = data.train_images.shape[0]
    started = time.perf_counter()
    order = torch.randperm(count, generator=_epoch_generator(config.seed, epoch, 0))
    augment = _epoch_generator(config.seed, epoch, 1)
    with_indices = run.trajectory is not None  # SAF records per example: the step gets their global indices
    measured: list[dict[str, Any]] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)  # examples whose loss was finite
    for index in range(per_epoch):
        global_batch = order[index * config.batch_size : (index + 1) * config.batch_size]
        local = ctx.shard(global_batch)
        inputs = batches(data.train_images[local], augment)
        try:
            targets = data.train_labels[local].to(device)
            loss = step(inputs, targets, indices=local) if with_indices else step(inputs, targets)
        except FloatingPointError as error:
            kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written"
            raise FloatingPointError(
                f"epoch {epoch + 1}, step {index + 1}: {_first_sentence(error)}; {kept}. Lower {_step_sizes(config)}, "
                "or pass --nonfinite skip to skip such steps"
            ) from None
        scheduler.step()
        if rho_scheduler is not None:  # after the lr's: rho_schedule lr reads the lr of the next step
            rho_scheduler.step()
        if tracker is not None:
            record = tracker.maybe_measure(model, epoch * per_epoch + index + 1)
            if record is not None:
                measured.append(record.to_dict())
        finite = torch.isfinite(loss)
        loss_sum += torch.where(finite, loss.double() * local.numel(), 0.0)
        seen += finite.double() * local.numel()
        if progress is not None:
            progress.update(1)
    _check_finite(model, seen, epoch, run.output, config, ctx)
    if config.fsdp:
        fsdp.sync_buffers(model)
    totals = ctx.sum(torch.stack([loss_sum, seen]))
    record = {"epoch": epoch + 1, "train_loss": (totals[0] / totals[1]).item(), "lr": scheduler.get_last_lr()[0]}
    evaluation_started = time.perf_counter()
    record["test_loss"], record["test_accuracy"] = evaluate(
        network, data.test_images, data.test_labels, batches, ctx, _eval_batch(config, ctx, data.test_images)
    )
    if data.val_images is not None:
        record["val_loss"], record["val_accuracy"] = evaluate(
            network, data.val_images, data.val_labels, batches, ctx, _eval_batch(config, ctx, data.val_images)
        )
    if measured:
        record["lambda_max"] = measured[-1]["lambda_max"]
        record["sharpness"] = measured
    record["seconds"] = time.perf_counter() - started
    record["eval_seconds"] = time.perf_counter() - evaluation_started
    return record


def _finish(run: _Run, history: list[dict[str, Any]]) -> None:
    """The final model, the curves and the summary (rank 0); every rank leaves together."""
    config, ctx = run.config, run.ctx
    model_state, _ = _states(config, ctx, run.model, None)
    if ctx.is_main:
        save_checkpoint({"model": model_state, "config": config.to_dict()}, run.output / "model.pt")
        figure = plot_curves({config.optimizer: history}, run.output / "test_accuracy.png")
        write_summary(run.output, config.to_dict(), history, figure)
    # every rank leaves together: a rank tearing down its process group while rank 0 still writes made gloo
    # abort at exit now and then under --fsdp (about 1 run in 7 with bf16 on the CPU)
    ctx.barrier()


def run_folder_foreign_files(output: Path) -> list[str]:
    """The entries of ``output`` that are not a flatminima run's (its files, lock and interrupted writes)."""
    if not output.is_dir():
        return []
    return sorted(p.name for p in output.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))


def _check_output(config: TrainConfig, output: Path, checkpoint_path: Path, is_main: bool, lock: FolderLock) -> None:
    """Before any work: the folder is this run's alone (rank 0 takes its lock), and a run to resume is there, or
    the folder is free (or the user said --overwrite)."""
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output {output} is a file, not a folder; choose another --output.")
    if config.resume and not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"nothing to resume in {output}: it holds no checkpoint.pt; drop --resume to start a new run there."
        )
    if not is_main:
        return
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create --output {output}: {error.strerror}; choose another folder.") from None
    if not os.access(output, os.W_OK):
        raise PermissionError(f"--output {output} is not writable; choose another folder.")
    lock.acquire()
    if config.resume:
        return
    entries = sorted(p.name for p in output.iterdir() if p.name != LOCK_NAME and not p.name.endswith(".tmp"))
    foreign = run_folder_foreign_files(output)
    if foreign or (entries and not config.overwrite):
        lock.release(remove_if_new=True)  # refused: leave nothing in the folder
    if foreign:
        raise FileExistsError(
            f"--output {output} holds files that are not a flatminima run ({', '.join(foreign[:3])}); "
            "choose an empty or new folder."
        )
    if entries and not config.overwrite:
        held = (
            "a run (checkpoint.pt): pass --resume to continue it"
            if "checkpoint.pt" in entries
            else ("a previous run's files (" + ", ".join(entries[:3]) + "): pass --overwrite to replace them")
        )
        raise FileExistsError(f"{output} already holds {held}, or choose another --output.")
    for name in entries:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_data_fits(config: TrainConfig, data: PreparedData, ctx: Distributed) -> None:
    """What only the data can refute, checked before the model is built."""
    count = data.train_images.shape[0]
    if config.batch_size > count:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {count} training examples"
            + (f" left after the {config.validation_fraction:g} validation split" if config.validation_fraction else "")
            + "; lower --batch-size."
        )
    if ctx.enabled and config.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {ctx.world_size} ranks.")
    per_rank = config.batch_size // ctx.world_size
    if config.group_size is not None and config.group_size > per_rank:
        raise ValueError(
            f"group_size {config.group_size} exceeds the per-rank batch of {per_rank} (plain SAM); lower --group-size."
        )
    images = data.train_images
    if config.cutout and images.ndim == 4 and config.cutout > min(images.shape[-2:]):
        side = min(images.shape[-2:])
        raise ValueError(
            f"cutout {config.cutout} exceeds the {images.shape[-2]}x{images.shape[-1]} images (it would blank them); "
            f"use at most {side}, or 0."
        )


def _run_state(
    config: TrainConfig,
    ctx: Distributed,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rho_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    tracker: SharpnessTracker | None,
    trajectory: TrajectoryLoss | None = None,
) -> RunState:
    """The checkpoint's stateful parts, each registered once (loaded back in this order)."""
    run = RunState()

    def save_weights() -> dict[str, Any]:
        model_state, optimizer_state = _states(config, ctx, model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_weights(state: dict[str, Any]) -> None:
        if config.fsdp:  # full state dicts, sharded again
            fsdp.load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])

    run.register(save_weights, load_weights)
    run.register_object("scheduler", scheduler)
    if rho_scheduler is not None:  # a checkpoint from before the rho schedule: it stands where the lr's does
        run.register_object("rho_scheduler", rho_scheduler, fallback=lambda: {"last_step": scheduler.last_epoch})
    if scaler is not None:
        run.register_object("scaler", scaler, optional=True)
    run.register(lambda: {"rng": torch.get_rng_state()}, lambda state: torch.set_rng_state(state["rng"]))
    if tracker is not None:
        run.register_object("sharpness_tracker", tracker, optional=True)
    if trajectory is not None:  # SAF's record, MESA's average (equal on every rank; rank 0 writes it)
        run.register_object("trajectory", trajectory)  # required: without it a resume would not continue exactly
    return run


def _states(
    config: TrainConfig, ctx: Distributed, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What a checkpoint holds of the model and optimiser, on rank 0 (None elsewhere). Under --fsdp the full
    state dicts, which every rank gathers together."""
    if config.fsdp:
        return fsdp.full_state(model, optimizer)
    if not ctx.is_main:
        return None, None
    return model.state_dict(), (optimizer.state_dict() if optimizer is not None else None)


def _eval_batch(config: TrainConfig, ctx: Distributed, images: Tensor) -> int:
    """The evaluation batch size: 4 batches' worth; under --fsdp one that gives every rank as many passes."""
    size = 4 * config.batch_size
    return fsdp.lockstep_batch_size(images.shape[0], ctx.world_size, size) if config.fsdp else size


def _check_finite(
    model: nn.Module, seen: Tensor, epoch: int, output: Path, config: TrainConfig, ctx: Distributed
) -> None:
    """Stop before a checkpoint or model.pt could hold inf/NaN weights (the last good checkpoint stays). Every rank
    decides alike (under --fsdp each holds a shard of the weights)."""
    weights_ok = is_finite([sharded.local(p.detach()) for p in model.parameters()])  # one foreach norm, one host sync
    any_seen = bool(seen > 0)
    if ctx.enabled:
        flags = ctx.sum(torch.tensor([float(not weights_ok), float(any_seen)], device=seen.device))
        weights_ok, any_seen = bool(flags[0] == 0), bool(flags[1] > 0)
    if weights_ok and any_seen:
        return
    kept = f"the checkpoint of epoch {epoch} in {output} is kept" if epoch else "no checkpoint was written"
    what = "the weights" if not weights_ok else "every training loss"
    hint = "" if config.nonfinite == "skip" else ", or pass --nonfinite skip to skip such steps"
    raise FloatingPointError(f"{what} became inf/NaN in epoch {epoch + 1} ({kept}); lower {_step_sizes(config)}{hint}.")


def _first_sentence(error: BaseException) -> str:
    """What happened, without the API's advice (the command line gives its own, in flags)."""
    return str(error).split(". ")[0].rstrip(".")


def _step_sizes(config: TrainConfig) -> str:
    """The sizes that make a step diverge, as flags to lower: the lr, and rho for the SAM family."""
    lr = f"--lr (now {config.lr:g})"
    if optimizer_spec(config.optimizer).sharpness_aware:
        return f"{lr} or --rho (now {config.rho:g})"
    return lr


def _check_world_size(state: dict[str, Any], world_size: int, allowed: bool, under_fsdp: bool = False) -> None:
    saved = int(state.get("world_size", 1))
    if saved != world_size and not allowed and under_fsdp:
        raise ValueError(
            f"the checkpoint was written by {saved} process(es), resumed with {world_size}: under --fsdp the steps "
            "are the same up to rounding (every pass uses the global batch), not bit for bit; pass "
            "--allow-world-size-change to accept that."
        )
    if saved != world_size and not allowed:
        raise ValueError(
            f"the checkpoint was written by {saved} process(es), resumed with {world_size}: each rank perturbs with "
            "its own batch, so the algorithm changes (m-SAM's m is the per-rank batch); pass "
            "--allow-world-size-change to accept that."
        )


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE and k in saved and saved[k] != current[k])
    changed += sorted(k for k in current if k not in RESUMABLE and k not in saved and current[k] != _default(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume: the config differs from the checkpoint's in {details} (with --resume only "
            f"{', '.join(sorted(RESUMABLE - {'resume', 'output', 'overwrite', 'allow_world_size_change'}))} "
            "may change; drop the other flags)."
        )


def _default(name: str) -> Any:
    return next(f.default for f in config_fields() if f.name == name)


def _write_config(path: Path, config: TrainConfig) -> None:
    import yaml

    write_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _progress(config: TrainConfig, ctx: Distributed, start_epoch: int, per_epoch: int):
    if not (config.progress and ctx.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    total = config.epochs * per_epoch
    return tqdm(total=total, initial=start_epoch * per_epoch, desc=config.optimizer, unit="step", leave=False)


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of ``config`` with some fields changed."""
    return dataclasses.replace(config, **changes)
