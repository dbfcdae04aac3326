"""How loose may Lanczos's guard be? Products and wrong eigenvalues against the guard's tolerance.

    python3 benchmarks/bench_guard_tolerance.py --output benchmarks/results-guard-tolerance-cpu.md  (about 8 min)

``lanczos_eigs`` stops only when, beyond the ``k`` wanted Ritz values, one guard Ritz value has a relative
residual of at most ``GUARD_TOL`` (3e-2): evidence that the Krylov space reaches past the wanted end of the
spectrum, so that an eigenvector barely present in the start vector has had its chance to enter. Each guard
product is a product a user pays for, so this measures what a looser guard saves and what it costs: for three
trained digits models (the SmallCNN after 3 and after 1 epoch, the MLP after 3), k = 1 and k = 5 with
``value_tol=1e-3`` from 30 start vectors each, the mean and largest number of Hessian-vector products, the largest
relative eigenvalue error against a converged reference (``tol=1e-10``, 7 eigenvalues), and how many starts
returned an eigenvalue more than 1e-3 off (a wrong eigenvalue, most often lambda_{k+1} in place of lambda_k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import start_report
from bench_fast_sharpness import start
from bench_hessian import digits_workload

import flatminima.sharpness.lanczos  # noqa: F401  (the module, not the function of the same name)
from flatminima.sharpness import HessianOperator, lanczos_eigs

LANCZOS = sys.modules["flatminima.sharpness.lanczos"]
CASES = (("small_cnn", 3, 0), ("mlp", 3, 0), ("small_cnn", 1, 1))  # model, training epochs, seed
TOLERANCES = (3e-2, 1e-1, 3e-1)
TARGET = 1e-3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--starts", type=int, default=30, help="start vectors per setting (default: 30)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = start_report("flatminima: Lanczos's guard tolerance against wrong eigenvalues")
    rows = []
    default = LANCZOS.GUARD_TOL
    try:
        for name, epochs, seed in CASES:
            model, batches, _ = digits_workload(256, epochs, seed=seed, model_name=name)
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            op = HessianOperator(model, F.cross_entropy, (x, y))
            reference = lanczos_eigs(op, k=7, tol=1e-10, return_vectors=False).eigenvalues.double()
            for k in (1, 5):
                for tolerance in TOLERANCES:
                    LANCZOS.GUARD_TOL = tolerance
                    products, errors = [], []
                    for s in range(args.starts):
                        v0 = torch.from_numpy(start(op.dim, s)).float()
                        result = lanczos_eigs(op, k=k, value_tol=TARGET, v0=v0, return_vectors=False)
                        error = (result.eigenvalues.double() - reference[:k]).abs() / reference[:k].abs()
                        products.append(result.num_hvp)
                        errors.append(float(error.max()))
                    rows.append(
                        [
                            f"{name}, {epochs} epoch{'s' * (epochs > 1)}",
                            str(k),
                            f"{tolerance:g}" + (" (default)" if tolerance == default else ""),
                            f"{sum(products) / len(products):.2f}",
                            str(max(products)),
                            f"{max(errors):.1e}",
                            f"{sum(e > TARGET for e in errors)} / {args.starts}",
                        ]
                    )
                    print(" | ".join(rows[-1]), flush=True)
    finally:
        LANCZOS.GUARD_TOL = default
    report.table(
        f"**Guard tolerance** (`value_tol={TARGET:g}`, guard 1, {args.starts} start vectors per row; one batch of 256 "
        "digits; products counted by the operator).",
        ["model", "k", "guard tolerance", "mean HVPs", "most HVPs", "worst relative error", f"errors > {TARGET:g}"],
        rows,
    )
    if args.output:
        Path(args.output).write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
