"""n-SAM: the perturbation from a larger sample's gradient, the descent on the mini-batch (Luo, Harandi, Phung, Le,
NeurIPS 2025, arXiv 2509.18001; the papers page of the documentation, papers.md sec. 3).

Each step: ``e = rho g_n / ||g_n||`` with ``g_n`` the gradient at ``w`` of the mean loss over an *ascent sample*
of ``n`` training examples (a second draw from the training set, not the mini-batch), then the base step along
the mini-batch gradient at ``w + e``. In the paper's SDE analysis the ascent noise then carries no ``1/m``
implicit regulariser, which is what separates n-SAM from m-SAM.

Choices where the paper is open, each an option:

* ``sample_size``: ``n`` (``None``: the whole training set, the paper's full-data n-SAM);
* ``refresh_every``: the ascent sample is redrawn every ``k`` steps (``1``: a fresh sample each step; ``0``: one
  fixed sample for the whole run). The gradient on it is always taken at the current ``w``.

Draws are seeded by (seed, rank, draw number), so a resumed run draws the same samples. The ascent sample is
processed in chunks of the batch size (memory as for SAM), and BatchNorm running statistics come from its pass
(the descent pass keeps them). The loss a step returns is the mini-batch loss at ``w + e`` (no pass at ``w`` is
taken on the batch). Under DDP each rank draws its own sample (a per-rank perturbation, as SAM's default there)
and the descent gradients are all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.batch_rules import BatchRule, Sample
from flatminima.optim.catalog import build_sam
from flatminima.optim.registry import OptimizerRequest, option, register_optimizer

__all__ = ["AscentSample"]

Draw = Callable[[int | None, torch.Generator], Sample]


class AscentSample(BatchRule):
    """The ascent pass on ``draw(sample_size, generator)``, redrawn every ``refresh_every`` steps.

    Args:
        draw: ``draw(n, generator) -> (inputs, targets)``: ``n`` examples of the training set, ready for the model
            (``n=None``: all of them).
        sample_size: ``n``, or ``None`` for the whole training set.
        refresh_every: steps between draws (``0``: draw once).
        seed: seeds draw number ``j`` as ``seed * 1_000_003 + j``.
    """

    def __init__(self, draw: Draw, sample_size: int | None, refresh_every: int = 1, seed: int = 0) -> None:
        if sample_size is not None and (isinstance(sample_size, bool) or sample_size < 1):
            raise ValueError(
                f"the ascent sample size must be >= 1 (or None for the whole training set); got {sample_size}"
            )
        if isinstance(refresh_every, bool) or refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: one fixed sample); got {refresh_every}")
        self.draw, self.sample_size, self.refresh_every, self.seed = draw, sample_size, refresh_every, seed
        self._sample: Sample | None = None
        self._draw_number: int | None = None

    def __repr__(self) -> str:
        return f"AscentSample(sample_size={self.sample_size}, refresh_every={self.refresh_every})"

    def ascent_sample(self, inputs: Tensor, targets: Tensor, step: int) -> Sample | None:
        number = 0 if self.refresh_every == 0 or self.sample_size is None else step // self.refresh_every
        if number != self._draw_number:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
            self._sample, self._draw_number = self.draw(self.sample_size, generator), number
        return self._sample


@dataclass(frozen=True)
class NSAMOptions:
    """n-SAM's options (``--nsam-*``)."""

    nsam_sample_size: int = option(
        512,
        "nsam: examples in the ascent sample (0: the whole training set)",
        check=lambda v: v >= 0,
        why="must be >= 0 (0: the whole training set)",
    )
    nsam_refresh_every: int = option(
        1,
        "nsam: draw a new ascent sample every k steps (0: one fixed sample)",
        check=lambda v: v >= 0,
        why="must be >= 0 (0: one fixed sample)",
    )


def _batch_rule(request: OptimizerRequest) -> AscentSample:
    config = request.config
    size = request.options.nsam_sample_size if request.options.nsam_sample_size > 0 else None
    if request.draw_examples is None:
        raise ValueError("n-SAM draws its ascent sample from the training set; this run offers no sampler")
    if size is not None and size > request.train_size:
        raise ValueError(
            f"nsam_sample_size={size} exceeds the {request.train_size} training examples; lower it, or use 0 for "
            "the whole training set"
        )
    seed = config.seed * 7919 + request.rank
    return AscentSample(request.draw_examples, size, request.options.nsam_refresh_every, seed)


register_optimizer(
    "nsam",
    "n-SAM: ascent on another sample of --nsam-sample-size examples",
    build_sam,
    sharpness_aware=True,
    options=NSAMOptions,
    passes="1 + ceil(n / batch)",
    batch_rule=_batch_rule,
)
