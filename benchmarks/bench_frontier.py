"""The quality-cost frontier: SGD and the SAM family, clean test accuracy against cost, on two workloads.

``python3 benchmarks/bench_frontier.py --output benchmarks/results-frontier-cpu.md --figure
docs/frontier-cpu.png`` (17 min on 2 idle CPU cores; ``--quick`` is a smoke run of 1-epoch trainings,
``--variants`` and ``--workloads`` run a subset).

Workloads, both 20 epochs of batch 32, SGD with momentum 0.9 and weight decay 5e-4, cosine learning rate, the
embedded digits (1,797 8x8 images; 360 for the test, 15 % of the rest held out for validation):

* **noisy-mlp**: the MLP (one hidden layer of 128), 40 % of the training labels flipped at random (symmetric noise),
  the validation labels noisy too (a user with noisy data has no clean labels to tune on), no augmentation;
* **cnn-bn**: the small CNN with BatchNorm (``small_cnn_bn``), clean labels, random crop and flip.

Rows: SGD and every variant of the SAM family (ASAM and USAM aside: SAM's geometry at SAM's cost), LookSAM in its
global and per-tensor forms, m-SAM with m = 8.

Protocol (``flatminima.experiments.protocol``): SGD's learning rate is chosen from a grid of 3 by the final
validation accuracy, averaged over the selection seeds 100 and 101; every other optimiser trains at that learning
rate and gets its main hyperparameter chosen the same way from a grid of the same size (rho for the SAM family,
lambda for SAF and MESA), its other options at their papers' defaults (those that set the cost included: m-SAM's
m, LookSAM's k, periodic SAM's k, random SAM's p, ESAM's beta and gamma; n-SAM's ascent sample is 4 batches,
not its default 512 examples, which would be 17 passes per step here). The chosen settings are retrained on
seeds 0, 1, 2 and scored on the clean test labels: mean and 95 % Student-t interval of the final test accuracy.

Cost, measured on those final runs. The final runs of a workload run in one process with one thread, the
variants interleaved (seed by seed, their order reversed every other seed), the two workloads' processes side by
side on the two cores. *Time per epoch*: the median over a run's epochs of its history's ``seconds`` minus
``eval_seconds`` (the steps and the loop's batch work, without the test evaluation); relative to SGD, the median
over seeds of the ratio to the same seed's SGD run. *Passes per step*: a forward pre-hook on the model counts,
within each training step, the examples of the forward passes with gradient (forward-backward passes) and without
(forward-only: ESAM's selection, RW-SAM's scoring, MESA's averaged model), in batches, averaged over the run's
steps. *Peak memory*: in a short run of its own per variant (after a warm-up run in the same process, so that
one-time allocations of the libraries are not counted), the heap in use (glibc ``mallinfo2``: allocated chunks plus
mmapped ones) sampled after every tensor operation of ten training steps (the 4th to the 13th: some that ascend,
for the variants that ascend on some steps only), minus the heap in use before the run
began: the data, the model, the optimiser's state, the variant's buffers and the step's activations; relative to
SGD's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import Report, command_line, local_timestamp, machine
from torch.utils._python_dispatch import TorchDispatchMode

from flatminima.experiments.protocol import SEEDS, SELECTION_SEEDS, Grid, Interval, choose, equal_sizes, interval
from flatminima.train import TrainConfig, loop, train
from flatminima.worker_pool import worker_pool

COMMON: dict[str, Any] = dict(
    dataset="digits", epochs=20, batch_size=32, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine",
    validation_fraction=0.15, threads=1, progress=False, device="cpu",
)  # fmt: skip
WORKLOADS: dict[str, dict[str, Any]] = {
    "noisy-mlp": dict(model="mlp", label_noise=0.4, validation_labels="noisy"),
    "cnn-bn": dict(model="small_cnn_bn", augment=True),
}
TITLES = {
    "noisy-mlp": "digits MLP, 40 % label noise",
    "cnn-bn": "SmallCNN with BatchNorm, digits with augmentation",
}
LR_GRID = (0.0125, 0.025, 0.05)  # 0.1 trains the BatchNorm CNN on some seeds and leaves it at chance on others
RHO_GRID = (0.05, 0.1, 0.2)
GAP_GOAL = 1.1  # the bound on time per epoch, relative to SGD


@dataclass(frozen=True)
class Variant:
    """One row: a registered optimiser, the setting tuned (a TrainConfig field) and its grid, fixed options."""

    label: str
    optimizer: str
    knob: str = "rho"
    grid: tuple[float, ...] = RHO_GRID
    fixed: dict[str, Any] = field(default_factory=dict)


VARIANTS = (
    Variant("SGD", "sgd", "lr", LR_GRID),
    Variant("SAM", "sam"),
    Variant("m-SAM (m = 8)", "sam", fixed={"group_size": 8}),
    Variant("n-SAM (n = 4B)", "nsam", fixed={"nsam_sample_size": 128}),  # the default 512 would be 17 passes
    Variant("RW-SAM", "rwsam"),
    Variant("Ahn RS", "ahn-rs"),
    Variant("Ahn SA", "ahn-sa"),
    Variant("GSAM", "gsam"),
    Variant("LookSAM", "looksam"),
    Variant("LookSAM per tensor", "looksam", fixed={"looksam_per_tensor": True}),
    Variant("Momentum-SAM", "momentum-sam", grid=(1.0, 2.0, 3.0)),  # its rho is a step along the momentum: ~1-3
    Variant("Friendly SAM", "friendly-sam"),
    Variant("periodic SAM (k = 2)", "periodic-sam"),
    Variant("random SAM (p = 0.5)", "random-sam"),
    Variant("ESAM", "esam"),
    Variant("AE-SAM", "aesam"),
    Variant("SAF", "saf", "saf_lambda", (0.1, 0.3, 1.0)),
    # the EMA's decay: a horizon of 100 steps, about SAF's lag of 3 epochs here (38 steps per epoch); the paper's
    # 0.9998 (5,000 steps, for ImageNet) would hardly move from the initial weights in these runs' 760 steps
    Variant("MESA", "mesa", "mesa_lambda", (0.3, 0.8, 2.0), {"mesa_decay": 0.99}),
    Variant("WSAM", "wsam"),  # gamma 0.9 (the peer's and the authors' README default), decoupled
    # bSAM is its own Adam-like optimiser: its step is lr g_m / s, so SGD's lr does not carry over; its lr is the
    # setting tuned, at the authors' rho 0.01 and beta2 0.99 (0.999 leaves s decaying from s_0 in 760 steps)
    Variant("bSAM", "bsam", "lr", (0.05, 0.1, 0.2), {"rho": 0.01, "bsam_beta2": 0.99}),
)
SGD_LABEL = "SGD"
SAM_LABEL = "SAM"


def grid_of(variant: Variant) -> Grid:
    return Grid(variant.label, tuple({variant.knob: value} for value in variant.grid))


# ---------------------------------------------------------------------------------------------- measuring a run


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _mallinfo() -> Any:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def heap_in_use(_info: list[Any] = []) -> int:  # noqa: B006 (a cache of the libc function)
    """Bytes the C heap holds for the program now: allocated chunks plus mmapped ones (glibc ``mallinfo2``)."""
    if not _info:
        _info.append(_mallinfo())
    info = _info[0]()
    return int(info.uordblks + info.hblkhd)


class PeakHeap(TorchDispatchMode):
    """Samples :func:`heap_in_use` after every tensor operation run under it; ``peak`` is the largest."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


