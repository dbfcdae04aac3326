"""Benchmark flatminima's Hessian estimators against peer packages on the same models, data and operator.

Peers: curvlinops (``HessianLinearOperator``, its ``hutchinson_trace``, ``hutchpp_trace`` and ``xtrace``, and scipy's
``eigsh`` (ARPACK) through its ``to_scipy()``), PyHessian (``hessian(...).eigenvalues`` / ``.trace``, dataloader
mode) and hessian-eigenthings (``lanczos``, ``deflated_power_iteration``, ``hutchinson``, ``hutch_plus_plus``).
Run it where they are installed, e.g. ``/tmp/peervenv/bin/python benchmarks/bench_peers.py`` (about 10 minutes on 2
CPU cores); ``--quick`` is a smoke run (one seed, fewer settings); ``--output FILE`` also writes the markdown report;
``--threads N`` sets torch's threads (default 2); ``--clock cpu`` makes the equal-seconds trace comparison use
the process's CPU time instead of the wall clock (steadier when other jobs load the machine; with one thread CPU
time is the wall time an idle machine would take). A peer that is missing or raises is reported as "failed: <reason>".

Section 1 (eigenvalues): bench_hessian's ``digits_workload(512, 3, seed)``, the SmallCNN (151,306 parameters) trained
3 SGD epochs on digits, for seeds 0, 1, 2, in eval mode; the Hessian of the mean cross-entropy over its first 512
training images in 4 batches of 128. Every solver gets that model and those batches; every peer's loss is that mean
(PyHessian weights each batch's product by its size, hessian-eigenthings averages the batches' products, curvlinops
weights them by batch size / N: all equal here, the batches being equal), which section 0 checks on one random
vector against our float64 product. Reference (as in bench_topk): our ``lanczos_eigs(op, k=5, tol=1e-10,
max_steps=400)`` in float32; its first value is the lambda_max reference. Each solver runs over a ladder of its own
settings; a cell gives the fewest products of a setting whose k values (sorted) were all within 1e-3 relative error
of the reference (median over seeds, per seed), and the seconds of that same run. Each ladder's cost only grows
along it (a tighter tol for one start vector, a longer fixed Krylov space), so it stops at its first hit, which is
then its cheapest; a run is stopped at 500 products (counted as not reaching the target). Solvers and settings:

* ours: ``lanczos_eigs(verify=False)`` over tol (0.3, 0.1, 3e-2, 1e-2), and the same with ``value_tol=1e-3`` when
  ``lanczos_eigs`` takes that keyword (checked with ``inspect.signature`` at run time; the rows are skipped if not),
  and once with ``value_tol=1e-3, tol=1e-8`` (value_tol, an extra way to stop, then decides alone); the default
  guard is one guard Ritz value, or for k=1 with ``value_tol`` the wanted residual to ``EVIDENCE_TOL`` instead;
  ``power_iteration_op`` (k=1) over tol (1e-2, ..., 1e-5). Counted by ``HessianOperator.num_hvp``.
* PyHessian ``eigenvalues(maxIter=1000, tol, top_n=k)`` over tol (1e-2, ..., 1e-5) (power iteration with deflation;
  a larger top_n computes the same first k values and then more). Start vectors from the global generator, seeded 0.
  Counted by wrapping the instance's ``dataloader_hv_product`` (one call = one product over all batches),
  cross-checked by counting ``torch.autograd.grad`` calls (one per batch per product).
* hessian-eigenthings ``lanczos(k, max_iter=m, which="LA", seed=0)`` over m (its ``tol`` only sets the converged
  flags: the result depends on m alone, and m products are made), and ``deflated_power_iteration(k, max_iter=300,
  tol, seed=0)`` over tol (0.1, ..., 1e-3). Counted by wrapping its ``HessianOperator.matvec`` (every product, the
  deflated ones included, goes through it), cross-checked by counting its per-batch ``_hvp`` calls.
* scipy ``eigsh(which="LA", ncv, tol, v0)`` on curvlinops' ``HessianLinearOperator(...).to_scipy()`` over ncv (3, 5,
  10) for k=1 and (11, 15, 20) for k=5 and tol (0.1, 1e-2, 1e-3). Counted by wrapping the operator's ``_matmat`` (the
  number of columns multiplied), cross-checked by counting the columns of its per-batch ``_matmat_batch`` calls.

Section 2 (trace): the Hessian of the SmallCNN is too large for an exact trace, so this reuses bench_trace.py's
workload, rebuilt here the same way: an MLP 64-32-10 (2,410 parameters, float64) trained 5 SGD epochs on the demo's
noisy-label digits, the Hessian of the mean cross-entropy over 512 examples in 2 batches of 256, and its exact trace
from products with all 2,410 unit vectors. Estimators: ours (Hutchinson, Hutch++, XTrace), curvlinops
(``hutchinson_trace``, ``hutchpp_trace``, ``xtrace``; global generator seeded), PyHessian ``trace(maxIter=n,
tol=-inf)`` (Hutchinson, n probes), hessian-eigenthings (``hutchinson``, ``hutch_plus_plus``), counted as above.
First at equal products (about 24, 48, 99: curvlinops' Hutch++ needs a multiple of 3, its XTrace and ours an even
count, so 99 becomes 98 there); then at equal seconds: a time budget per row (the median over estimators of their
median seconds at 24, 48, 99 products) and, for each estimator, the most products that fit it by a line fitted to
its own times (never more than dim - 1, curvlinops' limit). Cells: RMS relative error over 10 seeds of the probes
and the median seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import Report, command_line, load_average, local_timestamp, machine, noisy_digits_mlp, package_version
from bench_hessian import counting_autograd_grad, digits_workload, rel_err
from torch import Tensor, nn

from flatminima.sharpness import (
    HessianOperator,
    hutchinson_trace_op,
    hutchpp_trace_op,
    lanczos_eigs,
    power_iteration_op,
    xtrace_op,
)

TARGET = 1e-3
RUN_CAP = 500  # products after which an eigenvalue run is stopped (and counted as not reaching the target)
Batches = list[tuple[Tensor, Tensor]]

warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's backward(create_graph=True)


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 100 else text[:97] + "..."


class ProductCap(Exception):
    """Raised by a counted product once a run has spent its cap (``RUN_CAP``)."""


class Budget:
    """The products a run may still make (``None``: unlimited); every counted product, ours included, spends it."""

    def __init__(self) -> None:
        self.left: int | None = None

    def spend(self, n: int) -> None:
        if self.left is not None:
            self.left -= n
            if self.left < 0:
                raise ProductCap(f"stopped at the cap of {RUN_CAP} products")


BUDGET = Budget()


def count_ours(op: HessianOperator) -> HessianOperator:
    """Our operator with its ``matmat`` (which ``matvec`` calls) spending the run's budget; ``num_hvp`` counts."""
    matmat = op.matmat

    def capped(matrix: Tensor) -> Tensor:
        BUDGET.spend(int(matrix.shape[1]))
        return matmat(matrix)

    op.matmat = capped  # type: ignore[method-assign]
    return op


