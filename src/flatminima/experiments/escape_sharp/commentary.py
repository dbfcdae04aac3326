"""The commentary of ``escape-sharp``'s report: what each row shows, with the run's own numbers.

Every sentence that states an outcome (who moves, who is faster, which batch size decreases tr(H) most, whether SAM
reaches its target) chooses its wording from the measured numbers in ``results.json``; the method descriptions and
the closed forms are fixed text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LOSS_NEAR_ZERO", "STILL", "commentary"]

#: Below this displacement a run "does not move" (float64 rounding at a minimum; the quick test's bound).
STILL = 1e-12
#: Below this largest loss a run stays "near 0" on the way (the loss at ``w = 0`` is 1/2).
LOSS_NEAR_ZERO = 1e-2


def _removes(results: Mapping[str, Any], label: str) -> str:
    """``"removes 80%"`` of the excess ``tr(H) - tr(H)_min`` at the row's nearest minimum (``"adds"`` if it grew)."""
    start, tmin = results["trace_start"], results["trace_min_on_manifold"]
    fraction = (start - results["trace_nearest_minimum"][label]) / (start - tmin)
    verb, fraction = ("removes", fraction) if fraction >= 0 else ("adds", -fraction)
    return f"{verb} {fraction:.0%}" if fraction < 0.99 else f"{verb} {fraction:.1%}"


def _faster(near: Mapping[str, float], rs8: str) -> str:
    """Whether Algorithm 2's nearest minimum has a smaller tr(H) than Algorithm 1's, at both of its settings."""
    than_rs, than_rs8 = near["ahn-sa"] < near["ahn-rs"], near["ahn-sa"] < near[rs8]
    if than_rs and than_rs8:
        return "faster than both"
    if than_rs:
        return "faster than ahn-rs at the same settings, not than ahn-rs at 8 eta'"
    if than_rs8:
        return "faster than ahn-rs at 8 eta', not than ahn-rs at the same settings"
    return "not faster than either"


def _kicks(results: Mapping[str, Any], rs8: str) -> str:
    """Algorithm 1's largest loss against Algorithm 2's, the larger ``eta'`` it affords if it is smaller, and which
    of the two is faster."""
    loss_max = results["loss_max_along_run"]
    ratio = loss_max[rs8] / loss_max["ahn-sa"]
    about = "about ahn-sa's" if 0.5 <= ratio <= 2.0 else ("below ahn-sa's" if ratio < 0.5 else "above ahn-sa's")
    faster = f"Algorithm 2 is {_faster(results['trace_nearest_minimum'], rs8)}."
    at8 = f"at 8 eta' (largest loss\n  {loss_max[rs8]:.1e}, {about}) it {_removes(results, rs8)}"
    if loss_max["ahn-rs"] < loss_max["ahn-sa"]:
        return f"""Its kicks
  are smaller too (largest loss {loss_max["ahn-rs"]:.1e}), so it affords a larger eta': {at8}. {faster}"""
    return f"""Its kicks
  are not smaller (largest loss {loss_max["ahn-rs"]:.1e}, ahn-sa's {loss_max["ahn-sa"]:.1e}); {at8}. {faster}"""


