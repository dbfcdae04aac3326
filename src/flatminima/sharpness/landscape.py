"""Loss landscapes in 1D and 2D (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

The loss is evaluated at ``w + alpha d1`` (1D) or ``w + alpha d1 + beta d2`` (2D) on a grid, along
filter-normalised random directions (``filter_normalized_direction``), along Hessian eigenvectors, or along
directions you give. A direction is a list of tensors shaped like the trainable parameters (in
``model.parameters()`` order), or one flat vector of their concatenation, as the Hessian module returns them.

``loss_fn(outputs, targets)`` may return per-example losses (``reduction="none"``) or the batch mean: each point's
loss is the mean over all examples of ``data`` (batch means are weighted by batch size). ``data`` takes the forms
of ``flatminima.sharpness.data`` (one batch or an iterable of batches; inputs may be a tuple of tensors). The
model's weights and modes are restored exactly afterwards; the measurement runs in eval mode unless
``train_mode=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flatminima.output_folder import save_figure
from flatminima.sharpness.checks import positive_int
from flatminima.sharpness.data import Batch, Batches, batch_size, forward, measuring, trainable_parameters
from flatminima.sharpness.losses import LossFn, batch_mean_loss, error_rate

__all__ = ["Landscape", "filter_normalized_direction", "loss_landscape_1d", "loss_landscape_2d"]

DirectionLike = Tensor | Sequence[Tensor]
Data = Batch | Iterable[Batch]


@dataclass
class Landscape:
    """A loss landscape: ``losses[i]`` at ``alphas[i]`` (1D) or ``losses[i, j]`` at ``(alphas[i], betas[j])`` (2D).

    ``accuracies`` has the shape of ``losses`` (None when the task is not classification); ``directions``
    names how the directions were chosen (``"random"``, ``"eigen"`` or ``"given"``).
    """

    alphas: Tensor
    betas: Tensor | None
    losses: Tensor
    accuracies: Tensor | None
    directions: str

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG: a line for 1D, a filled contour for 2D. Returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        fig = Figure(figsize=(5.5, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        alphas = self.alphas.double().cpu().numpy()
        losses = self.losses.double().cpu().numpy()
        if self.betas is None:
            ax.plot(alphas, losses, "o-", color="C0", label="loss")
            ax.set_xlabel(r"$\alpha$")
            ax.set_ylabel("loss", color="C0")
            if self.accuracies is not None:
                twin = ax.twinx()
                twin.plot(alphas, self.accuracies.double().cpu().numpy(), "s--", color="C1", label="accuracy")
                twin.set_ylabel("accuracy", color="C1")
        else:
            betas = self.betas.double().cpu().numpy()
            filled = ax.contourf(alphas, betas, losses.T, levels=20, cmap="viridis")
            lines = ax.contour(alphas, betas, losses.T, levels=10, colors="k", linewidths=0.5)
            ax.clabel(lines, inline=True, fontsize=7, fmt="%.3g")
            fig.colorbar(filled, ax=ax, label="loss")
            ax.plot([0.0], [0.0], "r+", markersize=10)
            ax.set_xlabel(r"$\alpha$")
            ax.set_ylabel(r"$\beta$")
        ax.set_title(title if title is not None else f"loss landscape ({self.directions} directions)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=100)
        return path


def filter_normalized_direction(model: nn.Module, seed: int = 0, ignore_bn_and_bias: bool = True) -> list[Tensor]:
    """A random Gaussian direction, filter-normalised (Li et al. 2018), one tensor per trainable parameter.

    For a parameter with two or more dimensions each filter (slice along the first dimension) of the direction is
    rescaled to the norm of the same filter of the weights. One-dimensional parameters (biases, BatchNorm and
    LayerNorm weights) get a zero direction when ``ignore_bn_and_bias``, else are rescaled as one filter.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for p in trainable_parameters(model).values():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore_bn_and_bias else _rescale(d, w)
        else:
            d = torch.stack([_rescale(df, wf) for df, wf in zip(d, w)])
        directions.append(d)
    return directions


def _rescale(d: Tensor, w: Tensor) -> Tensor:
    d_norm = torch.linalg.vector_norm(d)
    if d_norm == 0:
        return torch.zeros_like(d)
    return d * (torch.linalg.vector_norm(w) / d_norm)


