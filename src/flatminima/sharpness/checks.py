"""Argument checks shared by the measures, with error messages that name the argument."""

from __future__ import annotations

import math

__all__ = ["nonnegative_float", "positive_int"]


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum``, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def nonnegative_float(name: str, value: object, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (``> 0`` with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value
