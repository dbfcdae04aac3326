"""The claims and their verdicts, each computed from the reported seeds by a rule fixed before the run.

Where SGD "overfits harmfully" is decided on the held-out seeds (``sgd_harmful``), not on the reported ones: cells
picked for SGD's bad luck on the reported seeds would favour SAM there by regression to the mean alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flatminima.experiments.cnn_data_model.compute import CnnDataModelResult
from flatminima.experiments.cnn_data_model.problem import STEPS
from flatminima.experiments.cnn_data_model.regions import (
    BENIGN_MARGIN,
    NEVER_FITS_BELOW,
    OVERFITS_FROM,
    Arm,
    Decided,
    Fit,
    fit_class,
)
from flatminima.experiments.cnn_data_model.selection import SGD_CHECKPOINTS
from flatminima.experiments.protocol import (
    Budget,
    Claim,
    Interval,
    Verdict,
    interval,
    paired_difference,
    verdict,
)

__all__ = ["FitRow", "budget_name", "claims", "fit_row", "region_verdict"]


def budget_name(budget: Budget) -> str:
    """The budget in words, with SGD's steps."""
    if budget is Budget.EQUAL_EPOCHS:
        return f"equal steps, {STEPS} each"
    return f"equal gradient evaluations, SGD {SGD_CHECKPOINTS[budget]} steps"


@dataclass(frozen=True)
class FitRow:
    """One arm's fit of the flipped labels where it is benign: pooled over seeds (``fraction``), its interval over
    the seeds that had a flipped label there (``band``, None with fewer than two), and its ``Fit``."""

    fraction: float
    band: Interval | None
    fit: Fit


def fit_row(arm: Arm) -> FitRow:
    """How ``arm`` treats the flipped labels in its benign cells (``fit_class`` of the pooled fraction)."""
    values = [v for v in arm.fitted_per_seed(arm.benign_list()) if not math.isnan(v)]
    fraction = arm.fitted_where_benign()
    return FitRow(fraction, interval(values) if len(values) >= 2 else None, fit_class(fraction))


def region_verdict(sam: Arm, sgd: Arm) -> tuple[Verdict, str]:
    """Whether SAM's benign region is larger than SGD's, counting the cells each one's 95 % interval decides:
    SUPPORTS when SAM's decided-benign cells outnumber SGD's decided-benign and undecided ones together (SAM's
    region is larger even if every undecided cell of SGD's were benign), CONTRADICTS when the reverse holds,
    INCONCLUSIVE otherwise; and the counts, in words."""
    counts = {}
    for name, arm in (("SAM", sam), ("SGD", sgd)):
        counts[name] = (arm.decided_count(Decided.BENIGN), arm.decided_count(Decided.UNDECIDED))
    (sam_low, sam_open), (sgd_low, sgd_open) = counts["SAM"], counts["SGD"]
    if sam_low > sgd_low + sgd_open:
        found = Verdict.SUPPORTS
    elif sgd_low > sam_low + sam_open:
        found = Verdict.CONTRADICTS
    else:
        found = Verdict.INCONCLUSIVE
    cells = len(sam.cells())
    measured = (
        f"benign by interval SAM {sam_low}/{cells} ({sam_open} undecided), SGD {sgd_low}/{cells} ({sgd_open} "
        f"undecided); by the mean SAM {sam.benign_count}, SGD {sgd.benign_count}"
    )
    return found, measured


def _difference_claim(statement: str, sam: Arm, sgd: Arm, key: str, cells: list[tuple[int, int]], what: str) -> Claim:
    """A paired-difference claim (SAM minus SGD below zero, the paper's direction) over ``cells``."""
    rule = (
        f"SUPPORTS when the 95 % interval of SAM - SGD ({what}, mean over the cells where SGD's mean clean test "
        f"error on the held-out seeds is above {BENIGN_MARGIN:g}, paired by seed) lies below 0, CONTRADICTS when "
        "above, else INCONCLUSIVE"
    )
    if not cells:
        return Claim(statement, "no cell where SGD is harmful on the held-out seeds", rule, Verdict.INCONCLUSIVE)
    sam_values, sgd_values = sam.per_seed(key, cells), sgd.per_seed(key, cells)
    difference = paired_difference(sam_values, sgd_values)
    measured = (
        f"SAM - SGD {difference} over {len(cells)} cells, {difference.n} seeds (SAM {interval(sam_values)}, "
        f"SGD {interval(sgd_values)})"
    )
    return Claim(statement, measured, rule, verdict(difference, paper_says_positive=False))


def claims(result: CnnDataModelResult) -> list[Claim]:
    """The paper's claims, SAM at the chosen radius against SGD at its chosen learning rate, per budget."""
    sam, selection = result.chosen, result.selection
    out = []
    for budget in (Budget.EQUAL_EPOCHS, Budget.EQUAL_EVALUATIONS):
        sgd, cells = result.sgd[budget], selection.sgd_harmful[budget]
        out.append(
            _difference_claim(
                f"SAM's clean test error is below SGD's where SGD overfits harmfully ({budget_name(budget)})",
                sam,
                sgd,
                "test_error",
                cells,
                "clean test error",
            )
        )
        found, measured = region_verdict(sam, sgd)
        out.append(
            Claim(
                f"SAM's benign region is larger than SGD's ({budget_name(budget)})",
                measured,
                f"a cell is benign (harmful) when its 95 % interval of the clean test error lies at or below (above) "
                f"{BENIGN_MARGIN:g}; SUPPORTS when SAM's benign cells outnumber SGD's benign and undecided ones "
                "together, CONTRADICTS when the reverse holds, else INCONCLUSIVE",
                found,
            )
        )
    budget = Budget.EQUAL_EPOCHS
    out.append(
        _difference_claim(
            f"SAM memorises less of the noise than SGD where SGD overfits harmfully ({budget_name(budget)})",
            sam,
            result.sgd[budget],
            "noise_memorisation",
            selection.sgd_harmful[budget],
            "noise memorisation mean_i max_r <w_(y_i,r), xi_i>",
        )
    )
    out.append(_overfit_claim(sam))
    return out


def _overfit_claim(sam: Arm) -> Claim:
    """Whether SAM at the chosen radius overfits benignly (fits the flipped labels where it is benign), as the
    paper's SAM theorem has it (training loss to ~0 with near-optimal test error), or generalises without."""
    row = fit_row(sam)
    statement = (
        f"At the chosen rho ({sam.rho:g}) SAM overfits benignly: where it is benign it fits the flipped training "
        "labels, as in the paper's SAM theorem (small training loss, near-optimal test error)"
    )
    rule = (
        f"the fraction of the flipped labels fitted in SAM's benign cells, per seed: SUPPORTS when its 95 % "
        f"interval lies above {OVERFITS_FROM:g}, CONTRADICTS when below, else INCONCLUSIVE; the class: at most "
        f"{NEVER_FITS_BELOW:g} never overfits, at least {OVERFITS_FROM:g} overfits benignly (pooled fraction)"
    )
    if row.band is None:
        return Claim(
            statement, f"{row.fit.value}: too few seeds with a flipped label there", rule, Verdict.INCONCLUSIVE
        )
    shifted = Interval(
        row.band.mean - OVERFITS_FROM, row.band.low - OVERFITS_FROM, row.band.high - OVERFITS_FROM, row.band.n
    )
    measured = (
        f"{row.fit.value}: fits {row.fraction:.3g} of the flipped labels in its {sam.benign_count} benign cells "
        f"(per seed {row.band})"
    )
    return Claim(statement, measured, rule, verdict(shifted, paper_says_positive=True))
