"""SAM: the two-pass protocol around any ``torch.optim`` optimiser.

One step: gradient ``g`` at ``w`` -> move to ``w + e`` (``e`` from a perturbation rule) -> gradient there ->
restore ``w`` exactly from a saved copy -> base optimiser step with the second gradient (Foret et al. 2021,
Algorithm 1). The class is itself a :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` *are*
the base optimiser's, so LR schedulers, per-group options and checkpoints work as with the base optimiser.

Per-group options (plain values, so a ``state_dict`` loads with ``torch.load(weights_only=True)``):

- ``rho``: radius (0 or ``perturb=False`` excludes the group from the perturbation, e.g. norms and biases);
- ``p``: the L_p ball of the ascent (:class:`~flatminima.optim.perturb.DualNorm`);
- ``adaptive`` and ``adaptive_eta``: ASAM scaling (:class:`~flatminima.optim.perturb.Adaptive`);
- ``normalize``: ``False`` gives USAM, ``e = rho g`` (:class:`~flatminima.optim.perturb.Unnormalized`).

Groups whose rules coincide are normalised together (one global norm, as in the paper); a custom rule passed
as ``perturbation=`` replaces these for every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatminima import running_stats
from flatminima.optim.flat import FlatLayout
from flatminima.optim.perturb import (
    Adaptive,
    DualNorm,
    PerturbationRule,
    Unnormalized,
    flat_norm,
    global_norm,
    tensor_norms,
)

__all__ = ["SAM"]

NonFinitePolicy = Literal["raise", "skip", "ignore"]
_RULE_KEYS = ("p", "adaptive", "adaptive_eta", "normalize")


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimiser.

    Args:
        params: parameters or parameter groups, as for any optimiser (``None`` when ``base_optimizer`` is an
            instance: its groups are used).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (built here with ``**base_kwargs``) or an instance.
        rho: radius of the neighbourhood; 0 reproduces the base optimiser bit for bit.
        p: the ascent's L_p ball, ``1 <= p <= inf``.
        adaptive: ASAM, the ball taken in the space scaled by ``|w| + adaptive_eta``.
        normalize: ``False`` for USAM (``e = rho g``).
        perturbation: a custom :class:`PerturbationRule` for all groups (overrides ``p``, ``adaptive``,
            ``normalize``); used by the variants.
        model: the model being trained. Given once here, its BatchNorm running statistics are kept from the
            first pass with no extra call in the training loop.
        nonfinite: what to do when a gradient holds inf or NaN: ``"raise"`` (default) a ``FloatingPointError``,
            ``"skip"`` the step (weights and optimiser state untouched), ``"ignore"`` to check nothing. The check
            costs one device-to-host sync per pass; ``"ignore"`` removes it (a GradScaler, when passed, does its
            own checking and the policy is not applied to that step).
        flatten: keep parameters and gradients as views into one buffer (:class:`FlatLayout`), so each step's
            maths is a few single operations instead of a few per tensor: much faster for models of many small
            tensors, on a CPU especially. Gradients are then zeroed in place, as ``set_to_none=False`` does,
            and parameters must share one device and dtype. Steps that do not fit (a parameter without
            gradient, per-group rho, a rule other than p = 2 or USAM, a GradScaler) take the general path.
        **base_kwargs: options of the base optimiser (``lr``, ``momentum``, ``weight_decay``...).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        p: float = 2.0,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        normalize: bool = True,
        perturbation: PerturbationRule | None = None,
        model: nn.Module | None = None,
        nonfinite: NonFinitePolicy = "raise",
        flatten: bool = False,
        **base_kwargs: Any,
    ) -> None:
        base = _build_base(params, base_optimizer, base_kwargs)
        if perturbation is not None and not isinstance(perturbation, PerturbationRule):
            raise TypeError(f"perturbation must have a perturb_(params, grads, rho) method; got {perturbation!r}.")
        if nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or 'ignore'; got {nonfinite!r}.")
        defaults = dict(rho=rho, p=p, adaptive=adaptive, adaptive_eta=adaptive_eta, normalize=normalize, perturb=True)
        for group in base.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            _check_group(group)
        self.perturbation = perturbation
        self.nonfinite = nonfinite
        self._norm_layers = running_stats.norm_layers(model) if model is not None else []
        self._rules: dict[tuple, PerturbationRule] = {}
        self._perturbed: list[Tensor] = []
        self._restore_from: list[Tensor] = []
        self._frozen_flags: list[bool] | None = None
        self._flat: FlatLayout | None = None
        self._flat_saved: Tensor | None = None
        self._flat_perturbed = False
        self._skip_descent = False
        self._base_step_pending = False
        super().__init__(base.param_groups, defaults)
        self.base_optimizer = base
        # Share, not copy: schedulers, add_param_group and state_dict all act on the base optimiser.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults.update(base.defaults)
        if flatten:
            self._flat = FlatLayout([p for g in self.param_groups for p in g["params"]])
            self._flat_saved = torch.empty_like(self._flat.weights)

    # ------------------------------------------------------------------ the two passes

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Move from ``w`` to ``w + e``, using the gradients now in ``.grad`` (the gradient at ``w``).

        ``zero_grad=True`` clears the gradients for the second pass (and lets ``e`` reuse their memory).
        With ``grad_scaler`` the gradients are unscaled first and an inf/NaN step is left unperturbed; the
        scaler then skips that step in :meth:`second_step`.
        """
        if self._perturbed or self._flat_perturbed:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights are still perturbed. "
                "Call second_step() (or restore()) after the second backward pass."
            )
        self._skip_descent = False
        if grad_scaler is not None and _already_unscaled(grad_scaler, self):
            raise RuntimeError(
                "grad_scaler.unscale_(optimizer) was called before first_step: SAM unscales the first gradient "
                "itself. Call unscale_ (e.g. for clipping) only after the second backward, before second_step."
            )
        flat_plan = self._flat_plan(grad_scaler)
        if flat_plan is not None:
            self._perturb_flat(*flat_plan)
        else:
            self._perturb(zero_grad, grad_scaler)
        if self._norm_layers and not self._skip_descent:
            self._freeze_running_stats()
        if zero_grad:
            self.zero_grad()

    def _flat_plan(self, grad_scaler: torch.amp.GradScaler | None) -> tuple[PerturbationRule, float] | None:
        """(rule, rho) when this step can run on the flat buffers, else None."""
        flat = self._flat
        if flat is None or (grad_scaler is not None and grad_scaler.is_enabled()):
            return None
        groups = self.param_groups
        rho = groups[0]["rho"]
        if not rho > 0 or any(not g["perturb"] or g["rho"] != rho for g in groups):
            return None
        rule = self._rule_for(groups[0])
        if any(self._rule_for(g) is not rule for g in groups[1:]):
            return None
        if getattr(rule, "linear_coefficient", lambda *_: None)(rho, 1.0) is None:
            return None
        if not flat.weights_in_place() or not flat.adopt_gradients():
            return None
        return rule, rho

    def _perturb_flat(self, rule: PerturbationRule, rho: float) -> None:
        """``w += c g`` on the flat buffers after saving ``w``: one operation each."""
        flat = self._flat
        norm = flat_norm(flat.grads)
        if self.nonfinite != "ignore" or _host_sync_is_free([norm]):
            norm = norm.item()
            if self.nonfinite != "ignore" and not math.isfinite(norm):
                self._nonfinite_first_gradient()
                return
        coefficient = rule.linear_coefficient(rho, norm)
        self._flat_saved.copy_(flat.weights)
        if isinstance(coefficient, Tensor):
            flat.weights.addcmul_(flat.grads, coefficient)
        else:
            flat.weights.add_(flat.grads, alpha=coefficient)
        self._flat_perturbed = True

    def _nonfinite_first_gradient(self) -> None:
        if self.nonfinite == "raise":
            raise FloatingPointError(
                "SAM.first_step: the gradient at w holds inf or NaN, so no perturbation was applied "
                "and the weights are unchanged. Check the loss and learning rate, pass a GradScaler "
                "for mixed precision, or build SAM with nonfinite='skip' to skip such steps."
            )
        self._skip_descent = True

    def _perturb(self, zero_grad: bool, grad_scaler: torch.amp.GradScaler | None) -> None:
        """Swap each parameter's tensor for ``w + e``, keeping ``w`` itself; no change if the gradient is not finite.

        Restoring is then a pointer swap: exact, and free. For rules that scale the gradient (SAM's p = 2, USAM)
        ``w + e`` is one fused ``_foreach_add``; other rules write ``e`` into the gradients (or copies of them).
        """
        buckets = self._buckets()
        all_params = [p for params, _, _ in buckets.values() for p in params]
        all_grads = [g for _, grads, _ in buckets.values() for g in grads]
        if not all_grads:
            return
        scaled = grad_scaler is not None and grad_scaler.is_enabled()
        if scaled and not self._unscale_first_gradient(grad_scaler, all_grads):
            return  # inf/NaN: no perturbation; the scaler skips this step in second_step
        norms = tensor_norms(all_grads)
        totals: list[Tensor] | list[float] = []
        offset = 0
        for params, _, _ in buckets.values():
            totals.append(global_norm(norms[offset : offset + len(params)]))
            offset += len(params)
        if self.nonfinite != "ignore" or _host_sync_is_free(all_grads):
            totals = torch.stack([t.to(totals[0].device) for t in totals]).tolist()  # one sync, free on a CPU
            if not scaled and self.nonfinite != "ignore" and not all(map(math.isfinite, totals)):
                self._nonfinite_first_gradient()
                return
        moved: list[Tensor] = []
        offset = 0
        in_place = zero_grad and self._flat is None  # flat gradients are views: never hold weights in them
        for (rule, (params, grads, rhos)), total in zip(buckets.items(), totals):
            bucket_norms = norms[offset : offset + len(params)]
            offset += len(params)
            moved.extend(_moved_weights(rule, params, grads, rhos, total, bucket_norms, in_place=in_place))
        self._perturbed = all_params
        self._restore_from = [p.data for p in all_params]
        for param, weights in zip(all_params, moved):
            param.data = weights

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` exactly and take the base optimiser's step with the gradient from ``w + e``.

        With ``grad_scaler`` the step goes through ``grad_scaler.step``, so its skip logic applies (call
        ``grad_scaler.update()`` afterwards, as usual). Clip gradients before calling this, after
        ``grad_scaler.unscale_(optimizer)`` when scaling.
        """
        self.restore()
        self._opt_called = True  # tells LR schedulers the optimiser has stepped (the two-step pattern too)
        if self._skip_descent:
            self._skip_descent = False
            self.zero_grad()
            return
        if grad_scaler is not None and grad_scaler.is_enabled():
            self._base_step_pending = True
            try:
                grad_scaler.step(self)
            finally:
                self._base_step_pending = False
        else:
            if self.nonfinite != "ignore" and not self._second_gradient_finite():
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        "SAM.second_step: the gradient at w + e holds inf or NaN; the weights were restored to "
                        "w and no step was taken. Lower rho or the learning rate, or build SAM with "
                        "nonfinite='skip' to skip such steps."
                    )
                self.zero_grad()
                return
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @property
    def step_skipped(self) -> bool:
        """True between a ``first_step`` that met a non-finite gradient (``nonfinite="skip"``) and ``second_step``."""
        return self._skip_descent

    @torch.no_grad()
    def restore(self) -> None:
        """Give each parameter back its own tensor ``w`` (untouched, so exact); a no-op when not perturbed."""
        if self._perturbed:
            for param, weights in zip(self._perturbed, self._restore_from):
                param.data = weights
            self._perturbed, self._restore_from = [], []
        if self._flat_perturbed:
            self._flat.weights.copy_(self._flat_saved)
            self._flat_perturbed = False
        self._thaw_running_stats()

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor | None:
        """A full SAM step: ``closure`` runs forward and backward and returns the loss.

        SAM clears the gradients before each of its two calls of ``closure`` (at ``w``, then at ``w + e``),
        so closures written for torch.optim work whether or not they zero the gradients themselves. Returns
        the loss at ``w``. With ``grad_scaler``, the closure must backpropagate ``grad_scaler.scale(loss)``.
        """
        if closure is None:
            if self._base_step_pending:  # called back by GradScaler.step from second_step
                return self.base_optimizer.step()
            raise RuntimeError(
                "SAM.step() needs a closure that runs forward and backward and returns the loss, e.g. "
                "opt.step(lambda: (loss_fn(model(x), y).backward(), ...)[-1]); or call first_step() after the "
                "first backward and second_step() after the second."
            )
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        if not self._skip_descent:
            try:
                with torch.enable_grad(), self._second_pass_running_stats():
                    closure()
            except BaseException:
                self.restore()
                raise
        self.second_step(grad_scaler=grad_scaler)
        return loss

    # ------------------------------------------------------------------ checkpoints and groups

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimiser's state and the per-group SAM options; stays shared with the base."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _check_group(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's; with ``flatten=True`` the gradients stay views of the flat buffer, zeroed in place."""
        if self._flat is not None:
            self._flat.zero_gradients()
        else:
            super().zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__ the groups are already in place
            super().add_param_group(param_group)
            return
        if self._flat is not None:
            raise ValueError("add_param_group is not supported with flatten=True; build SAM with all groups.")
        for key in ("rho", "p", "adaptive", "adaptive_eta", "normalize", "perturb"):
            param_group.setdefault(key, self.defaults[key])
        _check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ internals

    def _rule_for(self, group: dict[str, Any]) -> PerturbationRule:
        if self.perturbation is not None:
            return self.perturbation
        key = tuple(group[k] for k in _RULE_KEYS)
        rule = self._rules.get(key)
        if rule is None:
            rule = DualNorm(group["p"]) if group["normalize"] else Unnormalized()
            if group["adaptive"]:
                rule = Adaptive(rule, eta=group["adaptive_eta"])
            self._rules[key] = rule
        return rule

    def _buckets(self) -> dict[PerturbationRule, tuple[list[Tensor], list[Tensor], list[tuple[int, float]]]]:
        """Params and grads to perturb, grouped by rule; ``rhos`` holds (count, rho) per param group."""
        buckets: dict[PerturbationRule, tuple[list[Tensor], list[Tensor], list[tuple[int, float]]]] = {}
        for group in self.param_groups:
            rho = group["rho"]
            if not group["perturb"] or rho == 0:
                continue
            if rho < 0:
                raise ValueError(f"rho must be >= 0; a param group has rho={rho}. Fix the group or scheduler.")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("SAM does not support sparse gradients; use dense embeddings.")
            entry = buckets.setdefault(self._rule_for(group), ([], [], []))
            entry[0].extend(params)
            entry[1].extend(p.grad for p in params)
            entry[2].append((len(params), rho))
        return buckets

    def _unscale_first_gradient(self, grad_scaler: torch.amp.GradScaler, grads: list[Tensor]) -> bool:
        """Unscale in place and report whether the first gradient is finite (one sync, as GradScaler does)."""
        scale = grad_scaler._get_scale_async()
        if scale is None:  # scaler not yet used: its first scale() call creates it
            return True
        found_inf = torch.zeros(1, device=scale.device)
        inv_scale = scale.double().reciprocal().float()
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, device_grads in by_device.items():
            device_inf = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(device_grads, device_inf, inv_scale.to(device))
            found_inf += device_inf.to(found_inf.device)
        return not bool(found_inf.item())

    def _second_gradient_finite(self) -> bool:
        if self._flat is not None and self._flat.gradients_are_views():
            return bool(torch.isfinite(flat_norm(self._flat.grads)).item())
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return not grads or _finite(tensor_norms(grads))

    def _freeze_running_stats(self) -> None:
        if self._frozen_flags is not None:  # already frozen (first_step again without second_step)
            return
        self._frozen_flags = [layer.track_running_stats for layer in self._norm_layers]
        for layer in self._norm_layers:
            layer.track_running_stats = False

    def _thaw_running_stats(self) -> None:
        if self._frozen_flags is not None:
            for layer, flag in zip(self._norm_layers, self._frozen_flags):
                layer.track_running_stats = flag
            self._frozen_flags = None

    def _second_pass_running_stats(self) -> AbstractContextManager[None]:
        """Closure pattern: freeze via the model if known (already done by first_step), else globally."""
        if self._norm_layers:
            return nullcontext()
        return running_stats.freeze_everywhere()


def _build_base(
    params: Iterable[Any] | None, base_optimizer: type[Optimizer] | Optimizer, base_kwargs: dict[str, Any]
) -> Optimizer:
    if isinstance(base_optimizer, Optimizer):
        if isinstance(base_optimizer, SAM):
            raise TypeError("base_optimizer is already a SAM optimiser; wrap the plain optimiser instead.")
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an instance, so its options must go to its own constructor; "
                f"got extra keyword arguments {sorted(base_kwargs)}."
            )
        if params is not None:
            given = {id(p) for p in _flatten_params(params)}
            held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if given != held:
                raise ValueError(
                    "params differ from the parameters the base optimiser instance holds; pass params=None "
                    "to use the instance's parameter groups."
                )
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if params is None:
            raise ValueError("params is None but base_optimizer is a class: pass the parameters to optimise.")
        return base_optimizer(params, **base_kwargs)
    raise TypeError(
        f"base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an instance of "
        f"one; got {base_optimizer!r}."
    )


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    flat: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            value = item["params"]
            flat.extend([value] if isinstance(value, Tensor) else list(value))
        else:
            flat.append(item)
    return flat


def _check_group(group: dict[str, Any]) -> None:
    rho, p, eta = group["rho"], group["p"], group["adaptive_eta"]
    if isinstance(rho, Tensor) or not rho >= 0:
        raise ValueError(f"rho must be a float >= 0 (0 gives the base optimiser); got rho={rho!r}.")
    if not float(p) >= 1:
        raise ValueError(f"p must be in [1, inf] (2 is SAM, inf the sign rule); got p={p!r}.")
    if not eta >= 0:
        raise ValueError(f"adaptive_eta must be >= 0; got {eta!r}.")
    if math.isnan(float(rho)):
        raise ValueError("rho is NaN.")


def _already_unscaled(grad_scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether the scaler has unscaled this optimiser's gradients in the current iteration."""
    states = getattr(grad_scaler, "_per_optimizer_states", {})
    stage = states.get(id(optimizer), {}).get("stage") if isinstance(states, dict) else None
    return getattr(stage, "name", None) == "UNSCALED"


def _host_sync_is_free(tensors: list[Tensor]) -> bool:
    """On a CPU reading a value back costs nothing, so the fused float-scaled path is always taken there."""
    return all(t.device.type == "cpu" for t in tensors)


def _finite(norms: list[Tensor]) -> bool:
    return bool(torch.isfinite(global_norm(norms)).item()) if norms else True


def _apply_rule(
    rule: PerturbationRule,
    params: list[Tensor],
    grads: list[Tensor],
    rhos: list[tuple[int, float]],
    norms: list[Tensor] | None,
) -> None:
    """Run ``rule`` over a bucket, with one rho per param group inside it."""
    distinct = {rho for _, rho in rhos}
    if len(distinct) == 1:
        rule.perturb_(params, grads, distinct.pop(), norms)
        return
    rule.perturb_(params, grads, 1.0, norms)
    start = 0
    for count, rho in rhos:
        torch._foreach_mul_(grads[start : start + count], rho)
        start += count


def _moved_weights(
    rule: PerturbationRule,
    params: list[Tensor],
    grads: list[Tensor],
    rhos: list[tuple[int, float]],
    total_norm: Tensor | float,
    norms: list[Tensor],
    in_place: bool,
) -> list[Tensor]:
    """New tensors holding ``w + e`` for one bucket; ``params`` are left untouched.

    ``in_place`` allows a general rule to write into the gradients (they are cleared afterwards anyway).
    """
    coefficient = getattr(rule, "linear_coefficient", None)
    coefficients = [coefficient(rho, total_norm) for _, rho in rhos] if coefficient is not None else [None]
    if any(c is None for c in coefficients):
        work = grads if in_place else [g.clone() for g in grads]
        _apply_rule(rule, params, work, rhos, norms)
        torch._foreach_add_(work, params)
        return work
    moved: list[Tensor] = []
    start = 0
    for (count, _), c in zip(rhos, coefficients):
        group_params, group_grads = params[start : start + count], grads[start : start + count]
        start += count
        if isinstance(c, Tensor):  # no host sync: two passes
            shifted = torch._foreach_mul(group_grads, c)
            torch._foreach_add_(shifted, group_params)
            moved.extend(shifted)
        else:
            moved.extend(torch._foreach_add(group_params, group_grads, alpha=c))
    return moved
