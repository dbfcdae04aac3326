"""Benchmark tracking lambda_max along training: products per measurement, warm-started against cold starts.

The demo's SmallCNN on digits (40 % label noise, as ``flatminima demo``) trained with SGD (lr 0.05, momentum 0.9,
batch 32); every ``every`` steps lambda_max of the mean cross-entropy on 512 training examples is measured twice
at the same weights: by power iteration warm-started from the previous measurement's eigenvector (what
``SharpnessTracker`` and ``flatminima train --track-sharpness`` do) and from a fresh random vector, both to the
same tolerance. Reported: products per measurement (mean, median, max), the agreement of the two values, and the
cost of a measurement in training steps (seconds of a measurement / seconds of an SGD step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import load_average, noisy_digits, start_report

from flatminima.models import build_model
from flatminima.sharpness import SharpnessTracker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (one epoch)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=20, help="steps between measurements (default 20)")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    report = start_report("flatminima sharpness tracking benchmark")
    images, labels = noisy_digits()
    data = [(images[:256], labels[:256]), (images[256:512], labels[256:512])]
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (8, 8)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    warm = SharpnessTracker(F.cross_entropy, data, every=args.every, tol=args.tol, max_iter=500)
    gen = torch.Generator().manual_seed(1)
    rows, step_seconds, warm_seconds = [], [], []
    step = 0
    started = time.perf_counter()
    for _ in range(epochs):
        for index in torch.randperm(images.shape[0], generator=gen).split(32):
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            opt.step()
            step_seconds.append(time.perf_counter() - t0)
            step += 1
            if step % args.every:
                continue
            t0 = time.perf_counter()
            record = warm.measure(model, step)
            warm_seconds.append(time.perf_counter() - t0)
            cold = SharpnessTracker(F.cross_entropy, data, every=1, tol=args.tol, max_iter=500, seed=step)
            cold_record = cold.measure(model, step)
            rows.append((step, record, cold_record))
    warm_hvp = [r.num_hvp for _, r, _ in rows[1:]]  # the first measurement is a cold start for both
    cold_hvp = [c.num_hvp for _, _, c in rows[1:]]
    agreement = max(abs(r.lambda_max - c.lambda_max) / abs(c.lambda_max) for _, r, c in rows)
    report.table(
        f"**Products per lambda_max measurement along training** ({epochs} epochs, {step} SGD steps, a measurement "
        f"every {args.every} steps: {len(rows)} measurements, the first one cold for both; tol {args.tol:g}; "
        f"largest relative difference between the warm and the cold value: {agreement:.1e}). (Time "
        f"{time.perf_counter() - started:.0f} s; load average at the end {load_average()}.)",
        ["start", "mean HVPs", "median", "max", "seconds per measurement / seconds per SGD step"],
        [
            [
                "warm (previous eigenvector)",
                f"{statistics.mean(warm_hvp):.1f}",
                f"{statistics.median(warm_hvp):g}",
                f"{max(warm_hvp)}",
                f"{statistics.median(warm_seconds) / statistics.median(step_seconds):.1f}",
            ],
            [
                "cold (random vector)",
                f"{statistics.mean(cold_hvp):.1f}",
                f"{statistics.median(cold_hvp):g}",
                f"{max(cold_hvp)}",
                "-",
            ],
        ],
    )
    report.table(
        "**Each measurement** (warm / cold products, lambda_max).",
        ["step", "warm HVPs", "cold HVPs", "lambda_max (warm)", "lambda_max (cold)"],
        [[s, r.num_hvp, c.num_hvp, f"{r.lambda_max:.4f}", f"{c.lambda_max:.4f}"] for s, r, c in rows],
    )
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
