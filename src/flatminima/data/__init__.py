"""Data: file-based loaders (CIFAR-10/100, MNIST, Fashion-MNIST, SVHN), the embedded digits, the synthetic
signal/noise patch model, label noise, validation splits and batched augmentation.

Everything returns plain tensors; nothing is downloaded (file-based loaders explain where to get missing files).
"""

from flatminima.data.cifar import load_cifar10, load_cifar100
from flatminima.data.dataset import ImageDataset, channel_mean_std, to_float
from flatminima.data.digits import DigitsSplit, load_digits, load_digits_split
from flatminima.data.label_noise import CIFAR10_ASYMMETRIC_MAPPING, asymmetric_label_noise, symmetric_label_noise
from flatminima.data.mnist import load_fashion_mnist, load_mnist
from flatminima.data.patches import make_signal_noise_patches
from flatminima.data.registry import DATASETS, load_dataset
from flatminima.data.safe_pickle import RefusedGlobalError, RestrictedUnpickler
from flatminima.data.splits import validation_split
from flatminima.data.svhn import load_svhn
from flatminima.data.transforms import Augmentation, cutout, horizontal_flip, normalize, random_crop

__all__ = [
    "CIFAR10_ASYMMETRIC_MAPPING",
    "DATASETS",
    "Augmentation",
    "DigitsSplit",
    "ImageDataset",
    "RefusedGlobalError",
    "RestrictedUnpickler",
    "asymmetric_label_noise",
    "channel_mean_std",
    "cutout",
    "horizontal_flip",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_digits_split",
    "load_fashion_mnist",
    "load_mnist",
    "load_svhn",
    "make_signal_noise_patches",
    "normalize",
    "random_crop",
    "symmetric_label_noise",
    "to_float",
    "validation_split",
]