def _as_direction(direction: DirectionLike, weights: list[Tensor], what: str) -> list[Tensor]:
    """A direction as tensors shaped like ``weights``, from such a list or one flat vector of all of them."""
    shapes = [tuple(w.shape) for w in weights]
    total = sum(w.numel() for w in weights)
    if isinstance(direction, Tensor):
        if direction.numel() != total:
            raise ValueError(
                f"{what}: a flat direction needs {total} elements (all trainable parameters), got shape "
                f"{tuple(direction.shape)}"
            )
        pieces = torch.split(direction.reshape(-1), [w.numel() for w in weights])
        out = [piece.reshape(w.shape) for piece, w in zip(pieces, weights)]
    elif isinstance(direction, Sequence) and all(isinstance(t, Tensor) for t in direction):
        got = [tuple(t.shape) for t in direction]
        if got != shapes:
            raise ValueError(f"{what}: the direction's tensor shapes {got} do not match the parameters' {shapes}")
        out = list(direction)
    else:
        raise TypeError(
            f"{what}: a direction must be a tensor or a sequence of tensors, got {type(direction).__name__}"
        )
    out = [t.detach().to(device=w.device, dtype=w.dtype) for t, w in zip(out, weights)]
    if not all(torch.isfinite(t).all() for t in out):
        raise ValueError(f"{what}: the direction has non-finite entries")
    return out


def _eigen_directions(eigenvectors: object, weights: list[Tensor], count: int) -> list[list[Tensor]]:
    """The first ``count`` eigenvectors: a (k, dim) tensor (one per row), a flat vector (k = 1), a sequence of
    directions, or an object with such an ``eigenvectors`` attribute (the Hessian module's ``EigenResult``)."""
    if not isinstance(eigenvectors, (Tensor, Sequence)) and hasattr(eigenvectors, "eigenvectors"):
        eigenvectors = eigenvectors.eigenvectors  # a result of the Hessian module (EigenResult)
    if eigenvectors is None:
        raise ValueError("directions='eigen' needs eigenvectors= (e.g. the top Hessian eigenvectors)")
    total = sum(w.numel() for w in weights)
    if isinstance(eigenvectors, Tensor):
        if eigenvectors.dim() == 2 and eigenvectors.shape[1] == total:
            vectors: list[DirectionLike] = list(eigenvectors)
        else:
            vectors = [eigenvectors]
    elif isinstance(eigenvectors, Sequence) and eigenvectors:
        # either one direction given per parameter, or a sequence of directions
        shapes = [tuple(w.shape) for w in weights]
        if all(isinstance(t, Tensor) for t in eigenvectors) and [tuple(t.shape) for t in eigenvectors] == shapes:
            vectors = [eigenvectors]
        else:
            vectors = list(eigenvectors)
    else:
        raise TypeError(f"eigenvectors must be a tensor or a non-empty sequence, got {type(eigenvectors).__name__}")
    if len(vectors) < count:
        raise ValueError(f"directions='eigen' needs {count} eigenvectors, got {len(vectors)}")
    return [_as_direction(v, weights, f"eigenvector {i}") for i, v in enumerate(vectors[:count])]


