"""``cnn-data-model``: on the signal/noise patch model, SAM generalises over a larger range of signal strength than SGD.

Chen, Zhang, Kou, Chen, Hsieh and Gu (NeurIPS 2023) train a two-layer ReLU CNN with a fixed ``+1/-1`` second layer
(:class:`~flatminima.models.two_layer_cnn.TwoLayerCNN`) on two-patch data, one patch ``y mu`` and the other Gaussian
noise ``xi`` orthogonal to ``mu``, with training labels flipped with probability ``p``
(:func:`~flatminima.data.patches.make_signal_noise_patches`). Gradient descent overfits benignly only when the signal
is strong enough, roughly ``n ||mu||^4 >= C d sigma_p^4``; below that it fits the flipped labels by memorising the
noise patches (the coefficients ``<w_{y_i,r}, xi_i>`` grow) and the test error stays far from the optimum. SAM's
ascent step deactivates the filters that align with noise early in training, so the signal is learnt first and the
test error is small over a strictly larger part of the ``(||mu||, d)`` plane.

The reproduction trains the same initialisation on the same data with full-batch gradient descent
(``torch.optim.SGD``) and with the library's :class:`~flatminima.SAM` around it, over a grid of ``(||mu||, d)`` and
several seeds, one model at a time (SAM normalises its ascent over all of a model's parameters, so models trained
together as one stacked parameter would not be trained by SAM), and compares the regions where the mean clean test
error is within ``BENIGN_MARGIN`` of the optimum, 0.

The radius: at initialisation the gradient is dominated by its noise part, and the ascent ``rho g / ||g||`` moves
each coefficient ``<w_{y_i,r}, xi_i>`` down by about ``rho sqrt(d / (n m))``, while the coefficients are spread with
standard deviation ``sigma_0 sigma_p sqrt(d)``; the shift is ``rho / (sigma_0 sqrt(n m))`` standard deviations,
independent of ``d``. With ``sigma_0 = 0.01``, ``n = 20``, ``m = 10`` that is ``rho / 0.14``, so ``rho = 0.5``
(3.5 standard deviations) switches off the noise-aligned filters at the perturbed point, the paper's mechanism; the
full run also trains ``rho = 0.1`` and ``0.2``, which do not, to show how the effect depends on the radius.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from flatminima.data.dataset import ImageDataset
from flatminima.data.patches import make_signal_noise_patches, signal_vector
from flatminima.experiments.reproduce import Context, Outcome, Reproduction
from flatminima.models.two_layer_cnn import TwoLayerCNN, noise_memorisation
from flatminima.optim import SAM

__all__ = [
    "BENIGN_MARGIN",
    "REPRODUCTION",
    "SAM_RHO",
    "Setting",
    "benign_cells",
    "benign_threshold",
    "make_data",
    "noise_patches",
    "run",
    "train_cnn",
]

N_TRAIN = 20
N_TEST = 1000
WIDTH = 10  # filters per class, m
INIT_STD = 0.01  # sigma_0
NOISE_STD = 1.0  # sigma_p
FLIP_PROB = 0.1  # p
LR = 0.1
EPOCHS = 200  # full-batch steps
SAM_RHO = 0.5  # the radius of the main comparison (module docstring)
ABLATION_RHOS = (0.1, 0.2)  # the full run's smaller radii
BENIGN_MARGIN = 0.05  # a cell is benign when its mean clean test error is at most this (the optimum is 0)
TRACK_EVERY = 5  # steps between two records of the coefficients in the tracked cell

FULL_SIGNAL_NORMS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0)
FULL_DIMS = (100, 300, 500, 700, 900, 1100)
QUICK_SIGNAL_NORMS = (2.0, 7.0)
QUICK_DIMS = (300, 900)
TRACKED = (2.0, 900)  # (||mu||, d): SGD memorises the noise there, SAM does not; in both grids


@dataclass(frozen=True)
class Setting:
    """One training run: the data's signal strength ``||mu||`` and dimension ``d``, the seed, the optimiser
    (``rho=None`` for gradient descent, else SAM with that radius) and the number of full-batch steps."""

    signal_norm: float
    dim: int
    seed: int
    rho: float | None
    epochs: int = EPOCHS


def make_data(signal_norm: float, dim: int, seed: int) -> ImageDataset:
    """The patch data of papers.md sec. 5: n = 20, 1000 clean test points, sigma_p = 1, flip probability 0.1.

    For a given ``(d, seed)`` the labels, flips and noise are the same draw for every ``||mu||`` (the generator
    draws nothing whose size depends on ``||mu||``), so the cells of a row of the grid differ only in the signal.
    """
    return make_signal_noise_patches(
        N_TRAIN, N_TEST, dim=dim, signal_norm=signal_norm, noise_std=NOISE_STD, flip_prob=FLIP_PROB, seed=seed
    )


def noise_patches(images: Tensor) -> Tensor:
    """The noise patch ``xi_i`` of each example, ``[n, d]`` from images ``[n, 2, d]``.

    The signal patch ``+-mu`` lies along ``e_1`` and the noise is orthogonal to it, so the noise patch is the one
    with the larger component off ``e_1`` (the signal patch has none).
    """
    off_signal = images[:, :, 1:].norm(dim=2)  # [n, 2]
    which = off_signal.argmax(dim=1)
    return images[torch.arange(len(images)), which]


def _coefficients(model: TwoLayerCNN, xi: Tensor, labels: Tensor, mu: Tensor) -> tuple[float, float]:
    """Noise memorisation ``mean_i max_r <w_{y_i,r}, xi_i>`` (``y_i`` the observed label: the filters that fit
    example ``i``) and signal learning ``mean_j max_r <w_{j,r}, j mu>`` over ``j = +-1``."""
    noise = noise_memorisation(model, xi)  # [2, m, n]
    own = noise[labels, :, torch.arange(len(labels))]  # [n, m]
    signal = noise_memorisation(model, mu[None])[:, :, 0]  # [2, m]: <w_{j,r}, mu>
    learnt = 0.5 * (signal[1].max() + (-signal[0]).max())
    return float(own.max(dim=1).values.mean()), float(learnt)


def train_cnn(setting: Setting, data: ImageDataset | None = None, track_every: int = 0) -> dict[str, Any]:
    """Train one :class:`TwoLayerCNN` on one draw of the patch data; return its errors and coefficients.

    ``data`` is ``make_data(signal_norm, dim, seed)`` when not given. The filters are drawn from
    ``N(0, INIT_STD^2)`` with a generator seeded ``seed + 10_000``, so both optimisers start from the same point.
    Each step is one full-batch step on the logistic loss: ``torch.optim.SGD(lr=LR)`` for ``rho=None``, else
    ``SAM(params, SGD, rho=rho, lr=LR)`` driven by a closure. With ``track_every > 0`` the noise and signal
    coefficients are recorded every ``track_every`` steps (and at step 0) under ``"trajectory"``.
    """
    if data is None:
        data = make_data(setting.signal_norm, setting.dim, setting.seed)
    x, y = data.train_images, data.train_labels
    mu = signal_vector(setting.dim, setting.signal_norm)
    xi = noise_patches(x)
    model = TwoLayerCNN(setting.dim, WIDTH, INIT_STD)
    generator = torch.Generator().manual_seed(setting.seed + 10_000)
    with torch.no_grad():
        model.weight.copy_(INIT_STD * torch.randn(model.weight.shape, generator=generator))

    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    sgd = setting.rho is None
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=LR)
        if sgd
        else SAM(model.parameters(), torch.optim.SGD, rho=setting.rho, lr=LR)
    )
    trajectory: list[tuple[int, float, float]] = []
    for step in range(setting.epochs):
        if track_every and step % track_every == 0:
            trajectory.append((step, *_coefficients(model, xi, y, mu)))
        if sgd:
            optimizer.zero_grad(set_to_none=True)
            closure()
            optimizer.step()
        else:
            optimizer.step(closure)
    noise, signal = _coefficients(model, xi, y, mu)
    if track_every:
        trajectory.append((setting.epochs, noise, signal))
    with torch.no_grad():
        test_error = float((model(data.test_images).argmax(dim=1) != data.test_labels).float().mean())
        logits = model(x)
    predicted = logits.argmax(dim=1)
    flipped = y != data.clean_train_labels
    result: dict[str, Any] = {
        "test_error": test_error,
        "train_error": float((predicted != y).float().mean()),
        "train_loss": float(F.cross_entropy(logits, y)),
        "flipped": int(flipped.sum()),
        "flipped_fitted": int((predicted[flipped] == y[flipped]).sum()),
        "noise_memorisation": noise,
        "signal_learning": signal,
    }
    if track_every:
        result["trajectory"] = trajectory
    return result


def benign_cells(errors: Sequence[Sequence[float]], margin: float = BENIGN_MARGIN) -> list[list[bool]]:
    """Which cells of a map of mean clean test errors are benign: within ``margin`` of the optimum, 0."""
    return [[e <= margin for e in row] for row in errors]


def benign_threshold(benign_row: Sequence[bool], signal_norms: Sequence[float]) -> float:
    """The smallest ``||mu||`` of a row from which every larger ``||mu||`` is benign too; nan when the strongest
    signal is not benign."""
    threshold = math.nan
    for norm, ok in sorted(zip(signal_norms, benign_row), reverse=True):
        if not ok:
            break
        threshold = norm
    return threshold


def _label(rho: float | None) -> str:
    return "SGD" if rho is None else f"SAM rho={rho:g}"


def _key(rho: float | None) -> str:
    return "sgd" if rho is None else f"sam_rho{rho:g}"


def _plot_maps(
    ctx: Context,
    name: str,
    maps: dict[float | None, list[list[float]]],
    signal_norms: Sequence[float],
    dims: Sequence[int],
    boundary_c: float,
) -> Any:
    """Heatmaps of the mean clean test error over ``(||mu||, d)``, side by side, with the benign cells outlined
    and the curve ``n ||mu||^4 = C d`` (``C`` read off SGD's boundary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 3.9), squeeze=False)
    image = None
    for axis, (rho, errors) in zip(axes[0], maps.items()):
        values = np.array(errors)
        image = axis.imshow(values, origin="lower", cmap="magma_r", vmin=0.0, vmax=0.5, aspect="auto")
        for i in range(len(dims)):
            for j in range(len(signal_norms)):
                colour = "white" if values[i, j] > 0.3 else "black"
                axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour)
        benign = values <= BENIGN_MARGIN
        for i in range(len(dims)):
            for j in range(len(signal_norms)):
                if not benign[i, j]:
                    continue
                # an edge of the region wherever the neighbour is outside it (or off the grid)
                if j == 0 or not benign[i, j - 1]:
                    axis.plot([j - 0.5, j - 0.5], [i - 0.5, i + 0.5], color="deepskyblue", linewidth=2)
                if j == len(signal_norms) - 1 or not benign[i, j + 1]:
                    axis.plot([j + 0.5, j + 0.5], [i - 0.5, i + 0.5], color="deepskyblue", linewidth=2)
                if i == 0 or not benign[i - 1, j]:
                    axis.plot([j - 0.5, j + 0.5], [i - 0.5, i - 0.5], color="deepskyblue", linewidth=2)
                if i == len(dims) - 1 or not benign[i + 1, j]:
                    axis.plot([j - 0.5, j + 0.5], [i + 0.5, i + 0.5], color="deepskyblue", linewidth=2)
        if math.isfinite(boundary_c) and len(signal_norms) > 2:
            fine = np.linspace(dims[0], dims[-1], 100)
            norms = (boundary_c * fine / N_TRAIN) ** 0.25
            inside = (norms >= signal_norms[0]) & (norms <= signal_norms[-1])
            columns = np.interp(norms, signal_norms, np.arange(len(signal_norms)))
            rows = np.interp(fine, dims, np.arange(len(dims)))
            axis.plot(columns[inside], rows[inside], "--", color="limegreen", linewidth=1.2)
        axis.set_xticks(range(len(signal_norms)), [f"{v:g}" for v in signal_norms])
        axis.set_yticks(range(len(dims)), [str(v) for v in dims])
        axis.set_xlabel("signal strength ||mu||")
        if axis is axes[0][0]:
            axis.set_ylabel("dimension d")
        cells = int(benign.sum())
        axis.set_title(f"{_label(rho)}: benign {cells}/{benign.size} cells", fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=list(axes[0]), shrink=0.85, label="clean test error (mean over seeds)")
    curve = (
        f"; green dashes: n ||mu||^4 = C d, C = {boundary_c:.3g} from SGD's boundary"
        if math.isfinite(boundary_c) and len(signal_norms) > 2
        else ""
    )
    figure.suptitle(f"blue outline: benign cells (mean clean test error <= {BENIGN_MARGIN:g}){curve}", fontsize=9)
    path = ctx.figure_path(name)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _plot_trajectories(ctx: Context, curves: dict[float | None, list[list[tuple[int, float, float]]]]) -> Any:
    """Noise memorisation and signal learning over training in the tracked cell: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for rho, runs in curves.items():
        values = np.array(runs)  # [seeds, records, 3]
        steps = values[0, :, 0]
        for axis, column in ((left, 1), (right, 2)):
            mean = values[:, :, column].mean(axis=0)
            (line,) = axis.plot(steps, mean, label=_label(rho), linewidth=1.5 if rho in (None, SAM_RHO) else 1.0)
            axis.fill_between(
                steps,
                values[:, :, column].min(axis=0),
                values[:, :, column].max(axis=0),
                alpha=0.2,
                color=line.get_color(),
            )
    left.set_ylabel("mean_i max_r <w_{y_i,r}, xi_i>")
    left.set_title("noise memorisation", fontsize=10)
    right.set_ylabel("mean_j max_r <w_{j,r}, j mu>")
    right.set_title("signal learning", fontsize=10)
    for axis in (left, right):
        axis.set_xlabel("full-batch step")
        axis.legend(fontsize=8)
    figure.suptitle(
        f"||mu|| = {TRACKED[0]:g}, d = {TRACKED[1]}, {len(next(iter(curves.values())))} seed(s)", fontsize=9
    )
    figure.tight_layout()
    path = ctx.figure_path("noise_memorisation.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else math.nan


def run(ctx: Context) -> Outcome:
    """Train SGD and SAM over the ``(||mu||, d)`` grid and every seed; compare the benign regions."""
    signal_norms = QUICK_SIGNAL_NORMS if ctx.quick else FULL_SIGNAL_NORMS
    dims = QUICK_DIMS if ctx.quick else FULL_DIMS
    rhos: tuple[float | None, ...] = (None, SAM_RHO) if ctx.quick else (None, SAM_RHO, *ABLATION_RHOS)
    # records[rho][i][j]: one result per seed, for d = dims[i] and ||mu|| = signal_norms[j]
    records: dict[float | None, list[list[list[dict[str, Any]]]]] = {
        rho: [[[] for _ in signal_norms] for _ in dims] for rho in rhos
    }
    curves: dict[float | None, list[list[tuple[int, float, float]]]] = {rho: [] for rho in rhos}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each step is microseconds of maths: a second thread only adds overhead
    try:
        for seed in ctx.seeds:
            for i, dim in enumerate(dims):
                for j, norm in enumerate(signal_norms):
                    data = make_data(norm, dim, seed)
                    tracked = (norm, dim) == TRACKED
                    for rho in rhos:
                        result = train_cnn(Setting(norm, dim, seed, rho), data, TRACK_EVERY if tracked else 0)
                        if tracked:
                            curves[rho].append(result.pop("trajectory"))
                        records[rho][i][j].append(result)
            ctx.progress(
                f"cnn-data-model: seed {seed} done ({len(dims) * len(signal_norms)} cells, {len(rhos)} runs each)"
            )
    finally:
        torch.set_num_threads(threads)

    def cell_map(rho: float | None, key: str) -> list[list[float]]:
        return [[_mean([r[key] for r in cell]) for cell in row] for row in records[rho]]

    errors = {rho: cell_map(rho, "test_error") for rho in rhos}
    benign = {rho: benign_cells(errors[rho]) for rho in rhos}
    total = len(dims) * len(signal_norms)
    counts = {rho: sum(map(sum, benign[rho])) for rho in rhos}
    harmful = [(i, j) for i in range(len(dims)) for j in range(len(signal_norms)) if not benign[None][i][j]]
    ti, tj = dims.index(TRACKED[1]), signal_norms.index(TRACKED[0])

    thresholds = {rho: [benign_threshold(row, signal_norms) for row in benign[rho]] for rho in rhos}
    constants = [N_TRAIN * t**4 / d for t, d in zip(thresholds[None], dims) if math.isfinite(t)]
    boundary_c = statistics.median(constants) if constants else math.nan

    rows = []
    for rho in rhos:
        runs = [r for row in records[rho] for cell in row for r in cell]
        flipped = sum(r["flipped"] for r in runs)
        tracked_cell = records[rho][ti][tj]
        rows.append(
            [
                _label(rho),
                f"{counts[rho]}/{total}",
                counts[rho] / total,
                _mean([errors[rho][i][j] for i, j in harmful]),
                _mean([r["train_error"] for r in runs]),
                sum(r["flipped_fitted"] for r in runs) / flipped if flipped else math.nan,
                _mean([r["test_error"] for r in tracked_cell]),
                _mean([r["noise_memorisation"] for r in tracked_cell]),
                _mean([r["signal_learning"] for r in tracked_cell]),
            ]
        )
    headers = [
        "optimiser",
        "benign cells",
        "benign area",
        "test error, SGD-harmful cells",
        "train error",
        "flipped labels fitted",
        f"test error at ‖mu‖={TRACKED[0]:g}, d={TRACKED[1]}",
        "noise memorisation there",
        "signal learning there",
    ]

    figures = [
        _plot_maps(
            ctx, "test_error_maps.png", {None: errors[None], SAM_RHO: errors[SAM_RHO]}, signal_norms, dims, boundary_c
        )
    ]
    if len(rhos) > 2:
        figures.append(
            _plot_maps(ctx, "rho_ablation.png", {rho: errors[rho] for rho in rhos[2:]}, signal_norms, dims, boundary_c)
        )
    figures.append(_plot_trajectories(ctx, curves))

    threshold_table = "\n".join(
        [
            "| d | SGD: smallest benign ‖mu‖ | n ‖mu‖^4 / d there | "
            + " | ".join(f"{_label(rho)}: smallest benign ‖mu‖" for rho in rhos[1:])
            + " |",
            "|---:|---:|---:|" + "---:|" * (len(rhos) - 1),
        ]
        + [
            f"| {d} | {thresholds[None][i]:g} | "
            + (f"{N_TRAIN * thresholds[None][i] ** 4 / d:.3g}" if math.isfinite(thresholds[None][i]) else "n/a")
            + " | "
            + " | ".join(f"{thresholds[rho][i]:g}" for rho in rhos[1:])
            + " |"
            for i, d in enumerate(dims)
        ]
    )
    report = f"""
