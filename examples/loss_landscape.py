"""Loss landscapes of an SGD-trained and a SAM-trained model

The training loss of an SGD-trained and a SAM-trained network along filter-normalised
random directions, and along each one's sharpest direction. A loss landscape is the loss
along a line through the trained weights `w`, `L(w + alpha d)` for `alpha` in `[-1, 1]`.
With a random direction `d` the picture depends on the scale of the weights, which
differs between layers and between models; Li et al. (2018) make it comparable by filter
normalisation: each filter of `d` is rescaled to the norm of the same filter of `w`
(biases get no direction), so `alpha = 1` means "as far again as each filter already is
from zero". `flatminima.sharpness.loss_landscape_1d` does this (`loss_landscape_2d` for
a plane), evaluates the loss and accuracy on a grid, and leaves the model exactly as it
was.

The example trains an MLP (64-128-10, 9,610 weights) on scikit-learn's digits twice,
from the same initialisation and batch order, with SGD and with SAM (`rho = 0.1`), and
draws each model's landscape along three filter-normalised random directions (left: each
line the mean over the three, the band their range), and along the top eigenvector of
its Hessian, the sharpest direction, with unit norm (right; from
`flatminima.sharpness.hessian_eigenvalues`).

What to look for: both models reach the same training loss at `alpha = 0`, and SAM's
minimum is the flatter one. Along random directions the difference is modest, since a
random direction mostly sees the many flat ones. Along the sharpest direction it is
larger: the curvature at `alpha = 0` is `lambda_max`, about a third of SGD's for the SAM
model, and its loss stays lower on both sides. Further out, each curve rises faster than
the parabola its curvature gives, as cross-entropy does near zero loss, and unevenly (an
eigenvector's sign is arbitrary). The printout gives the numbers under the curves: the
loss at the ends of each line, and `lambda_max`. One seed: a sketch, not a measurement.
About 6 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.nn import functional as F

import flatminima
from flatminima.data import DigitsSplit, load_digits_split
from flatminima.models import MLP
from flatminima.sharpness import hessian_eigenvalues, loss_landscape_1d

NAME = "loss_landscape"
SEED = 0
EPOCHS = 20
BATCH_SIZE = 32
DIRECTIONS = 3  # random filter-normalised directions per model
EIGEN_SPAN = (-0.5, 0.5)  # along a unit eigenvector


def train(model: nn.Module, opt: torch.optim.Optimizer, split: DigitsSplit) -> None:
    """SGD or SAM, cosine learning rate, the same batches for both."""
    steps = EPOCHS * -(-len(split.x_train) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order_gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        order = torch.randperm(len(split.x_train), generator=order_gen)
        for idx in order.split(BATCH_SIZE):
            x, y = split.x_train[idx], split.y_train[idx]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            scheduler.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="example-output", help="%(default)s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and reproducible

    split = load_digits_split(seed=SEED)
    torch.manual_seed(SEED)
    init = MLP(64, hidden=(128,)).state_dict()
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = (split.x_train, split.y_train)
    loss_fn = nn.CrossEntropyLoss()

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    print(f"MLP 64-128-10 on digits, {EPOCHS} epochs, batch {BATCH_SIZE}")
    print("training loss at alpha = 0, and at the ends of the lines:")
    row = "{:<5}{:>10}{:>16}{:>12}{:>18}"
    print(row.format("", "alpha = 0", "random -1, 1", "lambda_max", "eigen -0.5, 0.5"))
    for name, color in (("SGD", "C0"), ("SAM", "C1")):
        model = MLP(64, hidden=(128,))
        model.load_state_dict(init)
        if name == "SGD":
            opt = torch.optim.SGD(model.parameters(), **sgd)
        else:
            opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **sgd)
        train(model, opt, split)

        # filter-normalised random directions, the same seeds for both models
        lines = []
        for seed in range(DIRECTIONS):
            line = loss_landscape_1d(model, loss_fn, data, num_points=41, seed=seed)
            lines.append(line)
        alphas = lines[0].alphas.numpy()
        losses = torch.stack([line.losses for line in lines])
        mean = losses.mean(dim=0).numpy()
        low, high = losses.min(dim=0).values.numpy(), losses.max(dim=0).values.numpy()
        left.fill_between(alphas, low, high, color=color, alpha=0.25, linewidth=0)
        left.plot(alphas, mean, color=color, label=name)

        # the sharpest direction: the top eigenvector of the Hessian
        eig = hessian_eigenvalues(model, loss_fn, data, k=1, value_tol=1e-3)
        sharpest = loss_landscape_1d(
            model,
            loss_fn,
            data,
            direction="eigen",
            eigenvectors=eig,
            span=EIGEN_SPAN,
            num_points=41,
        )
        right.plot(sharpest.alphas.numpy(), sharpest.losses.numpy(), color=color)

        ends = f"{mean[0]:.3f}, {mean[-1]:.3f}"
        eigen_ends = f"{sharpest.losses[0]:.3f}, {sharpest.losses[-1]:.3f}"
        lam = f"{eig.eigenvalues[0]:.3f}"
        print(row.format(name, f"{mean[len(mean) // 2]:.4f}", ends, lam, eigen_ends))

    left.set_title("filter-normalised random directions")
    left.set_xlabel("alpha")
    left.set_ylabel("training loss")
    left.legend()
    right.set_title("top Hessian eigenvector (unit norm)")
    right.set_xlabel("alpha")
    fig.tight_layout()
    path = Path(args.output_dir) / f"{NAME}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
