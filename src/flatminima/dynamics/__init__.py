"""Closed forms from the theory of SAM, and small exact simulators to hold the optimisers against them."""

from flatminima.dynamics.quadratic import simulate_sam_quadratic, two_cycle_amplitude

__all__ = ["simulate_sam_quadratic", "two_cycle_amplitude"]
