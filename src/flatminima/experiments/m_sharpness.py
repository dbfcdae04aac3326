"""``m-sharpness``: at a fixed batch size, does a smaller m in m-SAM generalise better, and does RW-SAM get there
at SAM's cost?

Foret et al. (ICLR 2021, sec. 4.1) found that computing SAM's perturbation separately on groups of ``m`` examples
(m-SAM) generalises better the smaller ``m`` is. Luo et al. (NeurIPS 2025) explain it with an SDE: the
perturbation's gradient noise adds an implicit regulariser ``(rho / 2m) tr(V)``, ``V`` the per-example gradient
covariance, so smaller ``m`` regularises more; their Reweighted SAM (RW-SAM) keeps one parallel, full-batch
perturbation but weights the examples toward the sharp ones, for about one sixth more than SAM's cost.

The reproduction trains the demo's small CNN on the embedded digits (batch 32, lr 0.05, cosine, but rho 0.05,
not the demo's 0.3; see :data:`~flatminima.experiments.label_noise.DEMO_CONFIG`) with SGD, m-SAM for several
``m`` (``m = 32``, the batch, is plain SAM), n-SAM and RW-SAM, with clean and with 40 %-noisy training labels.
Along training it measures ``tr(V) = mean_i ||g_i - g_bar||^2`` from per-example gradients (``torch.func``:
``vmap`` over ``grad``) on a fixed sample of training examples as trained (labels as corrupted, no augmentation),
and the regulariser ``(rho / 2m) tr(V)`` that m-SAM's own ``m`` puts on it.
The measurement runs from a global optimiser step hook
(:func:`torch.optim.optimizer.register_optimizer_step_post_hook`) on the base SGD step, so the library's training
loop runs unchanged; its time is taken out of the seconds per epoch.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from flatminima.experiments.label_noise import DEMO_CONFIG
from flatminima.experiments.reproduce import TRAINING_FIELDS, Context, Outcome, Reproduction
from flatminima.running_stats import norm_layers
from flatminima.train import BatchPipeline, TrainConfig, train
from flatminima.train.prepare import model_for, prepare_data

__all__ = ["METHODS", "REPRODUCTION", "gradient_variance_trace", "methods_for", "run", "train_and_track"]

BATCH = 32
SAMPLE = 256  # training examples tr(V) is measured on
RHO = 0.05  # the SAM paper's default; the demo's 0.3 (and 0.1) leave SAM near chance for the first epochs

Methods = dict[str, tuple[dict[str, Any], int | None]]


def methods_for(batch: int) -> Methods:
    """name -> (the TrainConfig fields it sets on the demo config, the m of its regulariser (rho / 2m) tr V, or
    None): SGD, m-SAM for each m of 4, 8, 16, 64 that divides the batch and is smaller, SAM (m = the batch), n-SAM
    and RW-SAM."""
    groups = [m for m in (4, 8, 16, 64) if m < batch and batch % m == 0]
    return {
        "sgd": ({"optimizer": "sgd"}, None),
        **{f"msam-{m}": ({"optimizer": "sam", "group_size": m}, m) for m in groups},
        "sam": ({"optimizer": "sam"}, batch),
        "nsam": ({"optimizer": "nsam", "nsam_sample_size": 128}, None),
        "rwsam": ({"optimizer": "rwsam", "rwsam_lambda": 1.0}, batch),
    }


#: the methods at the reproduction's own batch size, 32
METHODS: Methods = methods_for(BATCH)


def gradient_variance_trace(model: nn.Module, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> float:
    """``tr(V) = mean_i ||g_i - g_bar||^2``: the trace of the per-example gradient covariance of the
    cross-entropy at ``params`` (no weight decay), from ``torch.func.vmap`` over ``torch.func.grad``.

    ``model`` only supplies the function (its own parameters are not used); the examples are processed in chunks
    of 64 so that memory stays at 64 gradient copies.
    """
    from torch.func import functional_call, grad, vmap

    detached = {name: p.detach() for name, p in params.items()}

    def loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, weights, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(p) for name, p in detached.items()}
    squares = 0.0
    count = inputs.shape[0]
    for x, y in zip(inputs.split(64), targets.split(64), strict=True):
        grads = per_example(detached, x, y)
        for name, g in grads.items():
            total[name] += g.sum(dim=0)
            squares += float(g.pow(2).sum())
    mean_square = sum(float(t.pow(2).sum()) for t in total.values()) / count**2
    return squares / count - mean_square


def train_and_track(config: TrainConfig, every: int) -> dict[str, Any]:
    """One training run with ``tr(V)`` measured after every ``every``-th epoch (and the last, and at the start).

    A module-level function, so that worker processes can run it. Returns the final record, the per-epoch test
    accuracy, the training seconds per epoch (the measurement's own time taken out) and the measurements
    ``[{"epoch", "trace_v"}]``: none for a model with BatchNorm, whose per-example gradients are not defined in
    training mode (one example has no batch statistics).
    """
    data = prepare_data(config)
    pipeline = BatchPipeline(data.dataset, config, torch.device("cpu"))
    count = min(SAMPLE, data.train_images.shape[0])
    inputs = pipeline(data.train_images[:count], None)
    targets = data.train_labels[:count]
    skeleton = model_for(config, data.dataset)
    names = [name for name, _ in skeleton.named_parameters()]
    per_epoch = data.train_images.shape[0] // config.batch_size
    state: dict[str, Any] = {"steps": 0, "measured": [], "cost": {}}

    def measure(optimizer: torch.optim.Optimizer, epoch: int) -> None:
        started = time.perf_counter()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device
        weights = dict(zip(names, params, strict=True))
        trace = gradient_variance_trace(skeleton, weights, inputs.to(device), targets.to(device))
        state["measured"].append({"epoch": epoch, "trace_v": trace})
        state["cost"][epoch] = state["cost"].get(epoch, 0.0) + time.perf_counter() - started

    measurable = not norm_layers(skeleton)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # the base step of every method here, not the SAM wrapper
        if not measurable or type(optimizer) is not torch.optim.SGD:
            return
        if state["steps"] == 0:
            measure(optimizer, 0)  # after the first step: close enough to the start, and the same for all
        state["steps"] += 1
        if state["steps"] % per_epoch == 0:
            epoch = state["steps"] // per_epoch
            if epoch % every == 0 or epoch == config.epochs:
                measure(optimizer, epoch)

    handle = register_optimizer_step_post_hook(hook)
    try:
        result = train(config)
    finally:
        handle.remove()
    seconds = [
        r["seconds"] - r["eval_seconds"] - state["cost"].get(r["epoch"], 0.0) - (state["cost"].get(0, 0.0) * (i == 0))
        for i, r in enumerate(result.history)
    ]
    return {
        "test_accuracy": result.final["test_accuracy"],
        "train_loss": result.final["train_loss"],
        "test_accuracy_curve": [r["test_accuracy"] for r in result.history],
        "seconds_per_epoch": statistics.median(seconds),
        "measured": state["measured"],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _plot(
    ctx: Context,
    summary: dict[str, dict[str, Any]],
    noises: tuple[float, ...],
    names: list[str],
    methods: Methods = METHODS,
    batch: int = BATCH,
) -> list[Path]:
    """Clean test accuracy against m (SGD, n-SAM and RW-SAM as lines), and the regulariser along training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4), squeeze=False)
    ms = [name for name in names if methods[name][1] is not None and name != "rwsam"]
    for axis, noise in zip(axes[0], noises):
        cells = summary[f"{noise:g}"]
        xs = [methods[name][1] for name in ms]
        ys = [100 * cells[name]["test_accuracy_mean"] for name in ms]
        es = [100 * cells[name]["test_accuracy_std"] for name in ms]
        axis.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"m-SAM (m = {batch} is SAM)")
        for name, style in (("sgd", "k--"), ("nsam", "g:"), ("rwsam", "r-.")):
            if name in cells:
                axis.axhline(100 * cells[name]["test_accuracy_mean"], color=style[0], linestyle=style[1:], label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel(f"m (batch {batch})")
        axis.set_ylabel("clean test accuracy %")
        axis.set_title(f"label noise {100 * noise:.0f} %")
        axis.legend(fontsize=8)
    figure.tight_layout()
    accuracy = ctx.figure_path("accuracy_vs_m.png")
    figure.savefig(accuracy, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(2, len(noises), figsize=(5 * len(noises), 7), squeeze=False)
    for column, noise in enumerate(noises):
        cells = summary[f"{noise:g}"]
        for index, name in enumerate(names):
            curve = cells[name]["regulariser_curve"]
            epochs = [point["epoch"] for point in curve]
            style = {"marker": ".", "label": name, "color": f"C{index}"}  # one colour per method in both rows
            axes[0][column].plot(epochs, [point["trace_v_mean"] for point in curve], **style)
            if methods[name][1] is not None:
                axes[1][column].plot(epochs, [point["regulariser_mean"] for point in curve], **style)
        axes[0][column].set_yscale("log")
        axes[0][column].set_ylabel("tr(V) on the fixed sample")
        axes[0][column].set_title(f"label noise {100 * noise:.0f} %")
        axes[1][column].set_yscale("log")
        axes[1][column].set_ylabel("(rho / 2m) tr(V)")
        axes[1][column].set_xlabel("epoch")
        axes[0][column].legend(fontsize=7)
        axes[1][column].legend(fontsize=7)
    figure.tight_layout()
    regulariser = ctx.figure_path("regulariser.png")
    figure.savefig(regulariser, dpi=120)
    plt.close(figure)
    return [accuracy, regulariser]


def run(ctx: Context) -> Outcome:
    """Train every (noise, method, seed) in two worker processes; tabulate accuracy, cost and regulariser."""
    noises = (0.4,) if ctx.quick else (0.0, 0.4)
    given = dict(ctx.overrides)
    batch = given.pop("batch_size", BATCH)
    rho = given.pop("rho", RHO)
    epochs = given.pop("epochs", 3 if ctx.quick else 12)
    if given.get("device") == "cuda" and "threads" not in given:
        given["threads"] = 0
    base = dataclasses.replace(DEMO_CONFIG, **given)
    methods = methods_for(batch)
    smallest = next((name for name in methods if name.startswith("msam-")), None)
    names = ["sgd", *([smallest] if smallest else []), "sam"] if ctx.quick else list(methods)
    every = 1 if ctx.quick else max(1, epochs // 4)
    workers = 1 if base.device == "cuda" else 2  # one GPU: one training at a time
    scratch = tempfile.TemporaryDirectory(prefix="m-sharpness-")
    jobs = []
    for noise in noises:
        for name in names:
            for seed in ctx.seeds:
                config = dataclasses.replace(
                    base,
                    **methods[name][0],
                    batch_size=batch,
                    rho=rho,
                    label_noise=noise,
                    epochs=epochs,
                    seed=seed,
                    output=str(Path(scratch.name) / f"{noise:g}-{name}-{seed}"),
                    progress=False,
                    overwrite=True,
                )
                jobs.append((noise, name, seed, config))
    ctx.progress(f"m-sharpness: {len(jobs)} trainings of {epochs} epochs in {workers} worker process(es)")
    with scratch, ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_track, config, every) for *_, config in jobs]
        runs = []
        for (noise, name, seed, _), future in zip(jobs, futures):
            runs.append({"noise": noise, "method": name, "seed": seed, **future.result()})
            ctx.progress(f"m-sharpness: noise {noise:g} {name} seed {seed}: {100 * runs[-1]['test_accuracy']:.2f} %")

    summary: dict[str, dict[str, Any]] = {}
    for noise in noises:
        cells: dict[str, Any] = {}
        sam_seconds = statistics.mean(
            r["seconds_per_epoch"] for r in runs if r["noise"] == noise and r["method"] == "sam"
        )
        for name in names:
            cell = [r for r in runs if r["noise"] == noise and r["method"] == name]
            m = methods[name][1]
            accuracy, accuracy_std = _mean_std([r["test_accuracy"] for r in cell])
            seconds = statistics.mean(r["seconds_per_epoch"] for r in cell)
            curve = []
            for index, point in enumerate(cell[0]["measured"]):
                traces = [r["measured"][index]["trace_v"] for r in cell]
                trace = statistics.mean(traces)
                curve.append(
                    {
                        "epoch": point["epoch"],
                        "trace_v_mean": trace,
                        "regulariser_mean": rho / (2 * m) * trace if m is not None else None,
                    }
                )
            late = curve[len(curve) // 2 :]  # the second half of training
            cells[name] = {
                "m": m,
                "test_accuracy_mean": accuracy,
                "test_accuracy_std": accuracy_std,
                "seconds_per_epoch": seconds,
                "cost_relative_to_sam": seconds / sam_seconds,
                "trace_v_final": curve[-1]["trace_v_mean"] if curve else None,
                "regulariser_final": curve[-1]["regulariser_mean"] if curve else None,
                "regulariser_mean_second_half": statistics.mean(p["regulariser_mean"] for p in late)
                if m is not None and curve
                else None,
                "regulariser_curve": curve,
            }
        summary[f"{noise:g}"] = cells

    rows = []
    for noise in noises:
        for name in names:
            cell = summary[f"{noise:g}"][name]
            rows.append(
                [
                    f"{100 * noise:.0f} %",
                    name,
                    "-" if cell["m"] is None else str(cell["m"]),
                    f"{100 * cell['test_accuracy_mean']:.2f} ± {100 * cell['test_accuracy_std']:.2f}",
                    f"{cell['seconds_per_epoch']:.2f}",
                    f"{cell['cost_relative_to_sam']:.2f}",
                    "n/a" if cell["trace_v_final"] is None else f"{cell['trace_v_final']:.3g}",
                    "n/a" if cell["regulariser_final"] is None else f"{cell['regulariser_final']:.3g}",
                ]
            )
    figures = _plot(ctx, summary, noises, names, methods, batch)
    model = "the demo's small CNN on the embedded digits" if not ctx.overrides else f"{base.model} on {base.dataset}"
    report = f"""
Each row: {len(ctx.seeds)} seed(s) of {model}, {epochs} epochs, batch
{batch}, SGD momentum {base.momentum:g}, lr {base.lr:g} ({base.lr_schedule}), weight decay {base.weight_decay:g}, rho
{rho} for every SAM variant; the labels of the training set {", ".join(f"{100 * n:.0f} %" for n in noises)} wrong
(symmetric noise), test labels clean. m-SAM is `--optimizer sam --group-size m`; SAM is m = {batch} (the batch).
n-SAM takes its perturbation from an independent sample of 128 training examples; RW-SAM weights the examples
of the batch by softmax(lambda s_i), lambda 1. Accuracy is the clean test accuracy at the last epoch, mean ± std
over seeds. s / epoch is the median training time of an epoch (evaluation and the tr(V) measurement taken out),
in 2 concurrent single-thread workers, so relative cost is what to read, not the seconds. tr(V) is
mean_i ||g_i - g_bar||^2 of the per-example cross-entropy gradients on the first {SAMPLE} training examples (as
trained, noisy labels included), at the last epoch; the regulariser is (rho / 2m) tr(V) with each method's own m
(n/a for SGD and n-SAM, which have no such term in Luo et al.'s drift).
"""
    if not runs[0]["measured"]:
        report += """
tr(V) was not measured: the model has BatchNorm, whose per-example gradients are not defined in training mode (one
example has no batch statistics); the accuracy columns stand alone.
"""
    return Outcome(
        headers=[
            "label noise",
            "method",
            "m",
            "clean test acc %",
            "s / epoch",
            "cost vs SAM",
            "tr(V), end",
            "(rho/2m) tr(V), end",
        ],
        rows=rows,
        results={
            "batch_size": batch,
            "rho": rho,
            "epochs": epochs,
            "measure_every_epochs": every,
            "trace_sample": SAMPLE,
            "noises": list(noises),
            "methods": names,
            "summary": summary,
            "runs": runs,
        },
        report=report,
        figures=figures,
        caption="Clean test accuracy, cost per epoch and the measured regulariser (rho / 2m) tr(V), per method.",
    )


REPRODUCTION = Reproduction(
    name="m-sharpness",
    summary="m-sharpness: smaller m in m-SAM, the regulariser (rho / 2m) tr(V), and RW-SAM's cost",
    paper="Foret et al., SAM (ICLR 2021), sec. 4.1; Luo et al., Unveiling m-Sharpness (NeurIPS 2025)",
    run=run,
    overridable=frozenset(TRAINING_FIELDS),
    # Fig. 3 of the SAM paper: m in {1, 4, 16, 64, 256} on CIFAR-10; at batch 256 this runs m = 4, 8, 16, 64, 256
    paper_command=(
        "flatminima reproduce m-sharpness --dataset cifar10 --data-root DATA --model wrn16_8 --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --augment --rho 0.05 --device cuda"
    ),
)
