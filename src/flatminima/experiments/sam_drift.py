"""``sam-drift``: along a valley of minima, SAM bounces across it and drifts toward its flat end; GD does not move.

Bartlett, Long and Bousquet (JMLR 2023), the non-quadratic case: near a valley, SAM's oscillation acts as gradient
descent, with a smaller step, on ``lambda_max``. The valley here is ``L(x, y) = 1/2 a(y) x^2`` with
``a(y) = 1 + y^2``: every point ``x = 0`` is a minimum and ``lambda_max = a(y)`` there, so the flat end is ``y = 0``.

At frozen ``y`` the problem is the 1-d quadratic with ``lambda = a(y)``, whose normalised-SAM 2-cycle is
``x = +-c(y)``, ``c = eta rho a / (2 - eta a)``. The gradient is ``g = (a x, 1/2 a' x^2)`` and the perturbation
``e = rho g / ||g|| = rho (sign x, a' |x| / (2 a)) / sqrt(1 + (a' x / (2 a))^2)``, so on the cycle ``x + e_x`` has
the sign of ``x`` and ``|x + e_x| = c + rho`` to leading order. The y-coordinate of the SAM gradient,
``1/2 a'(y + e_y) (x + e_x)^2``, is the same on both steps of the cycle, so y moves by

    dy/step = -eta/2 a'(y) (c + rho)^2 = -2 eta rho^2 a'(y) / (2 - eta a)^2

(``c + rho = 2 rho / (2 - eta a)``), up to four relative corrections of order ``rho^2`` (:func:`correction_terms`;
8.0e-6 in all at ``y = 1``, ``eta = 0.1``, ``rho = 0.01``). For small ``eta a`` this is ``-eta rho^2 a'(y) / 2``:
gradient descent on ``lambda_max = a(y)`` with step ``eta rho^2 / 2``; the closed form's extra factor
``4 / (2 - eta a)^2`` is 1.23 at ``y = 1``. Gradient descent from the same point contracts ``x`` by ``1 - eta a``
per step, moves ``y`` by ``O(eta x0^2)`` while it does, and then stops: ``x = 0`` is a fixed point.

The runs use the library's :class:`~flatminima.SAM` around ``torch.optim.SGD`` (and plain ``torch.optim.SGD``
for GD) on the parameter ``w = (x, y)`` in float64: the product, not a separate simulator. The derivation is in
``docs/reproductions.md`` (section sam-drift).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.reproduce import Context, Outcome, Reproduction, markdown_table
from flatminima.optim import SAM

__all__ = [
    "REPRODUCTION",
    "a",
    "a_prime",
    "correction_terms",
    "measured_rate",
    "predicted_rate",
    "refined_rate",
    "run",
    "run_valley",
    "small_eta_rate",
]

ETA = 0.1
RHO = 0.01
X0 = 1e-3
Y0 = 1.05
SETTLE = 200  # steps before the cycle (SAM) or the decay of x (GD) counts as settled; x's error shrinks 0.8x a step
HALF_WIDTH = 0.005  # the rate at y = 1 is fitted on the cycles whose mean y is within this of 1


def a(y: float) -> float:
    """The valley's curvature across itself, ``lambda_max`` on the line of minima: ``1 + y^2``."""
    return 1.0 + y * y


def a_prime(y: float) -> float:
    """``a'(y) = 2 y``: the third derivative that makes SAM drift."""
    return 2.0 * y


def valley_loss(w: Tensor) -> Tensor:
    """``L(x, y) = 1/2 (1 + y^2) x^2`` at ``w = (x, y)``."""
    return 0.5 * (1.0 + w[1] ** 2) * w[0] ** 2


def predicted_rate(eta: float, rho: float, y: float) -> float:
    """The drift of y per step on the settled cycle: ``-eta/2 a'(y) (c(y) + rho)^2`` (module docstring)."""
    c = two_cycle_amplitude(eta, rho, a(y))
    return -0.5 * eta * a_prime(y) * (c + rho) ** 2


def small_eta_rate(eta: float, rho: float, y: float) -> float:
    """The leading term of :func:`predicted_rate` for small ``eta a``: ``-eta rho^2 a'(y) / 2``."""
    return -0.5 * eta * rho**2 * a_prime(y)


