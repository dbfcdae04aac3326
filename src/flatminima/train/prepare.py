"""The data and model of a run, from its config: what ``train``, ``flatminima sharpness`` and the experiments share."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from flatminima.data import load_dataset
from flatminima.data.dataset import ImageDataset
from flatminima.data.label_noise import asymmetric_label_noise, symmetric_label_noise
from flatminima.data.splits import validation_split
from flatminima.models import build_model
from flatminima.train.config import TrainConfig

__all__ = ["PreparedData", "model_for", "prepare_data"]

#: added to the run's seed for the noise of a noisy validation split (its own draw, not the training noise's)
_VAL_NOISE_SEED = 7919


@dataclass
class PreparedData:
    """A run's splits: training (labels possibly corrupted), test, and the held-out validation split if any."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    val_images: Tensor | None
    val_labels: Tensor | None
    dataset: ImageDataset


def prepare_data(config: TrainConfig, dataset: ImageDataset | None = None) -> PreparedData:
    """Load, hold out a validation split, corrupt the (remaining) training labels; the seed fixes all three.

    The split is made before the noise, so its labels are clean unless ``config.validation_labels`` is
    ``"noisy"``: then they are corrupted like the training labels (the same fraction and kind, a seed of their own),
    as a practitioner whose whole training set is noisy would have to tune on.

    ``dataset`` replaces the one ``config.dataset`` names (a user's own images, or a benchmark's synthetic set).
    """
    if dataset is None:
        extra = {"seed": config.seed} if config.dataset in ("digits", "signal_noise") else {}
        dataset = load_dataset(config.dataset, config.data_root, **extra)
    images, labels = dataset.train_images, dataset.train_labels
    val_images = val_labels = None
    if config.validation_fraction > 0:
        images, labels, val_images, val_labels = validation_split(
            images, labels, config.validation_fraction, config.seed
        )
    if config.label_noise > 0:
        corrupt = symmetric_label_noise if config.label_noise_kind == "symmetric" else asymmetric_label_noise
        labels = corrupt(labels, config.label_noise, dataset.num_classes, seed=config.seed)
        if val_labels is not None and config.validation_labels == "noisy":
            val_seed = config.seed + _VAL_NOISE_SEED
            val_labels = corrupt(val_labels, config.label_noise, dataset.num_classes, seed=val_seed)
    return PreparedData(images, labels, dataset.test_images, dataset.test_labels, val_images, val_labels, dataset)


def model_for(config: TrainConfig, dataset: ImageDataset) -> nn.Module:
    """The configured model, shaped for the dataset's images ([N, C, H, W]) or patches ([N, P, d])."""
    sample = dataset.train_images
    if config.model == "two_layer_cnn" and sample.ndim != 3:
        raise ValueError(
            "two_layer_cnn is the network of the signal-noise data model: use it with --dataset signal_noise"
        )
    in_channels, size = (sample.shape[1], tuple(sample.shape[2:])) if sample.ndim == 4 else (1, tuple(sample.shape[1:]))
    return build_model(config.model, dataset.num_classes, in_channels, size)
