"""Benchmark the Hessian eigenvalue solvers of ``flatminima.sharpness`` against PyHessian, and the cost of one HVP.

Run ``python benchmarks/bench_hessian.py`` (about 4 minutes on 2 CPU cores) or ``--quick`` (a smoke run, under a
minute); ``--output FILE`` also writes the markdown report to ``FILE``; ``--threads N`` sets torch's threads.

Section 1 (eigenvalues): a small CNN trained for a few SGD epochs on the digits, the Hessian of the mean
cross-entropy over the first 512 training images (batches of 128; 256 with ``--quick``), model in eval mode. The
reference is ``lanczos_eigs`` in float64 with tol 1e-10. Each solver is run with a decreasing sequence of its own
tolerance (from the same seed) until its answer is within 1e-3 relative error of the reference (lambda_max, then
all of the top 5); the table shows the first tolerance that reaches it, with its Hessian-vector products (HVPs, one
product = one pass over all the batches) and wall time, and every tolerance tried before it. The "oracle" rows give
the fewest products after which the iterate is within the target (known only with the reference in hand): for power
iteration the Rayleigh quotient of the current vector, for Lanczos the Ritz values of the Krylov space so far.

PyHessian (PyPI ``pyhessian``, power iteration with deflation) is run in the same process on the same model and data
as ``hessian(model, criterion, dataloader=batches, cuda=False).eigenvalues(top_n, tol, maxIter)``; its HVPs are
counted by wrapping the instance's ``dataloader_hv_product`` (one call = one full-data product, which is what we
count), cross-checked by counting the ``torch.autograd.grad`` calls made during the run (one per batch per product).

Section 2 (HVP cost): median wall time of one full-data HVP over that of one full-data gradient, for both product
methods of ``HessianOperator``, timed in interleaved rounds; and which one ``method="auto"`` picks.

Section 1b (default run only) repeats section 1 on a resnet20 given 10 SGD steps on 32 random 3x32x32 images.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from _common import Report, load_average, machine, package_version
from torch import Tensor, nn

from flatminima.data import load_dataset
from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.models import build_model
from flatminima.sharpness import HessianOperator, lanczos, lanczos_eigs, power_iteration_op

TARGET = 1e-3
Batches = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------------- workload


def digits_workload(
    n_eval: int, epochs: int, seed: int = 0, model_name: str = "small_cnn"
) -> tuple[nn.Module, Batches, dict[str, Any]]:
    """``model_name`` (default small_cnn) trained ``epochs`` SGD epochs on the digits; the first ``n_eval``
    training images in batches of 128."""
    ds = load_dataset("digits")
    images = normalize(to_float(ds.train_images), ds.mean, ds.std)
    labels = ds.train_labels
    torch.manual_seed(seed)
    model = build_model(model_name, ds.num_classes, images.shape[1], tuple(images.shape[2:]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), 64):
            idx = order[i : i + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    with torch.no_grad():
        acc = float((model(images).argmax(1) == labels).float().mean())
    x, y = images[:n_eval], labels[:n_eval]
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, n_eval, 128)]
    info = dict(
        params=sum(p.numel() for p in model.parameters()),
        epochs=epochs,
        train_acc=acc,
        n=n_eval,
        batches=len(batches),
    )
    return model, batches, info


def rel_err(values: list[float] | Tensor, ref: Tensor) -> float:
    """Largest relative error of ``values`` (sorted descending) against ``ref`` (descending, same length)."""
    got = sorted((float(v) for v in values), reverse=True)
    return max(abs(g - float(r)) / abs(float(r)) for g, r in zip(got, ref, strict=True))


# ---------------------------------------------------------------------------------------------------- solvers


def run_ours_power(model: nn.Module, data: Batches, tol: float) -> tuple[list[float], int, float, list[float]]:
    """Our power iteration; also the Rayleigh quotient of every iterate (read off the products)."""
    op = HessianOperator(model, F.cross_entropy, data)
    quotients: list[float] = []
    matvec = op.matvec

    def recording(v: Tensor) -> Tensor:
        w = matvec(v)
        quotients.append(float(v @ w / (v @ v)))
        return w

    op.matvec = recording  # type: ignore[method-assign]
    start = time.perf_counter()
    res = power_iteration_op(op, tol=tol, max_iter=2000, seed=0, return_vectors=False)
    took = time.perf_counter() - start
    return [float(res.eigenvalues[0])], res.num_hvp, took, quotients


def run_ours_lanczos(model: nn.Module, data: Batches, k: int, tol: float) -> tuple[list[float], int, float]:
    op = HessianOperator(model, F.cross_entropy, data)
    start = time.perf_counter()
    res = lanczos_eigs(op, k=k, tol=tol, max_steps=400, seed=0, return_vectors=False)
    took = time.perf_counter() - start
    if res.num_hvp != op.num_hvp:
        raise AssertionError(f"EigenResult.num_hvp={res.num_hvp} but the operator counted {op.num_hvp}")
    return [float(v) for v in res.eigenvalues], res.num_hvp, took


def lanczos_oracle(model: nn.Module, data: Batches, ref: Tensor, steps: int) -> dict[int, int | None]:
    """Fewest Lanczos steps (same start vector as ``lanczos_eigs(seed=0)``) whose top-k Ritz values are on target."""
    op = HessianOperator(model, F.cross_entropy, data)
    v0 = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(op.dtype)
    dec = lanczos(op, op.dim, steps, v0, seed=0)
    tri = dec.tridiagonal()
    out: dict[int, int | None] = {1: None, 5: None}
    for m in range(1, tri.shape[0] + 1):
        theta = torch.linalg.eigvalsh(tri[:m, :m]).flip(0)
        for k in out:
            if out[k] is None and m >= k and rel_err(theta[:k], ref[:k]) <= TARGET:
                out[k] = m
        if all(v is not None for v in out.values()):
            break
    return out


@contextlib.contextmanager
def counting_autograd_grad() -> Iterator[list[int]]:
    calls = [0]
    real = torch.autograd.grad

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    with mock.patch("torch.autograd.grad", wrapped):
        yield calls


def run_pyhessian(
    model: nn.Module, data: Batches, top_n: int, tol: float, max_iter: int
) -> tuple[list[float], int, float, int]:
    """PyHessian on the batches (dataloader mode); returns values, full-data HVPs, seconds, autograd.grad calls."""
    from pyhessian import hessian

    torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
    comp = hessian(model, F.cross_entropy, dataloader=data, cuda=False)
    count = [0]
    product = comp.dataloader_hv_product

    def counted(v: Any) -> Any:
        count[0] += 1
        return product(v)

    comp.dataloader_hv_product = counted
    with counting_autograd_grad() as grads:
        start = time.perf_counter()
        values, _ = comp.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        took = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return [float(v) for v in values], count[0], took, grads[0]


# ---------------------------------------------------------------------------------------------------- section 1


def sweep(
    report_rows: list[list[Any]],
    name: str,
    tols: list[float],
    run: Callable[[float], tuple[list[float], int, float]],
    ref: Tensor,
) -> tuple[float | None, int | None, float | None]:
    """Run ``run(tol)`` for decreasing tols until on target; rows for every try; (tol, hvps, seconds) of the hit."""
    for tol in tols:
        values, hvps, took = run(tol)
        err = rel_err(values, ref)
        hit = err <= TARGET
        report_rows.append(
            [name, f"{tol:g}", hvps, f"{took:.2f}", f"{err:.1e}", "**yes**" if hit else "no", fmt(values)]
        )
        if hit:
            return tol, hvps, took
    return None, None, None


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.5f}" for v in values)


def resnet_workload(n: int, steps: int, seed: int = 0) -> tuple[nn.Module, Batches, dict[str, Any]]:
    """resnet20 given ``steps`` SGD steps (BatchNorm in train mode) on ``n`` random 3x32x32 images, random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, 3, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    info = dict(params=sum(p.numel() for p in model.parameters()), n=n, batches=1)
    return model, [(x, y)], info


