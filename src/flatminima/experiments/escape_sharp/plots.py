"""The figures of ``escape-sharp``: the curves of every row, and of ``ahn-sa``'s batch sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from flatminima.experiments.escape_sharp.compute import EscapeSharpResult
from flatminima.experiments.escape_sharp.problem import DTYPE
from flatminima.experiments.figures import saved_figure

__all__ = ["plot_batch_sizes", "plot_rows"]


def plot_rows(path: Path, result: EscapeSharpResult) -> Path:
    """tr(H)/d, lambda_max, the loss and the distance to the flattest minima over steps, one line per row (mean
    over seeds, the band their range; no band for the loss)."""
    d, refs, runs = result.problem.dim, result.references, result.runs
    title = "From a sharp global minimum: tr(H) and lambda_max along the minima set"
    with saved_figure(path, 2, 2, size=(10, 7), title=title) as (_, axes):
        panels = [
            (axes[0, 0], "trace", 1.0 / d, "tr(H) / d"),
            (axes[0, 1], "lambda_max", 1.0, "lambda_max(H)"),
            (axes[1, 0], "loss", 1.0, "training loss"),
            (axes[1, 1], "distance", 1.0, "distance to the flattest minima"),
        ]
        for index, (label, group) in enumerate(runs.items()):
            steps = group[0].steps
            colour = f"C{index}"
            for axis, key, factor, _ in panels:
                curves = torch.tensor([getattr(r, key) for r in group], dtype=DTYPE) * factor
                if key == "loss":
                    curves = curves.clamp_min(1e-16)
                axis.plot(steps, curves.mean(0), color=colour, linewidth=1.2, label=f"{label} ({len(group)})")
                if len(group) > 1 and key != "loss":  # the loss fluctuates step to step: its band would hide the lines
                    axis.fill_between(steps, curves.min(0).values, curves.max(0).values, color=colour, alpha=0.2)
        axes[0, 0].axhline(refs.trace_min / d, color="k", linestyle="--", linewidth=0.8)
        axes[0, 0].axhline(refs.trace_at_lambda_min / d, color="grey", linestyle=":", linewidth=0.8)
        axes[0, 1].axhline(refs.lambda_max_min, color="grey", linestyle=":", linewidth=0.8)
        axes[0, 1].axhline(refs.lambda_max_at_flattest, color="k", linestyle="--", linewidth=0.8)
        axes[1, 0].set_yscale("log")
        for axis, _, _, panel_title in panels:
            axis.set_xlim(0, runs["GD"][0].steps[-1])
            axis.set_xlabel("step")
            axis.set_title(panel_title, fontsize=10)
        axes[0, 0].legend(fontsize=7, title="dashed: flattest minima; dotted: smallest lambda_max", title_fontsize=7)
        axes[1, 0].text(0.02, 0.03, "GD: ~1e-32, at the floor (1e-16)", transform=axes[1, 0].transAxes, fontsize=7)
    return path


def plot_batch_sizes(path: Path, result: EscapeSharpResult) -> Path:
    """``ahn-sa`` with its extra passes on 1, a few and all examples: tr(H)/d and lambda_max over steps."""
    d, refs, runs = result.problem.dim, result.references, result.batch_runs
    with saved_figure(path, 1, 2, size=(10, 3.8)) as (_, (left, right)):
        for index, (size, group) in enumerate(runs.items()):
            steps = group[0].steps
            for axis, key, factor in ((left, "trace", 1.0 / d), (right, "lambda_max", 1.0)):
                curves = torch.tensor([getattr(r, key) for r in group], dtype=DTYPE) * factor
                axis.plot(steps, curves.mean(0), color=f"C{index}", linewidth=1.2, label=f"batch {size} ({len(group)})")
                if len(group) > 1:
                    axis.fill_between(steps, curves.min(0).values, curves.max(0).values, color=f"C{index}", alpha=0.2)
        left.axhline(refs.trace_min / d, color="k", linestyle="--", linewidth=0.8)
        left.axhline(refs.trace_at_lambda_min / d, color="grey", linestyle=":", linewidth=0.8)
        right.axhline(refs.lambda_max_min, color="grey", linestyle=":", linewidth=0.8)
        right.axhline(refs.lambda_max_at_flattest, color="k", linestyle="--", linewidth=0.8)
        for axis, title in ((left, "tr(H) / d"), (right, "lambda_max(H)")):
            axis.set_xlim(0, runs[1][0].steps[-1])
            axis.set_xlabel("step")
            axis.set_title(f"ahn-sa, extra passes on a batch of b examples: {title}", fontsize=9)
        left.legend(fontsize=8, title="dashed: flattest; dotted: smallest lambda_max", title_fontsize=7)
    return path
