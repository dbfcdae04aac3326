"""``hessian-spectrum``: at matched training loss, SAM ends in a flatter region than SGD (smaller lambda_max).

Foret et al. (ICLR 2021, sec. 4.2) report the Hessian spectrum of a WideResNet without BatchNorm trained on CIFAR-10:
at the end of training lambda_max is about 24 without SAM and 1.0 with it, and lambda_max / lambda_5 about 11.4 and
2.6. Sharpness compares fairly only at similar training loss: the cross-entropy Hessian shrinks with the loss (its
Gauss-Newton part is weighted by ``p (1 - p)`` of the softmax), so a run measured at a lower loss looks flatter for
that reason alone. So here both optimisers train until their *full* training loss first falls below a common
threshold, and are measured there.

Setting: the embedded digits with clean labels, the library's :class:`~flatminima.models.SmallCNN` (no BatchNorm,
151k parameters), the same initialisation and batch order for both optimisers: ``torch.optim.SGD`` (lr 0.05,
momentum 0.9, weight decay 5e-4, batch 32, constant learning rate, since the stopping point is not known in advance)
and the library's :class:`~flatminima.SAM` around the same SGD. The full training loss is computed every
``check_every`` steps; when it falls below the threshold, the run goes back to the previous check (model and
optimiser state were kept) and replays those steps one at a time, computing the loss after each, so that the run
stops at the first step whose full training loss is below the threshold (the replay is bit-exact: same batches,
same states). lambda_max is tracked along the way with :class:`~flatminima.sharpness.SharpnessTracker` (power
iteration warm-started from the previous eigenvector). At the stopping point, on a fixed subset of the training
examples (the first 512 of the split): the top-5 eigenvalues by Lanczos (``value_tol=1e-3``, verified residuals and
error bounds), tr(H) by Hutchinson with its standard error, and the spectral density by SLQ.

The radius: on these 8x8 digits the paper's rho = 0.05 barely changes lambda_max at matched loss (the full run
trains it too, as an ablation); rho = 0.3, the radius of the library's digits demo, does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatminima.data import load_dataset
from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.experiments.reproduce import Context, Outcome, Reproduction, markdown_table
from flatminima.models import SmallCNN, build_model
from flatminima.optim import SAM
from flatminima.running_stats import norm_layers
from flatminima.sharpness import (
    HessianOperator,
    SharpnessTracker,
    SpectralDensity,
    hutchinson_trace_op,
    lanczos_eigs,
    spectral_density_op,
)

__all__ = [
    "LR",
    "PAPER",
    "REPRODUCTION",
    "SAM_RHO",
    "Recipe",
    "Setting",
    "TrainedRun",
    "digits_tensors",
    "measure_spectrum",
    "paper_scale",
    "recipe_from",
    "run",
    "train_to_loss",
]

WIDTH = 32  # SmallCNN's default width: 151,306 parameters, no BatchNorm
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = 32
SAM_RHO = 0.3  # the main comparison's radius (module docstring)
PAPER_RHO = 0.05  # the paper's default radius: the full run's ablation
TOP_K = 5
VALUE_TOL = 1e-3  # Lanczos stops when every top-5 eigenvalue is within 0.1 % (error bound)
CHUNK = 256  # examples per batch of the Hessian's data

# Foret et al. 2021, sec. 4.2 (WideResNet without BatchNorm, CIFAR-10, end of training)
PAPER: dict[str, dict[str, float]] = {
    "sgd": {"lambda_max": 24.0, "ratio": 11.4},
    "sam": {"lambda_max": 1.0, "ratio": 2.6},
}


@dataclass(frozen=True)
class Recipe:
    """What is trained: the data, the network and SGD's settings. The default is the digits setting of the module
    docstring; ``flatminima reproduce hessian-spectrum --dataset ... --model ...`` replaces fields (see
    :func:`recipe_from`)."""

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "small_cnn"
    lr: float = LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    batch_size: int = BATCH_SIZE
    device: str = "cpu"

    @property
    def is_default(self) -> bool:
        return self == Recipe()


def recipe_from(overrides: dict[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """The recipe with the command line's training settings, and the settings that are not the recipe's
    (``epochs``, ``rho``, ``threads``)."""
    given = dict(overrides)
    fields = {name: given.pop(name) for name in list(given) if name in Recipe.__dataclass_fields__}
    if fields.get("device") == "auto":
        fields["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if fields.get("dataset", "digits") != "digits" and "model" not in fields:
        raise ValueError("hessian-spectrum with --dataset needs --model too (the paper's: --model wrn28_10_nobn)")
    return Recipe(**fields), given


@dataclass(frozen=True)
class Setting:
    """The sizes of one run of the reproduction (full or quick).

    ``threshold``: the full training loss both optimisers are stopped at; ``max_epochs``: the cap if a run never
    gets there; ``check_every``: steps between two computations of the full training loss (a crossing is then
    located exactly by replaying); ``track_every``: steps between two tracked lambda_max (a multiple of
    ``check_every``); ``examples``: the fixed training subset the Hessian is taken over; ``trace_probes``:
    Hutchinson probes; ``density_runs`` and ``density_steps``: SLQ's start vectors and Lanczos steps;
    ``rhos``: the SAM radii trained besides SGD; ``replay``: locate the crossing step exactly by replaying the
    steps since the last check (one full training loss per step; off at the paper's scale, where the run stops
    at the first check below the threshold).
    """

    threshold: float
    max_epochs: int
    check_every: int
    track_every: int
    examples: int
    trace_probes: int
    density_runs: int
    density_steps: int
    rhos: tuple[float, ...]
    replay: bool = True


FULL = Setting(
    threshold=0.01,
    max_epochs=60,
    check_every=10,
    track_every=30,
    examples=512,
    trace_probes=48,
    density_runs=3,
    density_steps=40,
    rhos=(SAM_RHO, PAPER_RHO),
)
QUICK = Setting(
    threshold=0.03,
    max_epochs=30,
    check_every=10,
    track_every=60,
    examples=256,
    trace_probes=16,
    density_runs=1,
    density_steps=20,
    rhos=(SAM_RHO,),
)


def digits_tensors(seed: int, recipe: Recipe = Recipe()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The recipe's data (digits: the split of ``seed``) with clean labels, normalised, on the recipe's device:
    train images, train labels, test images, test labels."""
    extra = {"seed": seed} if recipe.dataset == "digits" else {}
    data = load_dataset(recipe.dataset, recipe.data_root, **extra)
    device = torch.device(recipe.device)
    train = normalize(to_float(data.train_images), data.mean, data.std).to(device)
    test = normalize(to_float(data.test_images), data.mean, data.std).to(device)
    return train, data.train_labels.to(device), test, data.test_labels.to(device)