def _grid(span: tuple[float, float], num_points: int, name: str) -> Tensor:
    if not (isinstance(span, Sequence) and len(span) == 2):
        raise ValueError(f"{name} must be a pair (low, high), got {span!r}")
    low, high = float(span[0]), float(span[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be finite with low < high, got {span!r}")
    num_points = positive_int("num_points", num_points, minimum=2)
    grid = torch.linspace(low, high, num_points, dtype=torch.float64)
    # put the centre exactly on the unperturbed weights when the span contains it
    nearest = grid.abs().argmin()
    if grid[nearest].abs() <= 1e-9 * (high - low):
        grid[nearest] = 0.0
    return grid


def _evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Batches, total: int, params: dict[str, Tensor], device: torch.device
) -> tuple[float, float]:
    """Mean loss and accuracy over all ``total`` examples of ``batches`` at ``params`` (batches weighted by size)."""
    loss, accuracy = 0.0, 0.0
    for inputs, targets, weight in batches.weighted(total, device):
        outputs = forward(model, inputs, params)
        loss += batch_mean_loss(loss_fn, outputs, targets, batch_size(inputs)).item() * weight
        accuracy += (1.0 - error_rate(outputs, targets)) * weight
    return loss, accuracy


def _landscape(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    dirs: list[list[Tensor]],
    grids: list[Tensor],
    label: str,
    train_mode: bool,
) -> Landscape:
    trainable = trainable_parameters(model)
    device = next(iter(trainable.values())).device
    batches = Batches(data)
    total = batches.count()
    if total == 0:
        raise ValueError("data holds no examples")
    shape = tuple(len(g) for g in grids)
    losses = torch.empty(shape, dtype=torch.float64)
    accuracies = torch.empty(shape, dtype=torch.float64)
    with measuring(model, train_mode, restore_parameters=True), torch.no_grad():
        weights = {name: p.detach() for name, p in trainable.items()}
        for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
            coefficients = [grid[i].item() for grid, i in zip(grids, index)]
            params = {}
            for k, (name, w) in enumerate(weights.items()):
                value = w
                for c, d in zip(coefficients, dirs):
                    value = value + c * d[k]
                params[name] = value
            loss, accuracy = _evaluate(model, loss_fn, batches, total, params, device)
            losses[tuple(index)] = loss
            accuracies[tuple(index)] = accuracy
    return Landscape(
        alphas=grids[0],
        betas=grids[1] if len(grids) > 1 else None,
        losses=losses,
        accuracies=None if torch.isnan(accuracies).all() else accuracies,
        directions=label,
    )


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    direction: str | DirectionLike | None = None,
    eigenvectors: object = None,
    span: tuple[float, float] = (-1.0, 1.0),
    num_points: int = 21,
    seed: int = 0,
    ignore_bn_and_bias: bool = True,
    train_mode: bool = False,
) -> Landscape:
    """The loss at ``w + alpha d`` for ``num_points`` values of ``alpha`` evenly spaced over ``span``.

    ``direction``: None or ``"random"`` for a filter-normalised random direction (``seed``,
    ``ignore_bn_and_bias``); ``"eigen"`` for the first of ``eigenvectors`` (a flat vector, a ``(k, dim)`` tensor,
    a sequence of directions, or an ``EigenResult`` with its vectors); or a direction itself (list of tensors
    shaped like the trainable parameters, or one flat vector). ``alpha`` is in units of that direction (an
    eigenvector has unit norm). ``data`` as in ``m_sharpness``, iterated once per point (use a loader that
    does not shuffle; a one-shot iterator is read into memory once).
    """
    weights = list(trainable_parameters(model).values())
    if direction is None or (isinstance(direction, str) and direction == "random"):
        dirs, label = [filter_normalized_direction(model, seed, ignore_bn_and_bias)], "random"
    elif isinstance(direction, str) and direction == "eigen":
        dirs, label = _eigen_directions(eigenvectors, weights, 1), "eigen"
    elif isinstance(direction, str):
        raise ValueError(f"direction must be None, 'random', 'eigen' or a direction, got {direction!r}")
    else:
        dirs, label = [_as_direction(direction, weights, "direction")], "given"
    return _landscape(model, loss_fn, data, dirs, [_grid(span, num_points, "span")], label, train_mode)


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    directions: str | tuple[DirectionLike, DirectionLike] | None = None,
    eigenvectors: object = None,
    span: tuple[float, float] = (-1.0, 1.0),
    num_points: int = 11,
    seed: int = 0,
    ignore_bn_and_bias: bool = True,
    train_mode: bool = False,
) -> Landscape:
    """The loss at ``w + alpha d1 + beta d2`` on a ``num_points x num_points`` grid over ``span x span``.

    ``directions``: None or ``"random"`` for two filter-normalised random directions (seeds ``seed`` and
    ``seed + 1``); ``"eigen"`` for the first two of ``eigenvectors``; or a pair of directions. ``losses[i, j]`` is
    at ``(alphas[i], betas[j])``.
    """
    weights = list(trainable_parameters(model).values())
    if directions is None or (isinstance(directions, str) and directions == "random"):
        dirs = [filter_normalized_direction(model, s, ignore_bn_and_bias) for s in (seed, seed + 1)]
        label = "random"
    elif isinstance(directions, str) and directions == "eigen":
        dirs, label = _eigen_directions(eigenvectors, weights, 2), "eigen"
    elif isinstance(directions, str):
        raise ValueError(f"directions must be None, 'random', 'eigen' or a pair of directions, got {directions!r}")
    else:
        if not (isinstance(directions, Sequence) and len(directions) == 2):
            raise ValueError("directions must be a pair (d1, d2) of directions")
        dirs = [_as_direction(d, weights, f"direction {i}") for i, d in enumerate(directions)]
        label = "given"
    grid = _grid(span, num_points, "span")
    return _landscape(model, loss_fn, data, dirs, [grid, grid.clone()], label, train_mode)
