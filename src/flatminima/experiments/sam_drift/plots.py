"""The sam-drift figures, drawn from a ``SamDriftResult``: the iterates in the valley, lambda_max over the
steps, and the rate against rho."""

from __future__ import annotations

from pathlib import Path

import torch

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.figures import saved_figure
from flatminima.experiments.reproduce import Context
from flatminima.experiments.sam_drift.compute import SamDriftResult
from flatminima.experiments.sam_drift.problem import Y0, a
from flatminima.experiments.sam_drift.theory import predicted_rate, small_eta_rate

__all__ = ["plot_lambda_max", "plot_rho_sweep", "plot_trajectory"]


def plot_trajectory(ctx: Context, result: SamDriftResult) -> Path:
    """Left: the (x, y) iterates, SAM on the curves +-c(y) down the valley, GD dropping to x = 0 and staying.
    Right: x over the first steps, SAM bouncing and GD decaying."""
    sam, gd, eta, rho = result.sam, result.gd, result.eta, result.rho
    path = ctx.figure_path("trajectory.png")
    with saved_figure(path, 1, 2, size=(10, 4)) as (_, (left, right)):
        every = max(1, len(sam) // 400) * 2  # even, so both signs of the cycle show
        picks = torch.cat([torch.arange(0, len(sam), every), torch.arange(1, len(sam), every)])
        left.plot(sam[picks, 0], sam[picks, 1], ".", markersize=2, label="SAM iterates")
        ys = torch.linspace(float(sam[:, 1].min()), Y0, 200)
        cs = torch.tensor([two_cycle_amplitude(eta, rho, a(float(v))) for v in ys])
        left.plot(cs, ys, "r--", linewidth=0.8, label="+-c(y), predicted cycle")
        left.plot(-cs, ys, "r--", linewidth=0.8)
        left.plot(gd[:60, 0], gd[:60, 1], "k-o", markersize=2, linewidth=0.6, label="GD (first 60 steps)")
        left.set_xlabel("x (across the valley)")
        left.set_ylabel("y (along the valley; lambda_max = 1 + y^2)")
        left.set_title(f"SAM bounces across and drifts down (eta = {eta}, rho = {rho})", fontsize=9)
        left.legend(fontsize=7, loc="center")
        shown = 60
        right.plot(sam[:shown, 0], "-o", markersize=2, linewidth=0.7, label="SAM: x bounces at +-c")
        right.plot(gd[:shown, 0], "-o", markersize=2, linewidth=0.7, label="GD: x -> 0")
        c0 = two_cycle_amplitude(eta, rho, a(Y0))
        right.axhline(c0, color="r", linestyle="--", linewidth=0.8, label=f"+-c(y0) = {c0:.3g}")
        right.axhline(-c0, color="r", linestyle="--", linewidth=0.8)
        right.set_xlabel("step")
        right.set_ylabel("x")
        right.set_ylim(-1.5 * c0, 2.2 * c0)  # headroom for the legend
        right.set_title("the first steps", fontsize=9)
        right.legend(fontsize=7, loc="upper center", ncol=3)
    return path


def plot_lambda_max(ctx: Context, result: SamDriftResult) -> Path:
    """lambda_max = a(y) of the iterates over steps (log scale), SAM against GD and the predicted drift."""
    sam, gd = result.sam, result.gd
    path = ctx.figure_path("lambda_max.png")
    with saved_figure(path, size=(6, 4)) as (_, axis):
        steps = torch.arange(1, len(sam) + 1)
        axis.semilogx(steps, 1.0 + sam[:, 1] ** 2, label="SAM")
        axis.semilogx(torch.arange(1, len(gd) + 1), 1.0 + gd[:, 1] ** 2, label="GD")
        predicted = torch.tensor(result.predicted_path, dtype=torch.float64)
        axis.semilogx(
            torch.arange(1, len(predicted) + 1), 1.0 + predicted**2, "k:", label="predicted: y += rate(y) each step"
        )
        axis.axhline(2.0, color="grey", linewidth=0.5)
        axis.set_xlabel("step + 1")
        axis.set_ylabel("lambda_max = a(y) = 1 + y^2")
        axis.set_title("SAM drifts to the flat end of the valley; GD stays", fontsize=9)
        axis.legend(fontsize=8)
    return path


def plot_rho_sweep(ctx: Context, result: SamDriftResult) -> Path:
    """|dy/step| at y = 1 against rho: measured, the closed form, and the small-eta term (both slope 2)."""
    from matplotlib.ticker import NullFormatter

    eta, sweep = result.eta, result.sweep
    path = ctx.figure_path("rho_sweep.png")
    with saved_figure(path, size=(6, 4)) as (_, axis):
        rhos = [r.rho for r in sweep]
        span = [min(rhos) / 1.5, max(rhos) * 1.5]
        axis.loglog(rhos, [abs(r.measured_rate) for r in sweep], "o", label="measured (SAM)")
        axis.loglog(
            span,
            [abs(predicted_rate(eta, r, 1.0)) for r in span],
            "k--",
            linewidth=0.8,
            label="2 eta rho^2 a' / (2 - eta a)^2",
        )
        axis.loglog(
            span,
            [abs(small_eta_rate(eta, r, 1.0)) for r in span],
            "g:",
            linewidth=0.8,
            label="eta rho^2 a' / 2 (small eta)",
        )
        axis.set_xticks(rhos, [f"{r:g}" for r in rhos])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("rho")
        axis.set_ylabel("|dy / step| at y = 1")
        axis.set_title(f"the drift scales as rho^2 (eta = {eta})", fontsize=9)
        axis.legend(fontsize=8)
    return path