class SampledEnough(Exception):
    """Raised by a probed step once the sampled steps are done: the rest of the run is not needed."""


class StepProbe:
    """Installed in the training loop (:func:`probed`): counts, within each training step, the examples of the
    model's forward passes with and without gradient. With ``sample_epoch``, samples the heap during the first
    ``sample_steps`` steps of that epoch (0-based) and ends the run after them (:class:`SampledEnough`)."""

    def __init__(self, sample_epoch: int | None = None, sample_steps: int = 0) -> None:
        self.steps = 0
        self.with_grad = 0
        self.without_grad = 0
        self.batch = 1
        self.sample_epoch, self.sample_steps = sample_epoch, sample_steps
        self.sampled = range(0)  # the 1-based steps whose heap is sampled, set when the run is known
        self.peak = 0
        self.sampled_with_grad = 0  # examples of the passes with gradient in the sampled steps
        self.entry_heap = 0  # the heap in use as the first sampled step began
        self._inside = False

    def attach(self, run: Any) -> None:
        self.batch = run.config.batch_size
        if self.sample_epoch is not None:
            first = self.sample_epoch * run.per_epoch + 1
            self.sampled = range(first, first + self.sample_steps)
        run.model.register_forward_pre_hook(self._count)
        step = run.step

        def probed_step(*args: Any, **kwargs: Any) -> Any:
            if self.steps >= self.sampled.stop - 1 and self.sampled:
                raise SampledEnough
            self.steps += 1
            sampling = self.steps in self.sampled
            before = self.with_grad
            if sampling and self.steps == self.sampled.start:
                self.entry_heap = heap_in_use()
            self._inside = True
            try:
                with PeakHeap() if sampling else contextlib.nullcontext() as peak:
                    return step(*args, **kwargs)
            finally:
                self._inside = False
                if sampling:
                    self.peak = max(self.peak, peak.peak)
                    self.sampled_with_grad += self.with_grad - before

        run.step = probed_step

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._inside and args and isinstance(args[0], torch.Tensor):
            if torch.is_grad_enabled():
                self.with_grad += args[0].shape[0]
            else:
                self.without_grad += args[0].shape[0]

    def passes(self) -> tuple[float, float]:
        """Forward-backward and forward-only passes per step, in batches."""
        steps = max(self.steps, 1) * self.batch
        return self.with_grad / steps, self.without_grad / steps


