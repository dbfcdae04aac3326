"""Data helpers: the scikit-learn digits split and symmetric label noise."""

from flatminima.data.digits import DigitsSplit, load_digits_split
from flatminima.data.label_noise import symmetric_label_noise

__all__ = ["DigitsSplit", "load_digits_split", "symmetric_label_noise"]
