"""The ascent of a SAM step: ``w + e`` from the gradient at ``w``, by rule, on the fastest path that fits.

Parameters are grouped into buckets by ascent rule (rules that scale with rho share one normalisation across
groups, as the paper's one global norm), each bucket's ``w + e`` is formed by ``flatminima.optim.functional``,
and the optimiser's weight store (``flatminima.optim.weights``) holds it. With ``flatten=True`` and a rule
linear in ``g``, ``w + c g`` is one operation on the flat buffer. Sharded parameters (FSDP2) are handed over as their
local shards, the norms reduced over all ranks. The gradient's finiteness is checked here, once, on the norms the
rule needs anyway.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors

from flatminima.optim import functional as F
from flatminima.optim import scaler as amp
from flatminima.optim import sharded
from flatminima.optim.groups import check_dense, check_rho
from flatminima.optim.norms import FLAT_LIMIT, flat_norm, stack, tensor_norms

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = ["needs_gradient", "perturb"]


def needs_gradient(sam: SAM) -> bool:
    """Whether a rule of the perturbed groups reads ``g(w)`` (a random direction does not)."""
    book = sam.rules
    return any(book.declared(rule).needs_gradient for rule in book.active(sam.param_groups))


def perturb(sam: SAM, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> bool:
    """Move the parameters to ``w + e``; returns False when a GradScaler's ``g(w)`` holds inf/NaN (the weights stay
    at ``w`` and the scaler skips the step). A non-finite ``g(w)`` under ``nonfinite="skip"`` marks the step
    skipped and leaves the weights at ``w``."""
    flat = _flat_rule(sam, grad_scaler)
    if flat is not None:
        _perturb_flat(sam, *flat)
        return True
    layout = _layout(sam)
    buckets, grads = _buckets(sam, layout)  # grads: the real gradients only
    if not buckets:
        return True
    scaled = amp.is_active(grad_scaler)
    if scaled and grads and not amp.unscale_first_gradient(grad_scaler, grads):
        return False  # inf/NaN: no perturbation; the scaler skips this step in second_step
    with sharded.reducing(sam.shard_groups):
        _perturb_buckets(sam, layout, buckets, grads, zero_grad, scaled)
    return True


class Layout:
    """Which groups are perturbed, by which rule, decided once per set of group options (rho, p, ... and the
    parameter lists): a step then only gathers gradients. Rebuilt when an option changes (a rho schedule)."""

    def __init__(self, sam: SAM) -> None:
        book = sam.rules
        self.key = _layout_key(sam)
        self.entries: list[tuple[Any, Any, float, list[Tensor]]] = []  # (rule, its declarations, rho, params)
        for group in sam.param_groups:
            rho = group["rho"]
            if not group["perturb"] or rho == 0:
                continue
            check_rho(rho, "a param group has")
            rule = book.rule_for(group)
            self.entries.append((rule, book.declared(rule), rho, list(group["params"])))
        params = [p for *_, group_params in self.entries for p in group_params]
        self.on_cpu = all(p.device.type == "cpu" for p in params)  # reading a norm back is free there
        self.low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        # one rule linear in g, on one device and dtype, small: its gradient's norm from one flat copy (one kernel
        # instead of one per tensor; the per-tensor norms are not needed on the linear path)
        rules = {id(entry[0]) for entry in self.entries}
        linear = len(rules) == 1 and all(
            not declared.needs_state and declared.needs_gradient and _linear_coefficient(rule, rho, 1.0) is not None
            for rule, declared, rho, _ in self.entries
        )
        same = len({(p.device, p.dtype) for p in params}) == 1
        self.flat_norm = linear and same and not sam.sharded and sum(p.numel() for p in params) <= FLAT_LIMIT
        self.dense_checked = False  # sparse gradients refused until a step where every parameter had a gradient


_KEYS = ("rho", "perturb", "p", "adaptive", "adaptive_eta", "normalize")


def _layout_key(sam: SAM) -> tuple:
    """The groups' options and parameters (by identity: the layout holds them, so no id is reused meanwhile)."""
    return tuple((tuple(map(id, g["params"])), *(g[k] for k in _KEYS)) for g in sam.param_groups)


def _layout(sam: SAM) -> Layout:
    layout = sam._ascent_layout
    if layout is None or layout.key != _layout_key(sam):
        layout = sam._ascent_layout = Layout(sam)
    return layout


