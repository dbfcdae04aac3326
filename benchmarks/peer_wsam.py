"""WSAM against pytorch_optimizer's ``WSAM`` on the same float64 MLP and batches.

Run it where pytorch_optimizer is installed: ``/tmp/peervenv/bin/python benchmarks/peer_wsam.py`` (a few seconds);
``--output FILE`` also writes the markdown report, ``--steps N`` sets the training length (default 20).

Every run starts from the same float64 MLP (10 -> 16 -> 3, tanh) with SGD (lr 0.1, momentum 0.9) as the base
optimiser (AdamW, lr 0.01, for one pair of rows) and takes the same batches (a fresh batch of 32 per step); a row
gives the largest absolute weight difference between two runs after all steps. Both sides are driven by
``step(closure)``, ours with ``SAM.step``, the peer's with its own (the closure zeroes the gradients first, as the
peer's first pass needs). gamma = 0.9 (the peer's default) and rho = 0.05 throughout. Where the two differ, the script
checks the explanation: it reruns with one change (the peer's gradient norm taken in float64, its ``eps`` set to 0,
our clipping of g(w+e) alone) and reports the difference that is left. It also counts the forward passes, resumes
each optimiser from a ``state_dict`` saved after 3 steps and loaded with ``torch.load(weights_only=True)``, and trains
a model with a tensor whose gradient is always zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from _common import float64_batches, max_diff, weights
from _peer import Counter, Net, PeerReport, options_parser, parse_options, round_trip
from torch import Tensor, nn

from flatminima import SAM
from flatminima.optim.rules import RuleContext
from flatminima.variants.wsam import WSAMDescent, _clip_coefficient

LR, MOMENTUM, RHO, GAMMA = 0.1, 0.9, 0.05, 0.9
ADAMW_LR, WD = 1e-2, 0.01
MAX_NORM = 0.25  # below ||g|| on these batches, so that the clipping acts
SAVE_AT = 3


# ---------------------------------------------------------------- ours


class ClipPerturbedOnly(WSAMDescent):
    """Our WSAM with pytorch_optimizer's clipping, g(w + e) alone to ``clip`` (g(w) as it is): isolates the clipping
    as the cause of a difference."""

    def __init__(self, gamma: float, decouple: bool, clip: float) -> None:
        super().__init__(gamma, decouple)
        self.clip = clip

    def direction_(
        self, params: list[Tensor], grads: list[Tensor], first_grads: Any, context: RuleContext, ascended: bool
    ) -> None:
        if ascended and first_grads is not None and grads:
            torch._foreach_mul_(grads, _clip_coefficient(grads, self.clip))
        super().direction_(params, grads, first_grads, context, ascended)


def ours(
    decouple: bool = True, gamma: float = GAMMA, adamw: bool = False, max_norm: float | None = None
) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> SAM:
        descent = WSAMDescent(gamma, decouple, max_norm)
        if adamw:
            return SAM(model.parameters(), torch.optim.AdamW, rho=RHO, lr=ADAMW_LR, weight_decay=WD, descent=descent)
        return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, descent=descent)

    return make


def ours_sam(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)


def ours_clip_perturbed_only(model: nn.Module) -> SAM:
    descent = ClipPerturbedOnly(GAMMA, True, MAX_NORM)
    return SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, descent=descent)


# ---------------------------------------------------------------- pytorch_optimizer


@contextlib.contextmanager
def float64_norms() -> Iterator[None]:
    """pytorch_optimizer's SAM module with its global gradient norm taken in float64 instead of float32."""
    import pytorch_optimizer.optimizer.sam as peer_sam

    original = peer_sam.get_global_gradient_norm

    def norm64(param_groups, device=None, *, weight_adaptive: bool = False) -> Tensor:
        grads = [p.grad for group in param_groups for p in group["params"] if p.grad is not None]
        return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)

    peer_sam.get_global_gradient_norm = norm64
    try:
        yield
    finally:
        peer_sam.get_global_gradient_norm = original


def peer(
    decouple: bool = True, gamma: float = GAMMA, adamw: bool = False, eps: float = 1e-12, max_norm: float | None = None
) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> Any:
        from pytorch_optimizer import WSAM

        options: dict[str, Any] = dict(rho=RHO, gamma=gamma, decouple=decouple, eps=eps, max_norm=max_norm)
        if adamw:
            return WSAM(model, model.parameters(), torch.optim.AdamW, lr=ADAMW_LR, weight_decay=WD, **options)
        return WSAM(model, model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **options)

    return make


# ---------------------------------------------------------------- one run, either side


def run(
    make: Callable[[nn.Module], Any], data: list[tuple[Tensor, Tensor]], dead: bool = False, resume: bool = False
) -> tuple[list[Tensor], int]:
    """Train with ``make(model)``'s optimiser by ``step(closure)``; with ``resume`` the run stops after SAVE_AT steps
    and continues in fresh objects loaded from the state dicts."""
    model = Net(dead)
    counter = Counter(model)
    opt = make(model)
    for t, (x, y) in enumerate(data):
        if resume and t == SAVE_AT:
            states = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
            model = Net(dead)
            model.load_state_dict(states["model"])
            counter.watch(model)
            opt = make(model)
            opt.load_state_dict(states["opt"])

        def closure(x: Tensor = x, y: Tensor = y, model: nn.Module = model, opt: Any = opt) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return weights(model), counter.passes


