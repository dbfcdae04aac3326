"""The report's figures: lambda_max along training, and the SLQ spectral densities at the stopping point."""

from __future__ import annotations

from pathlib import Path

import torch

from flatminima.experiments.figures import saved_figure
from flatminima.experiments.hessian_spectrum.compute import HessianSpectrumResult
from flatminima.experiments.hessian_spectrum.setting import label

__all__ = ["plot_density", "plot_tracking"]


def _colours(result: HessianSpectrumResult) -> dict[str, str]:
    """One colour per optimiser key: SGD red, the paper's rho blue, the validated one green."""
    return dict(zip(result.keys, ("tab:red", "tab:blue", "tab:green", "tab:purple")))


def plot_tracking(path: Path, result: HessianSpectrumResult) -> Path:
    """lambda_max along training, against the step and against the full training loss; the last point of each run
    is the Lanczos lambda_max at the stopping point.

    The tracker's power iteration finds the eigenvalue of largest *magnitude*: where that one is negative (a saddle,
    e.g. SAM's first steps on the ``ln 10`` plateau), its magnitude is drawn with an ``x``, on the log scale."""
    keys = result.keys
    colours = _colours(result)
    with saved_figure(path, 1, 2, size=(10, 3.8)) as (_, (left, right)):
        negative_drawn = False
        for name in keys:
            for index, r in enumerate(result.runs(name)):
                steps = [t[0] for t in r.tracked] + [r.step]
                losses = [t[1] for t in r.tracked] + [r.train_loss]
                values = [t[2] for t in r.tracked] + [r.spectrum.lambda_max]
                magnitudes = [max(abs(v), 1e-4) for v in values]
                legend = label(r.rho) if index == 0 else None
                for axis, xs in ((left, steps), (right, losses)):
                    axis.plot(xs, magnitudes, "-", color=colours[name], linewidth=0.9, alpha=0.8, label=legend)
                    positive = [(x, m) for x, m, v in zip(xs[:-1], magnitudes, values) if v > 0]
                    negative = [(x, m) for x, m, v in zip(xs[:-1], magnitudes, values) if v <= 0]
                    if positive:
                        axis.plot(*zip(*positive), "o", color=colours[name], markersize=2.5)
                    if negative:
                        axis.plot(*zip(*negative), "x", color=colours[name], markersize=5)
                        negative_drawn = True
                    axis.plot(xs[-1], magnitudes[-1], "*", color=colours[name], markersize=9)
        if negative_drawn:
            left.plot([], [], "x", color="k", markersize=5, label="x: |dominant eigenvalue|, negative")
        left.set_xlabel("step")
        left.set_ylabel(f"lambda_max ({result.setting.examples} training examples)")
        left.set_yscale("log")
        tracked = "along training" if result.setting.track_every else "(not tracked in this run)"
        left.set_title(f"lambda_max {tracked} (star: the measured point)", fontsize=9)
        left.legend(fontsize=8)
        right.set_xscale("log")
        right.set_yscale("log")
        right.invert_xaxis()
        threshold = result.setting.threshold
        right.axvline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
        right.set_xlabel("full training loss (decreasing ->)")
        right.set_title("the same, against the training loss", fontsize=9)
        right.legend(fontsize=8)
    return path


def plot_density(path: Path, result: HessianSpectrumResult, mean_lambda_max: dict[str, float]) -> Path:
    """SLQ densities of SGD and SAM overlaid, the runs of every seed pooled, on one grid and one smoothing width;
    a dashed line at each optimiser's ``mean_lambda_max`` (by key)."""
    densities = result.densities
    nodes = torch.cat([d.nodes.reshape(-1) for group in densities.values() for d in group]).to(torch.float64)
    low, high = float(nodes.min()), float(nodes.max())
    sigma = 0.01 * max(high - low, 1e-12)
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, 1500, dtype=torch.float64)
    colours = _colours(result)
    rhos = dict(zip(result.keys, (None, *result.rhos)))
    with saved_figure(path, size=(6.5, 3.8)) as (_, axis):
        for name, group in sorted(densities.items(), key=lambda item: result.keys.index(item[0])):
            values = torch.stack([d.density(grid, sigma) for d in group]).mean(dim=0)
            colour = colours[name]
            runs = sum(d.num_runs for d in group)
            legend = f"{label(rhos[name])} (SLQ runs: {runs})"
            axis.semilogy(grid.numpy(), values.clamp_min(1e-8).numpy(), color=colour, linewidth=1.0, label=legend)
            axis.axvline(mean_lambda_max[name], color=colour, linestyle="--", linewidth=0.8)
        axis.set_ylim(1e-6, None)
        axis.set_xlabel("eigenvalue of the Hessian (dashed: mean lambda_max by Lanczos)")
        axis.set_ylabel("density (Gaussian smoothing)")
        axis.set_title(f"SLQ spectral density at matched training loss (sigma = {sigma:.2g})", fontsize=9)
        axis.legend(fontsize=8)
    return path
