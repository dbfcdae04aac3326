"""From a ``SamDriftResult`` to the runner's ``Outcome``: the table, the commentary, results.json and
the figures. Every sentence that states what the runs showed is chosen from the measured numbers."""

from __future__ import annotations

import math
from typing import Any

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.protocol import Claim, within
from flatminima.experiments.reproduce import Context, Outcome, markdown_table
from flatminima.experiments.sam_drift.compute import FULL_STEPS, GDNumbers, SamDriftResult
from flatminima.experiments.sam_drift.measure import RateRecord
from flatminima.experiments.sam_drift.plots import plot_lambda_max, plot_rho_sweep, plot_trajectory
from flatminima.experiments.sam_drift.problem import HALF_WIDTH, SETTLE, X0, Y0, a
from flatminima.experiments.sam_drift.theory import small_eta_rate

__all__ = [
    "claims",
    "explained_by_corrections",
    "gd_sentences",
    "long_run_sentence",
    "outcome",
    "rate_sentences",
    "sweep_sentence",
]

#: the closed form's error "is" the second-order terms' sum when within this fraction of it (the tests' 5 %)
EXPLAINED = 0.05
#: the refined value "agrees" with the measured rate within this relative difference (rounding alone: ~1e-10)
REFINED_AGREES = 1e-8
#: GD's y "stays" when it moves by at most this after settling (it moves by exactly 0 here)
GD_STILL = 1e-12
#: GD's transient move of y "is O(eta x0^2)" when within this factor of eta x0^2
TRANSIENT_FACTOR = 10.0
#: SAM "bounces at +-c(y)" when |x| stays within this relative distance of c(y) after SETTLE steps
ON_CYCLE = 1e-3


def explained_by_corrections(record: RateRecord) -> bool:
    """Whether ``measured / predicted - 1`` is the sum of the four second-order terms, to within ``EXPLAINED``."""
    difference, terms = record.signed_rel_difference, record.second_order_corrections
    return math.isfinite(difference) and abs(difference - terms) <= EXPLAINED * abs(terms)


def rate_sentences(
    main: RateRecord, terms: dict[str, float], crossing_step: int | None, amplitude: float, c_one: float
) -> str:
    """The measured rate at y = 1 against the closed form, the second-order terms, the refined value, and the
    x-amplitude where y crosses 1 against ``c(1)`` (line breaks as in the report's source)."""
    listed = (
        f"`a'` read at `y + e_y`\n({terms['a_prime_shift']:.3e}), the cycle set by `a(y + e_y)` "
        f"({terms['amplitude_shift']:.3e}), the cycle lagging\n`c(y)` as y drifts ({terms['lag']:.3e}), and `|e_x|` "
        f"slightly below rho ({terms['normalisation']:.3e})."
    )
    if math.isnan(main.measured_rate):
        text = (
            f"measured: none, since fewer than 5 whole cycles had their mean y within {HALF_WIDTH} of 1. The closed "
            f"form drops four\nsecond-order terms, each O(rho^2) ({terms['sum']:.3e}): {listed} The refined\nvalue "
            f"that keeps them is {main.refined_predicted_rate:.10g}."
        )
    else:
        measured, predicted = abs(main.measured_rate), abs(main.predicted_rate)
        size = "larger in size" if measured > predicted else "smaller in size" if measured < predicted else "equal"
        text = f"measured\n{main.measured_rate:.7g}, {size} by a relative {main.rel_difference:.3e}. "
        if explained_by_corrections(main):
            text += "That is the sum of four\nsecond-order terms the closed form drops, each O(rho^2) "
            text += f"({terms['sum']:.3e}): {listed}"
        else:
            text += "That is not the sum of the four\nsecond-order terms the closed form drops, each O(rho^2) "
            text += f"({terms['sum']:.3e}, against {main.signed_rel_difference:.3e} signed): {listed}"
        text += f" The refined\nvalue that keeps them ({main.refined_predicted_rate:.10g}) "
        if main.refined_rel_difference <= REFINED_AGREES:
            text += f"agrees to {main.refined_rel_difference:.0e}."
        else:
            text += f"is off by a relative {main.refined_rel_difference:.1e}, so the terms do not explain it all."
    if crossing_step is None:
        return text + " SAM's y did\nnot cross 1 in this run, so the x-amplitude there is not measured."
    text += f" The\nx-amplitude where y crosses 1 is {amplitude:.7g} against `c(1)` = {c_one:.7g}\n"
    if amplitude > c_one:
        return text + "(above it by the lag and the `a(y + e_y)` shift)."
    relation = "below" if amplitude < c_one else "equal to"
    return text + f"({relation} it, although the lag and the `a(y + e_y)` shift should put it above)."


