"""All the sharpness measures of one model on one data set, as a table and figures: ``flatminima sharpness``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.sharpness.density import spectral_density
from flatminima.sharpness.lanczos import hessian_eigenvalues
from flatminima.sharpness.landscape import loss_landscape_1d
from flatminima.sharpness.msharpness import m_sharpness
from flatminima.sharpness.trace import hutchinson_trace

__all__ = ["SharpnessReport", "sharpness_report"]


@dataclass
class SharpnessReport:
    """The measures, each with its error estimate; ``rows`` is what the table prints."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in self.rows)


def _mean_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs.float(), targets)


def _per_example_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs.float(), targets, reduction="none")


def sharpness_report(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    output: str | Path | None = None,
    *,
    k: int = 5,
    trace_probes: int = 50,
    density_runs: int = 4,
    density_steps: int = 40,
    m: int = 32,
    rho: float = 0.05,
    landscape_points: int = 21,
    seed: int = 0,
) -> SharpnessReport:
    """Top-k Hessian eigenvalues (Lanczos), trace (Hutchinson), spectral density (SLQ), m-sharpness (worst and
    average case) and a 1-D loss landscape along the top eigenvector; figures go to ``output`` when given."""
    report = SharpnessReport()
    eigen = hessian_eigenvalues(model, _mean_loss, data, k=k, tol=1e-4, seed=seed)
    values = ", ".join(f"{v:.4g}" for v in eigen.eigenvalues.tolist())
    report.rows.append(
        (
            f"top-{k} eigenvalues (Lanczos)",
            f"{values}  [{'converged' if eigen.converged else 'NOT converged'}, {eigen.num_hvp} HVPs]",
        )
    )
    report.rows.append((f"lambda_max / lambda_{k}", f"{eigen.ratio(k):.3g}"))
    report.values["eigenvalues"] = eigen.eigenvalues.tolist()
    trace = hutchinson_trace(model, _mean_loss, data, num_probes=trace_probes, seed=seed)
    report.rows.append(("trace (Hutchinson)", f"{trace.estimate:.4g} ± {trace.stderr:.2g}  [{trace_probes} probes]"))
    report.values["trace"] = (trace.estimate, trace.stderr)
    for kind in ("worst", "average"):
        sharp = m_sharpness(model, _per_example_loss, data, m=m, rho=rho, kind=kind, seed=seed)
        report.rows.append(
            (
                f"{m}-sharpness, {kind} case (rho {rho})",
                f"loss {sharp.loss_increase:+.4g} ± {sharp.loss_increase_stderr:.2g}, "
                f"error {100 * sharp.error_increase:+.2f} ± {100 * sharp.error_increase_stderr:.2f} points",
            )
        )
        report.values[f"m_sharpness_{kind}"] = (sharp.loss_increase, sharp.loss_increase_stderr)
    density = spectral_density(model, _mean_loss, data, num_runs=density_runs, num_steps=density_steps, seed=seed)
    if output is not None:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        report.figures.append(density.plot(folder / "spectral_density.png"))
        landscape = loss_landscape_1d(
            model, _mean_loss, data, direction="eigen", eigenvectors=eigen.eigenvectors[:1], num_points=landscape_points
        )
        report.figures.append(landscape.plot(folder / "landscape_top_eigenvector.png"))
    return report
