"""A tour of the SAM variants, built in Python

Ten optimisers, plain SGD and nine sharpness-aware variants built with the Python API,
train the same small CNN on scikit-learn's digits, and a table compares their test
accuracy, forward-backward passes and time per step. Each trains for three epochs from
the same initialisation, with the same batches and the same SGD underneath. Most
variants are `flatminima.SAM` with one rule changed on one of its three seams: what the
perturbation is, which direction the descent takes, and on which steps the ascent
happens.

| row | how it is built |
|---|---|
| SAM | `SAM(params, SGD, rho=...)` |
| ASAM | `SAM(..., adaptive=True)` |
| GSAM | `SAM(..., descent=GSAMDescent(alpha))` |
| Friendly SAM | `SAM(..., perturbation=FriendlyAscent())` |
| LookSAM | `SAM(..., descent=LookSAMDescent(alpha), cadence=EveryKSteps(5))` |
| periodic SAM | `periodic_sam(params, SGD, k=2, ...)` |
| AE-SAM | `aesam(params, SGD, total_steps, ...)` |
| ESAM | `esam(params, SGD, beta, ...)`, and `SharpnessSensitiveSelection(gamma)` |
| Momentum-SAM | `SAM(..., perturbation=MomentumAscent())` |

Every row is driven by `SharpnessAwareStep` (SGD by `PlainStep`, the same interface with
one pass), the driver that also runs ESAM's data selection, a batch rule. A forward hook
on the model counts the examples each step pushes through it, with and without gradient,
in units of the batch: the passes per step. The time per step is CPU time relative to
SGD's in the same process (indicative: a tiny model, so each rule's own bookkeeping
shows).

What to look for: the passes follow the seams. SAM, ASAM, GSAM and Friendly SAM take
two; LookSAM (k = 5) and periodic SAM (k = 2) ascend on some steps only, 1.2 and 1.5
passes; AE-SAM lets the size of `||g||^2` decide, about half of the steps here; ESAM's
second pass sees the half of the batch whose loss rose most, chosen by a forward pass
without gradient; Momentum-SAM perturbs along the momentum, needs no gradient at `w`,
and costs one pass. The times follow the passes, plus the bookkeeping. The accuracies
after three epochs on one seed say little (LookSAM's reuse of a stale direction lags
here): the tour shows how each is built and what it costs, not which is best; the
variants page's quality-cost frontier compares them properly. About 10 s on a 2-core
CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from flatminima import SAM, EveryKSteps, PlainStep, SharpnessAwareStep
from flatminima.data import DigitsSplit, load_digits_split
from flatminima.models import SmallCNN
from flatminima.variants import (
    FriendlyAscent,
    GSAMDescent,
    LookSAMDescent,
    MomentumAscent,
    SharpnessSensitiveSelection,
    periodic_sam,
)
from flatminima.variants.aesam import aesam
from flatminima.variants.esam import esam

EPOCHS = 3
BATCH_SIZE = 32
SEED = 0
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO = {
    "SGD": 0.0,
    "SAM": 0.05,
    "ASAM": 0.5,  # its ball is in |w|-scaled units, so its radius is larger
    "GSAM": 0.05,
    "Friendly SAM": 0.05,
    "LookSAM": 0.05,
    "periodic SAM": 0.05,
    "AE-SAM": 0.05,
    "ESAM": 0.05,
    "Momentum-SAM": 1.0,  # a step along the momentum, not uphill: the paper uses 1-3
}


def build(name: str, model: nn.Module, total_steps: int) -> torch.optim.Optimizer:
    """The optimiser of row ``name``: SGD, or SGD inside a variant of SAM."""
    params, base, rho = model.parameters(), torch.optim.SGD, RHO[name]
    if name == "SGD":
        return base(params, **SGD)
    if name == "SAM":
        return SAM(params, base, rho=rho, **SGD)
    if name == "ASAM":
        return SAM(params, base, rho=rho, adaptive=True, **SGD)
    if name == "GSAM":
        return SAM(params, base, rho=rho, descent=GSAMDescent(alpha=0.01), **SGD)
    if name == "Friendly SAM":
        return SAM(params, base, rho=rho, perturbation=FriendlyAscent(), **SGD)
    if name == "LookSAM":
        look = dict(descent=LookSAMDescent(alpha=0.7), cadence=EveryKSteps(5))
        return SAM(params, base, rho=rho, **look, **SGD)
    if name == "periodic SAM":
        return periodic_sam(params, base, k=2, rho=rho, **SGD)
    if name == "AE-SAM":
        return aesam(params, base, total_steps=total_steps, rho=rho, **SGD)
    if name == "ESAM":  # its data selection is a batch rule, given to the step
        return esam(params, base, beta=0.6, seed=SEED, rho=rho, **SGD)
    if name == "Momentum-SAM":
        return SAM(params, base, rho=rho, perturbation=MomentumAscent(), **SGD)
    raise ValueError(f"unknown row {name!r}; the rows are {', '.join(RHO)}")


class PassCounter:
    """Counts the examples a model sees, with and without gradient."""

    def __init__(self, model: nn.Module) -> None:
        self.with_grad = 0
        self.without_grad = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            self.with_grad += len(args[0])
        else:
            self.without_grad += len(args[0])


def run(
    name: str,
    init: dict[str, Tensor],
    split: DigitsSplit,
) -> tuple[float, float, float, float]:
    """Train one row; returns its test accuracy, passes and forwards per step, and
    CPU seconds per step."""
    model = SmallCNN(num_classes=split.num_classes, width=16)
    model.load_state_dict(init)
    steps_per_epoch = -(-len(split.x_train) // BATCH_SIZE)
    opt = build(name, model, total_steps=EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(reduction="none")  # the steps take per-example losses
    if isinstance(opt, SAM):
        rule = SharpnessSensitiveSelection(gamma=0.5) if name == "ESAM" else None
        step = SharpnessAwareStep(model, loss_fn, opt, batch_rule=rule)
    else:
        step = PlainStep(model, loss_fn, opt)
    counter = PassCounter(model)
    order_gen = torch.Generator().manual_seed(SEED)  # the same batches for every row
    model.train()
    start = time.process_time()  # CPU time: less sensitive to other load than wall
    for _ in range(EPOCHS):
        order = torch.randperm(len(split.x_train), generator=order_gen)
        for idx in order.split(BATCH_SIZE):
            step(split.x_train[idx], split.y_train[idx])
    seconds = (time.process_time() - start) / (EPOCHS * steps_per_epoch)
    examples = EPOCHS * len(split.x_train)  # what one pass per step would see
    passes = counter.with_grad / examples
    forwards = counter.without_grad / examples
    model.eval()
    with torch.no_grad():
        pred = model(split.x_test).argmax(dim=1)
    accuracy = (pred == split.y_test).float().mean().item()
    return accuracy, passes, forwards, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and reproducible

    split = load_digits_split(seed=SEED)
    torch.manual_seed(SEED)
    init = SmallCNN(num_classes=split.num_classes, width=16).state_dict()
    print(f"digits, SmallCNN (width 16), {EPOCHS} epochs, batch {BATCH_SIZE}")
    print("SGD lr 0.05, momentum 0.9, wd 5e-4 (also inside every variant)")
    row = "{:<14}{:>5}{:>12}{:>20}{:>13}"
    print(row.format("optimiser", "rho", "test acc %", "passes / step", "time / step"))
    sgd_seconds = 0.0
    for name, rho in RHO.items():
        accuracy, passes, forwards, seconds = run(name, init, split)
        sgd_seconds = sgd_seconds or seconds
        passes_text = f"{passes:.2f}" + (f" + {forwards:.2f} fwd" if forwards else "")
        cells = (f"{rho:g}" if rho else "-", f"{100 * accuracy:.2f}", passes_text)
        print(row.format(name, *cells, f"{seconds / sgd_seconds:.2f}x"))
    print("passes: forward-backward passes in batches (fwd: forwards without gradient)")
    print("time: CPU time per step, relative to SGD's")


if __name__ == "__main__":
    main()
