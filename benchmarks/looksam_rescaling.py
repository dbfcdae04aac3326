"""How large LookSAM's added term is in each layer, relative to that layer's own gradient (a diagnostic, not a timing).

LookSAM's cheap steps add ``alpha ||g|| g_v / ||g_v||`` to the gradient ``g``. In the paper's global form the total
is ``alpha ||g||``, but a layer can receive many times its own gradient; per tensor it is ``alpha`` times in every
layer by construction. This script writes Algorithm 1 out in plain PyTorch on the label-noise demo (digits, 40 %
noise, SmallCNN, SGD lr 0.05 momentum 0.9 wd 5e-4, batch 32, k = 5, alpha = 0.7, seed 0, constant learning rate)
and prints, at the first SAM step of each epoch, ``||g_v|| / ||g||``, the largest per-layer ratio and the batch
loss, for each rho.

    python3 benchmarks/looksam_rescaling.py --rhos 0.05 0.3 --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn.functional as F

from flatminima.data.dataset import to_float
from flatminima.data.transforms import normalize
from flatminima.experiments.label_noise import DEMO_CONFIG
from flatminima.train import model_for, prepare_data


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((u * v).sum()) for u, v in zip(a, b))


def run(rho: float, epochs: int, alpha: float = 0.7, k: int = 5) -> list[tuple[int, float, float, float, str]]:
    """(epoch, loss, ||g_v|| / ||g||, the largest added/own-gradient ratio, its layer) at the first SAM step of each
    epoch."""
    config = dataclasses.replace(DEMO_CONFIG, rho=rho)
    data = prepare_data(config)
    torch.manual_seed(0)
    model = model_for(config, data.dataset)
    names, params = zip(*model.named_parameters())
    images = normalize(to_float(data.train_images), data.dataset.mean, data.dataset.std)
    labels = data.train_labels
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def gradient(x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), [g.detach() for g in grads]

    rows, gv, step, order = [], None, 0, torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=order)
        for start in range(0, len(labels) - 31, 32):
            x, y = images[perm[start : start + 32]], labels[perm[start : start + 32]]
            loss, g = gradient(x, y)
            norm_g = math.sqrt(_dot(g, g))
            if step % k == 0:  # SAM's two passes; store g_v, the part of g_s orthogonal to g
                e = [rho * t / norm_g for t in g]
                with torch.no_grad():
                    torch._foreach_add_(params, e)
                _, gs = gradient(x, y)
                with torch.no_grad():
                    torch._foreach_sub_(params, e)
                c = _dot(g, gs) / norm_g**2
                gv = [s - c * t for s, t in zip(gs, g)]
                direction = gs
                if not rows or rows[-1][0] != epoch:  # the first SAM step of this epoch
                    norm_gv = math.sqrt(_dot(gv, gv))
                    scale = alpha * norm_g / norm_gv
                    ratios = [scale * float(v.norm()) / max(float(t.norm()), 1e-12) for v, t in zip(gv, g)]
                    worst = max(range(len(ratios)), key=ratios.__getitem__)
                    rows.append((epoch, loss, norm_gv / norm_g, ratios[worst], names[worst]))
            else:  # the cheap step: g + alpha ||g|| / ||g_v|| g_v
                scale = alpha * norm_g / math.sqrt(_dot(gv, gv))
                direction = [t + scale * v for t, v in zip(g, gv)]
            for p, d in zip(params, direction):
                p.grad = d
            opt.step()
            step += 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.3])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| rho | epoch | loss at its first step | ‖g_v‖ / ‖g‖ | largest added / own gradient | layer |")
    print("|---:|---:|---:|---:|---:|---|")
    for rho in args.rhos:
        for epoch, loss, relative, ratio, layer in run(rho, args.epochs):
            print(f"| {rho} | {epoch} | {loss:.3f} | {relative:.3f} | {ratio:.1f} | `{layer}` |")


if __name__ == "__main__":
    main()
