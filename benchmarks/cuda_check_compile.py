"""CUDA check: SAM's closure pattern on a ``torch.compile``d model with BatchNorm, under inductor on the GPU.

The running statistics must come from the first (unperturbed) pass only, with or without ``model=``: after n steps
``num_batches_tracked`` is n and the running means and weights equal an uncompiled reference's to float tolerance.
Prints a table; exits 1 on a failure, 2 without a GPU (``--device cpu`` runs the same checks on the CPU).

    python benchmarks/cuda_check_compile.py [--device cuda] [--backend inductor] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.nn import functional as F

import flatminima


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _train(device: str, compiled: str | None, watch: bool, steps: int) -> nn.Module:
    model = _model().to(device)
    forward = torch.compile(model, backend=compiled) if compiled else model
    options = {"rho": 0.1, "lr": 0.05, "momentum": 0.9}
    optimizer = flatminima.SAM(model.parameters(), torch.optim.SGD, model=model if watch else None, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=generator).to(device)
        y = torch.randint(0, 10, (16,), generator=generator).to(device)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    reference = _train(args.device, None, True, args.steps)
    ref_bn = reference[1]
    rows, failed = [], False
    for watch in (True, False):
        model = _train(args.device, args.backend, watch, args.steps)
        bn = model[1]
        counted = int(bn.num_batches_tracked)
        mean_gap = float((bn.running_mean - ref_bn.running_mean).abs().max())
        weight_gap = max(
            float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), reference.parameters())
        )
        ok = counted == args.steps and mean_gap < 1e-4 and weight_gap < 1e-4
        failed |= not ok
        rows.append(
            (f"compiled ({args.backend}), model={'model' if watch else 'None'}", counted, mean_gap, weight_gap, ok)
        )
    print(
        f"| case ({args.device}, {torch.__version__}) | num_batches_tracked (want {args.steps}) | "
        "max |running_mean - ref| | max |w - ref| | ok |"
    )
    print("|---|---:|---:|---:|---|")
    for name, counted, mean_gap, weight_gap, ok in rows:
        print(f"| {name} | {counted} | {mean_gap:.2e} | {weight_gap:.2e} | {'yes' if ok else 'NO'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