def correction_terms(eta: float, rho: float, y: float) -> dict[str, float]:
    """The relative corrections to :func:`predicted_rate` at second order in ``rho`` (each ``O(rho^2)``), whose sum
    is ``measured / predicted - 1`` (derived in the docs):

    - ``a_prime_shift``: ``a'`` read at ``y + e_y``, ``e_y = rho a' c / (2 a)``: ``a'' e_y / a'``;
    - ``amplitude_shift``: the cycle set by ``a(y + e_y)``, not ``a(y)``: ``2 eta a' e_y / (2 - eta a)``;
    - ``lag``: the cycle trailing ``c(y)`` as y drifts: ``2 eta a' |r| / (2 - eta a)^2``, ``r`` the predicted rate;
    - ``normalisation``: ``|e_x| = rho / sqrt(1 + (a' c / (2 a))^2)``, not ``rho``: ``-(a' c / (2 a))^2``.
    """
    ay, slope, curvature = a(y), a_prime(y), 2.0
    c = two_cycle_amplitude(eta, rho, ay)
    e_y = rho * slope * c / (2.0 * ay)
    terms = {
        "a_prime_shift": curvature * e_y / slope,
        "amplitude_shift": 2.0 * eta * slope * e_y / (2.0 - eta * ay),
        "lag": 2.0 * eta * slope * abs(predicted_rate(eta, rho, y)) / (2.0 - eta * ay) ** 2,
        "normalisation": -((slope * c / (2.0 * ay)) ** 2),
    }
    terms["sum"] = sum(terms.values())
    return terms


def _frozen_cycle(eta: float, rho: float, y: float) -> tuple[float, float, float]:
    """The exact 2-cycle of the x-update at frozen y, with the full normalised ``e`` (its y-component included):
    ``u`` solving ``u = eta a(y + e_y(u)) (u + e_x(u)) / 2`` by fixed-point iteration (a contraction with factor
    about ``eta a / 2``), and ``e_x, e_y`` there."""

    def perturbation(u: float) -> tuple[float, float]:
        gx, gy = a(y) * u, 0.5 * a_prime(y) * u * u
        norm = math.hypot(gx, gy)
        return rho * gx / norm, rho * gy / norm

    u = two_cycle_amplitude(eta, rho, a(y))
    for _ in range(100):
        ex, ey = perturbation(u)
        u = 0.5 * eta * a(y + ey) * (u + ex)
    ex, ey = perturbation(u)
    return u, ex, ey


def refined_rate(eta: float, rho: float, y: float) -> float:
    """:func:`predicted_rate` without its approximations, to explain the measured rate's last digits.

    Two corrections, each a relative ~1e-6 to 1e-5 at the default settings: (1) the perturbation's y-component and
    the exact normalisation (:func:`_frozen_cycle`: ``u`` and ``e`` instead of ``c`` and ``rho``); (2) the cycle's
    lag behind ``u(y)`` as y drifts. With ``|x_t| = u_t + d_t``, the x-update gives
    ``d_(t+1) = -(1 - eta a) d_t - (u_(t+1) - u_t)``, so a steady drift ``u_(t+1) - u_t = u'(y) r`` leaves
    ``d = -u'(y) r / (2 - eta a)`` on both steps of the cycle (``|x|`` above ``u`` while y descends). The rate is then
    ``-eta/2 a'(y + e_y) (u + d + e_x)^2``, with ``r`` the frozen-cycle rate and ``u'`` by central difference.
    """
    u, ex, ey = _frozen_cycle(eta, rho, y)
    frozen = -0.5 * eta * a_prime(y + ey) * (u + ex) ** 2
    h = 1e-4
    slope = (_frozen_cycle(eta, rho, y + h)[0] - _frozen_cycle(eta, rho, y - h)[0]) / (2 * h)
    lag = -slope * frozen / (2.0 - eta * a(y + ey))
    return -0.5 * eta * a_prime(y + ey) * (u + lag + ex) ** 2


