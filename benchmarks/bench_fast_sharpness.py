"""Issue 30 in one run: the cost of a Hessian-vector product, of lambda_max and of the top 5 to 1e-3, and of
``import flatminima``, each against its peer, in CPU time on one thread, in interleaved rounds.

Workload (the issue's): the SmallCNN (151,306 parameters) trained 3 SGD epochs on digits, the Hessian of the mean
cross-entropy over one fixed batch of 256 training images, model in eval mode.

* Product: ``HessianOperator.matvec`` (by default on a gradient graph built once and kept) against the peer's
  product, PyHessian's double backward on a graph built once (``create_graph=True``, then
  ``autograd.grad(grads, params, grad_outputs=v, retain_graph=True)`` per product). Also shown: our products that
  rebuild the graph every time (``reuse_graph=False``, the old default), forward-over-reverse, and ``matmat`` of 5
  columns in one batched backward (``vectorize=True``), per product.
* Eigenvalues: ``hessian_eigenvalues(k=1, value_tol=1e-3)`` and ``(k=5, value_tol=1e-3)`` with their defaults,
  against scipy's ``eigsh`` (ARPACK) on the peer's product with the issue's settings (``k=1, ncv=3, tol=1e-2``;
  ``k=5, ncv=11`` at tol 1e-3, the issue's 18 products, and at 1e-2; at its default tol 0 it takes about 47),
  from 10 start vectors, the same for both (paired: a lucky start helps both alike). Every run builds its graph
  (a fresh operator for ours, a fresh graph for the peer). Products, CPU seconds (medians) and the largest
  relative error against a float64-accurate reference (our Lanczos at tol 1e-10, k=7).
* Import: CPU time (user + system, of the child) of ``python -c "import flatminima"``, of ``flatminima --help``
  (as ``python -m flatminima --help``) and of ``python -c "import torch"``, interleaved.

Run ``python benchmarks/bench_fast_sharpness.py --output benchmarks/results-fast-sharpness-cpu.md`` (about a
minute on one core); ``--rounds`` and ``--starts`` trade time for noise.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import load_average, start_report
from bench_hessian import digits_workload
from scipy.sparse.linalg import LinearOperator as ScipyOperator
from scipy.sparse.linalg import eigsh
from torch import Tensor, nn

from flatminima.sharpness import HessianOperator, hessian_eigenvalues, lanczos_eigs

TARGET = 1e-3


class PeerProduct:
    """PyHessian's product: the gradient graph built once, then one double backward per vector."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        loss = F.cross_entropy(model(x), y)
        self.grads = torch.autograd.grad(loss, self.params, create_graph=True)
        self.count = 0

    def __call__(self, v: Tensor) -> Tensor:
        chunks = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in self.params]), self.params, strict=True)]
        hv = torch.autograd.grad(self.grads, self.params, grad_outputs=chunks, retain_graph=True)
        self.count += 1
        return torch.cat([h.reshape(-1) for h in hv])


def start(dim: int, seed: int) -> np.ndarray:
    """The start vector of both solvers for one start (the same for ours and the peer: a paired comparison)."""
    return np.random.default_rng(seed).standard_normal(dim)


def peer_eigsh(model: nn.Module, x: Tensor, y: Tensor, k: int, ncv: int, tol: float, seed: int) -> tuple[Any, int]:
    product = PeerProduct(model, x, y)

    def matvec(v: np.ndarray) -> np.ndarray:
        return product(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))).double().numpy()

    operator = ScipyOperator((product.dim, product.dim), matvec=matvec, dtype=np.float64)
    values = eigsh(
        operator,
        k=k,
        which="LA",
        ncv=ncv,
        tol=tol,
        v0=start(product.dim, seed),
        return_eigenvectors=False,
        maxiter=1000,
    )
    return sorted(values.tolist(), reverse=True), product.count


