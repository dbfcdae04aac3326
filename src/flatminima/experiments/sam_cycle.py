"""``sam-cycle``: full-batch normalised SAM on a convex quadratic settles into the 2-cycle ``+-c u_1``.

Bartlett, Long and Bousquet (JMLR 2023): on ``L(w) = 1/2 w^T H w``, SAM with ``e = rho g / ||g||`` and plain gradient
steps bounces across the minimum along the top eigenvector ``u_1`` with amplitude
``c = eta rho lambda_1 / (2 - eta lambda_1)``, while every other coordinate dies out. Linearising the update around
the cycle (``||g|| = lambda_1 c`` there) gives the rate at which coordinate ``i`` dies: it is multiplied each step by
``f_i = 1 - eta lambda_i - (lambda_i / lambda_1)^2 (2 - eta lambda_1)``, and ``|f_i| < 1`` for every
``lambda_i < lambda_1`` and ``0 < eta lambda_1 < 2`` (so the cycle is stable beyond the paper's ``eta < 1 / (2
lambda_1)``). The runs use the library's :class:`~flatminima.SAM` around ``torch.optim.SGD`` in float64, so the
reproduction checks the product, not a separate simulator.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import Tensor

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.reproduce import Context, Outcome, Reproduction
from flatminima.optim import SAM

__all__ = ["REPRODUCTION", "decay_factor", "random_quadratic", "run", "run_sam"]


def random_quadratic(seed: int, dim: int, lambda_max: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A random rotation of a spectrum with ``lambda_1 = lambda_max`` and the rest log-uniform in
    ``[0.05, 0.95] lambda_max``: the Hessian, its eigenvalues (descending) and eigenvectors (columns), float64."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.exp(torch.empty(dim - 1, dtype=torch.float64).uniform_(math.log(0.05), math.log(0.95), generator=gen))
    eigenvalues = lambda_max * torch.cat([torch.ones(1, dtype=torch.float64), torch.sort(rest, descending=True).values])
    vectors, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return vectors @ torch.diag(eigenvalues) @ vectors.T, eigenvalues, vectors


def decay_factor(eta: float, lambda_i: float, lambda_1: float) -> float:
    """The factor ``f_i`` that multiplies coordinate ``i`` each step near the cycle (module docstring)."""
    return 1.0 - eta * lambda_i - (lambda_i / lambda_1) ** 2 * (2.0 - eta * lambda_1)


def run_sam(hessian: Tensor, w0: Tensor, eta: float, rho: float, steps: int) -> Tensor:
    """``steps`` steps of ``SAM(SGD(lr=eta), rho)`` on ``1/2 w^T H w`` from ``w0``: the trajectory ``(steps+1, d)``."""
    w = w0.clone().requires_grad_(True)
    optimizer = SAM([w], torch.optim.SGD, rho=rho, lr=eta)

    def closure() -> Tensor:
        loss = 0.5 * w @ hessian @ w
        loss.backward()
        return loss

    trajectory = torch.empty(steps + 1, len(w0), dtype=w0.dtype)
    trajectory[0] = w0
    for step in range(steps):
        optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        trajectory[step + 1] = w.detach()
    return trajectory


def _measured_decay(top: Tensor, other: Tensor, c: float) -> float:
    """Geometric mean of ``|x_{t+1} / x_t|`` of a non-top coordinate over the steps where the linearisation holds:
    the top coordinate within 1e-3 of ``+-c`` and the other coordinate between 1e-13 c (rounding) and 1e-3 c. NaN
    when fewer than 5 consecutive steps qualify (the coordinate died before the top one settled)."""
    window = ((top.abs() - c).abs() <= 1e-3 * c) & (other.abs() >= 1e-13 * c) & (other.abs() <= 1e-3 * c)
    ratios = [
        math.log(abs(float(other[t + 1]) / float(other[t])))
        for t in range(len(other) - 1)
        if window[t] and window[t + 1]
    ]
    return math.exp(statistics.mean(ratios)) if len(ratios) >= 5 else math.nan


def _decays(coordinates: Tensor, eigenvalues: Tensor, eta: float, c: float) -> dict[str, Any]:
    """Predicted and measured decay factors of the non-top coordinates: the slowest one's, and the largest
    disagreement over every coordinate whose decay could be measured."""
    lambda_1 = float(eigenvalues[0])
    predicted = [abs(decay_factor(eta, float(v), lambda_1)) for v in eigenvalues[1:]]
    measured = [_measured_decay(coordinates[:, 0], coordinates[:, i + 1], c) for i in range(len(predicted))]
    slowest = max(range(len(predicted)), key=predicted.__getitem__)
    errors = [abs(m - p) for m, p in zip(measured, predicted) if not math.isnan(m)]
    return {
        "slowest_coordinate": slowest + 2,
        "decay_predicted": predicted[slowest],
        "decay_measured": measured[slowest],
        "decay_coordinates_measured": len(errors),
        "decay_max_abs_error": max(errors) if errors else math.nan,
    }


def _one_run(seed: int, x: float, rho: float, dim: int, steps: int) -> dict[str, Any]:
    hessian, eigenvalues, vectors = random_quadratic(seed, dim)
    eta = x / float(eigenvalues[0])
    w0 = torch.randn(dim, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    trajectory = run_sam(hessian, w0, eta, rho, steps)
    coordinates = trajectory @ vectors  # (steps + 1, d) in the eigenbasis
    c = two_cycle_amplitude(eta, rho, float(eigenvalues[0]))
    last, before = coordinates[-1], coordinates[-2]
    return {
        "seed": seed,
        "eta_lambda1": x,
        "rho": rho,
        "c_predicted": c,
        "amplitude_measured": abs(float(last[0])),
        "amplitude_rel_error": abs(abs(float(last[0])) - c) / c,
        "sign_alternates": bool(float(last[0]) * float(before[0]) < 0),
        "others_norm_final": float(torch.linalg.vector_norm(last[1:])),
        **_decays(coordinates, eigenvalues, eta, c),
    }


def _plot_trajectory(ctx: Context, eta: float, rho: float, steps: int) -> Any:
    """A 2-d ravine (lambda = 1 and 0.15): the SAM iterates bounce across the minimum along u_1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hessian = torch.diag(torch.tensor([1.0, 0.15], dtype=torch.float64))
    trajectory = run_sam(hessian, torch.tensor([0.3, 2.2], dtype=torch.float64), eta, rho, steps)
    c = two_cycle_amplitude(eta, rho, 1.0)
    grid_x, grid_y = torch.meshgrid(torch.linspace(-2.5, 2.5, 200), torch.linspace(-0.5, 2.5, 200), indexing="xy")
    loss = 0.5 * (grid_x**2 + 0.15 * grid_y**2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.contour(grid_x, grid_y, loss, levels=20, linewidths=0.5, colors="grey")
    left.plot(trajectory[:, 0], trajectory[:, 1], "-o", markersize=2, linewidth=0.7, label="SAM iterates")
    left.plot([c, -c], [0, 0], "r*", markersize=10, label=f"2-cycle +-c, c = {c:.4f}")
    left.set_xlabel("u_1 (sharp, lambda = 1)")
    left.set_ylabel("u_2 (flat, lambda = 0.15)")
    left.set_title(f"SAM bounces across the ravine (eta = {eta}, rho = {rho})")
    left.legend(fontsize=8)
    right.semilogy(trajectory[:, 0].abs(), label="|w . u_1|")
    right.semilogy(trajectory[:, 1].abs().clamp_min(1e-300), label="|w . u_2|")
    right.axhline(c, color="r", linestyle="--", linewidth=0.8, label="c (predicted)")
    right.set_ylim(1e-17, 10)
    right.set_xlabel("step")
    right.set_title("the top coordinate settles at c, the other dies out")
    right.legend(fontsize=8)
    figure.tight_layout()
    path = ctx.figure_path("trajectory.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_amplitudes(ctx: Context, records: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    predicted = [r["c_predicted"] for r in records]
    left.loglog(predicted, [r["amplitude_measured"] for r in records], "o", markersize=4)
    span = [min(predicted) / 1.5, max(predicted) * 1.5]
    left.loglog(span, span, "k--", linewidth=0.8, label="measured = predicted")
    left.set_xlabel("c = eta rho lambda_1 / (2 - eta lambda_1)")
    left.set_ylabel("measured amplitude |w . u_1|")
    left.legend(fontsize=8)
    decays = [r for r in records if not math.isnan(r["decay_measured"])]
    right.plot([r["decay_predicted"] for r in decays], [r["decay_measured"] for r in decays], "o", markersize=4)
    right.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    right.set_xlabel("|f_i| predicted (linearised around the cycle)")
    right.set_ylabel("measured decay factor of the slowest coordinate")
    figure.tight_layout()
    path = ctx.figure_path("amplitude_and_decay.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _beyond_the_theorem(records: list[dict[str, Any]], tolerance: float = 1e-6) -> str:
    """What the runs past the theorem's step size (eta lambda_1 >= 0.5) showed, from their records: whether every
    one settled into the cycle (amplitude within ``tolerance`` of c, the sign alternating)."""
    beyond = [r for r in records if r["eta_lambda1"] >= 0.5]
    if not beyond:
        return "this run has no step size past that bound (the full run has eta lambda_1 = 1 and 1.5)."
    values = " and ".join(f"{x:g}" for x in sorted({r["eta_lambda1"] for r in beyond}))
    settled = all(r["amplitude_rel_error"] <= tolerance and r["sign_alternates"] for r in beyond)
    worst = max(r["amplitude_rel_error"] for r in beyond)
    if settled:
        return (
            f"the runs with eta lambda_1 = {values} settle into the same cycle (amplitude error {worst:.1e} at "
            "most), as the linearisation predicts (|f_i| < 1 for every eta lambda_1 < 2)."
        )
    return (
        f"of the runs with eta lambda_1 = {values}, not all settle into the cycle (amplitude error up to "
        f"{worst:.1e}), against the linearisation's prediction (|f_i| < 1 for every eta lambda_1 < 2)."
    )


def run(ctx: Context) -> Outcome:
    """Sweep ``eta lambda_1`` and ``rho`` over random quadratics (one per seed); compare with the closed forms."""
    dim = 10
    steps = 1500 if ctx.quick else 4000
    etas = (0.2, 1.0) if ctx.quick else (0.1, 0.5, 1.0, 1.5)
    rhos = (0.05,) if ctx.quick else (0.01, 0.05, 0.2)
    records = []
    for seed in ctx.seeds:
        for x in etas:
            for rho in rhos:
                records.append(_one_run(seed, x, rho, dim, steps))
        ctx.progress(f"sam-cycle: quadratic seed {seed} done ({len(etas) * len(rhos)} runs)")
    rows = []
    for x in etas:
        for rho in rhos:
            cell = [r for r in records if r["eta_lambda1"] == x and r["rho"] == rho]
            decays = [r for r in cell if not math.isnan(r["decay_measured"])]
            rows.append(
                [
                    f"{x:g}",
                    f"{rho:g}",
                    f"{statistics.mean(r['c_predicted'] for r in cell):.6g}",
                    f"{max(r['amplitude_rel_error'] for r in cell):.1e}",
                    "yes" if all(r["sign_alternates"] for r in cell) else "no",
                    f"{max(r['others_norm_final'] for r in cell):.1e}",
                    f"{statistics.mean(r['decay_predicted'] for r in cell):.4f}",
                    f"{statistics.mean(r['decay_measured'] for r in decays):.4f}" if decays else "n/a",
                    f"{max(r['decay_max_abs_error'] for r in cell if not math.isnan(r['decay_max_abs_error'])):.1e}"
                    if any(not math.isnan(r["decay_max_abs_error"]) for r in cell)
                    else "n/a",
                ]
            )
    worst = max(r["amplitude_rel_error"] for r in records)
    figures = [_plot_trajectory(ctx, eta=1.6, rho=0.3, steps=150), _plot_amplitudes(ctx, records)]
    beyond_sentence = _beyond_the_theorem(records)
    report = f"""
Each row is {len(ctx.seeds)} random quadratic(s) in {dim} dimensions (lambda_1 = 1, the rest log-uniform in
[0.05, 0.95]), started from a random point and run {steps} steps of `SAM(SGD(lr=eta), rho)` in float64. The
amplitude is |w . u_1| at the last step against c; "others" is the norm of the remaining coordinates at the last
step. The decay factor of each other coordinate is measured as the geometric mean of |x_(t+1) / x_t| over the
steps where the top coordinate is within 1e-3 of c and that coordinate is between 1e-13 c and 1e-3 c (not
measurable where it died before the top coordinate settled), and predicted by linearising the update around the
cycle: `f_i = 1 - eta lambda_i - (lambda_i / lambda_1)^2 (2 - eta lambda_1)` (derived in `docs/reproductions.md`).
The slowest is the flattest direction (f_i -> 1 - eta lambda_i as lambda_i -> 0), not lambda_2.

Worst relative amplitude error over all {len(records)} runs: {worst:.1e}. The paper proves the cycle for
eta < 1 / (2 lambda_1) (eta lambda_1 < 0.5); {beyond_sentence}
"""
    return Outcome(
        headers=[
            "eta lambda_1",
            "rho",
            "c (predicted)",
            "amplitude rel. error (max)",
            "sign alternates",
            "other coords at end (max)",
            "slowest decay, predicted",
            "slowest decay, measured",
            "decay error, all coords (max)",
        ],
        rows=rows,
        results={
            "dim": dim,
            "steps": steps,
            "max_amplitude_rel_error": worst,
            "max_others_norm_final": max(r["others_norm_final"] for r in records),
            "max_decay_abs_error": max(
                (r["decay_max_abs_error"] for r in records if not math.isnan(r["decay_max_abs_error"])), default=None
            ),
            "runs": records,
        },
        report=report,
        figures=figures,
        caption="Measured 2-cycle amplitude against the closed form c, and the decay of the other coordinates.",
    )


REPRODUCTION = Reproduction(
    name="sam-cycle",
    summary="SAM's 2-cycle on a convex quadratic: amplitude c = eta rho lambda_1 / (2 - eta lambda_1)",
    paper="Bartlett, Long, Bousquet, The Dynamics of Sharpness-Aware Minimization (JMLR 2023), sec. 3",
    run=run,
)