# ---------------------------------------------------------------------------------------------- peers' operators


@dataclass
class Counts:
    """Products counted for one package: full-data products, and per-batch products (the cross-check)."""

    products: int = 0
    batch_products: int = 0


class Peers:
    """The peers' operators on one model and data, each wrapped to count its products; a failure is kept as text."""

    def __init__(self, model: nn.Module, data: Batches) -> None:
        self.model, self.data = model, data
        self.counts = {name: Counts() for name in ("PyHessian", "hessian-eigenthings", "curvlinops")}
        self.failures: dict[str, str] = {}
        self.curv: Any = self._make("curvlinops", self._curvlinops)
        self.things: Any = self._make("hessian-eigenthings", self._eigenthings)
        self._make("PyHessian", self.pyhessian)  # fails early if the package is missing

    def _make(self, name: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as exc:
            self.failures[name] = short(exc)
            return None

    def _curvlinops(self) -> Any:
        from curvlinops import HessianLinearOperator

        params = [p for p in self.model.parameters() if p.requires_grad]
        num_data = sum(len(y) for _, y in self.data)
        op = HessianLinearOperator(
            self.model, nn.CrossEntropyLoss(), params, self.data, check_deterministic=False, num_data=num_data
        )
        counts = self.counts["curvlinops"]
        matmat, matmat_batch = op._matmat, op._matmat_batch

        def counted_matmat(m: list[Tensor]) -> list[Tensor]:
            BUDGET.spend(int(m[0].shape[-1]))
            counts.products += int(m[0].shape[-1])
            return matmat(m)

        def counted_batch(x: Tensor, y: Tensor, m: list[Tensor]) -> list[Tensor]:
            counts.batch_products += int(m[0].shape[-1])
            return matmat_batch(x, y, m)

        op._matmat, op._matmat_batch = counted_matmat, counted_batch
        return op

    def _eigenthings(self) -> Any:
        import hessian_eigenthings as he

        op = he.HessianOperator(self.model, self.data, he.supervised_loss(F.cross_entropy))
        counts = self.counts["hessian-eigenthings"]
        matvec, hvp = op.matvec, op._hvp

        def counted_matvec(v: Tensor) -> Tensor:
            BUDGET.spend(1)
            counts.products += 1
            return matvec(v)

        def counted_hvp(v_split: list[Tensor], batch: Any) -> Tensor:
            counts.batch_products += 1
            return hvp(v_split, batch)

        op.matvec, op._hvp = counted_matvec, counted_hvp
        return op

    def pyhessian(self) -> Any:
        """A fresh PyHessian ``hessian`` in dataloader mode with a counted ``dataloader_hv_product``."""
        from pyhessian import hessian

        self.model.zero_grad(set_to_none=True)
        comp = hessian(self.model, F.cross_entropy, dataloader=self.data, cuda=False)
        counts = self.counts["PyHessian"]
        product = comp.dataloader_hv_product

        def counted(v: list[Tensor]) -> Any:
            BUDGET.spend(1)
            counts.products += 1
            return product(v)

        comp.dataloader_hv_product = counted
        return comp

    @contextlib.contextmanager
    def pyhessian_grads(self) -> Iterator[None]:
        """Count ``torch.autograd.grad`` calls (PyHessian: one per batch per product); drop its graph-holding grads."""
        try:
            with counting_autograd_grad() as calls:
                yield
        finally:
            self.counts["PyHessian"].batch_products += calls[0]
            self.model.zero_grad(set_to_none=True)

    def count(self, name: str) -> Callable[[], int]:
        return lambda: self.counts[name].products


def hvp_agreement(ours: HessianOperator, peers: Peers, seed: int = 12345) -> dict[str, float | str]:
    """Relative difference ``||H v - H64 v|| / ||H64 v||`` of each package's product against ours in float64."""
    op64 = HessianOperator(peers.model, F.cross_entropy, peers.data, dtype=torch.float64)
    v = torch.randn(op64.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = op64.matvec(v)
    v32 = v.to(ours.dtype)

    def pyhessian() -> Tensor:
        comp = peers.pyhessian()
        with peers.pyhessian_grads():
            return ours.flatten(comp.dataloader_hv_product(ours.unflatten(v32))[1])

    cases: dict[str, Callable[[], Tensor]] = {}
    if ours.dtype != torch.float64:  # else ours is the reference itself
        cases[f"flatminima ({str(ours.dtype).replace('torch.', '')})"] = lambda: ours.matvec(v32)
    cases |= {
        "PyHessian": pyhessian,
        "hessian-eigenthings": lambda: peers.things.matvec(v32),
        "curvlinops": lambda: peers.curv @ v32,
    }
    out: dict[str, float | str] = {}
    for name, product in cases.items():
        if name in peers.failures:
            out[name] = f"failed: {peers.failures[name]}"
            continue
        try:
            hv = product().detach().to(torch.float64)
            out[name] = float(torch.linalg.vector_norm(hv - ref) / torch.linalg.vector_norm(ref))
        except Exception as exc:
            out[name] = f"failed: {short(exc)}"
    return out


# ---------------------------------------------------------------------------------------------- section 1


@dataclass
class Run:
    """One solver run at one setting: its values, products, seconds and error (or why it failed)."""

    setting: str
    values: list[float] = field(default_factory=list)
    hvps: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    error: float | None = None
    failure: str | None = None

    @property
    def hit(self) -> bool:
        return self.error is not None and self.error <= TARGET


def measure(setting: str, call: Callable[[], list[float]], count: Callable[[], int], ref: Tensor) -> Run:
    before = count()
    BUDGET.left = RUN_CAP
    start, cpu = time.perf_counter(), time.process_time()
    try:
        values = [float(v) for v in call()]
    except Exception as exc:
        took = time.perf_counter() - start, time.process_time() - cpu
        return Run(setting, hvps=count() - before, seconds=took[0], cpu=took[1], failure=short(exc))
    finally:
        BUDGET.left = None
    run = Run(setting, values, count() - before, time.perf_counter() - start, time.process_time() - cpu)
    if len(values) != len(ref):
        run.failure = f"returned {len(values)} values for k={len(ref)}"
    else:
        run.error = rel_err(values, ref)
    return run


@dataclass
class Solver:
    """A named solver: ladders of (label, call) settings; each ladder stops at its first hit (or at the cap)."""

    name: str
    ladders: list[list[tuple[str, Callable[[], list[float]]]]]
    count: Callable[[], int]
    failure: str | None = None

    def run(self, ref: Tensor, tag: str) -> list[Run]:
        runs: list[Run] = []
        for ladder in self.ladders:
            for label, call in ladder:
                run = measure(label, call, self.count, ref)
                runs.append(run)
                outcome = f"error {run.error:.1e}" if run.error is not None else f"failed: {run.failure}"
                print(f"[{tag}] {self.name}, {label}: {run.hvps} HVPs, {run.seconds:.1f} s, {outcome}", file=sys.stderr)
                if run.hit or (run.failure or "").startswith("ProductCap"):
                    break  # further along the ladder costs more
        return runs


def eigen_solvers(k: int, op: HessianOperator, peers: Peers, quick: bool) -> list[Solver]:
    import hessian_eigenthings as he
    from scipy.sparse.linalg import eigsh

    solvers: list[Solver] = []
    ours_count = lambda: op.num_hvp  # noqa: E731
    tols = (0.3, 0.1, 3e-2, 1e-2)
    params = inspect.signature(lanczos_eigs).parameters
    guard = "default guard" if "guard" in params else "no guard keyword"

    def ours(tol: float, **extra: Any) -> list[float]:
        res = lanczos_eigs(op, k=k, tol=tol, max_steps=400, seed=0, return_vectors=False, verify=False, **extra)
        return res.eigenvalues.tolist()

    solvers.append(
        Solver(
            f"ours, lanczos_eigs (verify=False, {guard})",
            [[(f"tol {t:g}", lambda t=t: ours(t)) for t in tols]],
            ours_count,
        )
    )
    if "value_tol" in params:
        solvers.append(
            Solver(
                f"ours, lanczos_eigs (verify=False, {guard}, value_tol=1e-3)",
                [[(f"tol {t:g}", lambda t=t: ours(t, value_tol=1e-3)) for t in tols]],
                ours_count,
            )
        )
        solvers.append(  # value_tol is an extra way to stop: with a tight tol it alone decides
            Solver(
                f"ours, lanczos_eigs (verify=False, {guard}, value_tol=1e-3, tol=1e-8)",
                [[("value_tol 1e-3, tol 1e-8", lambda: ours(1e-8, value_tol=1e-3))]],
                ours_count,
            )
        )
    if k == 1:

        def power(tol: float) -> list[float]:
            return power_iteration_op(op, tol=tol, max_iter=2000, seed=0, return_vectors=False).eigenvalues.tolist()

        solvers.append(
            Solver(
                "ours, power_iteration_op",
                [[(f"tol {t:g}", lambda t=t: power(t)) for t in (1e-2, 1e-3, 1e-4, 1e-5)]],
                ours_count,
            )
        )

    def pyhessian(tol: float) -> list[float]:
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
        comp = peers.pyhessian()
        with peers.pyhessian_grads():
            values, _ = comp.eigenvalues(maxIter=1000, tol=tol, top_n=k)
        return values

    solvers.append(
        Solver(
            f"PyHessian eigenvalues (top_n={k})",
            [[(f"tol {t:g}", lambda t=t: pyhessian(t)) for t in (1e-2, 1e-3, 1e-4, 1e-5)]],
            peers.count("PyHessian"),
            failure=peers.failures.get("PyHessian"),
        )
    )
    steps = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 40) if k == 1 else (10, 12, 14, 16, 18, 20, 22, 25, 30, 35, 40, 50)

    def things_lanczos(steps: int) -> list[float]:
        return he.lanczos(peers.things, k=k, max_iter=steps, which="LA", seed=0).eigenvalues.tolist()

    def things_power(tol: float) -> list[float]:
        return he.deflated_power_iteration(peers.things, k=k, max_iter=300, tol=tol, seed=0).eigenvalues.tolist()

    things = peers.count("hessian-eigenthings"), peers.failures.get("hessian-eigenthings")
    solvers.append(
        Solver(
            'hessian-eigenthings lanczos (which="LA")',
            [[(f"max_iter {m}", lambda m=m: things_lanczos(m)) for m in steps]],
            things[0],
            failure=things[1],
        )
    )
    solvers.append(
        Solver(
            "hessian-eigenthings deflated_power_iteration",
            [[(f"tol {t:g}", lambda t=t: things_power(t)) for t in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)]],
            things[0],
            failure=things[1],
        )
    )

    def arpack(ncv: int, tol: float) -> list[float]:
        scipy_op = peers.curv.to_scipy(dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(scipy_op.shape[0])
        values = eigsh(scipy_op, k=k, which="LA", ncv=ncv, tol=tol, v0=v0, return_eigenvectors=False, maxiter=1000)
        return values.tolist()

    ncvs = (3, 5, 10) if k == 1 else (11, 15, 20)
    solvers.append(
        Solver(
            "scipy eigsh on curvlinops HessianLinearOperator",
            [
                [(f"ncv {n}, tol {t:g}", lambda n=n, t=t: arpack(n, t)) for t in (1e-1, 1e-2, 1e-3)]
                for n in (ncvs[:1] if quick else ncvs)
            ],
            peers.count("curvlinops"),
            failure=peers.failures.get("curvlinops"),
        )
    )
    return solvers


@dataclass
class Cell:
    """Per seed: the best run (fewest products on target), or why there is none."""

    best: list[Run | None] = field(default_factory=list)
    why: list[str] = field(default_factory=list)


def best_run(runs: list[Run]) -> tuple[Run | None, str]:
    hits = [r for r in runs if r.hit]
    if hits:
        return min(hits, key=lambda r: (r.hvps, r.seconds)), ""
    failures = [r.failure for r in runs if r.failure]
    if failures and len(failures) == len(runs):
        return None, f"failed: {failures[0]}"
    closest = min((r.error for r in runs if r.error is not None), default=float("nan"))
    return None, f"not reached (best error {closest:.1e})" + (f"; failed: {failures[0]}" if failures else "")


def section_eigen(report: Report, seeds: tuple[int, ...], quick: bool) -> None:
    t0 = time.perf_counter()
    report("## 1. Top Hessian eigenvalues: products and seconds to 1e-3 relative error")
    report()
    cells: dict[tuple[int, str], Cell] = {}
    all_runs: list[list[Any]] = []
    agreement: dict[str, list[float | str]] = {}
    references: list[list[Any]] = []
    cross: dict[str, list[int]] = {}
    for seed in seeds:
        model, data, info = digits_workload(512, 3, seed=seed)
        op = count_ours(HessianOperator(model, F.cross_entropy, data))
        peers = Peers(model, data)
        for name, diff in hvp_agreement(op, peers).items():
            agreement.setdefault(name, []).append(diff)
        start = time.perf_counter()
        ref_res = lanczos_eigs(op, k=5, tol=1e-10, max_steps=400, seed=0, return_vectors=False)
        reference = ref_res.eigenvalues.to(torch.float64)
        references.append(
            [
                seed,
                f"{info['train_acc']:.3f}",
                ref_res.num_hvp,
                f"{time.perf_counter() - start:.1f}",
                ", ".join(f"{v:.5f}" for v in reference.tolist()),
            ]
        )
        for k in (1, 5):
            for solver in eigen_solvers(k, op, peers, quick):
                cell = cells.setdefault((k, solver.name), Cell())
                if solver.failure:
                    cell.best.append(None)
                    cell.why.append(f"failed: {solver.failure}")
                    continue
                runs = solver.run(reference[:k], f"seed {seed}, k={k}")
                best, why = best_run(runs)
                cell.best.append(best)
                cell.why.append(why)
                for r in runs:
                    all_runs.append(
                        [
                            seed,
                            f"top {k}",
                            solver.name,
                            r.setting,
                            r.hvps,
                            f"{r.seconds:.2f}",
                            f"{r.error:.1e}" if r.error is not None else "-",
                            "**yes**" if r.hit else (f"failed: {r.failure}" if r.failure else "no"),
                            ", ".join(f"{v:.5f}" for v in sorted(r.values, reverse=True)),
                        ]
                    )
        for name, counts in peers.counts.items():
            pair = cross.setdefault(name, [0, 0])
            pair[0] += counts.products
            pair[1] += counts.batch_products
        report(f"(seed {seed} done after {time.perf_counter() - t0:.0f} s; load average {load_average()})")
        report()
    n_batches = len(data)

    report.table(
        f"**Section 0: the same operator.** Relative difference of one Hessian-vector product, "
        f"`||Hv - H64 v|| / ||H64 v||` for one random Gaussian v, against ours on a float64 copy of the model "
        f"(per seed; float32 products, so about 1e-6 is agreement). Same SmallCNN, same {len(data)} batches.",
        ["package", *(f"seed {s}" for s in seeds)],
        [[name, *(d if isinstance(d, str) else f"{d:.1e}" for d in diffs)] for name, diffs in agreement.items()],
    )
    report.table(
        "**References** (`lanczos_eigs(op, k=5, tol=1e-10, max_steps=400)`, float32; the first value is the "
        "lambda_max reference)",
        ["seed", "train accuracy", "HVPs", "seconds", "top 5 eigenvalues"],
        references,
    )
    rows = []
    for (k, name), cell in cells.items():
        found = [b for b in cell.best if b is not None]
        per_seed = [str(b.hvps) if b else why for b, why in zip(cell.best, cell.why)]
        per_seed_s = [f"{b.seconds:.2f}" if b else "-" for b in cell.best]
        if len(found) == len(cell.best):
            median_hvps = f"{statistics.median(b.hvps for b in found):g}"
            median_s = f"{statistics.median(b.seconds for b in found):.2f}"
            median_cpu = f"{statistics.median(b.cpu for b in found):.2f}"
            ms = f"{1e3 * statistics.median(b.seconds / b.hvps for b in found):.0f}"
        else:
            reasons = {w for w in cell.why if w}
            median_hvps = "; ".join(sorted(reasons)) if not found else f"{len(found)}/{len(cell.best)} seeds reached"
            median_s, median_cpu, ms = "-", "-", "-"
        rows.append(
            [
                f"top {k}" if k > 1 else "lambda_max",
                name,
                median_hvps,
                ", ".join(per_seed),
                median_s,
                ", ".join(per_seed_s),
                median_cpu,
                ms,
                "; ".join(b.setting if b else "-" for b in cell.best),
            ]
        )
    report.table(
        f"**Fewest Hessian-vector products of a setting that put every one of the top k eigenvalues within "
        f"{TARGET:g} relative error of the reference, and the seconds of that run** (median over {len(seeds)} "
        f"seed(s) of model and data order; per seed in order {', '.join(map(str, seeds))}). ms/HVP = that run's "
        "wall seconds per product (median over seeds): the cost of the package's products plus its own overhead. "
        "CPU seconds = the process's CPU time in that run (all threads), less sensitive than wall time to other "
        "load on the machine.",
        [
            "eigenvalues",
            "solver",
            "HVPs (median)",
            "HVPs per seed",
            "seconds (median)",
            "seconds per seed",
            "CPU seconds (median)",
            "ms/HVP",
            "best setting per seed",
        ],
        rows,
    )
    lines = []
    per_product = {
        "PyHessian": "`torch.autograd.grad` calls",
        "hessian-eigenthings": "per-batch `_hvp` calls",
        "curvlinops": "per-batch `_matmat_batch` columns",
    }
    for name, (products, batch_products) in cross.items():
        ok = batch_products == products * n_batches
        lines.append(
            f"- {name}: {products} counted products (all seeds, the section 0 check included), {batch_products} "
            f"{per_product[name]} = {products} x {n_batches} batches: {'consistent' if ok else '**INCONSISTENT**'}"
        )
    report("**Product counts cross-checked** (full-data products counted at the operator against per-batch work):")
    report()
    for line in lines:
        report(line)
    report()
    report.table(
        "**Every run** (ladders whose cost grows along them stop at their first hit)",
        ["seed", "eigenvalues", "solver", "setting", "HVPs", "seconds", "max rel. error", "on target", "values"],
        all_runs,
        "|---:|---|---|---|---:|---:|---:|---|---|",
    )
    report(f"(Section time {time.perf_counter() - t0:.0f} s; load average at its end {load_average()}.)")
    report()


# ---------------------------------------------------------------------------------------------- section 2


@dataclass
class TraceEstimator:
    """``run(n, seed)`` estimates the trace with about ``n`` products (a multiple of ``step``, at least ``minimum``)."""

    name: str
    run: Callable[[int, int], float]
    count: Callable[[], int]
    step: int = 1
    minimum: int = 1
    failure: str | None = None

    def products(self, n: int) -> int:
        return max(self.minimum, n - n % self.step)


def trace_estimators(op: HessianOperator, peers: Peers) -> list[TraceEstimator]:
    import curvlinops
    import hessian_eigenthings as he

    ours = lambda: op.num_hvp  # noqa: E731

    def seeded(fn: Callable[[int], Any]) -> Callable[[int, int], float]:
        def run(n: int, seed: int) -> float:
            torch.manual_seed(seed)  # curvlinops and PyHessian draw their probes from the global generator
            return float(fn(n))

        return run

    def pyhessian(n: int) -> float:
        comp = peers.pyhessian()
        with peers.pyhessian_grads():
            return float(np.mean(comp.trace(maxIter=n, tol=float("-inf"))))  # tol -inf: all n probes

    curv_fail = peers.failures.get("curvlinops")
    things_fail = peers.failures.get("hessian-eigenthings")
    return [
        TraceEstimator("ours, Hutchinson", lambda n, s: hutchinson_trace_op(op, num_probes=n, seed=s).estimate, ours),
        TraceEstimator(
            "ours, Hutch++", lambda n, s: hutchpp_trace_op(op, num_matvecs=n, seed=s).estimate, ours, minimum=3
        ),
        TraceEstimator("ours, XTrace", lambda n, s: xtrace_op(op, num_matvecs=n, seed=s).estimate, ours, 2, 4),
        TraceEstimator(
            "curvlinops hutchinson_trace",
            seeded(lambda n: curvlinops.hutchinson_trace(peers.curv, n)),
            peers.count("curvlinops"),
            failure=curv_fail,
        ),
        TraceEstimator(
            "curvlinops hutchpp_trace",
            seeded(lambda n: curvlinops.hutchpp_trace(peers.curv, n)),
            peers.count("curvlinops"),
            3,
            3,
            curv_fail,
        ),
        TraceEstimator(
            "curvlinops xtrace",
            seeded(lambda n: curvlinops.xtrace(peers.curv, n)),
            peers.count("curvlinops"),
            2,
            4,
            curv_fail,
        ),
        TraceEstimator(
            "PyHessian trace (Hutchinson)",
            seeded(pyhessian),
            peers.count("PyHessian"),
            failure=peers.failures.get("PyHessian"),
        ),
        TraceEstimator(
            "hessian-eigenthings hutchinson",
            lambda n, s: he.hutchinson(peers.things, num_samples=n, seed=s).estimate,
            peers.count("hessian-eigenthings"),
            failure=things_fail,
        ),
        TraceEstimator(
            "hessian-eigenthings hutch_plus_plus",
            lambda n, s: he.hutch_plus_plus(peers.things, num_matvecs=n, seed=s).estimate,
            peers.count("hessian-eigenthings"),
            3,
            3,
            things_fail,
        ),
    ]


@dataclass
class TraceCell:
    products: str
    rms: float | None = None
    seconds: float | None = None
    cpu: float | None = None
    failure: str | None = None

    def row(self) -> list[str]:
        """products, RMS relative error, median wall seconds, median CPU seconds."""
        if self.failure:
            return [self.products, f"failed: {self.failure}", "-", "-"]
        assert self.rms is not None and self.seconds is not None and self.cpu is not None
        return [self.products, f"{100 * self.rms:.2f} %", f"{self.seconds:.3f}", f"{self.cpu:.3f}"]


def trace_cell(est: TraceEstimator, n: int, seeds: range, exact: float) -> TraceCell:
    if est.failure:
        return TraceCell("-", failure=est.failure)
    errors, seconds, cpus, counted = [], [], [], set()
    for seed in seeds:
        before = est.count()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            value = est.run(n, seed)
        except Exception as exc:
            return TraceCell(str(n), failure=short(exc))
        seconds.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        counted.add(est.count() - before)
        errors.append((value - exact) / abs(exact))
    rms = statistics.fmean(e * e for e in errors) ** 0.5
    products = "/".join(str(c) for c in sorted(counted))
    return TraceCell(products, rms, statistics.median(seconds), statistics.median(cpus))


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * products`` (through the origin for one point); b kept positive."""
    if len(points) == 1:
        n, t = points[0]
        return 0.0, t / n
    xs, ys = [float(p[0]) for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b = max(b, 1e-9)
    return my - b * mx, b


def section_trace(report: Report, quick: bool, clock: str = "wall") -> None:
    t0 = time.perf_counter()
    seeds = range(3 if quick else 10)
    budgets = (24,) if quick else (24, 48, 99)
    model, data = noisy_digits_mlp()
    op = HessianOperator(model, F.cross_entropy, data)
    report(
        f"## 2. Hessian trace: error at equal products and at equal seconds (bench_trace.py's MLP, {op.dim:,} "
        f"parameters, float64; mean cross-entropy over 512 noisy-label digits in {len(data)} batches of 256)"
    )
    report()
    peers = Peers(model, data)
    agreement = hvp_agreement(op, peers)
    report(
        "Same operator: relative difference of one product against ours (float64 everywhere): "
        + ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.1e}'}" for k, v in agreement.items())
        + "."
    )
    report()
    start = time.perf_counter()
    eye = torch.eye(op.dim, dtype=torch.float64)
    exact = sum(float(torch.diagonal(op.matmat(eye[:, j : j + 64])[j : j + 64]).sum()) for j in range(0, op.dim, 64))
    took = time.perf_counter() - start
    report(f"Exact trace {exact:.6f} from {op.dim} products with the unit vectors ({took:.1f} s).")
    report()
    estimators = trace_estimators(op, peers)
    rows: list[list[Any]] = []
    timings: dict[str, list[tuple[int, float]]] = {e.name: [] for e in estimators}
    cell_seconds: dict[int, list[float]] = {}
    for budget in budgets:
        for est in estimators:
            n = est.products(budget)
            cell = trace_cell(est, n, seeds, exact)
            rows.append([budget, est.name, *cell.row()])
            seconds = cell.seconds if clock == "wall" else cell.cpu
            if seconds is not None:
                timings[est.name].append((n, seconds))
                cell_seconds.setdefault(budget, []).append(seconds)
    report.table(
        f"**Trace error at equal products** ({len(seeds)} seeds of the probes per cell; products as counted, "
        "several when they differ between seeds). (Load average now "
        f"{load_average()}.)",
        ["products asked", "estimator", "products counted", "RMS relative error", "seconds (median)", "CPU s (median)"],
        rows,
    )
    report(
        "Ours, PyHessian's and hessian-eigenthings' Hutchinson (and ours and its Hutch++) draw the same Rademacher "
        "probes for a seed (`torch.randint(0, 2)` from a CPU generator seeded with it), so their errors coincide when "
        "they multiply by the same operator; curvlinops draws its probes with `bernoulli_`."
    )
    report()
    time_rows: list[list[Any]] = []
    what = "wall" if clock == "wall" else "CPU"
    for budget in budgets:
        if budget not in cell_seconds:
            continue
        limit = statistics.median(cell_seconds[budget])
        for est in estimators:
            if not timings[est.name]:
                time_rows.append([f"{limit:.3f}", est.name, "-", "failed (see above)", "-", "-"])
                continue
            a, b = fit_line(timings[est.name])
            fitted = int((limit - a) / b)
            n = min(est.products(max(fitted, 0)), op.dim - 1 - (op.dim - 1) % est.step)
            note = "" if fitted >= est.minimum else f" (its minimum, over the budget: fit {a:.3f} + {b * 1e3:.2f} ms/p)"
            cell = trace_cell(est, n, seeds, exact)
            products, *rest = cell.row()
            time_rows.append([f"{limit:.3f}", est.name, products + note, *rest])
    report.table(
        f"**Trace error at equal {what} seconds**: the budget is the median over estimators of their median "
        f"{what} seconds at {', '.join(map(str, budgets))} products; each estimator gets the most products its fitted "
        f"time line ({what} seconds = a + b x products, from the runs above) says fit, capped at dim - 1 "
        f"({len(seeds)} seeds per cell; the seconds columns are what the runs took).",
        [f"{what} seconds budget", "estimator", "products", "RMS relative error", "seconds (median)", "CPU s (median)"],
        time_rows,
    )
    report(f"(Section time {time.perf_counter() - t0:.0f} s; load average at its end {load_average()}.)")
    report()


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, fewer settings")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="the seconds the equal-time trace comparison uses: wall clock (default) or the process's CPU time "
        "(steadier on a loaded machine with --threads 1)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report()
    report(f"# flatminima Hessian estimators against peer packages ({local_timestamp()})")
    report()
    report(f"`{command_line()}` (interpreter `{sys.executable}`)")
    report()
    params = inspect.signature(lanczos_eigs).parameters
    machine(
        report,
        extra=[
            ["scipy", package_version("scipy")],
            ["curvlinops-for-pytorch", package_version("curvlinops-for-pytorch")],
            ["PyHessian", package_version("PyHessian")],
            ["hessian-eigenthings", package_version("hessian-eigenthings")],
            ["lanczos_eigs keywords", ", ".join(p for p in params if p != "op")],
        ],
    )
    started = time.perf_counter()
    section_eigen(report, (0,) if args.quick else (0, 1, 2), args.quick)
    section_trace(report, args.quick, args.clock)
    report(f"Total time {time.perf_counter() - started:.0f} s.")
    if args.output:
        args.output.write_text("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
