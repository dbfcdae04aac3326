"""Friendly SAM against pytorch_optimizer's ``FriendlySAM`` (and, when given, the official codes) on one float64 MLP.

Run it where pytorch_optimizer is installed: ``/tmp/peervenv/bin/python benchmarks/peer_friendly_sam.py`` (a few
seconds); ``--output FILE`` also writes the markdown report, ``--steps N`` sets the training length (default 20).
``--official DIR`` adds the authors' own code, read from ``DIR/fsam_utils.py`` (nblt/F-SAM ``utils.py``, its class
``FriendlySAM``) and ``DIR/msam.py`` (MarlonBecker/MSAM ``optimizer/msam.py``, class ``MSAM``); neither is shipped
here (licences), and their rows are left out without them.

Every run starts from the same float64 MLP (10 -> 16 -> 3, tanh) with SGD (lr 0.1, momentum 0.9) as the base
optimiser and takes the same batches (a fresh batch of 32 per step); a row gives the largest absolute weight
difference between two runs after all steps, and, for scale, how far the runs moved from plain SGD. Ours is driven
by ``SAM.step(closure)``; the peers by a backward pass at ``w`` and then ``step(closure)`` (pytorch_optimizer's and
F-SAM's documented use), the official MSAM by a backward pass at its (perturbed) weights and ``step()``, with
``move_back_from_momentumAscent()`` at the end, as its ``main.py`` does before evaluating.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import float64_batches, max_diff, weights
from _peer import Net, options_parser, parse_options
from torch import Tensor, nn

from flatminima import SAM
from flatminima.variants.friendly_sam import FriendlyAscent
from flatminima.variants.momentum_sam import MomentumAscent

LR, MOMENTUM, RHO, MSAM_RHO, WD = 0.1, 0.9, 0.05, 0.5, 5e-4


def closure_of(model: nn.Module, x: Tensor, y: Tensor, passes: list[int], penalty: float = 0.0) -> Callable[[], Tensor]:
    """Forward and backward of the batch loss, plus ``penalty / 2 ||w||^2`` (weight decay in the loss) if given."""

    def closure() -> Tensor:
        passes.append(1)
        loss = F.cross_entropy(model(x), y)
        if penalty:
            loss = loss + 0.5 * penalty * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    return closure


def train_ours(
    steps: int, rule: Any, rho: float, wd: float = 0.0, wd_in_loss: bool = False
) -> tuple[list[Tensor], int]:
    model, passes = Net(), []
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=MOMENTUM,
              weight_decay=0.0 if wd_in_loss else wd, perturbation=rule)  # fmt: skip
    for x, y in float64_batches(steps):
        opt.step(closure_of(model, x, y, passes, wd if wd_in_loss else 0.0))
    return weights(model), len(passes)


def train_peer(steps: int, cls: type, wd: float = 0.0, **options: Any) -> tuple[list[Tensor], int]:
    """A davda54-style SAM class (pytorch_optimizer's, F-SAM's): backward at w, then step(closure)."""
    model, passes = Net(), []
    opt = cls(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=wd, **options)
    for x, y in float64_batches(steps):
        closure = closure_of(model, x, y, passes)
        opt.zero_grad()
        closure()
        opt.step(lambda closure=closure: (opt.zero_grad(), closure())[1])
    return weights(model), len(passes)


@contextlib.contextmanager
def peer_norm_in_float64() -> Iterator[None]:
    """pytorch_optimizer's SAM classes take the squared global gradient norm in float32 (``get_global_gradient_norm``
    ends in ``.float()``); this runs them with it in the gradients' dtype, to show what the rest of a difference
    is."""
    import pytorch_optimizer.optimizer.sam as peer_sam

    original = peer_sam.get_global_gradient_norm

    def in_grad_dtype(param_groups: Any, device: Any = None, *, weight_adaptive: bool = False) -> Tensor:
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)

    peer_sam.get_global_gradient_norm = in_grad_dtype
    try:
        yield
    finally:
        peer_sam.get_global_gradient_norm = original


def train_sgd(steps: int, wd: float = 0.0) -> list[Tensor]:
    model, passes = Net(), []
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=wd)
    for x, y in float64_batches(steps):
        opt.zero_grad()
        closure_of(model, x, y, passes)()
        opt.step()
    return weights(model)


def train_official_msam(steps: int, cls: type, wd: float = 0.0) -> tuple[list[Tensor], int]:
    model, passes = Net(), []
    opt = cls(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=wd, rho=MSAM_RHO)
    opt.move_up_to_momentumAscent()
    for x, y in float64_batches(steps):
        opt.zero_grad()
        closure_of(model, x, y, passes)()
        opt.step()
    opt.move_back_from_momentumAscent()
    return weights(model), len(passes)


def load_class(path: Path, name: str) -> type:
    """The class ``name`` from a source file, executed alone with torch in scope (the rest of the file may import
    what is not installed here)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"class {name}"))
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("class ")), len(lines))
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile("\n".join(lines[start:stop]), str(path), "exec"), namespace)  # the authors' code, as given
    return namespace[name]


