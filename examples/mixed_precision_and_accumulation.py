"""Accumulation, clipping, bfloat16 and a resumed checkpoint

SAM with gradient accumulation, gradient clipping and bfloat16 autocast, and a run
checkpointed halfway that resumes bit for bit. `flatminima.SharpnessAwareStep` owns
SAM's forward and backward passes, so it also owns what SAM makes delicate: accumulation
(each of the two passes split into micro-batches), clipping (of the descent gradient,
the one taken at `w + e`) and mixed precision (`torch.autocast`; bfloat16 here, which a
CPU runs, so no GradScaler). The example does each the way the training guide does:

```python
opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, ...)
step = flatminima.SharpnessAwareStep(
    model, nn.CrossEntropyLoss(reduction="none"), opt,
    accumulation_steps=2, max_grad_norm=1.0, autocast_dtype=torch.bfloat16,
)
loss = step(x, y)  # one SAM step on the batch
```

It prints three things. First, that accumulation is exact: one SAM step on a batch of 64
in float32, whole and in 4 micro-batches of 16, ends at the same weights up to float32
rounding (a difference near 1e-8). Second, a short bfloat16 run of a small CNN on
scikit-learn's digits, batches of 64 in 2 micro-batches of 32, the descent gradient
clipped to norm 1, a cosine learning rate, and a checkpoint written after epoch 2: the
model's, the optimiser's (SGD's momentum and SAM's own step count) and the scheduler's
`state_dict`, loaded back with `torch.load(weights_only=True)`. Third, a fresh model,
optimiser, scheduler and step resumed from that checkpoint, which run epochs 3 and 4
again. What to look for: the resumed epochs print the same losses as the uninterrupted
ones, and the largest weight difference between the two final models is 0.0. The batch
order of an epoch is drawn from a generator seeded with the epoch, so the resumed run
needs no random state beyond the checkpoint. About 6 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import flatminima
from flatminima.data import DigitsSplit, load_digits_split
from flatminima.models import SmallCNN

EPOCHS = 4
CHECKPOINT_AFTER = 2  # epochs
BATCH_SIZE = 64
SEED = 0


@dataclass
class Run:
    """Everything a training run holds, and so everything a checkpoint must carry."""

    model: nn.Module
    opt: flatminima.SAM
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: flatminima.SharpnessAwareStep


def new_run(
    init: dict[str, Tensor],
    steps_per_epoch: int,
    accumulation_steps: int = 2,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> Run:
    """A model from ``init``, SAM around SGD, a cosine schedule and the batch step."""
    model = SmallCNN()
    model.load_state_dict(init)
    opt = flatminima.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.05,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
    )
    total = EPOCHS * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    step = flatminima.SharpnessAwareStep(
        model,
        nn.CrossEntropyLoss(reduction="none"),
        opt,
        accumulation_steps=accumulation_steps,  # each pass in micro-batches
        max_grad_norm=1.0,  # clips the descent gradient, g(w + e)
        autocast_dtype=autocast_dtype,  # None: float32
    )
    return Run(model, opt, scheduler, step)


def train_epoch(run: Run, split: DigitsSplit, epoch: int) -> float:
    """One epoch; returns the mean training loss (at ``w``, under autocast)."""
    order_gen = torch.Generator().manual_seed(1000 * SEED + epoch)
    order = torch.randperm(len(split.x_train), generator=order_gen)
    run.model.train()
    total = torch.zeros(())
    for idx in order.split(BATCH_SIZE):
        loss = run.step(split.x_train[idx], split.y_train[idx])
        run.scheduler.step()
        total += loss.float() * len(idx)  # no host sync until the epoch ends
    return total.item() / len(split.x_train)


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest absolute difference between two models' weights and buffers."""
    pairs = zip(a.state_dict().values(), b.state_dict().values())
    return max((x.double() - y.double()).abs().max().item() for x, y in pairs)


@torch.no_grad()
def test_accuracy(model: nn.Module, split: DigitsSplit) -> float:
    model.eval()
    pred = model(split.x_test).argmax(dim=1)
    return (pred == split.y_test).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and reproducible
    split = load_digits_split(seed=SEED)
    torch.manual_seed(SEED)
    init = SmallCNN().state_dict()
    steps_per_epoch = -(-len(split.x_train) // BATCH_SIZE)

    # 1. accumulation equals the whole batch (float32, so only rounding differs)
    x, y = split.x_train[:BATCH_SIZE], split.y_train[:BATCH_SIZE]
    whole = new_run(init, steps_per_epoch, accumulation_steps=1, autocast_dtype=None)
    parts = new_run(init, steps_per_epoch, accumulation_steps=4, autocast_dtype=None)
    whole.step(x, y)
    parts.step(x, y)
    difference = largest_difference(whole.model, parts.model)
    print(f"1. one SAM step on {BATCH_SIZE} examples in float32, whole and in 4 parts:")
    print(f"   largest weight difference {difference:.1e}")

    # 2. bfloat16, accumulation, clipping; a checkpoint after CHECKPOINT_AFTER epochs
    print("2. bfloat16 autocast, 2 micro-batches of 32, clipping at norm 1:")
    run = new_run(init, steps_per_epoch)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        for epoch in range(EPOCHS):
            loss = train_epoch(run, split, epoch)
            note = ""
            if epoch + 1 == CHECKPOINT_AFTER:
                checkpoint = {
                    "model": run.model.state_dict(),
                    "optimizer": run.opt.state_dict(),  # SGD's momentum, SAM's steps
                    "scheduler": run.scheduler.state_dict(),
                    "epoch": epoch + 1,
                }
                torch.save(checkpoint, path)
                note = "  (checkpoint saved)"
            print(f"   epoch {epoch + 1}  train loss {loss:.6f}{note}")
        print(f"   test accuracy {100 * test_accuracy(run.model, split):.2f} %")

        # 3. a fresh run, resumed from the checkpoint
        resumed = new_run(init=SmallCNN().state_dict(), steps_per_epoch=steps_per_epoch)
        checkpoint = torch.load(path, weights_only=True)
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.opt.load_state_dict(checkpoint["optimizer"])
    resumed.scheduler.load_state_dict(checkpoint["scheduler"])
    print(f"3. resumed from the checkpoint after epoch {checkpoint['epoch']}:")
    for epoch in range(checkpoint["epoch"], EPOCHS):
        loss = train_epoch(resumed, split, epoch)
        print(f"   epoch {epoch + 1}  train loss {loss:.6f}")
    difference = largest_difference(run.model, resumed.model)
    print(f"   largest weight difference from the uninterrupted run: {difference}")


if __name__ == "__main__":
    main()