def small_eta_sentence(eta: float, rho: float) -> str:
    """The small-eta form against the closed form at y = 1 (line breaks as in the report's source)."""
    factor = 4 / (2 - eta * a(1.0)) ** 2
    comparison = (
        f"smaller by the factor `4 / (2 - eta a)^2` = {factor:.4f}"
        if factor >= 1
        else f"larger by the factor `(2 - eta a)^2 / 4` = {1 / factor:.4f}"
    )
    return (
        f"The small-eta form, `dy/step ~ -eta rho^2 a'(y) / 2` = {small_eta_rate(eta, rho, 1.0):.4g} here, is\n"
        f"{comparison} at eta a = {eta * a(1.0):g}: the drift\nis proportional to `-rho^2 eta a'(y)` as\n"
        "[papers.md sec. 2](../../papers.md#2-sam-dynamics-bartlett-long-bousquet-jmlr-2023) says, but the\n"
        "constant 1/2 is its eta a -> 0 limit."
    )


def gd_sentences(gd: GDNumbers, eta: float, crossed: bool, y_end: float, x_end: float) -> str:
    """GD's transient, its stillness after settling and its rate around SAM's crossing (line breaks as in the
    report's source)."""
    order = eta * X0**2
    size = "O(eta x0^2)" if abs(gd.transient) <= TRANSIENT_FACTOR * order else f"well above eta x0^2 = {order:.0e}"
    lo, hi = gd.window
    where = (
        f"the {hi - lo} steps around SAM's\ncrossing of y = 1"
        if crossed
        else f"its last {hi - lo} steps (SAM's\ny did not cross 1)"
    )
    text = (
        f"**GD.** x shrinks by `1 - eta a` a step, y moves by {gd.transient:.2e} meanwhile ({size}), and from\n"
        f"step {SETTLE} to the end y changes by {gd.settled_change:.1e}; its rate over {where} is {gd.rate:.1e}. "
    )
    if abs(gd.settled_change) <= GD_STILL:
        return text + (
            f"x = 0 is a fixed point of GD: it stays where it first settles\n(lambda_max = {a(y_end):.6g}), with "
            f"x = {x_end:.1e} at the end."
        )
    return text + (
        f"x = 0 is a fixed point of GD, yet its y kept moving after it\nsettled (lambda_max = {a(y_end):.6g} at the "
        f"end), with x = {x_end:.1e} at the end."
    )


def long_run_sentence(stopped_early: bool, stop_below: float, y_end: float, deviation: float, alternates: bool) -> str:
    """Whether SAM was seen to approach the flattest minimum while bouncing at ``+-c(y)``, or the run stopped before
    it could show that (the quick run)."""
    opening = (
        "Since `a'(y) = 2y`, the drift slows as y -> 0: y decays\nabout exponentially, by "
        "`exp(-4 eta rho^2 / (2 - eta)^2)` a step near the bottom, so SAM "
    )
    on_cycle = alternates and deviation <= ON_CYCLE
    if stopped_early:
        bounce = (
            f"it bounced at `+-c(y)` (|x| within a relative {deviation:.0e} of `c(y)` after step {SETTLE})"
            if on_cycle
            else f"it did not keep to `+-c(y)` (|x| off `c(y)` by up to a relative {deviation:.1e} after step "
            f"{SETTLE}{'' if alternates else ', x not alternating in sign'})"
        )
        return opening + (
            f"should approach the flattest\nminimum (lambda_max = 1) without reaching it. This run stopped once y "
            f"passed {stop_below:g}, so it does not show that\n(the full run goes on for {FULL_STEPS:,} steps); up to "
            f"there, {bounce}."
        )
    if not 0.0 < y_end < Y0:
        return opening + f"should approach the flattest\nminimum (lambda_max = 1); here its y ended at {y_end:.6g}."
    bounce = (
        f"bouncing at `+-c(y)` all the way (|x| within a relative {deviation:.0e} of `c(y)` after step {SETTLE})"
        if on_cycle
        else f"but not on `+-c(y)` all the way (|x| off `c(y)` by up to a relative {deviation:.1e} after step "
        f"{SETTLE}{'' if alternates else ', x not alternating in sign'})"
    )
    return opening + (
        f"approaches the flattest\nminimum (lambda_max = 1) without reaching it (lambda_max = {a(y_end):.4g} at the "
        f"end),\n{bounce}."
    )


