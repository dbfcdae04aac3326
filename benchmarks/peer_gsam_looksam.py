"""GSAM and LookSAM against pytorch_optimizer's ``GSAM`` and ``LookSAM`` on the same float64 MLP and inputs.

Run it where pytorch_optimizer is installed: ``/tmp/peervenv/bin/python benchmarks/peer_gsam_looksam.py`` (a few
seconds); ``--output FILE`` also writes the markdown report, ``--steps N`` sets the training length (default 20).

Every run starts from the same float64 MLP (10 -> 16 -> 3, tanh) with SGD (lr 0.1, momentum 0.9) as the base
optimiser and takes the same batches (a fresh batch of 32 per step); a row gives the largest absolute weight
difference between two runs after all steps. Both sides are driven the way each documents: ours by
``SAM.step(closure)``; pytorch_optimizer's GSAM by ``set_closure`` + ``step()``, then ``lr_scheduler.step()`` and
``update_rho_t()``; its LookSAM by a backward pass at ``w`` and then ``step(closure)``. Where the two differ, the
script checks the explanation: it reruns the peer with one change (its gradient norm taken in float64, or our
LookSAM projected per tensor, as the peer does) and reports the difference that is left. It also counts the
forward passes, resumes each optimiser from a ``state_dict`` saved after 3 steps and loaded with
``torch.load(weights_only=True)``, and trains a model with a tensor whose gradient is always zero.
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
from flatminima.optim.rho_scheduler import lr_proportional_rho
from flatminima.optim.rules import EveryKSteps
from flatminima.variants.gsam import GSAMDescent
from flatminima.variants.looksam import LookSAMDescent

LR, MOMENTUM, RHO = 0.1, 0.9, 0.05
GSAM_ALPHA, RHO_MIN = 0.4, 0.02  # pytorch_optimizer's default alpha; rho_min for the lr-proportional runs
LOOKSAM_K, LOOKSAM_ALPHA = 5, 0.7
SAVE_AT = 3


def lr_factor(steps: int, decay: bool) -> Callable[[int], float]:
    return (lambda t: 1.0 - t / steps) if decay else (lambda t: 1.0)


# ---------------------------------------------------------------- ours


def ours_gsam(model: nn.Module, decay: bool, steps: int) -> tuple[SAM, Any, Any]:
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, descent=GSAMDescent(GSAM_ALPHA))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, decay))
    rho_scheduler = lr_proportional_rho(opt, lr_max=LR, lr_min=0.0, rho_min=RHO_MIN if decay else 0.0)
    return opt, lr_scheduler, rho_scheduler


def ours_looksam(model: nn.Module, per_tensor: bool, peer_eps: bool = False) -> SAM:
    descent = (PeerEpsLookSAM if peer_eps else LookSAMDescent)(LOOKSAM_ALPHA, per_tensor=per_tensor)
    return SAM(
        model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, descent=descent,
        cadence=EveryKSteps(LOOKSAM_K),
    )  # fmt: skip


class PeerEpsLookSAM(LookSAMDescent):
    """Our per-tensor LookSAM with pytorch_optimizer's ``||g|| / (||g_v|| + 1e-8)`` on the cheap steps: isolates
    that epsilon as the cause of the remaining difference."""

    def _reuse(self, g: list[Tensor], states: list[dict[str, Any]]) -> None:
        from flatminima.variants.looksam import STATE_KEY

        for t, state in zip(g, states):
            if STATE_KEY in state:
                v = state[STATE_KEY]
                t.add_(v * (self.alpha * t.norm() / (v.norm() + 1e-8)))


def run_ours(
    make: Callable[[nn.Module], Any], data: list[tuple[Tensor, Tensor]], dead: bool = False, resume: bool = False
) -> tuple[list[Tensor], int]:
    """Train with our optimiser; ``make(model)`` returns the SAM or (SAM, lr scheduler, rho scheduler). With
    ``resume`` the run stops after SAVE_AT steps and continues in fresh objects loaded from the state dicts."""
    model = Net(dead)
    counter = Counter(model)
    built = make(model)
    for t, (x, y) in enumerate(data):
        if resume and t == SAVE_AT:
            parts = {str(i): b.state_dict() for i, b in enumerate(_tuple(built))}
            states = round_trip({"model": model.state_dict(), **parts})
            model = Net(dead)
            model.load_state_dict(states["model"])
            counter.watch(model)
            built = make(model)
            for i, b in enumerate(_tuple(built)):
                b.load_state_dict(states[str(i)])
        opt = _tuple(built)[0]

        def closure(x: Tensor = x, y: Tensor = y, model: nn.Module = model) -> Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        for scheduler in _tuple(built)[1:]:
            scheduler.step()
    return weights(model), counter.passes


def _tuple(built: Any) -> tuple[Any, ...]:
    return built if isinstance(built, tuple) else (built,)


# ---------------------------------------------------------------- pytorch_optimizer


@contextlib.contextmanager
def float64_norms() -> Iterator[None]:
    """pytorch_optimizer's SAM module with its global gradient norm taken in float64 instead of float32."""
    import pytorch_optimizer.optimizer.sam as peer_sam

    original = peer_sam.get_global_gradient_norm

    def norm64(param_groups, device=None, *, weight_adaptive: bool = False) -> Tensor:
        grads = [
            p.grad * (p.abs() if weight_adaptive and group.get("adaptive", False) else 1.0)
            for group in param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)

    peer_sam.get_global_gradient_norm = norm64
    try:
        yield
    finally:
        peer_sam.get_global_gradient_norm = original


