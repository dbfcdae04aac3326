"""The frontier benchmark's measuring pieces (benchmarks/bench_frontier.py): the Pareto marking, the goal, and the
probe that counts passes and samples the heap inside the training loop's steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_frontier as frontier  # a script of benchmarks/, made importable above

from flatminima.experiments.protocol import Interval
from flatminima.train import TrainConfig


def _row(label: str, time_ratio: float, mean: float, low: float | None = None) -> frontier.Row:
    low = mean - 1 if low is None else low
    variant = frontier.Variant(label, label.lower())
    return frontier.Row(variant, {}, Interval(mean, low, 2 * mean - low, 3), time_ratio, 1.0, 0.0)


def test_pareto_marks_exactly_the_rows_nothing_beats_in_both() -> None:
    rows = [_row("SGD", 1.0, 80), _row("A", 1.05, 79), _row("B", 1.3, 90), _row("SAM", 2.0, 89), _row("C", 2.0, 90)]
    frontier.pareto(rows)
    assert [row.variant.label for row in rows if row.frontier] == ["SGD", "B"]  # C ties B's accuracy at more cost


def test_goal_is_sam_s_interval_at_the_time_bound() -> None:
    rows = [_row("SGD", 1.0, 80), _row("SAM", 2.0, 90, low=88), _row("A", 1.08, 88.5), _row("B", 1.2, 95)]
    within, best = frontier.goal(rows)
    assert [row.variant.label for row in within] == ["A"]  # B is more accurate but over 1.1x SGD's time
    assert best is not None and best.variant.label == "A"
    rows[2] = _row("A", 1.08, 87.9)
    within, _ = frontier.goal(rows)
    assert within == []


# periodic SAM (k = 2) takes SAM's two passes on the steps 0, 2, ..., 20: 11 of the epoch's 21 steps; ESAM's pass at
# w + e sees half the batch (gamma 0.5) and its selection is one forward pass without gradient
@pytest.mark.parametrize(
    ("optimizer", "passes", "forward_only"),
    [("sgd", 1.0, 0.0), ("sam", 2.0, 0.0), ("periodic-sam", (21 + 11) / 21, 0.0), ("esam", 1.5, 1.0)],
)
def test_the_probe_counts_the_passes_of_each_step(
    tmp_path: Path, optimizer: str, passes: float, forward_only: float
) -> None:
    config = TrainConfig(
        model="mlp", optimizer=optimizer, epochs=1, batch_size=64, threads=1, progress=False, output=str(tmp_path)
    )
    with frontier.probed(frontier.StepProbe()) as probe:
        frontier.train(config)
    assert probe.steps == 1347 // 64  # the loop's steps: the last incomplete batch is dropped
    assert probe.passes() == (pytest.approx(passes), pytest.approx(forward_only))


def test_the_probe_samples_the_heap_in_its_window_and_ends_the_run(tmp_path: Path) -> None:
    config = TrainConfig(model="mlp", optimizer="sam", epochs=3, batch_size=64, progress=False, output=str(tmp_path))
    probe = frontier.StepProbe(sample_epoch=1, sample_steps=3)
    with frontier.probed(probe), pytest.raises(frontier.SampledEnough):
        frontier.train(config)
    assert probe.sampled == range(22, 25) and probe.steps == 24  # epoch 1's first three steps, then no more
    assert probe.sampled_with_grad == 3 * 2 * 64  # SAM: two passes of the batch per sampled step
    # a step allocates its activations and SAM's copy of w: its peak is above the heap as it began (the heap before
    # the run is no bound: what other tests left may be freed meanwhile)
    assert probe.peak > probe.entry_heap > 0


def test_sam_s_peak_heap_exceeds_sgd_s_by_about_its_copy_of_the_weights(tmp_path: Path) -> None:
    """SAM keeps w while at w + e: about one copy of the MLP's 9,610 float32 weights (38 KiB) above SGD's peak, with
    the same data, model, momentum and activations (measured: 30 KiB, the copy of the weights that differ)."""
    configs = [
        TrainConfig(model="mlp", optimizer=name, epochs=7, batch_size=64, progress=False, output=str(tmp_path / name))
        for name in ("sgd", "sam")
    ]
    (sgd, sgd_passes), (sam, sam_passes) = frontier.peak_memory(configs)
    assert 20_000 < sam - sgd < 80_000
    assert (sgd_passes, sam_passes) == (1.0, 2.0)