def section_eigen(report: Report, quick: bool, which: str = "digits") -> dict[str, Any]:
    t0 = time.perf_counter()
    if which == "digits":
        n_eval, epochs = (256, 2) if quick else (512, 3)
        model, data, info = digits_workload(n_eval, epochs)
        report(
            f"## 1a. Top Hessian eigenvalues: small_cnn on digits ({info['params']:,} parameters, trained {epochs} "
            f"SGD epochs (lr 0.05, momentum 0.9, batch 64) to train accuracy {info['train_acc']:.3f}; Hessian of the "
            f"mean cross-entropy over the first {info['n']} training images in {info['batches']} batches of 128, "
            "eval mode)"
        )
    else:
        steps = 10
        model, data, info = resnet_workload(32, steps)
        report(
            f"## 1b. Top Hessian eigenvalues: resnet20 on random data ({info['params']:,} parameters; {info['n']} "
            f"random N(0,1) 3x32x32 images with random labels, one batch; {steps} full-batch SGD steps (lr 0.05, "
            "momentum 0.9) from initialisation so the Hessian is not the initial one; eval mode)"
        )
    report()
    start = time.perf_counter()
    op64 = HessianOperator(model, F.cross_entropy, data, dtype=torch.float64)
    ref_res = lanczos_eigs(op64, k=5, tol=1e-10, max_steps=400, seed=0, return_vectors=False)
    ref_time = time.perf_counter() - start
    ref = ref_res.eigenvalues.to(torch.float64)
    report(
        f"Reference: `lanczos_eigs` on a float64 copy, k=5, tol=1e-10: converged={ref_res.converged}, "
        f"{ref_res.num_hvp} HVPs, {ref_time:.1f} s, relative residuals "
        f"{', '.join(f'{float(r):.0e}' for r in ref_res.relative_residuals)}. Eigenvalues: {fmt(ref.tolist())}. "
        f"Target: relative error <= {TARGET:g} (all of the top 5 for the top-5 rows)."
    )
    report()

    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    # -------- lambda_max
    quotients_best: list[float] = []

    def power(tol: float) -> tuple[list[float], int, float]:
        values, hvps, took, quotients = run_ours_power(model, data, tol)
        quotients_best[:] = quotients
        return values, hvps, took

    summary["power"] = sweep(rows, "flatminima power_iteration_op", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], power, ref[:1])
    summary["lanczos1"] = sweep(
        rows,
        "flatminima lanczos_eigs k=1",
        [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4],
        lambda tol: run_ours_lanczos(model, data, 1, tol),
        ref[:1],
    )
    peer = peer_status()
    summary["peer"] = peer
    if peer["ok"]:
        summary["pyh1"] = sweep(
            rows,
            "PyHessian eigenvalues top_n=1",
            [1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
            lambda tol: pyh(model, data, 1, tol, summary),
            ref[:1],
        )
    top5_rows: list[list[Any]] = []
    summary["lanczos5"] = sweep(
        top5_rows,
        "flatminima lanczos_eigs k=5",
        [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4],
        lambda tol: run_ours_lanczos(model, data, 5, tol),
        ref[:5],
    )
    if peer["ok"]:
        summary["pyh5"] = sweep(
            top5_rows,
            "PyHessian eigenvalues top_n=5",
            [1e-2, 1e-3, 1e-4, 1e-5],
            lambda tol: pyh(model, data, 5, tol, summary),
            ref[:5],
        )

    # -------- oracles
    power_oracle = first_settled(quotients_best, float(ref[0]))
    oracle = lanczos_oracle(model, data, ref, 120)
    summary["oracle"] = dict(power=power_oracle, lanczos1=oracle[1], lanczos5=oracle[5])

    header = ["solver", "tol", "HVPs", "seconds", "max rel. error", "on target", "eigenvalue(s)"]
    report.table(
        "**lambda_max** (each solver's tolerance tried in turn until the answer is on target)",
        header,
        rows,
        "|---|---:|---:|---:|---:|---|---|",
    )
    report.table("**Top 5** (all five within the target)", header, top5_rows, "|---|---:|---:|---:|---:|---|---|")

    sp, sl = summary["power"], summary["lanczos1"]
    out_rows = [
        ["power iteration (ours)", hv(sp), tm(sp), power_oracle if power_oracle else "-"],
        ["Lanczos k=1 (ours)", hv(sl), tm(sl), oracle[1] or "-"],
    ]
    if peer["ok"]:
        out_rows.append(["PyHessian top_n=1", hv(summary["pyh1"]), tm(summary["pyh1"]), "-"])
    out_rows.append(["Lanczos k=5 (ours)", hv(summary["lanczos5"]), tm(summary["lanczos5"]), oracle[5] or "-"])
    if peer["ok"]:
        out_rows.append(["PyHessian top_n=5", hv(summary["pyh5"]), tm(summary["pyh5"]), "-"])
    report.table(
        "**Summary** (the first tolerance on target; oracle = fewest products after which the iterate is on target "
        "and stays there: power iteration's Rayleigh quotient at the hit tolerance's run, Lanczos's top Ritz values "
        "for the same start vector, without the k verification products `lanczos_eigs` adds)",
        ["solver", "HVPs to target", "seconds", "oracle HVPs"],
        out_rows,
    )
    ratio_lines = []
    if sp[1] and sl[1]:
        ratio_lines.append(
            f"Lanczos / power iteration HVPs for lambda_max: {sl[1]} / {sp[1]} = **{sl[1] / sp[1]:.2f}** "
            f"(project goal: <= 0.5: {'met' if sl[1] / sp[1] <= 0.5 else 'NOT met'})"
        )
    if power_oracle and oracle[1]:
        ratio_lines.append(f"oracle counts: {oracle[1]} / {power_oracle} = {oracle[1] / power_oracle:.2f}")
    if peer["ok"] and summary["pyh1"][1] and sl[1]:
        ratio_lines.append(f"Lanczos / PyHessian HVPs, lambda_max: {sl[1]} / {summary['pyh1'][1]}")
    if peer["ok"] and summary["pyh5"][1] and summary["lanczos5"][1]:
        ratio_lines.append(f"Lanczos / PyHessian HVPs, top 5: {summary['lanczos5'][1]} / {summary['pyh5'][1]}")
    for line in ratio_lines:
        report(f"- {line}")
    if "pyh_grad_calls" in summary:
        report(
            f"- PyHessian HVP count cross-check: {summary['pyh_grad_calls']} `torch.autograd.grad` calls over all "
            f"its runs = {summary['pyh_hvps']} counted products x {len(data)} batches: "
            f"{'consistent' if summary['pyh_grad_calls'] == summary['pyh_hvps'] * len(data) else 'INCONSISTENT'}"
        )
    report()
    report(f"(Section time {time.perf_counter() - t0:.0f} s; load average at its end {load_average()}.)")
    report()
    summary["model"], summary["data"] = model, data
    return summary


def hv(s: tuple[Any, Any, Any]) -> Any:
    return s[1] if s[1] is not None else "not reached"


def tm(s: tuple[Any, Any, Any]) -> str:
    return f"{s[2]:.2f}" if s[2] is not None else "-"


def first_settled(quotients: list[float], ref: float) -> int | None:
    """1-based index from which every Rayleigh quotient is within the target of ``ref``."""
    hit = None
    for i, q in enumerate(quotients, 1):
        on_target = abs(q - ref) / abs(ref) <= TARGET
        hit = (hit or i) if on_target else None
    return hit


def pyh(
    model: nn.Module, data: Batches, top_n: int, tol: float, summary: dict[str, Any]
) -> tuple[list[float], int, float]:
    values, hvps, took, grads = run_pyhessian(model, data, top_n, tol, max_iter=1000)
    summary["pyh_grad_calls"] = summary.get("pyh_grad_calls", 0) + grads
    summary["pyh_hvps"] = summary.get("pyh_hvps", 0) + hvps
    return values, hvps, took


def peer_status() -> dict[str, Any]:
    try:
        import pyhessian  # noqa: F401
        from pyhessian import hessian  # noqa: F401
    except Exception as exc:
        return dict(ok=False, why=f"{type(exc).__name__}: {exc}")
    return dict(ok=True, why="")


# ---------------------------------------------------------------------------------------------------- section 2


def time_rounds(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds (order reversed every other round) after one warm-up call of each."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def section_cost(report: Report, quick: bool, digits: tuple[nn.Module, Batches]) -> dict[str, str]:
    t0 = time.perf_counter()
    report("## 2. Cost of one Hessian-vector product relative to one gradient (same data, full pass)")
    report()
    workloads: list[tuple[str, nn.Module, Batches, int]] = [
        (
            f"small_cnn, digits, {sum(len(b[1]) for b in digits[1])} images in batches of 128",
            *digits,
            12 if quick else 30,
        )
    ]
    torch.manual_seed(1)
    resnet = build_model("resnet20", 10, 3, 32).eval()
    n = 32 if quick else 64
    x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    workloads.append((f"resnet20 (fresh), random 3x32x32, one batch of {n}", resnet, [(x, y)], 3 if quick else 8))
    rows = []
    choices = {}
    for title, model, data, rounds in workloads:
        ops = {
            m: HessianOperator(model, F.cross_entropy, data, method=m)
            for m in ("double_backward", "forward_over_reverse")
        }
        v = torch.randn(ops["double_backward"].dim, generator=torch.Generator().manual_seed(0))
        hv_db, hv_fr = ops["double_backward"].matvec(v), ops["forward_over_reverse"].matvec(v)
        agree = float(torch.linalg.vector_norm(hv_db - hv_fr) / torch.linalg.vector_norm(hv_db))
        times = time_rounds(
            {
                "gradient": ops["double_backward"].gradient,
                "double_backward": lambda ops=ops, v=v: ops["double_backward"].matvec(v),
                "forward_over_reverse": lambda ops=ops, v=v: ops["forward_over_reverse"].matvec(v),
            },
            rounds,
        )
        med = {k: statistics.median(t) for k, t in times.items()}
        mins = {k: min(t) for k, t in times.items()}
        # paired: ratio within each round, then the median (robust to load drift between rounds)
        paired = {
            k: statistics.median(a / b for a, b in zip(times[k], times["gradient"], strict=True))
            for k in ("double_backward", "forward_over_reverse")
        }
        auto = HessianOperator(model, F.cross_entropy, data, method="auto")
        faster = min(("double_backward", "forward_over_reverse"), key=lambda k: med[k])
        choices[title] = faster
        rows.append(
            [title, "gradient", f"{med['gradient'] * 1e3:.1f}", f"{mins['gradient'] * 1e3:.1f}", "1.00", "1.00", "", ""]
        )
        for k in ("double_backward", "forward_over_reverse"):
            rows.append(
                [
                    title,
                    f"HVP {k}",
                    f"{med[k] * 1e3:.1f}",
                    f"{mins[k] * 1e3:.1f}",
                    f"{med[k] / med['gradient']:.2f}",
                    f"{paired[k]:.2f}",
                    "**faster**" if k == faster else "",
                    ("**picked**, " if auto.method == k else "")
                    + f"its 1 timed product: {auto.benchmark[k] * 1e3:.1f} ms",
                ]
            )
        rows.append([title, "(methods agree: rel. diff of H v)", f"{agree:.1e}", "", "", "", "", ""])
    report.table(
        "Medians and minima over interleaved rounds (after one warm-up each); HVP / gradient ratio of the medians and "
        'the median of the per-round ratio (paired). The floor of the ratio is about 2. `method="auto"` decides '
        "from one timed product per method after one warm-up on the first batch (column auto: its pick and timings).",
        ["workload", "case", "median ms", "min ms", "/ gradient (medians)", "/ gradient (paired)", "", "auto"],
        rows,
        "|---|---|---:|---:|---:|---:|---|---|",
    )
    for title, faster in choices.items():
        report(f"- {title}: faster method on this CPU: **{faster}**")
    report()
    report(f"(Section time {time.perf_counter() - t0:.0f} s; load average at its end {load_average()}.)")
    report()
    return choices


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report()
    cmd = "python benchmarks/bench_hessian.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report(f"# Hessian benchmark: `{cmd}` ({now})")
    report()
    machine(report, extra=[["pyhessian", package_version("pyhessian")]])
    start = time.perf_counter()
    summary = section_eigen(report, args.quick)
    peer = summary["peer"]
    if not peer["ok"]:
        report(f"PyHessian could not be used: {peer['why']}")
        report()
    digits = (summary["model"], summary["data"])
    if not args.quick:
        section_eigen(report, args.quick, "resnet")
    section_cost(report, args.quick, digits)
    report(f"Total time {time.perf_counter() - start:.0f} s.")
    if args.output:
        args.output.write_text("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