def peer_gsam(model: nn.Module, decay: bool, steps: int) -> tuple[Any, Any]:
    from pytorch_optimizer import GSAM, ProportionScheduler

    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(base, lr_factor(steps, decay))
    rho_scheduler = ProportionScheduler(
        lr_scheduler, max_lr=LR, min_lr=0.0, max_value=RHO, min_value=RHO_MIN if decay else RHO
    )
    return GSAM(model.parameters(), base, model, rho_scheduler, alpha=GSAM_ALPHA), lr_scheduler


def run_peer_gsam(
    data: list[tuple[Tensor, Tensor]], decay: bool, dead: bool = False, resume: bool = False, refresh: bool = False
) -> tuple[list[Tensor], int]:
    """``refresh``: after loading, call ``update_rho_t()`` once (the workaround for its rho_t kept outside the
    state dict: it was set at construction, from the fresh LR scheduler's lr_0)."""
    model = Net(dead)
    counter = Counter(model)
    opt, lr_scheduler = peer_gsam(model, decay, len(data))
    for t, (x, y) in enumerate(data):
        if resume and t == SAVE_AT:  # its documented objects: the optimiser and the LR scheduler
            states = round_trip({"model": model.state_dict(), "opt": opt.state_dict(), "lr": lr_scheduler.state_dict()})
            model = Net(dead)
            model.load_state_dict(states["model"])
            counter.watch(model)
            opt, lr_scheduler = peer_gsam(model, decay, len(data))
            opt.load_state_dict(states["opt"])
            lr_scheduler.load_state_dict(states["lr"])
            if refresh:
                opt.update_rho_t()
        opt.set_closure(F.cross_entropy, x, y)
        opt.step()
        lr_scheduler.step()
        opt.update_rho_t()
    return weights(model), counter.passes


def peer_looksam(model: nn.Module) -> Any:
    from pytorch_optimizer import LookSAM

    return LookSAM(
        model.parameters(), torch.optim.SGD, rho=RHO, k=LOOKSAM_K, alpha=LOOKSAM_ALPHA, lr=LR, momentum=MOMENTUM
    )


