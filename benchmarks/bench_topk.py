"""Benchmark top-k Hessian eigenvalues against ARPACK: products to reach 1e-3 relative error on every value.

The demo's SmallCNN trained 3 epochs with SGD on digits (3 seeds of model and data order), the Hessian of the mean
cross-entropy over 512 training images. Reference: our Lanczos at tol 1e-10 (every Ritz value to float32 accuracy).
Each solver runs over a ladder of settings (tolerances and, for scipy's ``eigsh``, Krylov sizes ``ncv``) on the same
operator with counted products. Two columns per solver: the *oracle* cell (per seed, the fewest products of any
setting whose k values were all within 1e-3 of the reference; the median over seeds) and the *one setting* cell
(the single setting, chosen once for all seeds, with the smallest median among those that reached 1e-3 on every
seed), which is what a user who picks a setting in advance gets. ``value_tol=1e-3`` asks our Lanczos for the
eigenvalue accuracy itself (a ladder of one). ``eigsh`` is ARPACK's implicitly restarted Lanczos, called on our
operator through a ``scipy.sparse.linalg.LinearOperator``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import Report, load_average, start_report
from bench_hessian import digits_workload, rel_err
from scipy.sparse.linalg import LinearOperator as ScipyOperator
from scipy.sparse.linalg import eigsh

from flatminima.sharpness import HessianOperator, lanczos_eigs, power_iteration_op

TARGET = 1e-3


def ours(
    op: HessianOperator,
    k: int,
    tol: float,
    guard: int | None,
    verify: bool = True,
    value_tol: float | None = None,
) -> tuple[list[float], int]:
    before = op.num_hvp
    result = lanczos_eigs(
        op, k=k, tol=tol, max_steps=400, seed=0, return_vectors=False, guard=guard, verify=verify, value_tol=value_tol
    )
    return [float(v) for v in result.eigenvalues], op.num_hvp - before


def arpack(op: HessianOperator, k: int, ncv: int, tol: float) -> tuple[list[float], int]:
    before = op.num_hvp

    def matvec(v: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).to(op.dtype)).double().numpy()

    scipy_op = ScipyOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.dim)
    values = eigsh(scipy_op, k=k, which="LA", ncv=ncv, tol=tol, v0=v0, return_eigenvectors=False, maxiter=1000)
    return sorted(values.tolist(), reverse=True), op.num_hvp - before


Runs = list[tuple[str, list[float], int]]


def best(runs: Runs, reference: torch.Tensor) -> tuple[int | None, str]:
    hits = [(n, label) for label, values, n in runs if rel_err(values, reference) <= TARGET]
    return min(hits) if hits else (None, "none")


def one_setting(per_seed: list[dict[str, int | None]]) -> tuple[str, list[int]] | None:
    """The setting that reached the target on every seed with the smallest median count, and its counts."""
    candidates = []
    for label in per_seed[0]:
        counts = [seed_counts[label] for seed_counts in per_seed]
        if all(c is not None for c in counts):
            candidates.append((statistics.median(counts), label, counts))
    if not candidates:
        return None
    _, label, counts = min(candidates)
    return label, counts


def trust(report: Report, seeds: int = 10) -> None:
    """Does a rule return the true top 5? MLPs trained 3 epochs on digits (the case where the unguarded rule skipped
    lambda_5): per rule, how many seeds missed 1e-3 and how many skipped (an error above 5 %, a different
    eigenvalue), with the median products."""
    rules: dict[str, dict[str, Any]] = {
        "tol 3e-2, guard 0": dict(tol=3e-2, guard=0),
        "tol 3e-2, guard 1 (default)": dict(tol=3e-2),
        "value_tol 1e-3, guard 0": dict(value_tol=TARGET, guard=0),
        "value_tol 1e-3, guard 1 (default)": dict(value_tol=TARGET),
        "value_tol 1e-3, guard 2": dict(value_tol=TARGET, guard=2),
    }
    outcomes: dict[str, list[tuple[int, float]]] = {name: [] for name in rules}
    for seed in range(seeds):
        model, data, _ = digits_workload(512, 3, seed=seed, model_name="mlp")
        op = HessianOperator(model, F.cross_entropy, data)
        reference = lanczos_eigs(op, k=8, tol=1e-10, max_steps=400, return_vectors=False).eigenvalues[:5]
        for name, options in rules.items():
            result = lanczos_eigs(op, k=5, max_steps=400, return_vectors=False, verify=False, **options)
            error = float(((result.eigenvalues - reference).abs() / reference.abs()).max())
            outcomes[name].append((result.num_hvp, error))
    rows = [
        [
            name,
            f"{statistics.median(n for n, _ in runs):g}",
            sum(e > TARGET for _, e in runs),
            sum(e > 0.05 for _, e in runs),
            f"{max(e for _, e in runs):.1e}",
        ]
        for name, runs in outcomes.items()
    ]
    report.table(
        f"**Trust: the top 5 of {seeds} MLPs** (digits, 3 SGD epochs, 512 images; `verify=False`).",
        ["rule", "HVPs (median)", "seeds missing 1e-3", "seeds skipping an eigenvalue (error > 5 %)", "worst error"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer settings")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    parser.add_argument("--trust-only", action="store_true", help="only the trust table (seconds)")
    args = parser.parse_args(argv)
    seeds = (0,) if args.quick else (0, 1, 2)
    report = start_report("flatminima top-k eigenvalues against ARPACK")
    trust(report)
    if args.trust_only:
        if args.output:
            with open(args.output, "w") as file:
                file.write("\n".join(report.lines) + "\n")
        return
    started = time.perf_counter()
    cells: dict[tuple[int, str], list[int | None]] = {}
    settings: dict[tuple[int, str], list[str]] = {}
    by_setting: dict[tuple[int, str], list[dict[str, int | None]]] = {}
    for seed in seeds:
        model, data, _ = digits_workload(512, 3, seed=seed)
        op = HessianOperator(model, F.cross_entropy, data)
        for k in (1, 5):
            reference = torch.tensor(ours(op, k, 1e-10, 2)[0])
            tols = (0.3, 0.1, 3e-2, 1e-2)
            solvers: dict[str, Runs] = {
                "ours, Lanczos value_tol 1e-3 (guard 1, verify=False)": [
                    ("value_tol 1e-3", *ours(op, k, 1e-6, 1, verify=False, value_tol=TARGET))
                ],
                "ours, Lanczos value_tol 1e-3 (guard 2, verify=False)": [
                    ("value_tol 1e-3", *ours(op, k, 1e-6, 2, verify=False, value_tol=TARGET))
                ],
                "ours, Lanczos value_tol 1e-3 (guard 1, verified)": [
                    ("value_tol 1e-3", *ours(op, k, 1e-6, 1, value_tol=TARGET))
                ],
                "ours, Lanczos tol (guard 1, verify=False)": [
                    (f"tol {t:g}", *ours(op, k, t, 1, verify=False)) for t in tols
                ],
                "ours, Lanczos tol (guard 0: may skip an eigenvalue, verify=False)": [
                    (f"tol {t:g}", *ours(op, k, t, 0, verify=False)) for t in tols
                ],
            }
            if k == 1:  # the default for lambda_max: no guard, the wanted residual to EVIDENCE_TOL instead
                solvers["ours, Lanczos value_tol 1e-3 (the defaults: no guard, residual evidence, verify=False)"] = [
                    ("value_tol 1e-3", *ours(op, k, 1e-6, None, verify=False, value_tol=TARGET))
                ]
                power = []
                for t in (1e-2, 1e-3, 1e-4):
                    before = op.num_hvp
                    value = float(power_iteration_op(op, tol=t, max_iter=2000, return_vectors=False).eigenvalues[0])
                    power.append((f"tol {t:g}", [value], op.num_hvp - before))
                solvers["ours, power iteration"] = power
            ncvs = (3, 5, 10) if k == 1 else (11, 15, 20)
            solvers["scipy eigsh (ARPACK)"] = [
                (f"ncv {ncv}, tol {t:g}", *arpack(op, k, ncv, t)) for ncv in ncvs for t in (1e-1, 1e-2, 1e-3)
            ]
            for name, runs in solvers.items():
                count, label = best(runs, reference)
                cells.setdefault((k, name), []).append(count)
                settings.setdefault((k, name), []).append(label)
                by_setting.setdefault((k, name), []).append(
                    {lab: (n if rel_err(values, reference) <= TARGET else None) for lab, values, n in runs}
                )
    rows = []
    for (k, name), counts in cells.items():
        found = [c for c in counts if c is not None]
        median = f"{statistics.median(found):g}" if len(found) == len(counts) else "not reached"
        fixed = one_setting(by_setting[(k, name)])
        fixed_cell = (
            f"{statistics.median(fixed[1]):g} ({', '.join(map(str, fixed[1]))}; {fixed[0]})" if fixed else "none"
        )
        rows.append(
            [
                f"top {k}",
                name,
                median,
                ", ".join(str(c) for c in counts),
                "; ".join(settings[(k, name)]),
                fixed_cell,
            ]
        )
    report.table(
        f"**Products to reach {TARGET:g} relative error on every one of the top k eigenvalues** (SmallCNN, 151,306 "
        f"parameters, 512 digits; median over {len(seeds)} seeds of model and data order). (Time "
        f"{time.perf_counter() - started:.0f} s; load average at the end {load_average()}.)",
        [
            "eigenvalues",
            "solver",
            "HVPs, oracle (median)",
            "per seed",
            "best setting per seed",
            "HVPs, one setting for all seeds (median; per seed; setting)",
        ],
        rows,
    )
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
