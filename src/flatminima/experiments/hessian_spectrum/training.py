"""Training to a common loss: SGD or SAM until the full training loss first falls below a threshold, with
lambda_max tracked on the way."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.experiments.hessian_spectrum.problem import build, loss_and_accuracy
from flatminima.experiments.hessian_spectrum.setting import DEFAULT_RECIPE, Recipe, Setting
from flatminima.experiments.protocol import SAM_EVALUATIONS_PER_STEP
from flatminima.optim import SAM
from flatminima.sharpness import SharpnessTracker
from flatminima.step import PlainStep, SharpnessAwareStep

__all__ = ["TrainedRun", "train_to_loss"]


@dataclass
class TrainedRun:
    """One optimiser trained to the threshold: where it stopped and what was tracked on the way.

    ``loss_before`` is the full training loss one step before the stopping step (above the threshold when
    ``reached``); ``tracked`` holds ``(step, full training loss, lambda_max, products)`` of each tracked
    measurement; ``losses`` the ``(step, full training loss)`` of every check.
    """

    model: nn.Module
    rho: float | None
    step: int
    epochs: float
    reached: bool
    train_loss: float
    loss_before: float
    train_accuracy: float
    tracked: list[tuple[int, float, float, int]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds_training: float = 0.0
    seconds_tracking: float = 0.0

    @property
    def gradient_evaluations(self) -> int:
        """Batch gradients computed: one a step for SGD, two for SAM (the ascent's and the descent's)."""
        return self.step * (1 if self.rho is None else SAM_EVALUATIONS_PER_STEP)


def train_to_loss(
    seed: int,
    rho: float | None,
    images: Tensor,
    labels: Tensor,
    subset: list[tuple[Tensor, Tensor]],
    setting: Setting,
    recipe: Recipe = DEFAULT_RECIPE,
    track: bool = True,
) -> TrainedRun:
    """Train SGD (``rho=None``) or SAM until the full training loss first falls below ``setting.threshold``.

    The batch order depends on the seed only, so SGD and SAM see the same batches. Every ``check_every`` steps
    the full training loss is computed; the model and optimiser states at the last check above the threshold are
    kept, and when a check falls below it they are restored and the steps since are replayed one at a time, so
    the run stops at the first step below the threshold. lambda_max is tracked on ``subset`` every ``track_every``
    steps (and at step 0) with a warm-started ``SharpnessTracker``, unless ``track`` is False (the tuning
    runs, which only need the stopping point) or ``track_every`` is 0 (the quick run).

    Each step is the library's (``SharpnessAwareStep`` for SAM, ``PlainStep`` for
    SGD); the iteration around it stays here because ``flatminima.train`` runs a fixed number of epochs and
    cannot stop at the first step whose full training loss is below a threshold, rewind to a kept state and replay.
    """
    model, optimizer = build(seed, rho, recipe, images, int(labels.max()) + 1)
    if isinstance(optimizer, SAM):
        step_on: PlainStep | SharpnessAwareStep = SharpnessAwareStep(model, F.cross_entropy, optimizer)
    else:
        step_on = PlainStep(model, F.cross_entropy, optimizer)
    count = len(labels)
    size = recipe.batch_size
    per_epoch = count // size
    orders: dict[int, Tensor] = {}

    def take_step(step: int) -> None:
        """Step number ``step + 1``: the batch ``step`` of the seed's fixed order (the last short batch dropped)."""
        epoch, index = divmod(step, per_epoch)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        batch = orders[epoch][index * size : (index + 1) * size].to(images.device)
        step_on(images[batch], labels[batch])

    track = track and setting.track_every > 0
    tracker = SharpnessTracker(F.cross_entropy, subset, max(setting.track_every, 1), seed=seed)
    started = time.perf_counter()
    tracking = 0.0

    def measure(step: int, loss: float) -> None:
        nonlocal tracking
        if not track:
            return
        begin = time.perf_counter()
        record = tracker.measure(model, step)
        tracking += time.perf_counter() - begin
        run.tracked.append((step, loss, record.lambda_max, record.num_hvp))

    loss, accuracy = loss_and_accuracy(model, images, labels)
    run = TrainedRun(model, rho, 0, 0.0, False, loss, math.nan, accuracy, losses=[(0, loss)])
    measure(0, loss)
    kept = (0, loss, *_states(model, optimizer, setting.replay))
    last = setting.max_epochs * per_epoch
    step = 0
    while step < last:
        take_step(step)
        step += 1
        if step % setting.check_every and step < last:
            continue
        loss, accuracy = loss_and_accuracy(model, images, labels)
        if loss < setting.threshold and not setting.replay:  # the paper's scale: stop at the first check below
            run.reached, run.loss_before = True, kept[1]
            run.losses.append((step, loss))
            break
        if loss < setting.threshold:  # crossed since the kept check: replay from there, one step at a time
            step, before, model_state, optimizer_state = kept
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            while True:  # the replay is bit-exact, so it crosses again by the check that saw the crossing
                take_step(step)
                step += 1
                loss, accuracy = loss_and_accuracy(model, images, labels)
                if loss < setting.threshold:
                    break
                before = loss
            run.reached, run.loss_before = True, before
            run.losses.append((step, loss))
            break
        run.losses.append((step, loss))
        if track and step % setting.track_every == 0:
            measure(step, loss)
        kept = (step, loss, *_states(model, optimizer, setting.replay))
    run.step, run.train_loss, run.train_accuracy = step, loss, accuracy
    run.epochs = run.step / per_epoch
    run.seconds_tracking = tracking
    run.seconds_training = time.perf_counter() - started - tracking
    return run


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[Any, Any]:
    """Copies of the model's and the optimiser's states to replay from (None, None when there is no replay)."""
    if not keep:
        return None, None
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
