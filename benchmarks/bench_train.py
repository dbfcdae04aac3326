"""Benchmark ``flatminima.train.train``: its training throughput against a bare PyTorch loop, SGD and SAM.

Run ``python benchmarks/bench_train.py`` (about 100 s on 2 idle CPU cores) or ``--quick`` (a smoke run, about
20 s); ``--output FILE`` also writes the markdown report to ``FILE``, ``--threads N`` sets torch's CPU threads. When
other processes compete for the cores, multi-threaded ops slow down many-fold and the run takes several times
longer; ``--threads 1`` is steadier there, and the tables' best-epoch columns are the ones to read.

Two workloads: the digits (1347 8x8 training images, 21 steps of 64 per epoch) with small_cnn, and a synthetic
CIFAR-sized set (random uint8 3x32x32 images, a few batches of 128 per epoch) with resnet20. Four cases each:

* bare SGD: images already float, normalised and on the device, sliced into batches; zero_grad + forward +
  backward + SGD step, nothing else.
* bare SAM: the same loop with ``flatminima.SAM`` by hand (forward, backward, first_step, forward, backward,
  second_step), BatchNorm statistics kept from the first pass (``model=``), as in the training loop.
* ``train()`` with optimizer sgd, then sam (same model, seed, batch, lr 0.1, momentum 0.9, wd 5e-4, rho 0.05), with
  ``augment=True`` (random crop + flip), the usual setting.

The time of a ``train()`` epoch is its history's ``seconds`` field minus its ``eval_seconds`` (the time of the
test-set evaluation, which the loop records): ``seconds`` runs from the epoch's start to after
the test-set evaluation, so it includes evaluation but not the checkpoint and metrics written after it. What is
left is the loop's per-batch work (index the uint8 images, convert, normalise, augment, the step, the scheduler,
the loss sum) and the end-of-epoch loss sync. The bare loops are timed per epoch of the same number of steps, on a
fresh model per run like ``train()``. The cases run in interleaved rounds (A B C D, D C B A, ...), after one
warm-up round.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import Report, command_line, load_average, local_timestamp, machine, med, sync
from torch import Tensor

import flatminima
from flatminima.data import ImageDataset, channel_mean_std, load_digits, normalize, to_float
from flatminima.models import build_model
from flatminima.running_stats import AveragedRunningStats, norm_layers
from flatminima.train import BatchPipeline, TrainConfig, train
from flatminima.train.builders import build_scheduler

BASE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # TrainConfig's defaults
RHO = 0.05
CASES = ("bare SGD", "train() SGD", "bare SAM", "train() SAM")
METHOD = (
    "**Method.** *bare SGD*: pre-made float batches (normalised once, on the device, sliced from one shuffled "
    "tensor); zero_grad + forward + cross-entropy + backward + SGD step, nothing else. *bare SAM*: the same with "
    "flatminima.SAM(model=...) by hand: forward, backward, first_step(zero_grad=True), forward, backward, "
    "second_step(zero_grad=True). *train()*: `flatminima.train.train(TrainConfig(...))`, optimizer sgd or sam, "
    "augment=True (random crop + flip), progress=False; SGD lr 0.1, momentum 0.9, wd 5e-4, rho 0.05, seed 0 "
    "everywhere. The time of a train() epoch is its history's `seconds` (from the epoch's start to after the "
    "test-set evaluation; the checkpoint and metrics written afterwards are not in it) minus its `eval_seconds` "
    "(the test-set evaluation, recorded by the loop). What is left is the per-batch work "
    "(index the uint8 images, convert, normalise, augment, the step, the scheduler, the loss sum) and the "
    "end-of-epoch loss sync. Every run builds a fresh model; one sample per epoch."
)


@dataclass
class Workload:
    title: str
    model: str
    batch: int
    epochs: int  # per run (each epoch is one sample)
    rounds: int
    dataset: ImageDataset
    synthetic: bool
    inputs: Tensor = field(init=False)  # pre-made for the bare loops
    targets: Tensor = field(init=False)

    @property
    def steps(self) -> int:
        return self.dataset.train_images.shape[0] // self.batch


def digits(rounds: int, epochs: int) -> Workload:
    return Workload("digits, small_cnn, batch 64", "small_cnn", 64, epochs, rounds, load_digits(seed=0), False)


def synthetic_cifar(steps: int, rounds: int, epochs: int) -> Workload:
    gen = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (steps * 128, 3, 32, 32), dtype=torch.uint8, generator=gen)
    test_images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mean, std = channel_mean_std(train_images)
    dataset = ImageDataset(
        "synthetic-cifar",
        train_images,
        torch.randint(0, 10, (train_images.shape[0],), generator=gen),
        test_images,
        torch.randint(0, 10, (256,), generator=gen),
        10,
        mean,
        std,
    )
    title = f"synthetic CIFAR-sized (random uint8 3x32x32, {steps} steps/epoch), resnet20, batch 128"
    return Workload(title, "resnet20", 128, epochs, rounds, dataset, True)


def prepare(work: Workload, device: torch.device) -> None:
    """The bare loops' data: shuffled once, float, normalised, on the device."""
    data = work.dataset
    order = torch.randperm(data.train_images.shape[0], generator=torch.Generator().manual_seed(0))
    work.inputs = normalize(to_float(data.train_images[order]), data.mean, data.std).to(device)
    work.targets = data.train_labels[order].to(device)