def _buckets(sam: SAM, layout: Layout) -> tuple[list[F.Bucket], list[Tensor]]:
    """Params to perturb with their gradients (or zero buffers, for rules that need none), by rule, and the real
    gradients among them. Sharded parameters are handed over as their local shards; each bucket's rule gets the
    ``RuleContext`` of its parameters."""
    buckets: dict[Any, F.Bucket] = {}
    real: list[Tensor] = []
    shards, complete = sam.sharded, True
    for rule, declared, rho, group_params in layout.entries:
        if declared.needs_gradient:
            grads = [p.grad for p in group_params]
            params = group_params
            if any(g is None for g in grads):
                complete = False
                params = [p for p in group_params if p.grad is not None]
                grads = [p.grad for p in params]
            if not layout.dense_checked:
                check_dense(params)
            if shards:
                grads = sharded.locals_of(grads)
            real.extend(grads)
        else:
            params = [p for p in group_params if p.requires_grad]
            grads = [torch.zeros_like(sharded.local(p)) for p in params]
        if not params:
            continue
        key = rule if declared.scales_with_rho else (rule, rho)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = F.Bucket(rule, declared.needs_state)
        bucket.add(sharded.locals_of(params) if shards else params, grads, rho, params)
    layout.dense_checked = layout.dense_checked or (complete and bool(real))
    for bucket in buckets.values():
        bucket.context = sam.rule_context(bucket.owners)
    return list(buckets.values()), real


def _perturb_buckets(
    sam: SAM, layout: Layout, buckets: list[F.Bucket], grads: list[Tensor], zero_grad: bool, scaled: bool
) -> None:
    norms: list[Tensor] | None = None
    if layout.flat_norm and len(buckets) == 1:
        totals: list[Tensor] | list[float] = [flat_norm(_flatten_dense_tensors(buckets[0].grads))]
    else:
        norms = tensor_norms([g for b in buckets for g in b.grads], layout.low_precision or None)
        totals = F.bucket_norms(buckets, norms)
    if sam.guard.checks or layout.on_cpu:  # one sync, free on a CPU
        totals = [totals[0].item()] if len(totals) == 1 else stack(totals).tolist()
        if grads and not scaled and not sam.guard.first_gradient_ok(totals):
            sam._step.skipped = True
            return
    # a general rule may write e into the gradients if they are released afterwards and not needed again
    in_place = zero_grad and sam.flat_layout is None and sam._step.first_grads is None
    moved: list[Tensor] = []
    offset = 0
    for bucket, total in zip(buckets, totals):
        bucket_norms = norms[offset : offset + len(bucket.params)] if norms is not None else None
        offset += len(bucket.params)
        moved.extend(F.perturbed_weights(bucket, total, bucket_norms, in_place=in_place))
    sam._weights.hold([p for b in buckets for p in b.params], moved)


def _flat_rule(sam: SAM, grad_scaler: torch.amp.GradScaler | None) -> tuple[Any, float] | None:
    """(rule, rho) when this step can run on the flat buffers, else None."""
    flat = sam.flat_layout
    if flat is None or amp.is_active(grad_scaler):
        return None
    groups, book = sam.param_groups, sam.rules
    rho = groups[0]["rho"]
    if not 0 < rho < math.inf or any(not g["perturb"] or g["rho"] != rho for g in groups):
        return None
    rule = book.rule_for(groups[0])
    if any(book.rule_for(g) is not rule for g in groups[1:]):
        return None
    declared = book.declared(rule)
    if not declared.needs_gradient or declared.needs_state:
        return None
    if _linear_coefficient(rule, rho, 1.0) is None:
        return None
    check_dense(flat.params)  # before adopt_gradients, which cannot copy a sparse gradient
    if not flat.weights_in_place() or not flat.adopt_gradients():
        return None
    return rule, rho


def _perturb_flat(sam: SAM, rule: Any, rho: float) -> None:
    norm = flat_norm(sam.flat_layout.grads)
    if sam.guard.checks or _host_sync_is_free([norm]):
        norm = norm.item()
        if not sam.guard.first_gradient_ok([norm]):
            sam._step.skipped = True
            return
    sam._weights.hold_flat(_linear_coefficient(rule, rho, norm))


def _linear_coefficient(rule: Any, rho: float, norm: Tensor | float) -> Tensor | float | None:
    method = getattr(rule, "linear_coefficient", None)
    return method(rho, norm) if method is not None else None


def _host_sync_is_free(tensors: list[Tensor]) -> bool:
    """On a CPU reading a value back costs nothing, so the fused float-scaled path is always taken there."""
    return all(t.device.type == "cpu" for t in tensors)