def run_valley(
    method: str, eta: float, rho: float, steps: int, w0: tuple[float, float] = (X0, Y0), stop_below: float = -math.inf
) -> Tensor:
    """``steps`` steps of ``SAM(SGD(lr=eta), rho)`` (``method="sam"``) or ``SGD(lr=eta)`` (``"gd"``) on the valley
    from ``w0``, in float64; stops early once y falls below ``stop_below``. Returns the iterates ``(n + 1, 2)``."""
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    if method == "sam":
        optimizer: torch.optim.Optimizer = SAM([w], torch.optim.SGD, rho=rho, lr=eta)
    elif method == "gd":
        optimizer = torch.optim.SGD([w], lr=eta)
    else:
        raise ValueError(f"method must be 'sam' or 'gd'; got {method!r}")

    def closure() -> Tensor:
        loss = valley_loss(w)
        loss.backward()
        return loss

    trajectory = torch.empty(steps + 1, 2, dtype=torch.float64)
    trajectory[0] = w.detach()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)  # SGD's step(closure) does not clear them; SAM's does, twice a step
        optimizer.step(closure)
        trajectory[step + 1] = w.detach()
        if float(trajectory[step + 1, 1]) < stop_below:
            return trajectory[: step + 2].clone()
    return trajectory


def measured_rate(y: Tensor, target: float = 1.0, half_width: float = HALF_WIDTH, settle: int = SETTLE) -> float:
    """dy per step at ``y = target``, from whole 2-cycles.

    Each cycle starting at an even step ``t >= settle`` gives the rate ``(y_(t+2) - y_t) / 2``, the mean of the
    rates at ``y_t`` and ``y_(t+1)``, so it belongs to ``(y_t + y_(t+1)) / 2`` (taking ``y_(t+1)`` instead biases
    the result by a relative ~8e-6, half a step of y). The cycles whose y is within ``half_width`` of ``target`` are
    fitted by least squares with a quadratic in ``y - target``, read at ``target`` (a linear fit would carry a
    curvature bias of a relative ~3e-6 at ``half_width = 0.005``). NaN when fewer than 5 cycles qualify.
    """
    starts = torch.arange(settle + settle % 2, len(y) - 2, 2)
    rates = (y[starts + 2] - y[starts]) / 2
    centres = (y[starts] + y[starts + 1]) / 2 - target
    keep = centres.abs() <= half_width
    if int(keep.sum()) < 5:
        return math.nan
    scaled = centres[keep] / half_width
    design = torch.stack([torch.ones_like(scaled), scaled, scaled**2], dim=1)
    coefficients = torch.linalg.lstsq(design, rates[keep].unsqueeze(1)).solution
    return float(coefficients[0, 0])


def _crossing(y: Tensor, target: float = 1.0) -> int | None:
    """The first step at which y is below ``target``, or None."""
    below = torch.nonzero(y < target)
    return int(below[0, 0]) if len(below) else None


def _predicted_path(eta: float, rho: float, y0: float, steps: int) -> list[float]:
    """y iterated with the predicted rate alone, ``y_{t+1} = y_t + predicted_rate(y_t)``: the drift's ODE."""
    path = [y0]
    for _ in range(steps):
        path.append(path[-1] + predicted_rate(eta, rho, path[-1]))
    return path


def _rate_record(eta: float, rho: float, trajectory: Tensor) -> dict[str, Any]:
    """A SAM run's rate at y = 1 against the closed form, the refined value and the small-eta term."""
    measured = measured_rate(trajectory[:, 1])
    predicted = predicted_rate(eta, rho, 1.0)
    refined = refined_rate(eta, rho, 1.0)
    return {
        "rho": rho,
        "steps": len(trajectory) - 1,
        "y_end": float(trajectory[-1, 1]),
        "measured_rate": measured,
        "predicted_rate": predicted,
        "rel_difference": abs(measured - predicted) / abs(predicted),
        "second_order_corrections": correction_terms(eta, rho, 1.0)["sum"],
        "refined_predicted_rate": refined,
        "refined_rel_difference": abs(measured - refined) / abs(refined),
        "small_eta_rate": small_eta_rate(eta, rho, 1.0),
        "measured_over_rho_squared": measured / rho**2,
    }


def _sweep_run(eta: float, rho: float) -> Tensor:
    """SAM from the standard start until y is past the fitting window around 1 (at most 4x the predicted steps)."""
    steps = int(4 * (Y0 - 1.0) / abs(predicted_rate(eta, rho, 1.0))) + 10 * SETTLE
    return run_valley("sam", eta, rho, steps, stop_below=1.0 - 2 * HALF_WIDTH)


