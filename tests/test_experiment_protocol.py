"""The verdict protocol: Student-t intervals (checked against the closed form), paired differences and the rule."""

from __future__ import annotations

import math

import pytest

from flatminima.experiments.protocol import Verdict, interval, paired_difference, verdict


def test_interval_is_students_t() -> None:
    # values 1, 2, 3: mean 2, sample sd 1, half width t / sqrt(3); with 2 degrees of freedom Student's t has the
    # closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so its p-quantile is (2p - 1) sqrt(2 / (1 - (2p - 1)^2))
    def t2(p: float) -> float:
        return (2 * p - 1) * math.sqrt(2 / (1 - (2 * p - 1) ** 2))

    got = interval([1.0, 2.0, 3.0])
    half = t2(0.975) / math.sqrt(3)
    assert got.mean == 2.0 and got.n == 3
    assert got.low == pytest.approx(2.0 - half, rel=1e-12) and got.high == pytest.approx(2.0 + half, rel=1e-12)
    wide = interval([1.0, 2.0, 3.0], level=0.99)
    assert wide.high - wide.mean == pytest.approx(t2(0.995) / math.sqrt(3), rel=1e-12)
    one = interval([5.0])
    assert one.mean == 5.0 and one.low == -math.inf and one.high == math.inf and not one.excludes_zero()
    with pytest.raises(ValueError, match="at least one value"):
        interval([])


def test_paired_difference_cancels_the_seeds_shared_luck() -> None:
    sam = [0.70, 0.80, 0.90]  # each seed's luck moves both optimisers alike
    sgd = [0.60, 0.71, 0.79]
    alone = interval(sam)
    paired = paired_difference(sam, sgd)
    assert not (alone.low - interval(sgd).high > 0)  # the two intervals overlap: separately, nothing is shown
    assert paired.mean == pytest.approx(0.1, abs=1e-15) and paired.excludes_zero() and paired.low > 0
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_verdict_follows_the_interval_and_the_papers_direction() -> None:
    above = paired_difference([0.9, 0.95, 0.92], [0.8, 0.82, 0.83])
    below = paired_difference([0.8, 0.82, 0.83], [0.9, 0.95, 0.92])
    unclear = paired_difference([0.9, 0.8, 0.95], [0.85, 0.9, 0.8])
    assert verdict(above, paper_says_positive=True) is Verdict.SUPPORTS
    assert verdict(above, paper_says_positive=False) is Verdict.CONTRADICTS
    assert verdict(below, paper_says_positive=True) is Verdict.CONTRADICTS
    assert verdict(below, paper_says_positive=False) is Verdict.SUPPORTS
    assert verdict(unclear, paper_says_positive=True) is Verdict.INCONCLUSIVE
    assert str(Verdict.SUPPORTS.value) == "SUPPORTS"


def test_grids_of_different_sizes_are_refused_and_choose_takes_the_best_then_the_first() -> None:
    from flatminima.experiments.protocol import Grid, choose, equal_sizes

    sgd = Grid("sgd", ({"lr": 0.05}, {"lr": 0.1}))
    sam = Grid("sam", ({"rho": 0.05}, {"rho": 0.1}, {"rho": 0.2}))
    with pytest.raises(ValueError, match="same size"):
        equal_sizes(sgd, sam)
    equal_sizes(sgd, Grid("sam", ({"rho": 0.05}, {"rho": 0.1})))
    assert choose(sam, [0.8, 0.9, 0.85]) == {"rho": 0.1}
    assert choose(sam, [0.9, 0.8, 0.9]) == {"rho": 0.05}  # a tie goes to the first (the smallest change)
    assert choose(sam, [math.nan, 0.1, math.nan]) == {"rho": 0.1}  # a diverged run never wins
    with pytest.raises(ValueError, match="3 settings"):
        choose(sam, [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        Grid("sgd", ())


def test_more_seeds_when_the_mean_is_within_two_standard_errors() -> None:
    from flatminima.experiments.protocol import MORE_SEEDS, SEEDS, needs_more_seeds

    assert len(SEEDS) == 3 and len(MORE_SEEDS) == 5 and MORE_SEEDS[: len(SEEDS)] == SEEDS
    # mean 2, sd 1, standard error 1 / sqrt(3) = 0.577: 2 > 2 * 0.577, clear
    assert not needs_more_seeds([1.0, 2.0, 3.0])
    # mean 1, sd 1: 1 < 1.155, too close
    assert needs_more_seeds([0.0, 1.0, 2.0])
    assert not needs_more_seeds([0.0, 1.0, 2.0, 0.5, 0.1])  # five seeds already
    assert not needs_more_seeds([1.0])  # one seed has no spread to judge by


def test_sgd_gets_twice_the_epochs_at_equal_gradient_evaluations() -> None:
    from flatminima.experiments.protocol import Budget, sgd_epochs

    assert sgd_epochs(30, Budget.EQUAL_EPOCHS) == 30 and sgd_epochs(30, Budget.EQUAL_EVALUATIONS) == 60


def test_agreement_with_a_closed_form() -> None:
    from flatminima.experiments.protocol import agreement

    assert agreement(1.0001, 1.0, 1e-3) is Verdict.SUPPORTS
    assert agreement(1.01, 1.0, 1e-3) is Verdict.CONTRADICTS
    assert agreement(math.nan, 1.0, 1e-3) is Verdict.INCONCLUSIVE


def test_a_selection_seed_is_never_reported() -> None:
    from flatminima.experiments.protocol import SELECTION_SEEDS, disjoint_seeds

    disjoint_seeds((0, 1, 2))
    with pytest.raises(ValueError, match=r"seeds \[101\] choose"):
        disjoint_seeds((0, 101), SELECTION_SEEDS)