@contextlib.contextmanager
def probed(probe: StepProbe) -> Iterator[StepProbe]:
    """Within the block, every run that :func:`flatminima.train.train` builds is watched by ``probe``."""
    original = loop._setup

    def setup(*args: Any, **kwargs: Any) -> Any:
        run = original(*args, **kwargs)
        probe.attach(run)
        return run

    loop._setup = setup
    try:
        yield probe
    finally:
        loop._setup = original


def config_of(
    workload: str, variant: Variant, setting: dict[str, Any], seed: int, epochs: int, lr: float
) -> TrainConfig:
    fields = {**COMMON, **WORKLOADS[workload], "epochs": epochs, "seed": seed}
    if not math.isnan(lr):  # SGD's own selection gives the lr in its setting
        fields["lr"] = lr
    fields.update(optimizer=variant.optimizer, **variant.fixed, **setting)
    return TrainConfig(**fields)


def run_one(config: TrainConfig) -> dict[str, Any]:
    """Train ``config`` in a scratch folder; its final validation and test accuracy, time and passes."""
    with tempfile.TemporaryDirectory() as folder, probed(StepProbe()) as probe:
        config = loop.replace(config, output=folder)
        history = train(config).history
    times = [record["seconds"] - record["eval_seconds"] for record in history]
    with_grad, without_grad = probe.passes()
    return {
        "val": history[-1].get("val_accuracy", math.nan),
        "test": history[-1]["test_accuracy"],
        "epoch_seconds": statistics.median(times),
        "passes": with_grad,
        "forward_only": without_grad,
    }


def run_series(configs: list[TrainConfig]) -> list[dict[str, Any]]:
    """:func:`run_one` of each, in order, in this process (the interleaved timing)."""
    torch.set_num_threads(1)
    return [run_one(config) for config in configs]


MEMORY_EPOCH = 6  # SAF's and MESA's term is on from the 7th epoch (start epoch 5, counted from 0)
MEMORY_STEPS = 20


def peak_memory(configs: list[TrainConfig]) -> list[tuple[int, float]]:
    """For each config (the final runs' settings), bytes of the heap's peak during the first 20 steps of its 7th
    epoch above the heap before the run (after a 1-epoch warm-up run), and the passes with gradient per step in
    those steps (more than 1: some of them ascended)."""
    torch.set_num_threads(1)
    peaks = []
    for config in configs:
        run_one(loop.replace(config, epochs=1))  # warm-up: the libraries' one-time allocations
        gc.collect()
        probe = StepProbe(sample_epoch=min(MEMORY_EPOCH, config.epochs - 1), sample_steps=MEMORY_STEPS)
        with tempfile.TemporaryDirectory() as folder, probed(probe), contextlib.suppress(SampledEnough):
            before = heap_in_use()
            train(loop.replace(config, output=folder))
        peaks.append((probe.peak - before, probe.sampled_with_grad / (MEMORY_STEPS * probe.batch)))
        gc.collect()
    return peaks