def new_model(work: Workload, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = work.dataset.train_images.shape
    return build_model(work.model, work.dataset.num_classes, shape[1], tuple(shape[2:])).to(device).train()


def bare_run(work: Workload, sam: bool, device: torch.device, epochs: int) -> list[float]:
    """Seconds per epoch of the bare loop."""
    model = new_model(work, device)
    if sam:
        opt: Any = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, **BASE)
    else:
        opt = torch.optim.SGD(model.parameters(), **BASE)
    x, y, b = work.inputs, work.targets, work.batch
    times = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        for i in range(work.steps):
            xb, yb = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]
            if sam:
                F.cross_entropy(model(xb), yb).backward()
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


@dataclass
class CallTimes:
    optimizer: str
    call: float  # the whole train() call
    epochs: float  # sum of the history's seconds
    evaluation: float  # of which evaluation (eval_seconds)


def config_for(work: Workload, optimizer: str, device: torch.device, epochs: int, output: str, threads: int):
    return TrainConfig(
        dataset="synthetic" if work.synthetic else "digits",
        model=work.model,
        optimizer=optimizer,
        rho=RHO,
        epochs=epochs,
        batch_size=work.batch,
        augment=True,
        device=device.type,
        threads=threads,
        output=output,
        progress=False,
        seed=0,
        **BASE,
    )


def train_run(
    work: Workload, optimizer: str, device: torch.device, epochs: int, threads: int, calls: list[CallTimes]
) -> list[float]:
    """Seconds per epoch of train(), evaluation excluded; appends the call's breakdown to ``calls``."""
    with tempfile.TemporaryDirectory() as folder:
        config = config_for(work, optimizer, device, epochs, folder + "/run", threads)
        start = time.perf_counter()
        result = train(config, dataset=work.dataset if work.synthetic else None)
        call = time.perf_counter() - start
    evaluations = [r["eval_seconds"] for r in result.history]
    seconds = [r["seconds"] for r in result.history]
    calls.append(CallTimes(optimizer, call, sum(seconds), sum(evaluations)))
    return [s - e for s, e in zip(seconds, evaluations)]


