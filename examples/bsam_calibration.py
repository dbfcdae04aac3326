"""Predictive uncertainty with bSAM: SGD, SAM and bSAM on the digits

bSAM (Möllenhoff and Khan 2023) reads SAM as a relaxation of the Bayes objective and
runs it as an Adam-like method that also learns, per weight, the precision `s` of a
Gaussian posterior `N(w, 1/(N s))`, with `N` the data-set size (here 4 times the
training set, the tempering of the authors' code, `--dafactor 4`). Its first pass of
each step is taken at a draw from that posterior, and at the end the posterior comes
for free: `posterior_variance`, `sample_weights` and `predictive`
(`flatminima.variants.bsam`).

The example trains an MLP (64-128-10) on scikit-learn's digits three times from the
same initialisation and batch order, for the same number of epochs: SGD (momentum
0.9), SAM around the same SGD, and bSAM. It reports the test accuracy, the negative
log-likelihood (NLL) and the expected calibration error (ECE, 15 equal-width bins of
confidence), for bSAM both at its mean `w` and with its predictive, the softmax
averaged over `K = 32` draws of the weights. The figure is the reliability diagram of
each: the accuracy of the test examples in each confidence bin (their number above
the bar), against the diagonal of a calibrated model.

What to look for: the four reach about the same accuracy, and on this easy data set
SGD and SAM are already well calibrated (ECE about 0.01). bSAM's mean has the lowest
NLL (0.068 against SGD's 0.078; below SGD's for seeds 0, 1 and 2 alike), and its
predictive stays close to its mean: the posterior is narrow, its standard deviation
the same on every weight, about `1/sqrt(N gamma)`. With so few examples the damping
`gamma = 0.1` sets the precision `s`, not the curvature term `sqrt(s)|g|`, which is
small once the model fits; with `gamma = 0.01` and `N` the training set's size, the
noise (standard deviation 0.27) kept a run (lr 0.05) near 20 % accuracy. The ECE
differences are within the noise of 450 test examples: most bins hold a handful.
About 12 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import flatminima
from flatminima.data import DigitsSplit, load_digits_split
from flatminima.models import MLP
from flatminima.variants.bsam import BSAM, posterior_variance, predictive

NAME = "bsam_calibration"
SEED = 0
EPOCHS = 60
BATCH_SIZE = 32
BINS = 15
SAMPLES = 32  # K, the draws bSAM's predictive averages
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO = 0.05  # SAM's radius
# bSAM: alpha, rho (its ascent is rho g / s, no radius), delta = SGD's weight decay, the
# authors' damping gamma; beta2 = 0.99 instead of 0.999, so that s settles within the
# run's 2580 steps (with 0.999 it would still be decaying from s_0 = 1)
BSAM_OPTIONS = dict(lr=0.1, rho=0.01, betas=(0.9, 0.99), weight_decay=5e-4, damping=0.1)
TEMPERING = 4  # N = 4 x the training set, as the authors' code does (--dafactor 4)


def train(model: nn.Module, opt: torch.optim.Optimizer, split: DigitsSplit) -> None:
    """The same batches for every optimiser, a cosine learning rate, step(closure)."""
    steps = EPOCHS * -(-len(split.x_train) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order_gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        order = torch.randperm(len(split.x_train), generator=order_gen)
        for idx in order.split(BATCH_SIZE):
            x, y = split.x_train[idx], split.y_train[idx]

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            scheduler.step()


def reliability(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: the examples' share, mean confidence and accuracy."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    index = (confidence * BINS).ceil().long().clamp(1, BINS) - 1  # bins (0, 1/B], ...

    def total(values: Tensor) -> Tensor:
        return torch.zeros(BINS, dtype=torch.float64).index_add_(0, index, values)

    count = total(torch.ones_like(correct))
    safe = count.clamp(min=1)
    return count / len(labels), total(confidence.double()) / safe, total(correct) / safe


def scores(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Test accuracy (%), NLL and ECE of the predicted probabilities."""
    share, conf, accuracy = reliability(probs, labels)
    nll = F.nll_loss(probs.clamp(min=1e-12).log(), labels).item()
    return {
        "accuracy": 100 * (probs.argmax(dim=1) == labels).double().mean().item(),
        "nll": nll,
        "ece": (share * (conf - accuracy).abs()).sum().item(),
    }