# ---------------------------------------------------------------------------------------------- the protocol


@dataclass
class Row:
    variant: Variant
    setting: dict[str, Any]
    accuracy: Any  # protocol.Interval, in %
    time_ratio: float
    passes: float
    forward_only: float
    memory_ratio: float = math.nan
    memory_extra: float = math.nan  # bytes above SGD's peak
    frontier: bool = False
    memory_passes: float = math.nan  # passes with gradient per step in the steps whose heap was sampled


def pareto(rows: list[Row]) -> None:
    """Mark the rows no other row beats in both cost (time) and accuracy (mean)."""
    for row in rows:
        row.frontier = not any(
            other.time_ratio <= row.time_ratio
            and other.accuracy.mean >= row.accuracy.mean
            and (other.time_ratio < row.time_ratio or other.accuracy.mean > row.accuracy.mean)
            for other in rows
        )


def benchmark(args: argparse.Namespace) -> dict[str, list[Row]]:
    variants = [v for v in VARIANTS if v.label == SGD_LABEL or v.optimizer in args.variants or v.label in args.variants]
    equal_sizes(*(grid_of(v) for v in variants))
    epochs, selection, seeds = (1, SELECTION_SEEDS[:1], SEEDS[:2]) if args.quick else (20, SELECTION_SEEDS, SEEDS)
    workloads = args.workloads
    with worker_pool(args.workers) as pool:

        def submit_selection(workload: str, variant: Variant, lr: float) -> list[list[Any]]:
            """One job per (setting, selection seed) of the variant's grid."""
            return [
                [
                    pool.submit(run_series, [config_of(workload, variant, setting, seed, epochs, lr)])
                    for seed in selection
                ]
                for setting in grid_of(variant).settings
            ]

        def chosen_setting(variant: Variant, jobs: list[list[Any]]) -> dict[str, Any]:
            scores = [statistics.mean(job.result()[0]["val"] for job in setting) for setting in jobs]
            return choose(grid_of(variant), scores)

        sgd = variants[0]
        sgd_jobs = {w: submit_selection(w, sgd, math.nan) for w in workloads}  # lr comes from the setting
        lrs = {w: chosen_setting(sgd, sgd_jobs[w])["lr"] for w in workloads}
        jobs = {(w, v.label): submit_selection(w, v, lrs[w]) for w in workloads for v in variants[1:]}
        chosen = {(w, v.label): chosen_setting(v, jobs[w, v.label]) for w in workloads for v in variants[1:]}
        chosen.update({(w, sgd.label): {"lr": lrs[w]} for w in workloads})

        finals: dict[str, Any] = {}
        for w in workloads:  # one process per workload: its variants interleaved, seed by seed
            order = [(v, seed) for i, seed in enumerate(seeds) for v in (variants if i % 2 == 0 else variants[::-1])]
            configs = [config_of(w, v, chosen[w, v.label], seed, epochs, lrs[w]) for v, seed in order]
            finals[w] = (order, pool.submit(run_series, configs))
        memory = {
            w: pool.submit(peak_memory, [config_of(w, v, chosen[w, v.label], 0, epochs, lrs[w]) for v in variants])
            for w in workloads
        }
        tables: dict[str, list[Row]] = {}
        for w in workloads:
            order, job = finals[w]
            runs: dict[str, dict[int, dict[str, Any]]] = {}
            for (variant, seed), result in zip(order, job.result(), strict=True):
                runs.setdefault(variant.label, {})[seed] = result
            measured = memory[w].result()
            peaks = [peak for peak, _ in measured]
            sgd_runs = runs[SGD_LABEL]
            rows = []
            for variant, (peak, sampled_passes) in zip(variants, measured, strict=True):
                own = runs[variant.label]
                rows.append(
                    Row(
                        variant,
                        chosen[w, variant.label],
                        interval([100 * own[s]["test"] for s in seeds]),
                        statistics.median(own[s]["epoch_seconds"] / sgd_runs[s]["epoch_seconds"] for s in seeds),
                        statistics.mean(own[s]["passes"] for s in seeds),
                        statistics.mean(own[s]["forward_only"] for s in seeds),
                        peak / peaks[0],
                        peak - peaks[0],
                        memory_passes=sampled_passes,
                    )
                )
            pareto(rows)
            tables[w] = rows
    return tables