def first_gradient_norm(data: list[tuple[Tensor, Tensor]]) -> float:
    model = Net()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    return torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()


# ---------------------------------------------------------------- the report


def main(argv: list[str] | None = None) -> int:
    args = parse_options(options_parser(__doc__), argv)
    steps = args.steps
    data = float64_batches(steps)
    report = PeerReport("WSAM", steps)
    say, row = report, report.row

    # decoupled (the paper's Algorithm 1; both sides' default)
    ours_d, ours_passes = run(ours(True), data)
    peer_d, peer_passes = run(peer(True), data)
    row("decoupled: ours vs peer", max_diff(ours_d, peer_d),
        "peer's global gradient norm is float32 (`get_global_gradient_norm` casts)")  # fmt: skip
    with float64_norms():
        peer_d64, _ = run(peer(True), data)
        peer_d64_eps0, _ = run(peer(True, eps=0.0), data)
    row("decoupled: same, peer's norm in float64", max_diff(ours_d, peer_d64),
        "what is left: its `+ 1e-12` in `rho / (norm + eps)` and its `w + e - e` restore")  # fmt: skip
    row("decoupled: same, and peer's `eps=0`", max_diff(ours_d, peer_d64_eps0), "its `w + e - e` restore alone")

    # the objective's gradient through the base optimiser
    ours_c, _ = run(ours(False), data)
    peer_c, _ = run(peer(False), data)
    row("not decoupled: ours vs peer", max_diff(ours_c, peer_c), "float32 norm, as above")
    with float64_norms():
        peer_c64, _ = run(peer(False, eps=0.0), data)
    row("not decoupled: same, peer's norm in float64 and `eps=0`", max_diff(ours_c, peer_c64),
        "`k g~ + (1 - k) g` (ours) vs `g~.lerp_(g, 1 - k)` (peer) and the restore")  # fmt: skip
    row("ours: decoupled vs not decoupled", max_diff(ours_d, ours_c),
        "the size of the choice: g~ - g kept out of SGD's momentum")  # fmt: skip

    # gamma = 1/2, not decoupled: SAM
    ours_half, _ = run(ours(False, gamma=0.5), data)
    peer_half, _ = run(peer(False, gamma=0.5), data)
    sam, _ = run(ours_sam, data)
    row("gamma = 0.5 not decoupled: ours vs our SAM", max_diff(ours_half, sam), "bit for bit: k = 1, SAM's step")
    row("gamma = 0.5 not decoupled: peer vs our SAM", max_diff(peer_half, sam), "float32 norm, eps, restore")

    # AdamW as the base optimiser
    ours_a, _ = run(ours(True, adamw=True), data)
    with float64_norms():
        peer_a, _ = run(peer(True, adamw=True, eps=0.0), data)
    row("decoupled around AdamW: ours vs peer (float64 norm, `eps=0`)", max_diff(ours_a, peer_a),
        "both add `-lr k (g~ - g)` after AdamW's step, not divided by its sqrt(v)")  # fmt: skip

    # clipping: the authors' code clips g and g~, pytorch_optimizer g~ alone
    norm0 = first_gradient_norm(data)
    ours_clip, _ = run(ours(True, max_norm=MAX_NORM), data)
    with float64_norms():
        peer_clip, _ = run(peer(True, eps=0.0, max_norm=MAX_NORM), data)
    row(f"max_norm = {MAX_NORM}: ours (clips g and g~, the authors' code) vs peer (float64 norm, `eps=0`)",
        max_diff(ours_clip, peer_clip), f"the peer clips g~ only (||g|| = {norm0:.2f} at step 0)")  # fmt: skip
    ours_clip_p, _ = run(ours_clip_perturbed_only, data)
    row("same, ours clipping g~ only", max_diff(ours_clip_p, peer_clip), "agreement: the clipping was the difference")

    # passes, resumption, a tensor with zero gradient
    row("passes in the run (ours / peer)", f"{ours_passes} / {peer_passes}", "2 per step for both")
    ours_r, _ = run(ours(True), data, resume=True)
    peer_r, _ = run(peer(True), data, resume=True)
    row(f"resumed after {SAVE_AT} steps vs straight: ours", max_diff(ours_r, ours_d),
        "WSAM keeps nothing between steps; SGD's momentum in the state dict")  # fmt: skip
    row(f"resumed after {SAVE_AT} steps vs straight: peer", max_diff(peer_r, peer_d),
        "its state dict holds the base optimiser's")  # fmt: skip
    ours_dead, _ = run(ours(True), data, dead=True)
    peer_dead, _ = run(peer(True), data, dead=True)
    finite = all(torch.isfinite(t).all() for t in [*ours_dead, *peer_dead])
    row("one tensor with zero gradient: ours vs peer", max_diff(ours_dead, peer_dead),
        f"all weights finite: {finite}")  # fmt: skip

    report.comparison_table()
    say("**Reading.** The peer implements the paper's update, decoupled by default as ours: the base optimiser steps")
    say("along g and the weights then move by `-lr k (g~ - g)`, k = gamma / (1 - gamma). What separates the runs is")
    say("precision: the peer's gradient norm is taken in float32 even for float64 weights (about 1e-7 relative in e),")
    say("then its `+ 1e-12` and its `w + e - e` restore, at the level of rounding. Its `max_norm` clips g(w + e) only,")
    say("where the authors' code clips both gradients (ours with `max_norm`); with the same clipping the two agree.")
    say()
    report.write(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