def run_peer_looksam(
    data: list[tuple[Tensor, Tensor]], dead: bool = False, resume: bool = False, two_step: bool = False
) -> tuple[list[Tensor], int]:
    """Its documented loop: a backward pass at w, then ``step(closure)``; ``two_step``: ``first_step`` /
    ``second_step`` with the second pass only on its refresh steps (what its docs offer to save the pass)."""
    model = Net(dead)
    counter = Counter(model)
    opt = peer_looksam(model)
    for t, (x, y) in enumerate(data):
        if resume and t == SAVE_AT:
            states = round_trip({"model": model.state_dict(), "opt": opt.state_dict()})
            model = Net(dead)
            model.load_state_dict(states["model"])
            counter.watch(model)
            opt = peer_looksam(model)
            opt.load_state_dict(states["opt"])

        def closure(x: Tensor = x, y: Tensor = y, model: nn.Module = model, opt: Any = opt) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()
        if two_step:
            refresh = opt.get_step() % LOOKSAM_K == 0
            opt.first_step(zero_grad=refresh)
            if refresh:
                closure()
            opt.second_step()
        else:
            opt.step(closure)
    return weights(model), counter.passes


# ---------------------------------------------------------------- the report


def main(argv: list[str] | None = None) -> int:
    args = parse_options(options_parser(__doc__), argv)
    steps = args.steps
    data = float64_batches(steps)
    report = PeerReport("GSAM and LookSAM", steps)
    say, row = report, report.row

    # GSAM
    ours_const, ours_passes = run_ours(lambda m: ours_gsam(m, False, steps), data)
    peer_const, peer_passes = run_peer_gsam(data, decay=False)
    row("GSAM, constant lr and rho: ours vs peer", max_diff(ours_const, peer_const),
        "peer's global gradient norm is float32 (`get_global_gradient_norm` casts)")  # fmt: skip
    with float64_norms():
        peer64, _ = run_peer_gsam(data, decay=False)
    row("GSAM, same, peer's norm in float64", max_diff(ours_const, peer64),
        "what is left: its `+ 1e-12` eps and its `w + e - e` restore")  # fmt: skip
    ours_decay, _ = run_ours(lambda m: ours_gsam(m, True, steps), data)
    with float64_norms():
        peer_decay64, _ = run_peer_gsam(data, decay=True)
    peer_decay, _ = run_peer_gsam(data, decay=True)
    row("GSAM, lr linear to 0, rho from 0.05 to 0.02 with the lr: ours vs peer", max_diff(ours_decay, peer_decay),
        "our `lr_proportional_rho` vs its `ProportionScheduler`")  # fmt: skip
    row("GSAM, same, peer's norm in float64", max_diff(ours_decay, peer_decay64), "the same rho_t at every step")
    row("GSAM passes in the run (ours / peer)", f"{ours_passes} / {peer_passes}", "2 per step for both")
    ours_resumed, _ = run_ours(lambda m: ours_gsam(m, True, steps), data, resume=True)
    peer_resumed, _ = run_peer_gsam(data, decay=True, resume=True)
    row(f"GSAM resumed after {SAVE_AT} steps vs straight: ours", max_diff(ours_resumed, ours_decay),
        "optimiser, LR and rho schedulers' state dicts")  # fmt: skip
    row(f"GSAM resumed after {SAVE_AT} steps vs straight: peer", max_diff(peer_resumed, peer_decay),
        "peer's rho_t is outside its state dict: the first resumed step uses the rho of lr_0")  # fmt: skip
    peer_refreshed, _ = run_peer_gsam(data, decay=True, resume=True, refresh=True)
    row("GSAM peer resumed with `update_rho_t()` after loading", max_diff(peer_refreshed, peer_decay),
        "the workaround")  # fmt: skip

    # LookSAM
    ours_global, ours_l_passes = run_ours(lambda m: ours_looksam(m, False), data)
    ours_tensor, _ = run_ours(lambda m: ours_looksam(m, True), data)
    peer_l, peer_l_passes = run_peer_looksam(data)
    peer_l2, peer_l2_passes = run_peer_looksam(data, two_step=True)
    row("LookSAM: ours (global, the paper's) vs peer", max_diff(ours_global, peer_l),
        "the peer projects and rescales per parameter tensor")  # fmt: skip
    row("LookSAM: ours with per_tensor=True vs peer", max_diff(ours_tensor, peer_l),
        "peer's float32 norm in the perturbation; its `+ 1e-8` in norm(g_v)")  # fmt: skip
    with float64_norms():
        peer_l64, _ = run_peer_looksam(data)
    row("LookSAM: same, peer's norm in float64", max_diff(ours_tensor, peer_l64),
        "its `+ 1e-8`: 1e-8 / norm(g_v) relative, 3e-6 for the output bias (norm 0.004), compounded")  # fmt: skip
    ours_eps, _ = run_ours(lambda m: ours_looksam(m, True, peer_eps=True), data)
    row("LookSAM: ours per tensor with the peer's `+ 1e-8` vs peer (norm in float64)", max_diff(ours_eps, peer_l64),
        "agreement: the epsilon was the whole difference")  # fmt: skip
    row("LookSAM peer: step(closure) vs first_step/second_step", max_diff(peer_l, peer_l2), "the same update")
    row("LookSAM passes in the run (ours / peer step(closure) / peer two-step)",
        f"{ours_l_passes} / {peer_l_passes} / {peer_l2_passes}",
        f"(k + 1) / k per step is {steps + -(-steps // LOOKSAM_K)}: the peer's step(closure) runs the closure on "
        "every step, its cheap steps included")  # fmt: skip
    ours_l_resumed, _ = run_ours(lambda m: ours_looksam(m, False), data, resume=True)
    peer_l_resumed, _ = run_peer_looksam(data, resume=True)
    row(f"LookSAM resumed after {SAVE_AT} steps vs straight: ours", max_diff(ours_l_resumed, ours_global),
        "g_v in the optimiser state, the step counter beside it")  # fmt: skip
    row(f"LookSAM resumed after {SAVE_AT} steps vs straight: peer", max_diff(peer_l_resumed, peer_l),
        "g_v in its state dict, the step in its param groups")  # fmt: skip

    # a tensor whose gradient is always zero
    ours_dead, _ = run_ours(lambda m: ours_looksam(m, True), data, dead=True)
    peer_dead, _ = run_peer_looksam(data, dead=True)
    finite = all(torch.isfinite(t).all() for t in [*ours_dead, *peer_dead])
    row("LookSAM per tensor, one tensor with zero gradient: ours vs peer", max_diff(ours_dead, peer_dead),
        f"all weights finite: {finite}")  # fmt: skip
    ours_gdead, _ = run_ours(lambda m: ours_gsam(m, False, steps), data, dead=True)
    peer_gdead, _ = run_peer_gsam(data, decay=False, dead=True)
    finite = all(torch.isfinite(t).all() for t in [*ours_gdead, *peer_gdead])
    row("GSAM, one tensor with zero gradient: ours vs peer", max_diff(ours_gdead, peer_gdead),
        f"all weights finite: {finite}")  # fmt: skip

    report.comparison_table()
    say("**Reading.** GSAM: the two follow Algorithm 1 alike; the peer's gradient norm is taken in float32 even for")
    say("float64 weights (a precision loss of about 1e-7 relative in e), and its rho_t is kept outside its state dict,")
    say("so a resumed run takes its first step at the rho of the first learning rate unless `update_rho_t()` is")
    say("called after loading. LookSAM: the paper's Algorithm 1 takes cos(theta), ||g|| and ||g_v|| over the whole")
    say("parameter vector (ours by default); the peer takes them per parameter tensor, a different algorithm, which")
    say("ours reproduces with `per_tensor=True` once its `+ 1e-8` is matched. The peer's `step(closure)` runs the")
    say("closure on every step, so its cheap steps cost two passes, as SAM's do; only its `first_step`/`second_step`")
    say("loop saves the pass. Not reproduced in this version: weights rolled back on cheap steps, a crash without a")
    say("step counter, a division by zero (a tensor whose gradient is always 0 stays finite in both).")
    say()
    report.write(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
