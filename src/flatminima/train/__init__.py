"""Training end to end: configuration, loop, checkpoints, metrics, torchrun."""

from flatminima.train.batches import BatchPipeline, evaluate
from flatminima.train.config import TrainConfig
from flatminima.train.loop import TrainResult, train
from flatminima.train.prepare import PreparedData, model_for, prepare_data

__all__ = [
    "BatchPipeline",
    "PreparedData",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "model_for",
    "prepare_data",
    "train",
]
