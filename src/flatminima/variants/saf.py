"""SAF and MESA: sharpness-aware training for free (Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free",
NeurIPS 2022, arXiv 2205.14083; the official code github.com/AngusDujw/SAF, ``SAF_train.py`` and ``MESA_train.py``).

SAM's sharpness term is replaced by a trajectory loss, which needs no second pass:

    L(w) = mean_i CE(f_w(x_i), y_i) + lambda tau^2 mean_i KL( softmax(z_i / tau) || softmax(f_w(x_i) / tau) )

with ``z_i`` a constant target (no gradient flows into it):

* **SAF** (``saf``, ``PastOutputs``): ``z_i`` is the example's own logits recorded
  ``E~`` epochs earlier. The loss then measures how much the outputs changed along the trajectory of the weights
  (the paper's sec. 4: ``KL`` between the outputs at ``w_t`` and ``w_{t-E~}`` ~ the drop of the loss along the
  trajectory, which is large in a sharp minimum).
* **MESA** (``mesa``, ``EMATarget``): ``z_i`` is the output of an exponential moving
  average of the weights, ``ema <- d ema + (1 - d) w`` after every step (timm's ``ModelEmaV2``: every entry of the
  state dict, BatchNorm's statistics included), the averaged model run in eval mode: memory-efficient when the
  training set is too large for SAF's record.

The term counts from epoch ``start + 1`` on (the official ``epoch > kl_start_epoch``, epochs from 0). The base
optimiser is ``--base-optimizer`` (SGD with momentum by default, AdamW). ``lambda = 0`` is the base optimiser bit
for bit (nothing is computed for the term: MESA runs no forward of its average), and so is every step before the
start (the term is exactly 0).

Options and defaults: ``--saf-lambda 0.3`` and ``--mesa-lambda 0.8`` (the official README's ``--reinforce
(0.3/0.8)`` for SAF/MESA; ``SAF_train.py`` defaults to 0.16 and ``MESA_train.py`` to 0.3), ``--saf-tau`` /
``--mesa-tau`` 5 (the temperature, ``--temperature``), ``--saf-epochs-back 3`` (E~, ``--minus_epoch``),
``--saf-start-epoch`` / ``--mesa-start-epoch`` 5 (``--kl_start_epoch``), ``--mesa-decay 0.9998``
(``--model-ema-decay``).

Choices, and where they differ from the official code:

* SAF's record is per example **visit**, not per epoch slot: each example keeps a visit count ``c_i``; its logits
  are written at slot ``c_i mod (E~ + 1)``, its target is the record from ``E~`` visits earlier, slot
  ``(c_i - E~) mod (E~ + 1)``, and the term counts for it when ``c_i > start`` and ``c_i >= E~`` (visits from 0).
  With one visit per epoch this is the official rule exactly (the official buffer is written at slot
  ``epoch mod (E~+1)`` and read at ``(epoch - E~) mod (E~+1)``); an example dropped with an epoch's last
  incomplete batch is not counted, so it never reads a stale slot (the official code would read a record
  ``E~ + 1`` epochs old, or one never written: zeros, a uniform target). Logits that are not finite (a step that
  ``--nonfinite skip`` skips) are not recorded and not counted.
* The KL is averaged over the whole batch, the examples whose term does not count contributing 0 (as the official
  code, whose term is all or nothing per epoch). Both sides are log-softmax (``F.kl_div(..., log_target=True)``),
  in float32 at least: the official ``softmax(.).log()`` can give ``log 0``.
* Under DDP every step all-gathers the (indices, logits) of every rank, so every rank's record is complete and
  equal (a resumed run may change the number of ranks). The official code writes each rank's examples into that
  rank's buffer only, so the record a rank reads was written by whichever rank drew the example ``E~`` epochs
  earlier, or never: wrong under DDP, unless the sampler gives each rank the same examples every epoch.
* MESA's start is in steps (``start_step = (start_epoch + 1) * steps_per_epoch``, steps_per_epoch = train_size //
  batch_size): the term counts on step ``t >= start_step``. The average averages floating-point parameters and
  buffers; integer buffers (BatchNorm's ``num_batches_tracked``) are copied (timm averages them too and truncates).
  Under DDP the buffers' average is taken from rank 0's buffers (DDP broadcasts rank 0's at every forward), so every
  rank's average stays equal.
* The training loss recorded (``train_loss``) is the mean cross-entropy alone; the term is
  ``trajectory.last_penalty``. The official ``kl_end_epoch`` (stop the term before the end) is not provided.
* FSDP's sharded parameters are refused (use DDP).

Cost per step: one forward-backward (SAF: the record's reads and writes, a copy of the batch's logits to the CPU;
under DDP one all-gather of the global batch's indices and logits); MESA: one forward-backward and one forward of
the averaged model without gradient (from the start on), and one pass over the weights to average them.
Memory: SAF ``(E~ + 1) N C`` float32 values and ``N`` int64 counts, ``(E~+1)*N*C*4 + 8N`` bytes (on the CPU by
default: 1 347 digits, 10 classes, E~ = 3: 226 296 bytes; ImageNet, 1.28M x 1000: 20.5 GB); MESA one copy of the
model's parameters and buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatminima.optim.registry import OptimizerRequest, option, register_optimizer
from flatminima.trajectory import EMATarget, PastOutputs, TrajectoryLoss, kl_to_target

__all__ = ["EMATarget", "PastOutputs", "TrajectoryLoss", "kl_to_target"]


def _finite_at_least(least: float, strict: bool):
    return lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > least if strict else v >= least)


@dataclass(frozen=True)
class SAFOptions:
    """SAF's options (``--saf-*``)."""

    saf_lambda: float = option(
        0.3, "saf: weight lambda of the trajectory loss (0: the base optimiser)",
        check=_finite_at_least(0, strict=False), why="must be a finite number >= 0",
    )  # fmt: skip
    saf_tau: float = option(
        5.0, "saf: temperature tau of the softmax in the trajectory loss",
        check=_finite_at_least(0, strict=True), why="must be a finite number > 0",
    )  # fmt: skip
    saf_epochs_back: int = option(
        3, "saf: the target is the example's logits from this many epochs (visits) earlier (E~)",
        check=lambda v: v >= 1, why="must be >= 1",
    )  # fmt: skip
    saf_start_epoch: int = option(
        5, "saf: the trajectory loss counts after this epoch (epochs from 0)",
        check=lambda v: v >= 0, why="must be >= 0",
    )  # fmt: skip