def _plot_trajectory(ctx: Context, sam: Tensor, gd: Tensor, eta: float, rho: float) -> Any:
    """Left: the (x, y) iterates, SAM on the curves +-c(y) down the valley, GD dropping to x = 0 and staying.
    Right: x over the first steps, SAM bouncing and GD decaying."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
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
    figure.tight_layout()
    path = ctx.figure_path("trajectory.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_lambda_max(ctx: Context, sam: Tensor, gd: Tensor, predicted_path: list[float]) -> Any:
    """lambda_max = a(y) of the iterates over steps (log scale), SAM against GD and the predicted drift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps = torch.arange(1, len(sam) + 1)
    axis.semilogx(steps, 1.0 + sam[:, 1] ** 2, label="SAM")
    axis.semilogx(torch.arange(1, len(gd) + 1), 1.0 + gd[:, 1] ** 2, label="GD")
    predicted = torch.tensor(predicted_path, dtype=torch.float64)
    axis.semilogx(
        torch.arange(1, len(predicted) + 1), 1.0 + predicted**2, "k:", label="predicted: y += rate(y) each step"
    )
    axis.axhline(2.0, color="grey", linewidth=0.5)
    axis.set_xlabel("step + 1")
    axis.set_ylabel("lambda_max = a(y) = 1 + y^2")
    axis.set_title("SAM drifts to the flat end of the valley; GD stays", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = ctx.figure_path("lambda_max.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_rho_sweep(ctx: Context, eta: float, sweep: list[dict[str, Any]]) -> Any:
    """|dy/step| at y = 1 against rho: measured, the closed form, and the small-eta term (both slope 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axis = plt.subplots(figsize=(6, 4))
    rhos = [r["rho"] for r in sweep]
    span = [min(rhos) / 1.5, max(rhos) * 1.5]
    axis.loglog(rhos, [abs(r["measured_rate"]) for r in sweep], "o", label="measured (SAM)")
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
    figure.tight_layout()
    path = ctx.figure_path("rho_sweep.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _report(
    eta: float,
    rho: float,
    sam: Tensor,
    gd: Tensor,
    main: dict[str, Any],
    sweep: list[dict[str, Any]],
    gd_numbers: dict[str, float],
    path: list[float],
    amplitude: float,
) -> str:
    """The commentary under the table: how the rate was measured, why it differs from the closed form, GD, the
    long run and the rho sweep."""
    terms = correction_terms(eta, rho, 1.0)
    sweep_table = markdown_table(
        [
            "rho",
            "steps",
            "measured dy/step",
            "closed form",
            "rel. diff.",
            "2nd-order terms",
            "refined",
            "rel. diff.",
            "small-eta term",
            "measured / rho^2",
        ],
        [
            [
                f"{r['rho']:g}",
                r["steps"],
                f"{r['measured_rate']:.7g}",
                f"{r['predicted_rate']:.7g}",
                f"{r['rel_difference']:.3e}",
                f"{r['second_order_corrections']:.3e}",
                f"{r['refined_predicted_rate']:.10g}",
                f"{r['refined_rel_difference']:.1e}",
                f"{r['small_eta_rate']:.4g}",
                f"{r['measured_over_rho_squared']:.7g}",
            ]
            for r in sweep
        ],
    )
    return f"""
`w = (x, y)` starts at `({X0:g}, {Y0:g})` and takes {len(sam) - 1} steps of `SAM(SGD(lr={eta}), rho={rho})` (and
as many plain `SGD(lr={eta})` steps) on `L = 1/2 (1 + y^2) x^2`, in float64; lambda_max at `x = 0` is `a(y) = 1 + y^2`.

**Rate at y = 1.** Measured from whole 2-cycles: each cycle's `(y_(t+2) - y_t) / 2` (cycles starting after step
{SETTLE}), placed at `(y_t + y_(t+1)) / 2`, fitted with a quadratic in y over the cycles within {HALF_WIDTH} of
y = 1 and read at y = 1. Predicted: `dy/step = -eta/2 a'(y) (c(y) + rho)^2 = -2 eta rho^2 a'(y) / (2 - eta a(y))^2`
with `c = eta rho a / (2 - eta a)`: {main["predicted_rate"]:.7g} per step at y = 1; measured
{main["measured_rate"]:.7g}, larger in size by a relative {main["rel_difference"]:.3e}. That is the sum of four
second-order terms the closed form drops, each O(rho^2) ({terms["sum"]:.3e}): `a'` read at `y + e_y`
({terms["a_prime_shift"]:.3e}), the cycle set by `a(y + e_y)` ({terms["amplitude_shift"]:.3e}), the cycle lagging
`c(y)` as y drifts ({terms["lag"]:.3e}), and `|e_x|` slightly below rho ({terms["normalisation"]:.3e}). The refined
value that keeps them ({main["refined_predicted_rate"]:.10g}) agrees to {main["refined_rel_difference"]:.0e}. The
x-amplitude where y crosses 1 is {amplitude:.7g} against `c(1)` = {two_cycle_amplitude(eta, rho, a(1.0)):.7g}
(above it by the lag and the `a(y + e_y)` shift).

The small-eta form, `dy/step ~ -eta rho^2 a'(y) / 2` = {small_eta_rate(eta, rho, 1.0):.4g} here, is
smaller by the factor `4 / (2 - eta a)^2` = {4 / (2 - eta * a(1.0)) ** 2:.4f} at eta a = {eta * a(1.0):g}: the drift
is proportional to `-rho^2 eta a'(y)` as papers.md says, but the constant 1/2 is its eta a -> 0 limit.

**GD.** x shrinks by `1 - eta a` a step, y moves by {gd_numbers["transient"]:.2e} meanwhile (O(eta x0^2)), and from
step {SETTLE} to the end y changes by {gd_numbers["settled_change"]:.1e}; its rate over the 400 steps around SAM's
crossing of y = 1 is {gd_numbers["rate"]:.1e}. x = 0 is a fixed point of GD: it stays where it first settles
(lambda_max = {a(float(gd[-1, 1])):.6g}), with x = {float(gd[-1, 0]):.1e} at the end.

**Long run.** Iterating the closed-form rate alone, `y += rate(y)` from {Y0}, gives y = {path[-1]:.6g} after
{len(path) - 1} steps; SAM reached {float(sam[-1, 1]):.6g}. Since `a'(y) = 2y`, the drift slows as y -> 0: y decays
about exponentially, by `exp(-4 eta rho^2 / (2 - eta)^2)` a step near the bottom, so SAM approaches the flattest
minimum (lambda_max = 1) without reaching it, bouncing at `+-c(y)` all the way.

**Rate against rho**, each run from the same start until y is past {1 - 2 * HALF_WIDTH:g}. The closed form and the
small-eta term scale exactly as rho^2; the measured rate does too, up to the second-order terms, which grow as rho^2
relative to it:

{sweep_table}
"""


def run(ctx: Context) -> Outcome:
    """SAM and GD from ``(x, y) = (1e-3, 1.05)``: the drift rate of y at ``y = 1`` against the prediction, lambda_max
    over a long run, and the rate's scaling with rho."""
    eta, rho = ETA, RHO
    # quick: stop SAM just past the fitting window around y = 1 (about 4,700 steps); full: a long run down the valley
    steps = 5_000 if ctx.quick else 100_000
    stop = 1.0 - 2 * HALF_WIDTH if ctx.quick else -math.inf
    sam = run_valley("sam", eta, rho, steps, stop_below=stop)
    ctx.progress(f"sam-drift: SAM, {len(sam) - 1} steps, y {Y0} -> {float(sam[-1, 1]):.6g}")
    gd = run_valley("gd", eta, rho, len(sam) - 1)
    ctx.progress(f"sam-drift: GD, {len(gd) - 1} steps, y {Y0} -> {float(gd[-1, 1]):.6g}")

    main = _rate_record(eta, rho, sam)
    crossing = _crossing(sam[:, 1])
    amplitude = float(sam[crossing, 0].abs()) if crossing is not None else math.nan
    # GD over the 400 steps (200 cycles) around SAM's crossing of y = 1; GD's own y stays near 1.05
    centre = crossing if crossing is not None else len(gd) - 201
    lo = max(SETTLE, centre - 200)
    lo -= lo % 2
    hi = min(len(gd) - 1, lo + 400)
    gd_numbers = {
        "rate": float(gd[hi, 1] - gd[lo, 1]) / (hi - lo),
        "settled_change": float(gd[-1, 1] - gd[SETTLE, 1]),
        "transient": float(gd[SETTLE, 1] - gd[0, 1]),
    }
    path = _predicted_path(eta, rho, Y0, len(sam) - 1)

    sweep = []
    for r in (0.01, 0.02) if ctx.quick else (0.005, 0.01, 0.02, 0.04):
        sweep.append(main if r == rho else _rate_record(eta, r, _sweep_run(eta, r)))
        ctx.progress(f"sam-drift: rho = {r}: {sweep[-1]['steps']} steps, rate {sweep[-1]['measured_rate']:.7g}")

    sam_end, gd_end = float(sam[-1, 1]), float(gd[-1, 1])
    rows: list[list[Any]] = [
        ["SAM", f"{rho:g}", len(sam) - 1, Y0, sam_end, a(Y0), a(sam_end), *_rate_cells(main)],
        ["GD", "-", len(gd) - 1, Y0, gd_end, a(Y0), a(gd_end), gd_numbers["rate"], 0.0, math.nan],
    ]
    rows += [
        ["SAM (rho sweep)", f"{r['rho']:g}", r["steps"], Y0, r["y_end"], a(Y0), a(r["y_end"]), *_rate_cells(r)]
        for r in sweep
        if r is not main
    ]
    figures = [
        _plot_trajectory(ctx, sam, gd, eta, rho),
        _plot_lambda_max(ctx, sam, gd, path),
        _plot_rho_sweep(ctx, eta, sweep),
    ]
    return Outcome(
        headers=[
            "method",
            "rho",
            "steps",
            "y start",
            "y end",
            "lambda_max start",
            "lambda_max end",
            "dy/step at y = 1, measured (GD: same steps)",
            "dy/step at y = 1, predicted",
            "rel. difference",
        ],
        rows=rows,
        results={
            "eta": eta,
            "rho": rho,
            "x0": X0,
            "y0": Y0,
            "steps": len(sam) - 1,
            "measured_rate": main["measured_rate"],
            "predicted_rate": main["predicted_rate"],
            "rate_rel_difference": main["rel_difference"],
            "second_order_corrections": correction_terms(eta, rho, 1.0),
            "refined_predicted_rate": main["refined_predicted_rate"],
            "refined_rel_difference": main["refined_rel_difference"],
            "small_eta_rate": main["small_eta_rate"],
            "crossing_step": crossing,
            "amplitude_at_crossing": amplitude,
            "c_predicted_at_one": two_cycle_amplitude(eta, rho, a(1.0)),
            "sam_y_end": sam_end,
            "sam_y_end_predicted": path[-1],
            "sam_lambda_max_start": a(Y0),
            "sam_lambda_max_end": a(sam_end),
            "gd_rate": gd_numbers["rate"],
            "gd_y_change_after_settling": gd_numbers["settled_change"],
            "gd_y_change_transient": gd_numbers["transient"],
            "gd_y_end": gd_end,
            "gd_lambda_max_end": a(gd_end),
            "gd_x_end": float(gd[-1, 0]),
            "rho_sweep": sweep,
        },
        report=_report(eta, rho, sam, gd, main, sweep, gd_numbers, path, amplitude),
        figures=figures,
        caption="The drift of y (so of lambda_max = 1 + y^2) per step under SAM at y = 1, measured against the "
        "closed form; GD from the same start.",
    )


def _rate_cells(record: dict[str, Any]) -> list[float]:
    return [record["measured_rate"], record["predicted_rate"], record["rel_difference"]]


REPRODUCTION = Reproduction(
    name="sam-drift",
    summary="SAM drifts along a valley of minima toward lower lambda_max; GD stays put",
    paper="Bartlett, Long, Bousquet, The Dynamics of Sharpness-Aware Minimization (JMLR 2023), drift to wide minima",
    run=run,
    default_seeds=(0,),
    quick_seeds=(0,),
)