def _label(rho: float | None) -> str:
    return "SGD" if rho is None else f"SAM rho={rho:g}"


def _key(rho: float | None) -> str:
    return "sgd" if rho is None else f"sam_rho{rho:g}"


def _build(
    seed: int, rho: float | None, recipe: Recipe = Recipe(), images: Tensor | None = None, classes: int = 10
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (the same initialisation for every optimiser of a seed, drawn without touching the global random
    state) and its optimiser: SGD, or SAM with radius ``rho`` around the same SGD."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if recipe.model == "small_cnn" and recipe.dataset == "digits":
            model = SmallCNN(width=WIDTH)
        else:
            assert images is not None
            model = build_model(recipe.model, classes, images.shape[1], tuple(images.shape[2:]))
    if norm_layers(model):
        raise ValueError(
            f"hessian-spectrum compares models without BatchNorm (as the paper): {recipe.model} has BatchNorm; "
            "use e.g. --model wrn28_10_nobn, wrn16_8_nobn or small_cnn"
        )
    model = model.to(recipe.device)
    options = {"lr": recipe.lr, "momentum": recipe.momentum, "weight_decay": recipe.weight_decay}
    if rho is None:
        return model, torch.optim.SGD(model.parameters(), **options)
    return model, SAM(model.parameters(), torch.optim.SGD, rho=rho, **options)


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on all of ``images`` (in chunks; no BatchNorm or dropout, so the
    mode does not matter)."""
    total, correct = 0.0, 0
    for x, y in zip(images.split(1024), labels.split(1024)):
        logits = model(x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return total / len(labels), correct / len(labels)


@dataclass
class TrainedRun:
    """One optimiser trained to the threshold: where it stopped and what was tracked on the way.

    ``loss_before`` is the full training loss one step before the stopping step (above the threshold when
    ``reached``); ``tracked`` holds ``(step, full training loss, lambda_max, products)`` of each tracked
    measurement; ``losses`` the ``(step, full training loss)`` of every check.
    """

    model: nn.Module
    rho: float | None
    step: int
    epochs: float
    reached: bool
    train_loss: float
    loss_before: float
    train_accuracy: float
    tracked: list[tuple[int, float, float, int]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds_training: float = 0.0
    seconds_tracking: float = 0.0


def train_to_loss(
    seed: int,
    rho: float | None,
    images: Tensor,
    labels: Tensor,
    subset: list[tuple[Tensor, Tensor]],
    setting: Setting,
    recipe: Recipe = Recipe(),
) -> TrainedRun:
    """Train SGD (``rho=None``) or SAM until the full training loss first falls below ``setting.threshold``.

    The batch order depends on the seed only, so SGD and SAM see the same batches. Every ``check_every`` steps
    the full training loss is computed; the model and optimiser states at the last check above the threshold are
    kept, and when a check falls below it they are restored and the steps since are replayed one at a time, so
    the run stops at the first step below the threshold. lambda_max is tracked on ``subset`` every ``track_every``
    steps (and at step 0) with a warm-started :class:`SharpnessTracker`.
    """
    model, optimizer = _build(seed, rho, recipe, images, int(labels.max()) + 1)
    count = len(labels)
    size = recipe.batch_size
    per_epoch = count // size
    orders: dict[int, Tensor] = {}

    def take_step(step: int) -> None:
        """Step number ``step + 1``: the batch ``step`` of the seed's fixed order (the last short batch dropped)."""
        epoch, index = divmod(step, per_epoch)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        batch = orders[epoch][index * size : (index + 1) * size].to(images.device)

        def closure() -> Tensor:
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            return loss

        if rho is None:
            optimizer.zero_grad(set_to_none=True)
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)
            optimizer.zero_grad(set_to_none=True)

    tracker = SharpnessTracker(F.cross_entropy, subset, setting.track_every, seed=seed)
    started = time.perf_counter()
    tracking = 0.0

    def track(step: int, loss: float) -> None:
        nonlocal tracking
        begin = time.perf_counter()
        record = tracker.measure(model, step)
        tracking += time.perf_counter() - begin
        run.tracked.append((step, loss, record.lambda_max, record.num_hvp))

    loss, accuracy = _loss_and_accuracy(model, images, labels)
    run = TrainedRun(model, rho, 0, 0.0, False, loss, math.nan, accuracy, losses=[(0, loss)])
    track(0, loss)
    kept = (0, loss, *_states(model, optimizer, setting.replay))
    last = setting.max_epochs * per_epoch
    step = 0
    while step < last:
        take_step(step)
        step += 1
        if step % setting.check_every and step < last:
            continue
        loss, accuracy = _loss_and_accuracy(model, images, labels)
        if loss < setting.threshold and not setting.replay:  # the paper's scale: stop at the first check below
            run.reached, run.loss_before = True, kept[1]
            run.losses.append((step, loss))
            break
        if loss < setting.threshold:  # crossed since the kept check: replay from there, one step at a time
            step, before, model_state, optimizer_state = kept
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            while True:  # the replay is bit-exact, so it crosses again by the check that saw the crossing
                take_step(step)
                step += 1
                loss, accuracy = _loss_and_accuracy(model, images, labels)
                if loss < setting.threshold:
                    break
                before = loss
            run.reached, run.loss_before = True, before
            run.losses.append((step, loss))
            break
        run.losses.append((step, loss))
        if step % setting.track_every == 0:
            track(step, loss)
        kept = (step, loss, *_states(model, optimizer, setting.replay))
    run.step, run.train_loss, run.train_accuracy = step, loss, accuracy
    run.epochs = run.step / per_epoch
    run.seconds_tracking = tracking
    run.seconds_training = time.perf_counter() - started - tracking
    return run


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[Any, Any]:
    """Copies of the model's and the optimiser's states to replay from (None, None when there is no replay)."""
    if not keep:
        return None, None
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def measure_spectrum(
    model: nn.Module, subset: list[tuple[Tensor, Tensor]], setting: Setting, seed: int, density: bool
) -> tuple[dict[str, Any], SpectralDensity | None]:
    """Top-5 eigenvalues (Lanczos, verified residuals and error bounds), tr(H) (Hutchinson, with its standard
    error) and, if ``density``, the SLQ spectral density of the cross-entropy Hessian on ``subset``."""
    op = HessianOperator(model, F.cross_entropy, subset)
    started = time.perf_counter()
    eigen = lanczos_eigs(op, k=TOP_K, value_tol=VALUE_TOL, seed=seed)
    trace = hutchinson_trace_op(op, num_probes=setting.trace_probes, seed=seed)
    spectrum = None
    if density:
        spectrum = spectral_density_op(op, num_runs=setting.density_runs, num_steps=setting.density_steps, seed=seed)
    values = eigen.eigenvalues.tolist()
    result = {
        "eigenvalues": values,
        "residuals": eigen.residuals.tolist(),
        "relative_residuals": eigen.relative_residuals.tolist(),
        "error_bounds": eigen.error_bounds.tolist() if eigen.error_bounds is not None else None,
        "lanczos_converged": eigen.converged,
        "lanczos_hvp": eigen.num_hvp,
        "lambda_max": values[0],
        "lambda_5": values[TOP_K - 1],
        "ratio": eigen.ratio(TOP_K),
        "trace": trace.estimate,
        "trace_stderr": trace.stderr,
        "trace_probes": setting.trace_probes,
        "density_hvp": spectrum.num_hvp if spectrum is not None else 0,
        "seconds_measuring": time.perf_counter() - started,
    }
    return result, spectrum