def sweep_sentence(sweep: list[RateRecord]) -> str:
    """Whether the measured rate scales as rho^2 up to the second-order terms, over the sweep."""
    off = [r for r in sweep if not explained_by_corrections(r)]
    if not off:
        return "the measured rate does too, up to the second-order terms, which grow as rho^2\nrelative to it:"
    rhos = ", ".join(f"{r.rho:g}" for r in off)
    return (
        "the measured rate departs from rho^2 by more than the second-order terms\n(which grow as rho^2 "
        f"relative to it) at rho = {rhos}:"
    )


def _commentary(result: SamDriftResult) -> str:
    """The commentary under the table: how the rate was measured, why it differs from the closed form, GD, the
    long run and the rho sweep."""
    eta, rho, sam, gd, main = result.eta, result.rho, result.sam, result.gd, result.main
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
                f"{r.rho:g}",
                r.steps,
                f"{r.measured_rate:.7g}",
                f"{r.predicted_rate:.7g}",
                f"{r.rel_difference:.3e}",
                f"{r.second_order_corrections:.3e}",
                f"{r.refined_predicted_rate:.10g}",
                f"{r.refined_rel_difference:.1e}",
                f"{r.small_eta_rate:.4g}",
                f"{r.measured_over_rho_squared:.7g}",
            ]
            for r in result.sweep
        ],
    )
    rates = rate_sentences(
        main,
        result.corrections,
        result.crossing_step,
        result.amplitude_at_crossing,
        two_cycle_amplitude(eta, rho, a(1.0)),
    )
    gd_text = gd_sentences(result.gd_numbers, eta, result.crossing_step is not None, result.gd_y_end, float(gd[-1, 0]))
    long_run = long_run_sentence(
        result.stopped_early, result.stop_below, result.sam_y_end, result.cycle_deviation, result.cycle_alternates
    )
    # the full run's main row is the long run, not stopped past the window like the others
    past = f"{1 - 2 * HALF_WIDTH:g}" + ("" if result.stopped_early else f" (the rho = {rho:g} row: the long run above)")
    path = result.predicted_path
    return f"""
`w = (x, y)` starts at `({X0:g}, {Y0:g})` and takes {len(sam) - 1} steps of `SAM(SGD(lr={eta}), rho={rho})` (and
as many plain `SGD(lr={eta})` steps) on `L = 1/2 (1 + y^2) x^2`, in float64; lambda_max at `x = 0` is `a(y) = 1 + y^2`.

**Rate at y = 1.** Measured from whole 2-cycles: each cycle's `(y_(t+2) - y_t) / 2` (cycles starting after step
{SETTLE}), placed at `(y_t + y_(t+1)) / 2`, fitted with a quadratic in y over the cycles within {HALF_WIDTH} of
y = 1 and read at y = 1. Predicted: `dy/step = -eta/2 a'(y) (c(y) + rho)^2 = -2 eta rho^2 a'(y) / (2 - eta a(y))^2`
with `c = eta rho a / (2 - eta a)`: {main.predicted_rate:.7g} per step at y = 1; {rates}

{small_eta_sentence(eta, rho)}

{gd_text}

**Long run.** Iterating the closed-form rate alone, `y += rate(y)` from {Y0}, gives y = {path[-1]:.6g} after
{len(path) - 1} steps; SAM reached {result.sam_y_end:.6g}. {long_run}

**Rate against rho**, each run from the same start until y is past {past}. The closed form and the
small-eta term scale exactly as rho^2; {sweep_sentence(result.sweep)}

{sweep_table}
"""


