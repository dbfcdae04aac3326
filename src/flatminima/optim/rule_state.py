"""The rules' own per-parameter state, kept by SAM apart from the base optimiser's and saved beside it.

A rule that keeps state (Friendly SAM's gradient mean, LookSAM's ``g_v``) writes into the dicts of
``RuleContext.states``, which are these. Keeping them out of the base optimiser's state means its own lazy
initialisation (Adam starts a parameter's state when the dict is empty) is never disturbed. In a checkpoint they
are ``state_dict()["sam_rule_state"]``, keyed by parameter index as the base optimiser's ``"state"``; a checkpoint
written before they were kept apart (the rules' ``state_keys`` inside the base optimiser's state) loads too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from torch import Tensor

from flatminima.optim.rules import RuleContext

if TYPE_CHECKING:
    from flatminima.optim.sam import SAM

__all__ = ["KEY", "RuleState", "context"]

KEY = "sam_rule_state"


class RuleState(defaultdict):
    """``{parameter: {key: value}}``, a dict per parameter created when first read (as ``Optimizer.state``)."""

    def __init__(self) -> None:
        super().__init__(dict)

    def save(self, state_dict: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
        """``state_dict`` with the non-empty states added, by index of ``params`` (the base optimiser's order)."""
        packed = {index: dict(self[p]) for index, p in enumerate(params) if self.get(p)}
        if packed:
            state_dict[KEY] = packed
        return state_dict

    def load(self, state_dict: dict[str, Any], sam: SAM) -> None:
        """Replace the states with those of ``state_dict``; the rules' ``state_keys`` found in the base optimiser's
        state (the layout of checkpoints written before SAM kept them apart) are moved here."""
        from flatminima.optim.rules import DescentCapabilities

        params = [p for group in sam.param_groups for p in group["params"]]
        self.clear()
        for index, kept in state_dict.get(KEY, {}).items():
            owner = params[int(index)]
            self[owner] = {key: _on_param(value, owner) for key, value in kept.items()}
        legacy = (
            *sam.rules.declared(sam.perturbation).state_keys,
            *sam.rules.declared(sam.descent, DescentCapabilities).state_keys,
        )
        for owner in params:
            held = sam.state.get(owner, {})
            moved = {key: held.pop(key) for key in legacy if key in held}
            if moved:
                self[owner].update(moved)


def _on_param(value: Any, param: Tensor) -> Any:
    """A saved value moved to its parameter's device, in its dtype when floating (as torch.optim loads state)."""
    if isinstance(value, Tensor):
        return value.to(device=param.device, dtype=param.dtype if value.is_floating_point() else value.dtype)
    return value


def context(sam: SAM, params: list[Tensor]) -> RuleContext:
    """The ``RuleContext`` of ``params`` in ``sam`` (each field computed when a rule reads it)."""
    kept, state, groups = sam.rule_state, sam.state, sam.param_groups

    def learning_rates() -> list[float]:
        lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
        return [float(lr_of[id(p)]) for p in params]

    return RuleContext(lambda: [kept[p] for p in params], lambda: [state[p] for p in params], learning_rates, sam.steps)
