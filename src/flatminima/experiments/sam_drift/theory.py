"""The drift's closed form, its small-eta limit, the second-order terms it drops and the refined value that keeps
them (derived in the package docstring and in ``docs/reproductions.md``, section sam-drift)."""

from __future__ import annotations

import math

from flatminima.dynamics import two_cycle_amplitude
from flatminima.experiments.sam_drift.problem import a, a_prime

__all__ = ["correction_terms", "predicted_path", "predicted_rate", "refined_rate", "small_eta_rate"]


def predicted_rate(eta: float, rho: float, y: float) -> float:
    """The drift of y per step on the settled cycle: ``-eta/2 a'(y) (c(y) + rho)^2`` (package docstring)."""
    c = two_cycle_amplitude(eta, rho, a(y))
    return -0.5 * eta * a_prime(y) * (c + rho) ** 2


def small_eta_rate(eta: float, rho: float, y: float) -> float:
    """The leading term of ``predicted_rate`` for small ``eta a``: ``-eta rho^2 a'(y) / 2``."""
    return -0.5 * eta * rho**2 * a_prime(y)


def correction_terms(eta: float, rho: float, y: float) -> dict[str, float]:
    """The relative corrections to ``predicted_rate`` at second order in ``rho`` (each ``O(rho^2)``), whose sum
    is ``measured / predicted - 1`` (derived in the docs):

    - ``a_prime_shift``: ``a'`` read at ``y + e_y``, ``e_y = rho a' c / (2 a)``: ``a'' e_y / a'``;
    - ``amplitude_shift``: the cycle set by ``a(y + e_y)``, not ``a(y)``: ``2 eta a' e_y / (2 - eta a)``;
    - ``lag``: the cycle trailing ``c(y)`` as y drifts: ``2 eta a' |r| / (2 - eta a)^2``, ``r`` the predicted rate;
    - ``normalisation``: ``|e_x| = rho / sqrt(1 + (a' c / (2 a))^2)``, not ``rho``: ``-(a' c / (2 a))^2``.
    """
    ay, slope, curvature = a(y), a_prime(y), 2.0
    c = two_cycle_amplitude(eta, rho, ay)
    e_y = rho * slope * c / (2.0 * ay)
    terms = {
        "a_prime_shift": curvature * e_y / slope,
        "amplitude_shift": 2.0 * eta * slope * e_y / (2.0 - eta * ay),
        "lag": 2.0 * eta * slope * abs(predicted_rate(eta, rho, y)) / (2.0 - eta * ay) ** 2,
        "normalisation": -((slope * c / (2.0 * ay)) ** 2),
    }
    terms["sum"] = sum(terms.values())
    return terms


def _frozen_cycle(eta: float, rho: float, y: float) -> tuple[float, float, float]:
    """The exact 2-cycle of the x-update at frozen y, with the full normalised ``e`` (its y-component included):
    ``u`` solving ``u = eta a(y + e_y(u)) (u + e_x(u)) / 2`` by fixed-point iteration (a contraction with factor
    about ``eta a / 2``), and ``e_x, e_y`` there."""

    def perturbation(u: float) -> tuple[float, float]:
        gx, gy = a(y) * u, 0.5 * a_prime(y) * u * u
        norm = math.hypot(gx, gy)
        return rho * gx / norm, rho * gy / norm

    u = two_cycle_amplitude(eta, rho, a(y))
    for _ in range(100):
        ex, ey = perturbation(u)
        u = 0.5 * eta * a(y + ey) * (u + ex)
    ex, ey = perturbation(u)
    return u, ex, ey


def refined_rate(eta: float, rho: float, y: float) -> float:
    """``predicted_rate`` without its approximations, to explain the measured rate's last digits.

    Two corrections, each a relative ~1e-6 to 1e-5 at the default settings: (1) the perturbation's y-component and
    the exact normalisation (``_frozen_cycle``: ``u`` and ``e`` instead of ``c`` and ``rho``); (2) the cycle's
    lag behind ``u(y)`` as y drifts. With ``|x_t| = u_t + d_t``, the x-update gives
    ``d_(t+1) = -(1 - eta a) d_t - (u_(t+1) - u_t)``, so a steady drift ``u_(t+1) - u_t = u'(y) r`` leaves
    ``d = -u'(y) r / (2 - eta a)`` on both steps of the cycle (``|x|`` above ``u`` while y descends). The rate is then
    ``-eta/2 a'(y + e_y) (u + d + e_x)^2``, with ``r`` the frozen-cycle rate and ``u'`` by central difference.
    """
    u, ex, ey = _frozen_cycle(eta, rho, y)
    frozen = -0.5 * eta * a_prime(y + ey) * (u + ex) ** 2
    h = 1e-4
    slope = (_frozen_cycle(eta, rho, y + h)[0] - _frozen_cycle(eta, rho, y - h)[0]) / (2 * h)
    lag = -slope * frozen / (2.0 - eta * a(y + ey))
    return -0.5 * eta * a_prime(y + ey) * (u + lag + ex) ** 2


def predicted_path(eta: float, rho: float, y0: float, steps: int) -> list[float]:
    """y iterated with the predicted rate alone, ``y_{t+1} = y_t + predicted_rate(y_t)``: the drift's ODE."""
    path = [y0]
    for _ in range(steps):
        path.append(path[-1] + predicted_rate(eta, rho, path[-1]))
    return path