def measure(work: Workload, device: torch.device, threads: int) -> tuple[dict[str, list[list[float]]], list[CallTimes]]:
    """Per case, per round, the seconds of each epoch."""
    calls: list[CallTimes] = []
    runs: dict[str, Callable[[int], list[float]]] = {
        "bare SGD": lambda e: bare_run(work, False, device, e),
        "train() SGD": lambda e: train_run(work, "sgd", device, e, threads, calls),
        "bare SAM": lambda e: bare_run(work, True, device, e),
        "train() SAM": lambda e: train_run(work, "sam", device, e, threads, calls),
    }
    for run in runs.values():  # warm-up round
        run(1)
    calls.clear()
    samples: dict[str, list[list[float]]] = {name: [] for name in CASES}
    for r in range(work.rounds):
        for name in CASES if r % 2 == 0 else CASES[::-1]:
            gc.collect()
            samples[name].append(runs[name](work.epochs))
            progress(f"{work.model} round {r + 1}/{work.rounds} {name}: {fmt_list(samples[name][-1])} s/epoch")
    return samples, calls


def throughput_table(work: Workload, samples: dict[str, list[list[float]]], load: str, report: Report) -> float:
    """Returns the fastest bare SGD step, in ms."""
    images = work.steps * work.batch
    flat = {name: [t for run in runs for t in run] for name, runs in samples.items()}
    step_ms = {name: 1e3 * med(times) / work.steps for name, times in flat.items()}
    best_ms = {name: 1e3 * min(times) / work.steps for name, times in flat.items()}
    rows = []
    for name in CASES:
        rate = [images / t for t in flat[name]]
        row = [name, f"{med(rate):.0f}", f"{max(rate):.0f}", f"{min(rate):.0f}", f"{step_ms[name]:.2f}"]
        if name.startswith("train()"):
            bare = "bare " + name.split()[-1]
            paired = med([med(b) / med(t) for t, b in zip(samples[name], samples[bare])])
            row += [
                f"{step_ms[bare] / step_ms[name]:.3f}",
                f"{paired:.3f}",
                f"{best_ms[bare] / best_ms[name]:.3f}",
                f"{step_ms[name] - step_ms[bare]:+.2f}",
                f"{best_ms[name] - best_ms[bare]:+.2f}",
            ]
        else:
            row += ["1", "1", "1", "-", "-"]
        rows.append(row)
    report.table(
        f"**{work.title}: training throughput.** {work.steps} steps ({images} images) per epoch; "
        f"{work.rounds} interleaved rounds of {work.epochs} epochs per case after a warm-up round; one sample per "
        "epoch. train() epochs exclude the test evaluation. Ratio = train() images/s / bare images/s of the same "
        "optimiser (1 = no overhead): of the medians; the median over rounds of the ratio within a round (robust "
        "to drift); of the best epochs (robust to bursts of load from other processes, which only slow epochs "
        f"down). Extra ms/step = train() - bare, of the medians and of the best epochs. {load}",
        ["case", "images/s (median)", "images/s (best)", "images/s (worst)", "ms/step (median)", "ratio (medians)",
         "ratio (paired rounds)", "ratio (best)", "extra ms/step (median)", "extra ms/step (best)"],
        rows,
    )  # fmt: skip
    return best_ms["bare SGD"]


def calls_table(work: Workload, calls: list[CallTimes], report: Report) -> None:
    rows = []
    for optimizer in ("sgd", "sam"):
        chunk = [c for c in calls if c.optimizer == optimizer]
        rows.append(
            [
                f"train() {optimizer}",
                f"{med([c.call for c in chunk]):.2f}",
                f"{med([c.epochs - c.evaluation for c in chunk]):.2f}",
                f"{med([c.evaluation for c in chunk]):.3f}",
                f"{med([c.call - c.epochs for c in chunk]):.2f}",
            ]
        )
    report.table(
        f"**{work.title}: where a train() call's time goes ({work.epochs} epochs, median over calls, seconds).** "
        "Outside the epochs: loading the data, building the model, writing config, metrics and a checkpoint "
        "after every epoch, then model.pt, the plot and the summary.",
        ["call", "whole call", "training epochs", "test evaluation", "outside the epochs"],
        rows,
    )