@dataclass(frozen=True)
class MESAOptions:
    """MESA's options (``--mesa-*``)."""

    mesa_lambda: float = option(
        0.8, "mesa: weight lambda of the trajectory loss (0: the base optimiser)",
        check=_finite_at_least(0, strict=False), why="must be a finite number >= 0",
    )  # fmt: skip
    mesa_tau: float = option(
        5.0, "mesa: temperature tau of the softmax in the trajectory loss",
        check=_finite_at_least(0, strict=True), why="must be a finite number > 0",
    )  # fmt: skip
    mesa_decay: float = option(
        0.9998, "mesa: decay d of the weights' moving average, ema <- d ema + (1 - d) w after each step",
        check=lambda v: isinstance(v, (int, float)) and 0 <= v < 1, why="must be in [0, 1)",
    )  # fmt: skip
    mesa_start_epoch: int = option(
        5, "mesa: the trajectory loss counts after this epoch (epochs from 0)",
        check=lambda v: v >= 0, why="must be >= 0",
    )  # fmt: skip


# ---------------------------------------------------------------- command line


def _base(request: OptimizerRequest) -> torch.optim.Optimizer:
    return request.base()  # --base-optimizer with the run's options: the term is the step's, not the optimiser's


def _saf(request: OptimizerRequest) -> PastOutputs:
    options = request.options
    if request.train_size < 1:
        raise ValueError("saf needs the training set's size (OptimizerRequest.train_size) to size its record")
    return PastOutputs(
        request.train_size,
        epochs_back=options.saf_epochs_back,
        start_visit=options.saf_start_epoch,
        lam=options.saf_lambda,
        tau=options.saf_tau,
    )


def _mesa(request: OptimizerRequest) -> EMATarget:
    options = request.options
    per_epoch = request.train_size // request.config.batch_size  # as the training loop: the last batch is dropped
    return EMATarget(
        request.model,
        decay=options.mesa_decay,
        lam=options.mesa_lambda,
        tau=options.mesa_tau,
        start_step=(options.mesa_start_epoch + 1) * per_epoch,
    )


register_optimizer(
    "saf",
    "SAF: the base optimiser plus a KL to each example's logits from E~ epochs earlier (--saf-*)",
    _base,
    sharpness_aware=False,
    options=SAFOptions,
    passes="1",
    trajectory=_saf,
)
register_optimizer(
    "mesa",
    "MESA: the base optimiser plus a KL to the outputs of the weights' moving average (--mesa-*)",
    _base,
    sharpness_aware=False,
    options=MESAOptions,
    passes="1, and one forward of the averaged model",
    trajectory=_mesa,
)
