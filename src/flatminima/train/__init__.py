"""Training end to end: configuration, loop, checkpoints, metrics, torchrun."""

from flatminima.train.config import TrainConfig
from flatminima.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