def paper_scale(setting: Setting, recipe: Recipe, train_examples: int) -> Setting:
    """The setting for a dataset other than digits: the full training loss checked (and lambda_max tracked) once
    per epoch, and no replay: the run stops at the first epoch whose full training loss is below the threshold."""
    if recipe.dataset == "digits":
        return setting
    per_epoch = max(1, train_examples // recipe.batch_size)
    return dataclasses.replace(setting, check_every=per_epoch, track_every=per_epoch, replay=False)


def _one_seed(
    seed: int, setting: Setting, say: Callable[[str], None], recipe: Recipe = Recipe()
) -> tuple[list[dict[str, Any]], dict[str, SpectralDensity], Setting]:
    """SGD and SAM (each radius) trained on the seed's split to the threshold, and measured there; and the
    setting used (:func:`paper_scale`)."""
    images, labels, test_images, test_labels = digits_tensors(seed, recipe)
    setting = paper_scale(setting, recipe, len(labels))
    examples = min(setting.examples, len(labels))
    subset = list(zip(images[:examples].split(CHUNK), labels[:examples].split(CHUNK)))
    records, densities = [], {}
    for rho in (None, *setting.rhos):
        trained = train_to_loss(seed, rho, images, labels, subset, setting, recipe)
        density = rho is None or rho == setting.rhos[0]
        measured, spectrum = measure_spectrum(trained.model, subset, setting, seed, density)
        if spectrum is not None:
            densities[_key(rho)] = spectrum
        subset_loss, _ = _loss_and_accuracy(trained.model, images[:examples], labels[:examples])
        _, test_accuracy = _loss_and_accuracy(trained.model, test_images, test_labels)
        record = {
            "seed": seed,
            "optimizer": _key(rho),
            "rho": rho,
            "reached": trained.reached,
            "step": trained.step,
            "epochs": trained.epochs,
            "train_loss": trained.train_loss,
            "train_loss_step_before": trained.loss_before,
            "subset_loss": subset_loss,
            "train_accuracy": trained.train_accuracy,
            "test_accuracy": test_accuracy,
            **measured,
            "tracked": [list(t) for t in trained.tracked],
            "loss_checks": [list(c) for c in trained.losses],
            "steps_to_loss_below_2": next((c for c, loss in trained.losses if loss < 2.0), None),
            "seconds_training": trained.seconds_training,
            "seconds_tracking": trained.seconds_tracking,
        }
        records.append(record)
        say(
            f"hessian-spectrum: seed {seed} {_label(rho)}: loss {trained.train_loss:.4g} at step {trained.step} "
            f"({trained.epochs:.1f} epochs{'' if trained.reached else ', threshold NOT reached'}), lambda_max "
            f"{record['lambda_max']:.4g}, lambda_max/lambda_5 {record['ratio']:.3g}, tr(H) {record['trace']:.4g} "
            f"({trained.seconds_training + trained.seconds_tracking + record['seconds_measuring']:.0f} s)"
        )
    return records, densities, setting


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _cell(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (the mean alone for one seed), to ``digits`` significant digits."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {_spread(values):.2g}"


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of one optimiser's measurements; the trace's standard error is that of the mean
    of the per-seed estimates (each with its own Hutchinson error)."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "all_reached": all(r["reached"] for r in runs)}
    for name in ("lambda_max", "lambda_5", "ratio", "trace", "train_loss", "subset_loss", "step", "test_accuracy"):
        values = [float(r[name]) for r in runs]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = _spread(values)
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    out["trace_stderr"] = math.sqrt(sum(r["trace_stderr"] ** 2 for r in runs)) / len(runs)
    return out


def _plot_tracking(
    ctx: Context, records: list[dict[str, Any]], keys: list[str], threshold: float, examples: int
) -> Any:
    """lambda_max along training, against the step and against the full training loss; the last point of each run
    is the Lanczos lambda_max at the stopping point.

    The tracker's power iteration finds the eigenvalue of largest *magnitude*: where that one is negative (a saddle,
    e.g. SAM's first steps on the ``ln 10`` plateau), its magnitude is drawn with an ``x``, on the log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(keys, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    negative_drawn = False
    for key in keys:
        runs = [r for r in records if r["optimizer"] == key]
        for index, r in enumerate(runs):
            steps = [t[0] for t in r["tracked"]] + [r["step"]]
            losses = [t[1] for t in r["tracked"]] + [r["train_loss"]]
            values = [t[2] for t in r["tracked"]] + [r["lambda_max"]]
            magnitudes = [max(abs(v), 1e-4) for v in values]
            label = _label(r["rho"]) if index == 0 else None
            for axis, xs in ((left, steps), (right, losses)):
                axis.plot(xs, magnitudes, "-", color=colours[key], linewidth=0.9, alpha=0.8, label=label)
                positive = [(x, m) for x, m, v in zip(xs[:-1], magnitudes, values) if v > 0]
                negative = [(x, m) for x, m, v in zip(xs[:-1], magnitudes, values) if v <= 0]
                if positive:
                    axis.plot(*zip(*positive), "o", color=colours[key], markersize=2.5)
                if negative:
                    axis.plot(*zip(*negative), "x", color=colours[key], markersize=5)
                    negative_drawn = True
                axis.plot(xs[-1], magnitudes[-1], "*", color=colours[key], markersize=9)
    if negative_drawn:
        left.plot([], [], "x", color="k", markersize=5, label="x: |dominant eigenvalue|, negative")
    left.set_xlabel("step")
    left.set_ylabel(f"lambda_max ({examples} training examples)")
    left.set_yscale("log")
    left.set_title("lambda_max along training (star: the measured point)", fontsize=9)
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.invert_xaxis()
    right.axvline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    right.set_xlabel("full training loss (decreasing ->)")
    right.set_title("the same, against the training loss", fontsize=9)
    right.legend(fontsize=8)
    figure.tight_layout()
    path = ctx.figure_path("lambda_max_along_training.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_density(
    ctx: Context, densities: dict[str, list[SpectralDensity]], summaries: dict[str, dict[str, Any]]
) -> Any:
    """SLQ densities of SGD and SAM overlaid, the runs of every seed pooled, on one grid and one smoothing width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = torch.cat([d.nodes.reshape(-1) for group in densities.values() for d in group]).to(torch.float64)
    low, high = float(nodes.min()), float(nodes.max())
    sigma = 0.01 * max(high - low, 1e-12)
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, 1500, dtype=torch.float64)
    colours = {"sgd": "tab:red"}
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for key, group in densities.items():
        values = torch.stack([d.density(grid, sigma) for d in group]).mean(dim=0)
        colour = colours.get(key, "tab:blue")
        runs = sum(d.num_runs for d in group)
        label = f"{_label(summaries[key]['rho'])} (SLQ runs: {runs})"
        axis.semilogy(grid.numpy(), values.clamp_min(1e-8).numpy(), color=colour, linewidth=1.0, label=label)
        axis.axvline(summaries[key]["lambda_max"], color=colour, linestyle="--", linewidth=0.8)
    axis.set_ylim(1e-6, None)
    axis.set_xlabel("eigenvalue of the Hessian (dashed: mean lambda_max by Lanczos)")
    axis.set_ylabel("density (Gaussian smoothing)")
    axis.set_title(f"SLQ spectral density at matched training loss (sigma = {sigma:.2g})", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = ctx.figure_path("spectral_density.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ratio_cells(by_seed: dict[tuple[int, str], dict[str, Any]], seeds: tuple[int, ...], main: str) -> list[str]:
    """SGD's value over SAM's, per seed, for lambda_max, lambda_5, their ratio and the trace: mean ± std."""
    return [
        _cell([by_seed[(s, "sgd")][name] / by_seed[(s, main)][name] for s in seeds])
        for name in ("lambda_max", "lambda_5", "ratio", "trace")
    ]


def _detail_table(records: list[dict[str, Any]]) -> str:
    """Per seed and optimiser: the stopping point, the top-5 eigenvalues with their residuals and error bounds, and
    the trace with its standard error."""
    rows = [
        [
            r["seed"],
            _label(r["rho"]),
            f"{r['train_loss']:.4g} at step {r['step']} ({r['train_loss_step_before']:.4g} a step before)",
            ", ".join(f"{v:.4g}" for v in r["eigenvalues"]),
            f"{max(r['relative_residuals']):.1e}",
            f"{max(b / abs(v) for b, v in zip(r['error_bounds'], r['eigenvalues'])):.1e}",
            f"{r['trace']:.4g} ± {r['trace_stderr']:.2g}",
            r["lanczos_hvp"],
        ]
        for r in records
    ]
    headers = [
        "seed",
        "optimiser",
        "training loss at the measured point",
        "top-5 eigenvalues",
        "max rel. residual",
        "max rel. error bound",
        "tr(H) ± stderr",
        "Lanczos products",
    ]
    return markdown_table(headers, rows)


def run(ctx: Context) -> Outcome:
    """Train SGD and SAM to a common training loss on clean digits, per seed, and compare their Hessian spectra."""
    setting = QUICK if ctx.quick else FULL
    recipe, rest = recipe_from(dict(ctx.overrides))
    if "epochs" in rest:
        setting = dataclasses.replace(setting, max_epochs=rest["epochs"])
    if "rho" in rest:
        setting = dataclasses.replace(setting, rhos=(rest["rho"],))
    threads = torch.get_num_threads()
    # small matrices: on a shared 2-core machine a second thread mostly waits
    torch.set_num_threads(rest.get("threads") or (1 if recipe.is_default else threads))
    try:
        records: list[dict[str, Any]] = []
        densities: dict[str, list[SpectralDensity]] = {}
        for seed in ctx.seeds:
            seed_records, seed_densities, setting = _one_seed(seed, setting, ctx.progress, recipe)
            records += seed_records
            for key, density in seed_densities.items():
                densities.setdefault(key, []).append(density)
    finally:
        torch.set_num_threads(threads)

    rhos: tuple[float | None, ...] = (None, *setting.rhos)
    keys = [_key(rho) for rho in rhos]
    summaries = {
        key: {
            "rho": rho,
            **_summary([r for r in records if r["optimizer"] == key]),
            "paper_lambda_max": PAPER["sgd" if rho is None else "sam"]["lambda_max"],
            "paper_ratio": PAPER["sgd" if rho is None else "sam"]["ratio"],
        }
        for key, rho in zip(keys, rhos)
    }
    by_seed = {(r["seed"], r["optimizer"]): r for r in records}
    sgd_over_sam = {
        key: [by_seed[(s, "sgd")]["lambda_max"] / by_seed[(s, key)]["lambda_max"] for s in ctx.seeds]
        for key in keys[1:]
    }
    loss_gaps = {
        key: [abs(by_seed[(s, key)]["train_loss"] - by_seed[(s, "sgd")]["train_loss"]) for s in ctx.seeds]
        for key in keys[1:]
    }

    rows = []
    for key, rho in zip(keys, rhos):
        runs = [r for r in records if r["optimizer"] == key]
        paper = PAPER["sgd" if rho is None else "sam"]
        name = _label(rho) + (" (paper's rho)" if rho == PAPER_RHO else "")
        rows.append(
            [
                name + ("" if summaries[key]["all_reached"] else " (threshold NOT reached)"),
                _cell([r["train_loss"] for r in runs]),
                _cell([r["subset_loss"] for r in runs]),
                _cell([r["epochs"] for r in runs], 2),
                _cell([r["lambda_max"] for r in runs]),
                _cell([r["lambda_5"] for r in runs]),
                _cell([r["ratio"] for r in runs]),
                _cell([r["trace"] for r in runs]),
                _cell([100 * r["test_accuracy"] for r in runs], 3),
                f"{paper['lambda_max']:g}",
                f"{paper['ratio']:g}",
            ]
        )
    for key in keys[1:]:
        rows.append(
            [
                f"SGD / {_label(summaries[key]['rho'])}",
                "",
                "",
                "",
                *_ratio_cells(by_seed, ctx.seeds, key),
                "",
                f"{PAPER['sgd']['lambda_max'] / PAPER['sam']['lambda_max']:g}",
                f"{PAPER['sgd']['ratio'] / PAPER['sam']['ratio']:.3g}",
            ]
        )
    headers = [
        "optimiser",
        "training loss (all)",
        f"loss on the {setting.examples} measured",
        "epochs",
        "lambda_max",
        "lambda_5",
        "lambda_max / lambda_5",
        "tr(H)",
        "test acc %",
        "paper lambda_max",
        "paper lambda_max / lambda_5",
    ]
    seconds = {
        key: {
            phase: statistics.fmean(r[f"seconds_{phase}"] for r in records if r["optimizer"] == key)
            for phase in ("training", "tracking", "measuring")
        }
        for key in keys
    }
    figures = [
        _plot_tracking(ctx, records, keys, setting.threshold, setting.examples),
        _plot_density(ctx, densities, summaries),
    ]
    report = _report(setting, records, summaries, keys, sgd_over_sam, loss_gaps, seconds, recipe)
    results = {
        "setting": {
            "dataset": f"{recipe.dataset} (clean labels)",
            "model": f"SmallCNN width {WIDTH}, no BatchNorm" if recipe.model == "small_cnn" else recipe.model,
            "lr": recipe.lr,
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
            "batch_size": recipe.batch_size,
            "device": recipe.device,
            "exact_crossing": setting.replay,
            "lr_schedule": "constant",
            "threshold": setting.threshold,
            "max_epochs": setting.max_epochs,
            "check_every": setting.check_every,
            "track_every": setting.track_every,
            "hessian_examples": setting.examples,
            "lanczos_value_tol": VALUE_TOL,
            "trace_probes": setting.trace_probes,
            "density_runs": setting.density_runs,
            "density_steps": setting.density_steps,
            "rhos": list(setting.rhos),
        },
        "paper_numbers": PAPER,
        "measured": summaries,
        "sgd_over_sam_lambda_max": sgd_over_sam,
        "paper_sgd_over_sam_lambda_max": PAPER["sgd"]["lambda_max"] / PAPER["sam"]["lambda_max"],
        "train_loss_gap": loss_gaps,
        "seconds_per_run": seconds,
        "runs": records,
    }
    return Outcome(
        headers=headers,
        rows=rows,
        results=results,
        report=report,
        figures=figures,
        caption=(
            f"Mean ± std over seeds {list(ctx.seeds)}; each optimiser stopped at the first step whose full training "
            f"loss is below {setting.threshold:g}; Hessian of the cross-entropy on the first {setting.examples} "
            "training examples. The last row(s): SGD's value over SAM's, per seed. The paper's numbers are a "
            "WideResNet without BatchNorm on CIFAR-10."
        ),
    )


def _report(
    setting: Setting,
    records: list[dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
    keys: list[str],
    sgd_over_sam: dict[str, list[float]],
    loss_gaps: dict[str, list[float]],
    seconds: dict[str, dict[str, float]],
    recipe: Recipe = Recipe(),
) -> str:
    """The commentary that follows the table: the protocol, the per-seed details, and the comparison with the paper,
    each statement computed from the runs."""
    main = keys[1]
    sgd, sam = summaries["sgd"], summaries[main]
    seeds = sorted({r["seed"] for r in records})
    by_seed = {(r["seed"], r["optimizer"]): r for r in records}
    flatter_ratio = sum(by_seed[(s, main)]["ratio"] < by_seed[(s, "sgd")]["ratio"] for s in seeds)
    smaller_trace = sum(by_seed[(s, main)]["trace"] < by_seed[(s, "sgd")]["trace"] for s in seeds)
    largest_gap = max(max(gaps) for gaps in loss_gaps.values())
    ablation = ""
    if PAPER_RHO in setting.rhos:
        values = sgd_over_sam[_key(PAPER_RHO)]
        ablation = (
            f" With the paper's radius, rho = {PAPER_RHO:g}, SGD's lambda_max is "
            f"{statistics.fmean(values):.3g} times SAM's (per seed {', '.join(f'{v:.3g}' for v in values)})."
        )
    plateau = "; ".join(
        f"{_label(summaries[k]['rho'])} "
        + _cell([float(r["steps_to_loss_below_2"] or math.nan) for r in records if r["optimizer"] == k], 4)
        for k in keys
    )
    negative = "; ".join(
        f"{_label(summaries[k]['rho'])} {sum(t[2] <= 0 for r in records if r['optimizer'] == k for t in r['tracked'])}"
        f" of {sum(len(r['tracked']) for r in records if r['optimizer'] == k)}"
        for k in keys
    )
    timing = "; ".join(
        f"{_label(summaries[k]['rho'])}: {s['training']:.0f} s training, {s['tracking']:.0f} s tracking "
        f"lambda_max, {s['measuring']:.0f} s measuring"
        for k, s in seconds.items()
    )
    ratios = sgd_over_sam[main]
    stop = (
        f"Each run stops at the *first step* at which its full training loss (all training examples, clean labels) is "
        f"below {setting.threshold:g}: the loss is computed every {setting.check_every} steps, and when a check falls "
        "below the threshold the run goes back to the previous check (its model and optimiser state were kept) and "
        "replays the steps one at a time (bit-exact)."
        if setting.replay
        else f"Each run stops at the first check (once per epoch, every {setting.check_every} steps) at which its full "
        f"training loss (all training examples, clean labels) is below {setting.threshold:g}, or after "
        f"{setting.max_epochs} epochs."
    )
    model = f"SmallCNN width {WIDTH} on digits" if recipe.is_default else f"{recipe.model} on {recipe.dataset}"
    return f"""
**How the comparison was made fair.** Both optimisers start from the same initialisation and see the same batches
({model}; SGD: lr {recipe.lr:g}, momentum {recipe.momentum:g}, weight decay {recipe.weight_decay:g}, batch
{recipe.batch_size}, constant lr; SAM: the library's `SAM` around that same SGD). {stop} The table gives both
optimisers' losses at those
points, over all training examples and over the {setting.examples} the Hessian is taken on; the per-seed table
below gives the loss one step earlier too (above the threshold). The largest SGD-SAM difference in training loss
at the measured points is {largest_gap:.2g}. The cross-entropy Hessian shrinks as the loss goes to zero, so
lambda_max is plotted against the training loss too (figure, right), over the whole runs.

**Measurements**, on the first {setting.examples} training examples of each seed's split: the top-{TOP_K}
eigenvalues by Lanczos with full reorthogonalisation, stopped when every eigenvalue's error bound is within
{VALUE_TOL:g} of it relatively (`value_tol`, one guard value), residuals verified with true products; tr(H) by
Hutchinson with {setting.trace_probes} Rademacher probes (± its standard error per seed below; the table gives mean
± std over seeds, and the standard error of that mean from the probes alone is {sgd["trace_stderr"]:.2g} for SGD and
{sam["trace_stderr"]:.2g} for SAM); the spectral density by SLQ ({setting.density_runs} start vector(s) x
{setting.density_steps} Lanczos steps per model, pooled over seeds); lambda_max along training every
{setting.track_every} steps by `SharpnessTracker` (warm-started power iteration, relative tolerance 1e-3).

{_detail_table(records)}

**Against the paper.** At matched training loss SGD's lambda_max is {statistics.fmean(ratios):.3g} times SAM's
(per seed {", ".join(f"{v:.3g}" for v in ratios)}; the paper: 24). SAM's lambda_max / lambda_5 is the smaller in
{flatter_ratio} of {len(seeds)} seed(s) ({sam["ratio"]:.3g} against SGD's {sgd["ratio"]:.3g}; the paper: 2.6 against
11.4), and its trace the smaller in {smaller_trace} of {len(seeds)}.{ablation}

**On the way.** Steps until the full training loss first fell below 2 (it starts at ln 10 = 2.30, the uniform
prediction; checked every {setting.check_every} steps): {plateau}. Tracked points where the eigenvalue of largest
magnitude, which power iteration finds, was negative (a saddle; drawn as x in the figure): {negative}.

Time per run (mean over seeds): {timing}.
"""


REPRODUCTION = Reproduction(
    name="hessian-spectrum",
    summary="At matched training loss SAM's Hessian has a smaller lambda_max and lambda_max / lambda_5 than SGD's",
    paper="Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization (ICLR 2021), sec. 4.2",
    run=run,
    overridable=frozenset(
        {"dataset", "data_root", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "rho", "device"}
        | {"threads"}
    ),
    # the paper trains with a cosine schedule to the end (200 epochs); here the learning rate is constant and the
    # run stops at the first epoch below the common training loss (or after --epochs)
    paper_command=(
        "flatminima reproduce hessian-spectrum --dataset cifar10 --data-root DATA --model wrn28_10_nobn --epochs 200 "
        "--batch-size 256 --lr 0.1 --momentum 0.9 --weight-decay 5e-4 --rho 0.05 --device cuda"
    ),
)
