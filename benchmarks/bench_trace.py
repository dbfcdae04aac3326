"""Benchmark the Hessian trace estimators at equal products: Hutchinson, Hutch++ and XTrace against the exact trace.

An MLP (64-32-10, 2,410 parameters) trained for 5 epochs with SGD on digits with 40 % label noise (the demo's
data); the Hessian of the mean cross-entropy over 512 training examples, whose exact trace is computed from all
2,410 unit vectors (``matmat`` in blocks). Each estimator then runs with 20 seeds at each budget of products;
reported: the RMS relative error, the mean of the estimators' own standard errors relative to the trace (are they
calibrated?) and the seconds per estimate. Then the cost per vector of batched products (``matmat``) on the
demo's SmallCNN, by number of vectors per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import Report, load_average, noisy_digits_mlp, start_report

from flatminima.data import channel_mean_std, load_digits, normalize, to_float
from flatminima.sharpness import HessianOperator, hutchinson_trace_op, hutchpp_trace_op, xtrace_op


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (3 seeds, one budget)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    seeds = range(3 if args.quick else 20)
    budgets = (24,) if args.quick else (24, 48, 99)
    report = start_report("flatminima trace estimators benchmark")
    model, data = noisy_digits_mlp()
    op = HessianOperator(model, F.cross_entropy, data)
    started = time.perf_counter()
    eye = torch.eye(op.dim, dtype=torch.float64)
    exact = sum(float(torch.diagonal(op.matmat(eye[:, j : j + 64])[j : j + 64]).sum()) for j in range(0, op.dim, 64))
    report(f"Exact trace {exact:.6f} from {op.dim} products ({time.perf_counter() - started:.1f} s).")
    report()
    estimators = {"Hutchinson": hutchinson_trace_op, "Hutch++": hutchpp_trace_op, "XTrace": xtrace_op}
    rows = []
    for budget in budgets:
        for name, estimator in estimators.items():
            errors, stderrs, seconds = [], [], []
            for seed in seeds:
                t0 = time.perf_counter()
                result = (
                    estimator(op, num_probes=budget, seed=seed)
                    if name == "Hutchinson"
                    else estimator(op, num_matvecs=budget, seed=seed)
                )
                seconds.append(time.perf_counter() - t0)
                errors.append((result.estimate - exact) / abs(exact))
                stderrs.append(result.stderr / abs(exact))
            rms = statistics.fmean(e * e for e in errors) ** 0.5
            rows.append([budget, name, f"{100 * rms:.2f} %", f"{100 * statistics.fmean(stderrs):.2f} %",
                         f"{statistics.median(seconds):.2f}"])  # fmt: skip
    report.table(
        f"**Trace error at equal products** ({len(seeds)} seeds per cell; the MLP's Hessian over 512 noisy-label "
        f"digits). (Load average at the end {load_average()}.)",
        ["products", "estimator", "RMS relative error", "mean reported stderr / trace", "seconds (median)"],
        rows,
    )
    batched_products(report, args.quick)
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(report.lines) + "\n")


def batched_products(report: Report, quick: bool) -> None:
    """Cost per vector of ``HessianOperator.matmat`` by number of vectors: one pass over the data serves them all."""
    from flatminima.models import build_model

    digits = load_digits(seed=0)
    mean, std = channel_mean_std(digits.train_images)
    images = normalize(to_float(digits.train_images[:512]), mean, std)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (8, 8)).eval()
    data = [(images[:256], digits.train_labels[:256]), (images[256:], digits.train_labels[256:512])]
    op = HessianOperator(model, F.cross_entropy, data)
    rows = []
    base = None
    for k in (1, 4) if quick else (1, 4, 16, 64):
        matrix = torch.randn(op.dim, k, generator=torch.Generator().manual_seed(k))
        op.matmat(matrix)  # warm-up
        times = []
        for _ in range(2 if quick else 5):
            t0 = time.perf_counter()
            op.matmat(matrix)
            times.append(time.perf_counter() - t0)
        per_vector = statistics.median(times) / k
        base = base or per_vector
        rows.append([k, f"{1e3 * statistics.median(times):.1f}", f"{1e3 * per_vector:.1f}", f"{base / per_vector:.2f}"])
    report.table(
        f"**Batched Hessian products**: `HessianOperator.matmat` on the SmallCNN ({op.dim:,} parameters, 512 digits, "
        "double backward, float32, eval mode), median of 5 calls. The forward pass and the first backward are shared "
        "by the k vectors of a call.",
        ["vectors per call", "ms per call", "ms per vector", "speed-up per vector vs single products"],
        rows,
    )


if __name__ == "__main__":
    main()