# ---------------------------------------------------------------------------------------------- the report


def goal(rows: list[Row]) -> tuple[list[Row], Row | None]:
    """Rows within SAM's interval (mean at or above its lower end) at no more than GAP_GOAL x SGD's time per epoch,
    and the most accurate row within the time bound."""
    sam = next((row for row in rows if row.variant.label == SAM_LABEL), None)
    cheap = [row for row in rows if row.time_ratio <= GAP_GOAL and row.variant.label != SGD_LABEL]
    best = max(cheap, key=lambda row: row.accuracy.mean, default=None)
    if sam is None:
        return [], best
    return [row for row in cheap if row.accuracy.mean >= sam.accuracy.low], best


def setting_text(setting: dict[str, Any]) -> str:
    return ", ".join(f"{name.split('_')[-1]} {value:g}" for name, value in setting.items())


def report(tables: dict[str, list[Row]], args: argparse.Namespace) -> str:
    out = Report()
    out(f"# The quality-cost frontier ({local_timestamp()})")
    out()
    out(f"`{command_line()}`")
    out()
    machine(out, torch.device("cpu"), extra=[["threads of each training", f"1 (in {args.workers} worker processes)"]])
    for workload, rows in tables.items():
        out(f"## {TITLES[workload]} (`{workload}`)")
        out()
        table = [
            (
                ("**" if row.frontier else "") + row.variant.label + ("**" if row.frontier else ""),
                setting_text(row.setting),
                f"{row.accuracy.mean:.2f} [{max(row.accuracy.low, 0):.2f}, {min(row.accuracy.high, 100):.2f}]",
                f"{row.time_ratio:.2f}",
                f"{row.passes:.2f}" + (f" + {row.forward_only:.2f} fwd" if row.forward_only > 0.005 else ""),
                f"{row.memory_ratio:.2f} ({row.memory_extra / 1024:+.0f} KiB)"
                + (
                    f" [{row.memory_passes:.2f}]"
                    if row.passes > 1 and 1.0 < row.memory_passes < row.passes - 0.3
                    else ""
                ),
            )
            for row in sorted(rows, key=lambda row: row.time_ratio)
        ]
        out.table(
            "Sorted by time per epoch. **Bold**: on the Pareto frontier (no other row is at least as cheap and as "
            "accurate, and better in one). Accuracy intervals are clipped to [0, 100]. Peak memory: sampled in 20 "
            "steps of the 7th epoch (passes per step in them in brackets where some steps took one pass only).",
            [
                "optimiser",
                "chosen",
                "clean test acc % [95 %]",
                "time / epoch vs SGD",
                "passes / step",
                "peak memory vs SGD",
            ],
            table,
        )
        sam = next((row for row in rows if row.variant.label == SAM_LABEL), None)
        if sam is not None and rows[0].variant.label == SGD_LABEL and rows[0].accuracy.mean >= sam.accuracy.low:
            out(
                "SGD's mean is inside SAM's interval here: this workload does not tell SAM from SGD, so being within "
                "SAM's interval says little."
            )
            out()
        within, best = goal(rows)
        names = ", ".join(f"{row.variant.label} ({row.time_ratio:.2f}x)" for row in within) or "none"
        out(f"Within SAM's interval at no more than {GAP_GOAL}x SGD's time per epoch: {names}.")
        if best is not None:
            out(f"Most accurate at no more than {GAP_GOAL}x: {best.variant.label}, {best.accuracy.mean:.2f} %.")
        out()
    if len(tables) > 1:
        met = set.intersection(*({row.variant.label for row in goal(rows)[0]} for rows in tables.values()))
        names = ", ".join(sorted(met)) or "none"
        out(f"**The goal on every workload** (within SAM's interval at <= {GAP_GOAL}x SGD's time): {names}.")
        out()
    return "\n".join(out.lines) + "\n"