def _sam(results: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """SAM's verbs: whether it leaves the start, whether its lambda_max reaches the smallest over the minima,
    whether that minimum is the flattest in trace, and whether its loss stays near 0 on the way."""
    sam, lam, lam_min = (
        results["runs"]["SAM"],
        results["lambda_max_final"]["SAM"],
        results["lambda_max_min_on_manifold"],
    )
    moved = sam["displacement"]["mean"]
    leaves = "leaves the sharp minimum too" if moved > STILL else f"does not leave the sharp minimum ({moved:.1e})"
    if abs(lam - lam_min) <= 0.05 * lam_min:
        reach = "reaches"
    elif abs(lam - lam_min) < abs(results["lambda_max_start"] - lam_min):
        reach = "approaches"
    else:
        reach = "does not approach"
    other = results["trace_at_lambda_max_min"] > results["trace_min_on_manifold"] * (1 + 1e-9)
    target = "but that is not the flattest" if other else "and that is also the flattest"
    largest = results["loss_max_along_run"]["SAM"]
    if largest >= LOSS_NEAR_ZERO:
        loss = f"""Its loss is not near 0 on the way (largest
  {largest:.1e}): it bounces across the valley, as in `sam-cycle`."""
    else:
        loss = f"""Its loss stays near 0 on the way (largest
  {largest:.1e})."""
    return leaves, reach, target, loss


def _epsilon(results: Mapping[str, Any], eps: str) -> str:
    """The row with the gradient-norm switch: how often it perturbs, why, and whether the default does better."""
    fraction = results["perturbed_fraction"][eps]
    curvature = results["smallest_curvature_start"]
    slow = results["settings"]["lr"] * curvature
    only = "only " if fraction < 0.5 else ""
    text = f"""- **The switch epsilon**: with epsilon = 1e-3 instead of inf, {only}{fraction:.0%} of the steps
  perturb, and the run {_removes(results, eps)}."""
    if fraction < 0.5:
        text += f""" After each perturbation plain GD must bring ||grad f|| below epsilon,
  which takes many steps along the flat normal directions (the smallest nonzero curvature at the start is
  {curvature:.3g}, so `lr lambda = {slow:.2g}` per step); and with the gradient that small, the
  projection removes the slowest normal direction, not the sharp one, so every perturbation is a full kick."""
    near = results["trace_nearest_minimum"]
    if near[eps] > near["ahn-sa"]:
        return text + " The\n  library's default (inf) is the better choice on this problem."
    return text + " With\n  epsilon = 1e-3 the run does at least as well as with the library's default (inf) here."


def _batch_target(results: Mapping[str, Any], full: str, sam_reach: str, quick: bool, full_steps: int) -> str:
    """Where ``ahn-sa`` with all examples goes, against one example: towards SAM's target (smallest lambda_max,
    larger tr(H)) or not (yet)."""
    batch, lam_min = results["batch_size_effect"], results["lambda_max_min_on_manifold"]
    one, all_ = batch["1"], batch[full]
    lam_one, lam_all = one["lambda_max"]["mean"], all_["lambda_max"]["mean"]
    if abs(lam_all - lam_min) < abs(lam_one - lam_min) and (
        all_["trace_nearest_minimum"]["mean"] > one["trace_nearest_minimum"]["mean"]
    ):
        excess = results["trace_start"] - results["trace_min_on_manifold"]
        stuck = [b for b in batch if batch[b]["trace_decrease_mean"] <= 0.05 * excess]
        escapes = (
            "Every batch size escapes; they differ in where they go."
            if not stuck
            else f"Not every batch size escapes (b = {', '.join(stuck)}: under 5% of the excess removed)."
        )
        as_sam = ", as SAM does" if sam_reach in ("reaches", "approaches") else ""
        return (
            f"and the run heads for the minima of smallest lambda_max{as_sam}: it ends with lambda_max "
            f"{lam_all:.4g} (b = 1: {lam_one:.4g}; smallest over the minima "
            f"{lam_min:.4g}) but tr(H) {all_['trace_nearest_minimum']['mean']:.4g} (b = 1: "
            f"{one['trace_nearest_minimum']['mean']:.4g}). With one example `E[v]` is `rho^2 / 2 grad tr(H)`. "
            f"{escapes}"
        )
    text = (
        "but at this horizon the runs have not yet separated by target (lambda_max "
        f"{lam_all:.4g} with all examples, {lam_one:.4g} with one)"
    )
    if quick:
        return (
            text + f"; this quick run stops at {results['steps']} steps, and whether they separate later is left to "
            f"the full run ({full_steps} steps)."
        )
    return text + "."


def _exact(results: Mapping[str, Any]) -> tuple[str, tuple[str, str]]:
    """Whether ``ahn-sa`` stays put at the exact minimum, and whether it decreased tr(H) in the main problem."""
    exact = results["exact_interpolation_displacement"]
    if exact["ahn-sa"] == 0.0 and exact["GD"] == 0.0:
        stays = "so `ahn-sa` stays put like GD"
    elif exact["ahn-sa"] == 0.0:
        stays = f"so `ahn-sa` stays put (GD moved {exact['GD']:.1e})"
    else:
        stays = f"so `ahn-sa` should stay put like GD, but it moved {exact['ahn-sa']:.1e}"
    works = (
        ("the algorithm works as", "intended")
        if results["trace_nearest_minimum"]["ahn-sa"] < results["trace_start"]
        else ("yet here the algorithm", "did not decrease tr(H)")
    )
    return stays, works


def commentary(results: Mapping[str, Any], batch_table: str, *, quick: bool, full_steps: int) -> str:
    """The report's markdown after the table: the method, then one paragraph per row with the claims chosen from
    ``results`` (``results.json``'s numbers); ``quick`` says the runs stopped at the quick horizon, ``full_steps``
    is the full run's."""
    r = results
    d, start, tmin, steps = r["problem"]["d"], r["trace_start"], r["trace_min_on_manifold"], r["steps"]
    near, lam, loss_max = r["trace_nearest_minimum"], r["lambda_max_final"], r["loss_max_along_run"]
    rs8, eps = "ahn-rs, eta' x 8", "ahn-sa, epsilon 1e-3"
    error = r["hessian_trace_vs_closed_form_max_error"]
    agree = "it matches the closed form to" if error < 1e-10 else "it differs from the closed form by up to"
    gd_still = r["gd_displacement"] < STILL
    gd = "GD does not move" if gd_still else "GD moves"
    why = "the gradient at the start is float64 rounding" + ("" if gd_still else ", so it should not")

    batch = r["batch_size_effect"]
    best = max(batch, key=lambda b: batch[b]["trace_decrease_mean"])
    full = list(batch)[-1]
    decreases = ", ".join(f"b = {b}: {batch[b]['trace_decrease_mean']:.3g}" for b in batch)
    exact = r["exact_interpolation_displacement"]
    sa_runs = r["runs"]["ahn-sa"]
    peaks = ", ".join(f"{step:.0f}" for step in sa_runs["loss_max_step"]["per_seed"])
    first_kick = (
        f"The largest loss at any step is {loss_max['ahn-sa']:.1e} (at steps {peaks}), {r['loss_final']['ahn-sa']:.1e}"
        " at the end: the kick of a step is, to first order, `+-eta' rho ||grad p_i|| grad p_i`, across the valley "
        "and largest while the minimum is sharp."
    )
    lam_min = r["lambda_max_min_on_manifold"]
    sam = r["runs"]["SAM"]
    scale = sam["scale_nearest_minimum"]["mean"]
    sam_leaves, sam_reach, sam_target, sam_loss = _sam(r)
    kicks = _kicks(r, rs8)
    where = _batch_target(r, full, sam_reach, quick, full_steps)
    stays, (works, works_end) = _exact(r)
    return f"""
Every row starts at the same sharp global minimum (tr(H) = {start:.4g}, tr(H)/d = {start / d:.3g}, lambda_max =
{r["lambda_max_start"]:.4g}) and takes {steps} steps at lr = {r["settings"]["lr"]} on the whole data set; the random
algorithms once per seed. tr(H) is the trace of the dense float64 Hessian ({agree}
{error:.0e}); "nearest minimum" is where minimum-norm Gauss-Newton steps on
`W1^T w2 = beta` land from the last iterate, i.e. how far along the minima set the run got (the paper finishes
Algorithm 2 with plain GD for the same purpose); the distance is the last iterate's to the sphere of flattest
minima; "perturbed steps" is the fraction of steps that took the ascent (the others were plain gradient steps,
by the epsilon switch).

- **{gd}**: relative change of tr(H) {r["gd_relative_trace_change"]:.1e}, displacement
  {r["gd_displacement"]:.1e} ({why}).
- **ahn-sa (Algorithm 2)** {_removes(r, "ahn-sa")} of the excess tr(H) - tr(H)_min: its nearest minimum has
  tr(H) = {near["ahn-sa"]:.4g} against the closed-form minimum {tmin:.4g}, at distance
  {r["distance_to_flattest"]["ahn-sa"]:.3g} from the flattest minima (start: {r["distance_start"]:.3g}). {first_kick}
- **ahn-rs (Algorithm 1)** at the same rho and eta' {_removes(r, "ahn-rs")}: at a minimum the part of `E[v]`
  along the minima is `rho^2 / (2d) grad tr(H)` for Algorithm 1 and `rho^2 / 2 grad tr(H)` for Algorithm 2, d = {d}
  times larger (both exact here, for any rho: the loss is a quartic polynomial, the network bilinear). {kicks}
- **SAM** {sam_leaves}, and its lambda_max {sam_reach} the smallest lambda_max over the minima
  ({lam["SAM"]:.4g} against the closed form {lam_min:.4g}), {sam_target}
  minimum in trace. SAM's nearest minimum has `||w2|| = {scale:.3g}` (the scale of
  smallest lambda_max is {r["lambda_max_min_scale"]:.3g}, the flattest `a* = {r["flattest_scale"]:.3g}`) and keeps
  `tr(R Sigma R^T) = {sam["trace_off_balance_nearest_minimum"]["mean"]:.3g}` of the {r["trace_off_balance_start"]:.3g}
  it started with (`ahn-sa`: {sa_runs["trace_off_balance_nearest_minimum"]["mean"]:.2g}), the part that does not set
  lambda_max: tr(H) = {near["SAM"]:.4g}, against {r["trace_at_lambda_max_min"]:.4g} at the minimum of smallest
  lambda_max with `R = 0` and {tmin:.4g} at the flattest. {sam_loss}
{_epsilon(r, eps)}

**Batch size** (`ahn-sa` with both extra passes on b examples drawn without replacement, the projection against
the full gradient, b = 1 being Algorithm 2 itself; same settings and steps):

{batch_table}

Decrease of tr(H) (start minus nearest minimum, mean over seeds): {decreases}; batch {best} decreases it most.
With all {full} examples the ascent follows the full gradient, which near a minimum points along the top of the
Hessian, {where}

**An exact minimum.** From a minimum where every residual is exactly 0 in float64 (small integer data and a
dyadic factorisation, 100 steps), the displacements are: GD {exact["GD"]:.1e}, SAM {exact["SAM"]:.1e}, ahn-sa
{exact["ahn-sa"]:.1e}, ahn-rs {exact["ahn-rs"]:.1e}. Algorithm 2's ascent `grad f_i / ||grad f_i||` is undefined
where `grad f_i = 0`, and `DualNorm` maps it to 0, {stays}. In the main problem the
residuals are rounding (~1e-16) and `grad f_i = r_i grad p_i`, so the normalised direction is exactly
`+-grad p_i / ||grad p_i||` and the random sign makes the residual's sign irrelevant: {works}
{works_end}. Perturbing along `grad p_i / ||grad p_i||` (the output's gradient) would also move from an exact minimum
(a prediction: that variant is not run here).
"""