def make_optimizer(name: str, model: nn.Module, n: int) -> torch.optim.Optimizer:
    """SGD, SAM around SGD, or bSAM with ``N = n``."""
    params = model.parameters()
    if name == "SGD":
        return torch.optim.SGD(params, **SGD)
    if name == "SAM":
        return flatminima.SAM(params, torch.optim.SGD, rho=RHO, **SGD)
    noise = torch.Generator().manual_seed(SEED)
    return BSAM(params, num_data=n, generator=noise, **BSAM_OPTIONS)


def draw(probs: dict[str, Tensor], results: dict, labels: Tensor, path: Path) -> None:
    """The reliability diagram of each, the number of examples above each bar."""
    columns = len(probs)
    fig, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 3.4), sharey=True)
    centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
    for ax, (name, p) in zip(axes, probs.items()):
        share, _, accuracy = reliability(p, labels)
        used = share > 0
        x, height = centres[used], accuracy[used]
        ax.bar(x, height, width=1 / BINS, edgecolor="black", alpha=0.7)
        counts = (share[used] * len(labels)).round().long()
        for left, top, count in zip(x.tolist(), height.tolist(), counts.tolist()):
            ax.text(left, min(top, 0.93) + 0.02, str(count), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ece, nll = results[name]["ece"], results[name]["nll"]
        ax.set_title(f"{name}\nECE {ece:.3f}, NLL {nll:.3f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy in the bin")
    fig.suptitle("Reliability on the digits' test set")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="example-output", help="%(default)s")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and reproducible

    split = load_digits_split(seed=SEED)
    torch.manual_seed(SEED)
    init = MLP(64, hidden=(128,)).state_dict()
    n = TEMPERING * len(split.x_train)
    x_test, y_test = split.x_test, split.y_test
    probs: dict[str, Tensor] = {}
    for name in ("SGD", "SAM", "bSAM"):
        model = MLP(64, hidden=(128,))
        model.load_state_dict(init)
        opt = make_optimizer(name, model, n)
        train(model, opt, split)
        model.eval()
        with torch.no_grad():
            label = name if name != "bSAM" else "bSAM, mean"
            probs[label] = model(x_test).softmax(dim=1)
    draws = torch.Generator().manual_seed(SEED + 1)
    average = predictive(model, opt, x_test, samples=SAMPLES, generator=draws)
    probs[f"bSAM, K={SAMPLES}"] = average
    std = torch.cat([v.sqrt().flatten() for v in posterior_variance(opt)])

    print(f"MLP 64-128-10 on digits: {EPOCHS} epochs, batch {BATCH_SIZE}, same start")
    print(f"{len(y_test)} test examples; ECE over {BINS} confidence bins")
    print(f"{'':<14}{'accuracy %':>11}{'NLL':>8}{'ECE':>8}")
    results = {name: scores(p, y_test) for name, p in probs.items()}
    for name, r in results.items():
        print(f"{name:<14}{r['accuracy']:>11.2f}{r['nll']:>8.4f}{r['ece']:>8.4f}")
    quartiles = torch.quantile(std, torch.tensor([0.25, 0.5, 0.75], dtype=std.dtype))
    spread = ", ".join(f"{q:.3f}" for q in quartiles.tolist())
    print(f"bSAM posterior std sqrt(1/(N s)), N = {n}, quartiles: {spread}")

    path = Path(args.output_dir) / f"{NAME}.png"
    draw(probs, results, y_test, path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
