"""Benchmark the papers' variants: cost per step against SGD and SAM, and RW-SAM's cheap sharpness score.

1. Seconds per training step of every registered variant, built exactly as ``flatminima train`` builds it (the
   registry's builders and batch rules), on the same model and batches in one run: SGD, SAM, m-SAM, n-SAM (ascent
   sample of B and 4B examples), RW-SAM (finite-difference score; exact score on the small model only), Ahn et
   al.'s randomly smoothed (``ahn-rs``) and sharpness-aware (``ahn-sa``) perturbations, always perturbing
   (epsilon = inf) and in their plain-step regime (epsilon = 0). Cases run in interleaved rounds after a warm-up;
   ratios are of the medians and the median over rounds of the within-round ratio.
2. RW-SAM's score ``|l_i(w + delta z) - l_i(w)| / delta`` against the exact per-example gradient norm
   ``||grad l_i(w)||`` on the demo's data (digits, 40 % label noise; SmallCNN, batches of 32), at initialisation
   and after 5 epochs of SGD: Spearman rank correlation per batch (mean and spread over batches), with one z (what
   RW-SAM uses) and with the score averaged over 8 draws of z, the ratio of the mean score to the mean norm (about
   sqrt(2/pi) = 0.80 when ``<grad l_i, z>`` is close to Gaussian), and what the Gibbs weights do at lambda 0.01,
   0.1 and 1: their effective number of examples and their share on the mislabelled examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import Report, command_line, load_average, local_timestamp, machine, sync
from scipy.stats import spearmanr
from torch import Tensor

from flatminima.batch_rules import make_probe
from flatminima.data import channel_mean_std, load_digits, normalize, to_float
from flatminima.data.label_noise import symmetric_label_noise
from flatminima.models import build_model
from flatminima.step import PlainStep, SharpnessAwareStep
from flatminima.train import TrainConfig
from flatminima.train.builders import build_batch_rule, build_optimizer, optimizer_request
from flatminima.variants import GibbsReweighting


@dataclass
class Plan:
    rounds: int = 5
    steps: int = 10  # timed steps per case per round (a multiple of LookSAM's k = 5 and periodic SAM's k = 2)
    score_batches: int = 20
    train_epochs: int = 5


QUICK = Plan(rounds=2, steps=2, score_batches=3, train_epochs=1)


@dataclass
class Workload:
    name: str
    model: str
    in_channels: int
    size: tuple[int, int]
    batch: int
    exact_score: bool


WORKLOADS = [
    Workload("SmallCNN, 8x8 digits-sized images, batch 32 (the demo's setting)", "small_cnn", 1, (8, 8), 32, True),
    Workload("ResNet-20, 3x32x32 images, batch 128", "resnet20", 3, (32, 32), 128, False),
]


def per_example(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def cases(work: Workload) -> list[tuple[str, dict]]:
    """(label, TrainConfig fields) of every case; group_size is the step's, not the config's."""
    b = work.batch
    rows = [
        ("SGD", {"optimizer": "sgd"}),
        ("SAM", {"optimizer": "sam"}),
        (f"m-SAM, m = B/4 = {b // 4}", {"optimizer": "sam", "group_size": b // 4}),
        (f"n-SAM, ascent sample B = {b}", {"optimizer": "nsam", "nsam_sample_size": b}),
        (f"n-SAM, ascent sample 4B = {4 * b}", {"optimizer": "nsam", "nsam_sample_size": 4 * b}),
        ("RW-SAM, finite-difference score", {"optimizer": "rwsam"}),
    ]
    if work.exact_score:
        rows.append(("RW-SAM, exact score (one backward per example)", {"optimizer": "rwsam", "rwsam_score": "exact"}))
    rows += [
        ("ahn-rs (Alg. 1), epsilon = inf: always perturbs", {"optimizer": "ahn-rs"}),
        ("ahn-sa (Alg. 2), epsilon = inf: always perturbs", {"optimizer": "ahn-sa"}),
        ("ahn-rs, epsilon = 0: plain gradient steps", {"optimizer": "ahn-rs", "ahn_epsilon": 0.0}),
        ("ahn-sa, epsilon = 0: plain gradient steps", {"optimizer": "ahn-sa", "ahn_epsilon": 0.0}),
        ("GSAM (alpha default)", {"optimizer": "gsam"}),
        ("LookSAM, k = 5 (one SAM step in 5)", {"optimizer": "looksam"}),
        ("Momentum-SAM (one pass, at w + e)", {"optimizer": "momentum-sam"}),
        ("Friendly SAM", {"optimizer": "friendly-sam"}),
        ("periodic SAM, k = 2", {"optimizer": "periodic-sam", "sam_every": 2}),
        ("random SAM, p = 0.5", {"optimizer": "random-sam", "sam_probability": 0.5}),
    ]
    return rows


def build_step(work: Workload, fields: dict, device: torch.device, pool: tuple[Tensor, Tensor]) -> Callable:
    """The step ``flatminima train`` would run for this case (same builders), on a fresh model (seed 0)."""
    fields = dict(fields)
    group_size = fields.pop("group_size", None)
    config = dataclasses.replace(TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05), **fields)
    torch.manual_seed(0)
    model = build_model(work.model, 10, work.in_channels, work.size).to(device).train()
    images, labels = pool

    def draw(n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(images.shape[0], generator=generator)[:n]
        return images[index], labels[index]

    request = optimizer_request(config, model, draw_examples=draw, train_size=images.shape[0])
    optimizer = build_optimizer(config, model, request)
    if config.optimizer == "sgd":
        return PlainStep(model, per_example, optimizer)
    return SharpnessAwareStep(
        model, per_example, optimizer, group_size=group_size, batch_rule=build_batch_rule(config, request)
    )


def time_steps(report: Report, work: Workload, device: torch.device, plan: Plan) -> None:
    gen = torch.Generator().manual_seed(0)
    pool = (
        torch.randn(8 * work.batch, work.in_channels, *work.size, generator=gen).to(device),
        torch.randint(0, 10, (8 * work.batch,), generator=gen).to(device),
    )
    rows = cases(work)
    steps = {label: build_step(work, fields, device, pool) for label, fields in rows}
    batches = [(pool[0][i * work.batch : (i + 1) * work.batch], pool[1][i * work.batch : (i + 1) * work.batch])
               for i in range(8)]  # fmt: skip
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    started = time.perf_counter()
    load_start = load_average()
    for round_ in range(plan.rounds + 1):  # round 0 warms up
        order = [label for label, _ in rows]
        if round_ % 2 == 0:
            order.reverse()
        for label in order:
            sync(device)
            t0 = time.perf_counter()
            for k in range(plan.steps):
                steps[label](*batches[k % len(batches)])
            sync(device)
            if round_ > 0:
                times[label].append((time.perf_counter() - t0) / plan.steps)
    sgd, sam = times["SGD"], times["SAM"]
    table = []
    for label, _ in rows:
        t = times[label]
        paired_sgd = statistics.median(a / b for a, b in zip(t, sgd))
        paired_sam = statistics.median(a / b for a, b in zip(t, sam))
        table.append([
            label,
            f"{1e3 * statistics.median(t):.2f}",
            f"{statistics.median(t) / statistics.median(sgd):.2f}",
            f"{paired_sgd:.2f}",
            f"{statistics.median(t) / statistics.median(sam):.2f}",
            f"{paired_sam:.2f}",
        ])  # fmt: skip
    report.table(
        f"**Cost per step: {work.name}.** Each variant built by the registry's builders as `flatminima train` "
        f"builds it (SGD lr 0.05, momentum 0.9, wd 5e-4, rho 0.05; defaults of the variants' options otherwise), "
        f"driven by `SharpnessAwareStep` (SGD: `PlainStep`), random data, {plan.rounds} interleaved rounds of "
        f"{plan.steps} steps per case after a warm-up round; medians of the per-step time. (Section time "
        f"{time.perf_counter() - started:.0f} s; load average {load_start} at its start, {load_average()} at its "
        f"end.)",
        ["case", "ms / step", "/ SGD (medians)", "/ SGD (paired)", "/ SAM (medians)", "/ SAM (paired)"],
        table,
    )


LAMBDAS = (0.01, 0.1, 1.0)


def score_correlation(report: Report, plan: Plan) -> None:
    """RW-SAM's finite-difference score against exact per-example gradient norms, and what its weights do, on
    the demo's data: digits with 40 % symmetric label noise."""
    digits = load_digits(seed=0)
    mean, std = channel_mean_std(digits.train_images)
    images = normalize(to_float(digits.train_images), mean, std)
    clean = digits.train_labels
    labels = symmetric_label_noise(clean, 0.4, 10, seed=0)
    noisy = labels != clean
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, (8, 8)).train()
    gen = torch.Generator().manual_seed(1)
    rows, weight_rows = [], []
    started = time.perf_counter()
    for stage in ("at initialisation", f"after {plan.train_epochs} epochs of SGD (lr 0.05, batch 32)"):
        if stage != "at initialisation":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            for _ in range(plan.train_epochs):
                for index in torch.randperm(images.shape[0], generator=gen).split(32):
                    opt.zero_grad()
                    F.cross_entropy(model(images[index]), labels[index]).backward()
                    opt.step()
        one, eight, ratios, spread = [], [], [], []
        ess = {lam: [] for lam in LAMBDAS}
        noisy_share = {lam: [] for lam in LAMBDAS}
        base_share = []
        for _ in range(plan.score_batches):
            index = torch.randperm(images.shape[0], generator=gen)[:32]
            x, y = images[index], labels[index]
            probe = make_probe(model, per_example, x, y)
            with torch.no_grad():
                losses = per_example(model(x), y)
            exact = probe.gradient_norms(0, 32)
            rule = GibbsReweighting(1.0, 1e-3, generator=gen)
            draws = torch.stack([rule.scores(losses, probe) for _ in range(8)])
            one.append(spearmanr(draws[0].numpy(), exact.numpy()).statistic)
            eight.append(spearmanr(draws.mean(0).numpy(), exact.numpy()).statistic)
            ratios.append((draws[0].mean() / exact.mean()).item())
            spread.append((draws[0].max() - draws[0].min()).item())
            base_share.append(noisy[index].double().mean().item())
            for lam in LAMBDAS:
                p = torch.softmax(lam * draws[0], dim=0)
                ess[lam].append((1.0 / p.pow(2).sum()).item())
                noisy_share[lam].append(p[noisy[index]].sum().item())
        rows.append([
            stage,
            f"{statistics.mean(one):.3f} ± {statistics.stdev(one):.3f}",
            f"{statistics.mean(eight):.3f} ± {statistics.stdev(eight):.3f}",
            f"{statistics.mean(ratios):.3f}",
            f"{statistics.mean(spread):.2f}",
        ])  # fmt: skip
        weight_rows.append([
            stage,
            f"{100 * statistics.mean(base_share):.0f} %",
            *[f"{statistics.mean(ess[lam]):.1f}" for lam in LAMBDAS],
            *[f"{100 * statistics.mean(noisy_share[lam]):.0f} %" for lam in LAMBDAS],
        ])  # fmt: skip
    report.table(
        f"**RW-SAM's cheap score against the exact per-example gradient norm**, digits with 40 % symmetric label "
        f"noise (the demo's data), the demo's SmallCNN in train mode, {plan.score_batches} random batches of 32, "
        f"delta = 1e-3: Spearman rank correlation between the scores and ||grad l_i(w)|| per batch (mean ± std "
        f"over batches), and the spread (max - min) of one batch's scores. (Section time "
        f"{time.perf_counter() - started:.0f} s.)",
        ["model", "Spearman, one z (RW-SAM)", "Spearman, mean of 8 z", "mean score / mean norm", "score spread"],
        rows,
    )
    report.table(
        "**What the Gibbs weights p = softmax(lambda s) do** on the same batches (one z): the effective number of "
        "examples 1 / sum p_i^2 (32 = uniform) and the share of the weight on examples whose label is wrong.",
        [
            "model",
            "noisy share (uniform)",
            *[f"effective n, lambda {lam:g}" for lam in LAMBDAS],
            *[f"noisy share, lambda {lam:g}" for lam in LAMBDAS],
        ],
        weight_rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few iterations (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = QUICK if args.quick else Plan()
    report = Report()
    report(f"# flatminima variants benchmark ({local_timestamp()})")
    report()
    report(f"`{command_line()}`")
    report()
    machine(report, device)
    started = time.perf_counter()
    for work in WORKLOADS if not args.quick else WORKLOADS[:1]:
        time_steps(report, work, device, plan)
    score_correlation(report, plan)
    report(f"Total wall time {time.perf_counter() - started:.0f} s; load average at the end: {load_average()}.")
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
