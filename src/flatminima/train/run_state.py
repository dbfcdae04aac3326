"""What a training run's checkpoint holds, each stateful part registered once.

The loop registers every part that changes as it trains (model and optimiser, LR and rho schedulers, the
GradScaler, the sharpness tracker, the RNG) with a ``RunState``; ``save()`` gathers their states into one
dict and ``load(state)`` hands each its own back, in the order they were registered. A new stateful part is one
``register`` call, not an edit of the save and the load paths each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["RunState", "Stateful"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RunState:
    """The run's stateful parts, each saved under its keys and loaded back in registration order."""

    def __init__(self) -> None:
        self._parts: list[tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = []

    def register(self, save: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]) -> None:
        """A part given as functions: ``save()`` returns the keys it adds to the checkpoint, ``load(checkpoint)``
        reads them back from the whole checkpoint."""
        self._parts.append((save, load))

    def register_object(
        self, key: str, part: Stateful, *, fallback: Callable[[], dict[str, Any]] | None = None, optional: bool = False
    ) -> None:
        """An object with ``state_dict`` / ``load_state_dict`` under ``key``. A checkpoint without the key loads
        ``fallback()`` into it if given, leaves it as it is if ``optional``, and is an error otherwise."""

        def load(state: dict[str, Any]) -> None:
            if key in state:
                part.load_state_dict(state[key])
            elif fallback is not None:
                part.load_state_dict(fallback())
            elif not optional:
                raise KeyError(f"the checkpoint holds no {key!r}; it was not written by this run's settings")

        self.register(lambda: {key: part.state_dict()}, load)

    def save(self) -> dict[str, Any]:
        """Every part's state, in one dict (every rank calls it: a part may gather across ranks)."""
        state: dict[str, Any] = {}
        for save, _ in self._parts:
            state.update(save())
        return state

    def load(self, state: dict[str, Any]) -> None:
        """Each part's state back from ``state``, in the order the parts were registered."""
        for _, load in self._parts:
            load(state)
