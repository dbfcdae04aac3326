"""One training run through the library's loop, with ``tr(V)``, the trace of the per-example gradient covariance,
measured along it from an optimiser step hook."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from flatminima.experiments.m_sharpness.methods import SAMPLE
from flatminima.running_stats import norm_layers
from flatminima.train import BatchPipeline, TrainConfig, train
from flatminima.train.prepare import model_for, prepare_data

__all__ = ["Measurement", "TrackedRun", "gradient_variance_trace", "train_and_track"]


@dataclass(frozen=True)
class Measurement:
    """``tr(V)`` on the fixed sample after ``epoch`` epochs (0: after the first step)."""

    epoch: int
    trace_v: float


@dataclass(frozen=True)
class TrackedRun:
    """What one training run gives: its final numbers, the test accuracy per epoch, the training seconds per epoch
    (the measurement's own time taken out) and the tr(V) measurements (none for a model with BatchNorm)."""

    test_accuracy: float
    train_loss: float
    test_accuracy_curve: list[float]
    seconds_per_epoch: float
    measured: list[Measurement]


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


def train_and_track(config: TrainConfig, every: int) -> TrackedRun:
    """One training run with ``tr(V)`` measured after every ``every``-th epoch (and the last, and at the start).

    A module-level function, so that worker processes can run it. The measurement runs from a global optimiser step
    hook on the base SGD step, so :func:`flatminima.train` runs unchanged; there are none for a model with
    BatchNorm, whose per-example gradients are not defined in training mode (one example has no batch statistics).
    """
    data = prepare_data(config)
    pipeline = BatchPipeline(data.dataset, config, torch.device("cpu"))
    count = min(SAMPLE, data.train_images.shape[0])
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
            if epoch % every == 0 or epoch == config.epochs:
                measure(optimizer, epoch)

    handle = register_optimizer_step_post_hook(hook)
    try:
        result = train(config)
    finally:
        handle.remove()
    seconds = [
        r["seconds"] - r["eval_seconds"] - state["cost"].get(r["epoch"], 0.0) - (state["cost"].get(0, 0.0) * (i == 0))
        for i, r in enumerate(result.history)
    ]
    return TrackedRun(
        test_accuracy=result.final["test_accuracy"],
        train_loss=result.final["train_loss"],
        test_accuracy_curve=[r["test_accuracy"] for r in result.history],
        seconds_per_epoch=statistics.median(seconds),
        measured=state["measured"],
    )