def figure(tables: dict[str, list[Row]], path: Path) -> None:
    """Accuracy against time per epoch, one panel per workload. The vertical range is SGD's and SAM's intervals and
    every row above them; a row below it (a run left at chance) is a triangle on the lower edge with its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5.6), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], tables.items(), strict=True):
        sam = next((row for row in rows if row.variant.label == SAM_LABEL), None)
        anchors = [row.accuracy for row in rows if row.variant.label in (SGD_LABEL, SAM_LABEL)]
        floor = max(0.0, min(min(a.low, a.mean - 1) for a in anchors) - 1)
        top = min(100.0, max(max(row.accuracy.mean for row in rows) + 1, *(min(a.high, 100) for a in anchors)) + 0.5)
        if sam is not None and math.isfinite(sam.accuracy.low):
            ax.axhspan(sam.accuracy.low, sam.accuracy.high, color="tab:orange", alpha=0.15, label="SAM's 95 % interval")
        ax.axvline(GAP_GOAL, color="grey", linestyle=":", label=f"{GAP_GOAL}x SGD")
        for row in rows:
            colour = "tab:blue" if row.frontier else "0.45"
            if row.accuracy.mean < floor:
                ax.plot(row.time_ratio, floor, "v", color="tab:red", markersize=6, clip_on=False)
                ax.annotate(f"{row.variant.label} ({row.accuracy.mean:.0f} %)", (row.time_ratio, floor), fontsize=7,
                            xytext=(4, 4), textcoords="offset points", color="tab:red")  # fmt: skip
                continue
            low, high = row.accuracy.mean - row.accuracy.low, row.accuracy.high - row.accuracy.mean
            error = [[low], [high]] if math.isfinite(low) else None
            ax.errorbar(row.time_ratio, row.accuracy.mean, yerr=error, fmt="o", color=colour, capsize=2, markersize=4,
                        alpha=0.8, elinewidth=0.8)  # fmt: skip
            ax.annotate(row.variant.label, (row.time_ratio, row.accuracy.mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color=colour)  # fmt: skip
        front = sorted((row for row in rows if row.frontier), key=lambda row: row.time_ratio)
        ax.step([r.time_ratio for r in front], [r.accuracy.mean for r in front], where="post", color="tab:blue",
                label="Pareto frontier")  # fmt: skip
        ax.set_ylim(floor, top)
        ax.set_xlabel("wall time per epoch / SGD's (1 thread, interleaved runs)")
        ax.set_ylabel("clean test accuracy % (mean and 95 % interval, 3 seeds)")
        ax.set_title(TITLES[workload])
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rows_from_json(path: Path) -> dict[str, list[Row]]:
    """The tables a run wrote with ``--json`` (to draw the figure again with ``--replot``)."""
    tables = {}
    for workload, rows in json.loads(path.read_text()).items():
        tables[workload] = [
            Row(
                Variant(row["optimiser"], row["registered_name"], fixed=row["fixed"]),
                row["chosen"],
                Interval(row["accuracy_mean"], row["accuracy_low"], row["accuracy_high"], row.get("seeds", 3)),
                row["time_ratio"],
                row["passes"],
                row["forward_only"],
                row["memory_ratio"],
                frontier=row["frontier"],
            )
            for row in rows
        ]
    return tables


def as_json(tables: dict[str, list[Row]]) -> dict[str, Any]:
    return {
        workload: [
            {
                "optimiser": row.variant.label,
                "registered_name": row.variant.optimizer,
                "fixed": row.variant.fixed,
                "chosen": row.setting,
                "accuracy_mean": row.accuracy.mean,
                "accuracy_low": row.accuracy.low,
                "accuracy_high": row.accuracy.high,
                "time_ratio": row.time_ratio,
                "passes": row.passes,
                "forward_only": row.forward_only,
                "memory_ratio": row.memory_ratio,
                "frontier": row.frontier,
            }
            for row in rows
        ]
        for workload, rows in tables.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-epoch trainings, one selection seed, two seeds")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v.optimizer for v in VARIANTS],
        help="registered names or row labels (SGD always runs: the others train at its lr)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2: one per core)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    parser.add_argument("--figure", type=Path, help="write the frontier figure (PNG) here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--replot", type=Path, help="only draw --figure again from a JSON a run wrote")
    args = parser.parse_args()
    if args.replot is not None:
        figure(rows_from_json(args.replot), args.figure)
        return
    tables = benchmark(args)
    text = report(tables, args)
    if args.output is not None:
        args.output.write_text(text)
    if args.figure is not None:
        figure(tables, args.figure)
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(tables), indent=1) + "\n")


if __name__ == "__main__":
    main()