def components_table(work: Workload, device: torch.device, bare_sgd_ms: float, report: Report) -> None:
    """The loop's per-batch work besides the step, timed alone (median of many calls, microseconds)."""
    data = work.dataset
    config = config_for(work, "sam", device, 10, "unused", 0)
    batches = BatchPipeline(data, config, device)
    index = torch.randperm(data.train_images.shape[0])[: work.batch]
    raw = data.train_images[index]
    normed = normalize(to_float(raw), data.mean, data.std)
    model = new_model(work, device)
    optimizer = torch.optim.SGD(model.parameters(), **BASE)
    scheduler = build_scheduler(config, optimizer, work.steps)
    loss_sum, loss = torch.zeros((), dtype=torch.float64, device=device), torch.tensor(1.0, device=device)
    layers = norm_layers(model)
    gen = torch.Generator().manual_seed(0)

    def stats_cycle() -> None:
        stats = AveragedRunningStats(layers)
        stats.before_pass()
        stats.after_pass()
        stats.finish()

    def accumulate() -> None:
        nonlocal loss_sum
        loss_sum += loss.double() * index.numel()

    parts: list[tuple[str, Callable[[], Any]]] = [
        ("index the uint8 images (`train_images[local]`)", lambda: data.train_images[index]),
        ("to_float", lambda: to_float(raw)),
        ("normalize", lambda: normalize(to_float(raw), data.mean, data.std)),
        (f"augmentation {batches.augmentation} alone", lambda: batches.augmentation(normed, gen)),
        ("whole `BatchPipeline` call (to_float + normalize + augmentation + .to)", lambda: batches(raw, gen)),
        ("scheduler.step()", lambda: (optimizer.step(), scheduler.step())),  # SGD step without grads: a no-op
        ("`loss_sum += loss.double() * n`", accumulate),
        (f"SAM only: AveragedRunningStats per step ({len(layers)} BatchNorm layers)", stats_cycle),
    ]
    reps = 50 if work.synthetic else 200
    rows = []
    for name, fn in parts:
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        us = 1e6 * med(times)
        rows.append([name, f"{us:.0f}", f"{100 * us / (1e3 * bare_sgd_ms):.1f}"])
    report.table(
        f"**{work.title}: the loop's per-batch work besides the step, timed alone** (median of {reps} calls "
        f"after 5 warm-up calls; batch {work.batch}). % of the fastest bare SGD step ({bare_sgd_ms:.2f} ms). "
        "scheduler.step() row includes an SGD step with no gradients (a no-op loop, needed to silence the "
        "scheduler's order warning).",
        ["per-batch work", "µs", "% of bare SGD step"],
        rows,
    )


# ---------------------------------------------------------------------------------------------- report


def fmt_list(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def progress(message: str) -> None:
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few iterations (under a minute)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        workloads = [digits(rounds=2, epochs=2), synthetic_cifar(steps=2, rounds=2, epochs=1)]
    else:
        workloads = [digits(rounds=6, epochs=4), synthetic_cifar(steps=6, rounds=4, epochs=2)]
    report = Report()
    start = time.perf_counter()
    report(f"# Training-loop benchmark: `{command_line()}` ({local_timestamp()})")
    report()
    machine(report, device, flatminima.__version__)
    report(METHOD)
    report()
    for work in workloads:
        progress(f"{work.title}")
        prepare(work, device)
        load = f"(Load average {load_average()} at the start of the measurement, "
        samples, calls = measure(work, device, args.threads)
        load += f"{load_average()} at its end.)"
        bare_sgd_ms = throughput_table(work, samples, load, report)
        calls_table(work, calls, report)
        components_table(work, device, bare_sgd_ms, report)
    took = time.perf_counter() - start
    report(f"Total wall time {took:.0f} s; load average (1, 5, 15 min) at the end: {load_average()}.")
    if args.output:
        Path(args.output).write_text("\n".join(report.lines) + "\n")
        progress(f"wrote {args.output}")


if __name__ == "__main__":
    main()
