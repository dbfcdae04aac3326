"""One training run through the library's loop, with ``tr(V)``, the trace of the per-example gradient covariance,
measured along it from an optimiser step hook, and its final weights measured: training loss and accuracy (on the
labels as trained), and their m-sharpness for every m."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from flatminima.experiments.m_sharpness.problem import SignalNoise
from flatminima.running_stats import norm_layers
from flatminima.sharpness.msharpness import m_sharpness
from flatminima.train import BatchPipeline, TrainConfig, train
from flatminima.train.batches import evaluate
from flatminima.train.prepare import model_for, prepare_data

__all__ = ["Job", "Measurement", "TrackedRun", "gradient_variance_trace", "train_and_track"]


@dataclass(frozen=True)
class Measurement:
    """``tr(V)`` on the fixed sample after ``epoch`` epochs (0: after the first step)."""

    epoch: int
    trace_v: float


@dataclass(frozen=True)
class Job:
    """One training: its config, the patch problem it draws its data from (None: the config's dataset), the m
    and radius of the final m-sharpness, its ascent steps, the examples measured on and how often tr(V) is."""

    config: TrainConfig
    problem: SignalNoise | None
    ms: tuple[int, ...]
    sharpness_rho: float
    sharpness_steps: int
    sample: int
    every: int


@dataclass(frozen=True)
class TrackedRun:
    """What one training gives: the final validation and test accuracy, test loss, the training accuracy and loss
    of the final weights on the labels as trained, the training seconds per epoch (median; evaluation and the
    measurements taken out), tr(V) along training (none for a model with BatchNorm) and the m-sharpness of the
    final weights per m (``str(m)`` -> the mean over groups of the loss increase)."""

    validation_accuracy: float
    test_accuracy: float
    test_loss: float
    train_accuracy: float
    train_loss: float
    seconds_per_epoch: float
    trace_v: list[Measurement]
    m_sharpness: dict[str, float]


def gradient_variance_trace(model: nn.Module, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> float:
    """``tr(V) = mean_i ||g_i - g_bar||^2``: the trace of the per-example gradient covariance of the
    cross-entropy at ``params`` (no weight decay), from ``torch.func.vmap`` over ``torch.func.grad``.

    ``model`` only supplies the function (its own parameters are not used); the examples are processed in chunks
    of 64 so that memory stays at 64 gradient copies.
    """
    from torch.func import functional_call, grad, vmap

    detached = {name: p.detach() for name, p in params.items()}

    def loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, weights, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p) for name, p in detached.items()}
    squares = 0.0
    count = inputs.shape[0]
    for x, y in zip(inputs.split(64), targets.split(64), strict=True):
        grads = per_example(detached, x, y)
        for name, g in grads.items():
            total[name] += g.sum(dim=0)
            squares += float(g.pow(2).sum())
    mean_square = sum(float(t.pow(2).sum()) for t in total.values()) / count**2
    return squares / count - mean_square


def _per_example_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


def train_and_track(job: Job) -> TrackedRun:
    """Train ``job.config``, measuring ``tr(V)`` after the first step, every ``job.every``-th epoch and the last;
    then measure the final weights.

    A module-level function, so that worker processes can run it. The measurement runs from a global optimiser step
    hook on the base SGD step, so ``flatminima.train`` runs unchanged; there are none for a model with
    BatchNorm, whose per-example gradients are not defined in training mode (one example has no batch statistics).
    """
    config = job.config
    dataset = job.problem.draw(config.seed) if job.problem is not None else None
    data = prepare_data(config, dataset)
    pipeline = BatchPipeline(data.dataset, config, torch.device("cpu"))
    count = min(job.sample, data.train_images.shape[0])
    inputs = pipeline(data.train_images[:count], None)
    targets = data.train_labels[:count]
    skeleton = model_for(config, data.dataset)
    names = [name for name, _ in skeleton.named_parameters()]
    per_epoch = data.train_images.shape[0] // config.batch_size
    state: dict[str, Any] = {"steps": 0, "measured": [], "cost": {}}

    def measure(optimizer: torch.optim.Optimizer, epoch: int) -> None:
        started = time.perf_counter()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device
        weights = dict(zip(names, params, strict=True))
        trace = gradient_variance_trace(skeleton, weights, inputs.to(device), targets.to(device))
        state["measured"].append(Measurement(epoch=epoch, trace_v=trace))
        state["cost"][epoch] = state["cost"].get(epoch, 0.0) + time.perf_counter() - started

    measurable = not norm_layers(skeleton)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # the base step of every method here, not the SAM wrapper
        if not measurable or type(optimizer) is not torch.optim.SGD:
            return
        if state["steps"] == 0:
            measure(optimizer, 0)  # after the first step: close enough to the start, and the same for all
        state["steps"] += 1
        if state["steps"] % per_epoch == 0:
            epoch = state["steps"] // per_epoch
            if epoch % job.every == 0 or epoch == config.epochs:
                measure(optimizer, epoch)

    handle = register_optimizer_step_post_hook(hook)
    try:
        result = train(config, dataset)
    finally:
        handle.remove()
    seconds = [
        r["seconds"] - r["eval_seconds"] - state["cost"].get(r["epoch"], 0.0) - (state["cost"].get(0, 0.0) * (i == 0))
        for i, r in enumerate(result.history)
    ]
    model = result.model
    device = next(model.parameters()).device
    model.eval()
    eval_pipeline = BatchPipeline(data.dataset, config, device)
    train_loss, train_accuracy = evaluate(model, data.train_images, data.train_labels, eval_pipeline)
    sample = (inputs.to(device), targets.to(device))
    sharpness = {
        str(m): m_sharpness(
            model,
            _per_example_cross_entropy,
            sample,
            m,
            job.sharpness_rho,
            steps=job.sharpness_steps,
        ).loss_increase
        for m in job.ms
        if m <= count
    }
    final = result.final
    return TrackedRun(
        validation_accuracy=final.get("val_accuracy", float("nan")),
        test_accuracy=final["test_accuracy"],
        test_loss=final["test_loss"],
        train_accuracy=train_accuracy,
        train_loss=train_loss,
        seconds_per_epoch=statistics.median(seconds),
        trace_v=state["measured"],
        m_sharpness=sharpness,
    )
