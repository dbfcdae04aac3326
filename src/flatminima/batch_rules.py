"""The batch seam: which examples each pass of a sharpness-aware step sees, and with which weights.

The optimiser's seams (``flatminima.optim.rules``) decide the tensor maths; some variants also decide *what
data* the passes see, which only the batch-aware step (``SharpnessAwareStep``) can act on:

- n-SAM takes the ascent gradient on another, larger sample than the mini-batch;
- RW-SAM weights the examples of the ascent pass (Gibbs weights from cheap per-example sharpness scores);
- Ahn et al.'s sharpness-aware perturbation takes both passes on a single random example.

A ``BatchRule`` answers three questions per step; the defaults are SAM's (the batch, uniform weights), so a
rule overrides only what it changes. The step calls, in order: ``ascent_sample``,
``ascent_weights`` (with the per-example losses of the ascent sample at ``w`` and a
``Probe`` for extra forward passes), then ``descent_sample``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from flatminima import running_stats

__all__ = ["BatchRule", "Probe", "Sample", "make_probe", "random_index"]

Sample = tuple[Tensor, Tensor]  # (inputs, targets)


class Probe:
    """Extra passes over the ascent sample for a rule that scores examples: per-example losses at shifted weights
    ``w + offsets`` (forward only, no gradient), or exact per-example gradient norms; BatchNorm running statistics
    untouched, the model's weights never written.

    ``params`` are the trainable parameters, in the order ``offsets`` must follow (``None`` for no shift).
    """

    def __init__(
        self,
        params: list[Tensor],
        losses_at: Callable[[list[Tensor | None], int, int], Tensor],
        gradient_norms: Callable[[int, int], Tensor],
        batch_dependent: bool,
    ) -> None:
        self.params = params
        self.batch_dependent = batch_dependent  # BatchNorm in train mode: an example's loss depends on its batch
        self._losses_at = losses_at
        self._gradient_norms = gradient_norms

    def losses_at(self, offsets: list[Tensor | None], start: int = 0, stop: int | None = None) -> Tensor:
        """Per-example losses of examples ``start:stop`` of the ascent sample at ``w + offsets`` (float32 or wider)."""
        return self._losses_at(offsets, start, stop if stop is not None else -1)

    def gradient_norms(self, start: int, stop: int) -> Tensor:
        """``||grad l_i(w)||_2`` of examples ``start:stop``, one backward each (exact and slow; float64)."""
        return self._gradient_norms(start, stop)


class BatchRule:
    """SAM's answers: both passes on the mini-batch, the ascent loss its plain mean.

    ``needs_per_example_losses``: ``ascent_weights`` is called, so ``loss_fn`` must return one loss per
    example (``reduction="none"``).
    """

    needs_per_example_losses: bool = False

    def ascent_sample(self, inputs: Tensor, targets: Tensor, step: int) -> Sample | None:
        """The examples whose gradient at ``w`` drives the ascent; ``None`` for the batch itself."""
        return None

    def ascent_weights(self, losses: Tensor, probe: Probe) -> Tensor | None:
        """Weights (summing to 1) of the ascent sample's per-example losses; ``None`` for their mean."""
        return None

    def descent_sample(self, inputs: Tensor, targets: Tensor) -> Sample | None:
        """The examples whose gradient at ``w + e`` is the descent's; ``None`` for the batch itself."""
        return None

    def descent_weights(self) -> Tensor | None:
        """Weights of the descent sample's per-example losses (reusing the ascent's); ``None`` for their mean."""
        return None

    @property
    def is_default(self) -> bool:
        """True for SAM's own answers (the step then takes its general path, m-SAM and accumulation included)."""
        return type(self) is BatchRule


def random_index(n: int, generator: torch.Generator | None) -> int:
    """One index uniform in ``range(n)`` from ``generator`` (on the CPU, so runs are reproducible anywhere)."""
    return int(torch.randint(n, (1,), generator=generator).item())


def make_probe(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    autocast: AbstractContextManager[None] | None = None,
) -> Probe:
    """The ``Probe`` of ``model`` (unwrapped from DDP) on ``(inputs, targets)``; ``loss_fn`` returns one loss
    per example. ``autocast`` is entered around each forward pass (the step's mixed precision)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    layers = running_stats.norm_layers(model)

    def precision() -> AbstractContextManager[None]:
        return autocast if autocast is not None else nullcontext()

    def widen(losses: Tensor) -> Tensor:
        return losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses

    def losses_at(offsets: list[Tensor | None], start: int, stop: int) -> Tensor:
        stop = inputs.shape[0] if stop < 0 else stop
        weights = {name: p if o is None else p + o for (name, p), o in zip(named, offsets)}
        with torch.no_grad(), running_stats.frozen(layers), precision():
            outputs = torch.func.functional_call(model, weights, (inputs[start:stop],))
            return widen(loss_fn(outputs, targets[start:stop]))

    def gradient_norms(start: int, stop: int) -> Tensor:
        norms = []
        with running_stats.frozen(layers), torch.enable_grad():
            for i in range(start, stop):
                with precision():
                    loss = widen(loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])).sum()
                grads = [g for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None]
                squares = torch.stack([g.double().pow(2).sum() for g in grads]) if grads else torch.zeros(1)
                norms.append(squares.sum().sqrt().to(torch.float64))
        return torch.stack(norms)

    return Probe(params, losses_at, gradient_norms, batch_dependent=any(layer.training for layer in layers))