def _rate_cells(record: RateRecord) -> list[float]:
    return [record.measured_rate, record.predicted_rate, record.rel_difference]


#: the first-order closed form drops terms of relative size eta and rho (here ~1e-5): it is checked to 1e-4
RATE_TOLERANCE = 1e-4


def claims(result: SamDriftResult) -> list[Claim]:
    """The drift claim (SAM's rate along the valley against the closed form) and its control (GD does not drift)."""
    main, gd_numbers = result.main, result.gd_numbers
    return [
        Claim(
            statement="SAM drifts toward the flatter minima along the valley at the predicted rate",
            measured=f"dy/step {main.measured_rate:.6e} against {main.predicted_rate:.6e} predicted (relative "
            f"difference {main.rel_difference:.1e})",
            rule=f"SUPPORTS if within {RATE_TOLERANCE:g} (relative) of the first-order closed form, CONTRADICTS "
            "otherwise",
            verdict=within(main.rel_difference, RATE_TOLERANCE),
        ),
        Claim(
            statement="gradient descent from the same point does not drift (the drift is SAM's)",
            measured=f"GD's dy/step {gd_numbers.rate:.1e} against SAM's {main.measured_rate:.1e}",
            rule="SUPPORTS if GD's rate is below 1e-3 of SAM's in size, CONTRADICTS otherwise",
            verdict=within(abs(gd_numbers.rate), 1e-3 * abs(main.measured_rate)),
        ),
    ]


def outcome(result: SamDriftResult, ctx: Context) -> Outcome:
    """The table (SAM, GD, the other rhos of the sweep), results.json, the commentary and the three figures."""
    eta, rho, main, gd_numbers = result.eta, result.rho, result.main, result.gd_numbers
    sam_end, gd_end = result.sam_y_end, result.gd_y_end
    steps = len(result.sam) - 1
    rows: list[list[Any]] = [
        ["SAM", f"{rho:g}", steps, Y0, sam_end, a(Y0), a(sam_end), *_rate_cells(main)],
        ["GD", "-", len(result.gd) - 1, Y0, gd_end, a(Y0), a(gd_end), gd_numbers.rate, 0.0, math.nan],
    ]
    rows += [
        ["SAM (rho sweep)", f"{r.rho:g}", r.steps, Y0, r.y_end, a(Y0), a(r.y_end), *_rate_cells(r)]
        for r in result.sweep
        if r is not main
    ]
    figures = [plot_trajectory(ctx, result), plot_lambda_max(ctx, result), plot_rho_sweep(ctx, result)]
    return Outcome(
        claims=claims(result),
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
            "steps": steps,
            "measured_rate": main.measured_rate,
            "predicted_rate": main.predicted_rate,
            "rate_rel_difference": main.rel_difference,
            "second_order_corrections": result.corrections,
            "refined_predicted_rate": main.refined_predicted_rate,
            "refined_rel_difference": main.refined_rel_difference,
            "small_eta_rate": main.small_eta_rate,
            "crossing_step": result.crossing_step,
            "amplitude_at_crossing": result.amplitude_at_crossing,
            "c_predicted_at_one": two_cycle_amplitude(eta, rho, a(1.0)),
            "sam_y_end": sam_end,
            "sam_y_end_predicted": result.predicted_path[-1],
            "sam_lambda_max_start": a(Y0),
            "sam_lambda_max_end": a(sam_end),
            "gd_rate": gd_numbers.rate,
            "gd_y_change_after_settling": gd_numbers.settled_change,
            "gd_y_change_transient": gd_numbers.transient,
            "gd_y_end": gd_end,
            "gd_lambda_max_end": a(gd_end),
            "gd_x_end": float(result.gd[-1, 0]),
            "rho_sweep": [r.as_dict() for r in result.sweep],
        },
        report=_commentary(result),
        figures=figures,
        caption="The drift of y (so of lambda_max = 1 + y^2) per step under SAM at y = 1, measured against the "
        "closed form; GD from the same start.",
    )