def main(argv: list[str] | None = None) -> int:
    parser = options_parser(__doc__)
    parser.add_argument("--official", type=Path, default=None, help="folder with fsam_utils.py and msam.py")
    args = parse_options(parser, argv)
    from pytorch_optimizer import FriendlySAM

    steps = args.steps
    rows: list[tuple[str, str, str, float, str]] = []

    def row(what: str, ours: tuple[list[Tensor], int], peer: tuple[list[Tensor], int], peer_name: str,
            sgd: list[Tensor], note: str) -> None:  # fmt: skip
        diff = max_diff(ours[0], peer[0])
        moved = max_diff(ours[0], sgd)
        rows.append((what, peer_name, f"{ours[1]} / {peer[1]}", diff, f"{moved:.1e}; {note}"))

    sgd, sgd_wd = train_sgd(steps), train_sgd(steps, WD)
    po = "pytorch_optimizer"
    row("sigma 1, lambda 0.6", train_ours(steps, FriendlyAscent(1.0, 0.6), RHO),
        train_peer(steps, FriendlySAM, sigma=1.0, lmbda=0.6), po, sgd,
        "paper's order = official order at sigma 1")  # fmt: skip
    row("sigma 1, lambda 0.9, wd 5e-4", train_ours(steps, FriendlyAscent(1.0, 0.9), RHO, WD),
        train_peer(steps, FriendlySAM, WD, sigma=1.0, lmbda=0.9), po, sgd_wd, "with weight decay")  # fmt: skip
    row("sigma 1, lambda 0.6, foreach", train_ours(steps, FriendlyAscent(1.0, 0.6), RHO),
        train_peer(steps, FriendlySAM, sigma=1.0, lmbda=0.6, foreach=True), po, sgd,
        "peer's batched path (sub, then add (1 - lambda) d)")  # fmt: skip
    row("sigma 0.5, lambda 0.9, subtract=updated", train_ours(steps, FriendlyAscent(0.5, 0.9), RHO),
        train_peer(steps, FriendlySAM, sigma=0.5, lmbda=0.9), po, sgd,
        "ours removes m_t (the paper), the peer m_{t-1}")  # fmt: skip
    row("sigma 0.5, lambda 0.9, subtract=previous", train_ours(steps, FriendlyAscent(0.5, 0.9, "previous"), RHO),
        train_peer(steps, FriendlySAM, sigma=0.5, lmbda=0.9), po, sgd, "both remove m_{t-1}")  # fmt: skip
    with peer_norm_in_float64():
        row("sigma 1, lambda 0.6, peer's norm in float64", train_ours(steps, FriendlyAscent(1.0, 0.6), RHO),
            train_peer(steps, FriendlySAM, sigma=1.0, lmbda=0.6), po, sgd,
            "the ~1e-9 above is the peer's float32 norm")  # fmt: skip
        row("sigma 0.5, lambda 0.9, previous, peer's norm in float64",
            train_ours(steps, FriendlyAscent(0.5, 0.9, "previous"), RHO),
            train_peer(steps, FriendlySAM, sigma=0.5, lmbda=0.9), po, sgd, "as above")  # fmt: skip
    row("defaults (ours lambda 0.6, peer 0.9)", train_ours(steps, FriendlyAscent(), RHO),
        train_peer(steps, FriendlySAM), po, sgd, "the defaults differ, not the maths")  # fmt: skip
    official = args.official
    if official is not None and (official / "fsam_utils.py").is_file():
        fsam = load_class(official / "fsam_utils.py", "FriendlySAM")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its sigma and lambda
            row("sigma 1, lambda 0.6", train_ours(steps, FriendlyAscent(1.0, 0.6), RHO),
                train_peer(steps, fsam, sigma=1.0, lmbda=0.6), "nblt/F-SAM", sgd, "the authors' class")  # fmt: skip
            row("sigma 0.5, lambda 0.9, subtract=previous",
                train_ours(steps, FriendlyAscent(0.5, 0.9, "previous"), RHO),
                train_peer(steps, fsam, sigma=0.5, lmbda=0.9), "nblt/F-SAM", sgd, "the authors' class")  # fmt: skip
    if official is not None and (official / "msam.py").is_file():
        msam = load_class(official / "msam.py", "MSAM")
        row("Momentum-SAM, rho 0.5", train_ours(steps, MomentumAscent(), MSAM_RHO),
            train_official_msam(steps, msam), "MarlonBecker/MSAM", sgd,
            "weights kept at w~ there, restored here")  # fmt: skip
        row("Momentum-SAM, rho 0.5, wd 5e-4", train_ours(steps, MomentumAscent(), MSAM_RHO, WD),
            train_official_msam(steps, msam, WD), "MarlonBecker/MSAM", sgd_wd,
            "its weight decay is taken at w~, ours at w")  # fmt: skip
        row("Momentum-SAM, rho 0.5, wd 5e-4 in our loss", train_ours(steps, MomentumAscent(), MSAM_RHO, WD, True),
            train_official_msam(steps, msam, WD), "MarlonBecker/MSAM", sgd_wd,
            "ours with wd/2 ||w||^2 in the loss: its gradient, at w + e, is the official decay")  # fmt: skip

    lines = [
        f"Friendly SAM (and Momentum-SAM) against peers: float64 MLP 10-16-3, SGD lr {LR} momentum {MOMENTUM}, "
        f"rho {RHO} (Momentum-SAM {MSAM_RHO}), {steps} steps, batches of 32.",
        "",
        "| case | peer | passes ours / peer | max abs weight diff | moved from SGD; note |",
        "|---|---|---|---|---|",
        *(f"| {what} | {peer} | {passes} | {diff:.1e} | {note} |" for what, peer, passes, diff, note in rows),
        "",
        "Reading the table:",
        "",
        "- Same maths, same answer: with sigma = 1 the paper's order (remove m_t, ours by default) and the code's",
        "  (remove m_{t-1}: nblt/F-SAM, pytorch_optimizer) give the same perturbation, since g - m_t =",
        "  lambda (g - m_{t-1}) and e is normalised; with `subtract='previous'` ours is the code's for any sigma.",
        "  Against the authors' class the runs agree to rounding (~1e-14). Against pytorch_optimizer they agree",
        "  to ~1e-9: its squared global gradient norm is taken in float32 (`get_global_gradient_norm` ends in",
        "  `.float()`); with that norm taken in float64 the rest is rounding (~1e-14).",
        "- Where they differ: for sigma != 1, ours by default follows the paper's equations (d = g - sigma m_t with",
        "  m_t already holding g_t), the codes remove the previous mean; both are offered. The defaults differ",
        "  too: lambda 0.6 here (the official run.sh), 0.9 in pytorch_optimizer (the official class's default).",
        "- Momentum-SAM (when the official code is given): the official MSAM keeps the weights at w~ between steps;",
        "  ours restores w each step; the weights agree to rounding. With weight decay they differ because the",
        "  official code adds wd * w~ (the perturbed weights) to the gradient, torch's SGD wd * w; putting the",
        "  decay in our loss (so it is differentiated at w + e) reproduces the official run.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