Each cell is {len(ctx.seeds)} seed(s) of the patch data (n = {N_TRAIN}, {N_TEST} test points, two patches,
sigma_p = {NOISE_STD:g}, training labels flipped with probability {FLIP_PROB:g}, test labels clean) and a
`TwoLayerCNN` (m = {WIDTH} filters per class, ReLU, fixed second layer, sigma_0 = {INIT_STD:g}) trained for
{EPOCHS} full-batch steps with lr {LR:g} on the logistic loss, by gradient descent and by `SAM(SGD, rho)` from the
same initialisation. A cell is *benign* when its mean clean test error is at most {BENIGN_MARGIN:g} (the optimum on
clean labels is 0; on labels flipped like the training ones it is p = {FLIP_PROB:g}, and an error e on clean labels
reads p + (1 - 2p) e there, so the margin is {(1 - 2 * FLIP_PROB) * BENIGN_MARGIN:.3g} above p). The benign area is
the fraction of the {total} cells. "SGD-harmful cells" are the {len(harmful)} cells where SGD is not benign; train
error and flipped labels fitted are over every run of the grid. Noise memorisation is
`mean_i max_r <w_(y_i,r), xi_i>` (y_i the observed label), signal learning `mean_j max_r <w_(j,r), j mu>`, both at
the end of training in the tracked cell.