def cpu_seconds(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = function()
    return out, time.process_time() - start


def relative_error(values: Any, reference: Tensor) -> float:
    got = torch.tensor(sorted((float(v) for v in values), reverse=True), dtype=torch.float64)
    return float(((got - reference[: len(got)]).abs() / reference[: len(got)].abs()).max())


def child_cpu(command: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of single products")
    parser.add_argument("--starts", type=int, default=10, help="start vectors per eigenvalue solver")
    parser.add_argument("--import-rounds", type=int, default=5, help="interleaved rounds of the import timings")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = start_report("flatminima issue 30: products, eigenvalues and import against their peers")
    started = time.perf_counter()

    model, batches, _ = digits_workload(256, 3)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    data = (x, y)

    # ---- one product
    ops = {
        "ours, `matvec` (kept graph, the default)": HessianOperator(model, F.cross_entropy, data),
        "ours, `matvec`, `reuse_graph=False` (the old default)": HessianOperator(
            model, F.cross_entropy, data, reuse_graph=False
        ),
        "ours, `matvec`, forward-over-reverse": HessianOperator(
            model, F.cross_entropy, data, method="forward_over_reverse"
        ),
        "ours, `matmat` of 5 columns, `vectorize=True` (per product)": HessianOperator(
            model, F.cross_entropy, data, vectorize=True
        ),
    }
    peer = PeerProduct(model, x, y)
    v = torch.randn(peer.dim, generator=torch.Generator().manual_seed(0))
    block = torch.randn(peer.dim, 5, generator=torch.Generator().manual_seed(1))
    calls: dict[str, Callable[[], Any]] = {"peer: double backward on a graph built once (PyHessian)": lambda: peer(v)}
    for name, op in ops.items():
        calls[name] = (lambda op=op: op.matmat(block)) if "matmat" in name else (lambda op=op: op.matvec(v))
    for call in calls.values():  # warm-up; builds the kept graphs
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(cpu_seconds(call)[1] / (5 if "matmat" in name else 1))
    peer_name = next(iter(calls))
    peer_ms = 1e3 * statistics.median(times[peer_name])
    rows = [
        [name, f"{1e3 * statistics.median(t):.1f}", f"{1e3 * statistics.median(t) / peer_ms:.2f}"]
        for name, t in times.items()
    ]
    report.table(
        f"**One Hessian-vector product** (CPU ms, median of {args.rounds} interleaved rounds, one thread).",
        ["product", "CPU ms", "ours / peer"],
        rows,
    )
    auto = HessianOperator(model, F.cross_entropy, data, method="auto")
    report(
        f'`method="auto"` timed double backward on a kept graph at {1e3 * auto.benchmark["double_backward"]:.1f} ms '
        f"and forward-over-reverse at {1e3 * auto.benchmark['forward_over_reverse']:.1f} ms (wall) and chose "
        f"`{auto.method}`. The kept graph holds {ops[next(iter(ops))].graph_bytes / 2**20:.1f} MiB for the 256 "
        "images."
    )
    report()

    # ---- eigenvalues to 1e-3
    reference_op = HessianOperator(model, F.cross_entropy, data)
    reference = lanczos_eigs(reference_op, k=7, tol=1e-10, return_vectors=False).eigenvalues.to(torch.float64)
    solvers: dict[str, Callable[[int], tuple[Any, int]]] = {}

    def v0(seed: int) -> Tensor:
        return torch.from_numpy(start(reference_op.dim, seed)).float()

    def ours(k: int) -> Callable[[int], tuple[Any, int]]:
        def run(seed: int) -> tuple[Any, int]:
            result = hessian_eigenvalues(
                model, F.cross_entropy, data, k=k, value_tol=TARGET, v0=v0(seed), return_vectors=False
            )
            return result.eigenvalues.tolist(), result.num_hvp

        return run

    def ours_unguarded(k: int) -> Callable[[int], tuple[Any, int]]:
        def run(seed: int) -> tuple[Any, int]:
            result = hessian_eigenvalues(
                model, F.cross_entropy, data, k=k, value_tol=TARGET, v0=v0(seed), return_vectors=False, guard=0
            )
            return result.eigenvalues.tolist(), result.num_hvp

        return run

    def ours_checked(k: int) -> Callable[[int], tuple[Any, int]]:
        def run(seed: int) -> tuple[Any, int]:
            result = hessian_eigenvalues(
                model,
                F.cross_entropy,
                data,
                k=k,
                value_tol=TARGET,
                v0=v0(seed),
                return_vectors=False,
                guard=1,
                verify=True,
            )
            return result.eigenvalues.tolist(), result.num_hvp

        return run

    def arpack(k: int, ncv: int, tol: float) -> Callable[[int], tuple[Any, int]]:
        return lambda seed: peer_eigsh(model, x, y, k, ncv, tol, seed)

    solvers = {
        "lambda_max | ours, `value_tol=1e-3` (defaults: guard 1, no verification)": ours(1),
        "lambda_max | ours, `value_tol=1e-3, guard=0` (may stop on lambda_2)": ours_unguarded(1),
        "lambda_max | ours, `value_tol=1e-3, guard=1, verify=True` (the old defaults)": ours_checked(1),
        "lambda_max | peer, `eigsh(k=1, ncv=3, tol=1e-2)` on the peer's product": arpack(1, 3, 1e-2),
        "top 5 | ours, `value_tol=1e-3` (defaults: guard 1, no verification)": ours(5),
        "top 5 | ours, `value_tol=1e-3, guard=1, verify=True` (the old defaults)": ours_checked(5),
        "top 5 | peer, `eigsh(k=5, ncv=11, tol=1e-3)` on the peer's product": arpack(5, 11, 1e-3),
        "top 5 | peer, `eigsh(k=5, ncv=11, tol=1e-2)` on the peer's product": arpack(5, 11, 1e-2),
    }
    outcomes: dict[str, list[tuple[int, float, float]]] = {name: [] for name in solvers}
    for seed in range(args.starts):
        for name, solve in solvers.items():
            (values, products), seconds = cpu_seconds(lambda solve=solve, seed=seed: solve(seed))
            outcomes[name].append((products, seconds, relative_error(values, reference)))
    rows = []
    peers: dict[str, tuple[float, float]] = {}
    for name, runs in outcomes.items():
        which, solver = name.split(" | ")
        products = statistics.median(n for n, _, _ in runs)
        seconds = statistics.median(s for _, s, _ in runs)
        if solver.startswith("peer") and which not in peers:
            peers[which] = (products, seconds)
        rows.append([which, solver, products, ", ".join(str(n) for n, _, _ in runs), f"{seconds:.2f}", runs])
    table = []
    for which, solver, products, per_start, seconds, runs in rows:
        base_products, base_seconds = peers[which]
        table.append(
            [
                which,
                solver,
                f"{products:g}",
                per_start,
                f"{products / base_products:.2f}",
                seconds,
                f"{float(seconds) / base_seconds:.2f}",
                f"{max(e for _, _, e in runs):.1e}",
            ]
        )
    report.table(
        f"**Eigenvalues to {TARGET:g}** (median over {args.starts} start vectors; the ratios against the first peer "
        "row of each block, the issue's settings; error: the largest relative error of any start).",
        ["", "solver", "HVPs", "per start", "HVPs / peer", "CPU s", "CPU s / peer", "worst error"],
        table,
    )

    # ---- import
    python = sys.executable
    commands = {
        "`import torch`": [python, "-c", "import torch"],
        "`import flatminima`": [python, "-c", "import flatminima"],
        "`flatminima --help`": [python, "-m", "flatminima", "--help"],
    }
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.import_rounds):
        for name, command in commands.items():
            cpu[name].append(child_cpu(command))
    base = statistics.median(cpu["`import torch`"])
    report.table(
        f"**Import** (CPU s of a fresh interpreter, median of {args.import_rounds} interleaved rounds).",
        ["command", "CPU s", "/ `import torch`"],
        [[name, f"{statistics.median(t):.2f}", f"{statistics.median(t) / base:.2f}"] for name, t in cpu.items()],
    )
    report(f"(Time {time.perf_counter() - started:.0f} s; load average at the end {load_average()}.)")
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