Per dimension, the smallest ||mu|| from which every stronger signal is benign, and SGD's n ||mu||^4 / d there (the
paper's condition is n ||mu||^4 >= C d sigma_p^4; the median, C = {boundary_c:.3g}, draws the dashed curve):

{threshold_table}
"""
    results: dict[str, Any] = {
        "signal_norms": list(signal_norms),
        "dims": list(dims),
        "grid_cells": total,
        "epochs": EPOCHS,
        "lr": LR,
        "rho": SAM_RHO,
        "rhos": [rho for rho in rhos if rho is not None],
        "benign_margin": BENIGN_MARGIN,
        "benign_area_sgd": counts[None] / total,
        "benign_area_sam": counts[SAM_RHO] / total,
        "benign_cells_sgd": counts[None],
        "benign_cells_sam": counts[SAM_RHO],
        "sgd_harmful_cells": len(harmful),
        "boundary_constant_sgd": boundary_c,
        "tracked": {"signal_norm": TRACKED[0], "dim": TRACKED[1]},
        "noise_memorisation_final_sgd": rows[0][7],
        "noise_memorisation_final_sam": rows[1][7],
        "signal_learning_final_sgd": rows[0][8],
        "signal_learning_final_sam": rows[1][8],
        "optimisers": {
            _key(rho): {
                "rho": rho,
                "benign_cells": counts[rho],
                "benign_area": counts[rho] / total,
                "benign": benign[rho],
                "smallest_benign_signal_norm": thresholds[rho],
                "test_error_mean": errors[rho],
                "test_error_std": [
                    [statistics.pstdev([r["test_error"] for r in cell]) for cell in row] for row in records[rho]
                ],
                "train_error_mean": cell_map(rho, "train_error"),
                "flipped_fitted_fraction": [
                    [sum(r["flipped_fitted"] for r in cell) / max(1, sum(r["flipped"] for r in cell)) for cell in row]
                    for row in records[rho]
                ],
                "noise_memorisation_mean": cell_map(rho, "noise_memorisation"),
                "signal_learning_mean": cell_map(rho, "signal_learning"),
                "trajectory_mean": [
                    [step, _mean([run[k][1] for run in curves[rho]]), _mean([run[k][2] for run in curves[rho]])]
                    for k, (step, _, _) in enumerate(curves[rho][0])
                ]
                if curves[rho]
                else [],
            }
            for rho in rhos
        },
    }
    return Outcome(
        headers=headers,
        rows=rows,
        results=results,
        report=report,
        figures=figures,
        caption=f"Benign region (mean clean test error <= {BENIGN_MARGIN:g}) of SGD and SAM over the (||mu||, d) grid; "
        "noise memorisation and signal learning in one cell where they differ.",
    )


REPRODUCTION = Reproduction(
    name="cnn-data-model",
    summary="SAM generalises over a larger range of signal strength and dimension than SGD on the patch data model",
    paper="Chen, Zhang, Kou, Chen, Hsieh, Gu, Why Does Sharpness-Aware Minimization Generalize Better Than SGD? "
    "(NeurIPS 2023)",
    run=run,
    default_seeds=(0, 1, 2, 3, 4),
    quick_seeds=(0, 1, 2),
)
