"""``load_dataset(name, root)``: one entry point for every dataset, so experiments can name their data in a config."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flatminima.data.cifar import load_cifar10, load_cifar100
from flatminima.data.dataset import ImageDataset
from flatminima.data.digits import load_digits
from flatminima.data.mnist import load_fashion_mnist, load_mnist
from flatminima.data.patches import make_signal_noise_patches
from flatminima.data.svhn import load_svhn

__all__ = ["DATASETS", "FILE_DATASETS", "load_dataset"]

DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "svhn": load_svhn,
    "signal_noise": make_signal_noise_patches,
}
"""Name -> loader. File-based loaders take ``root`` as first argument; the others take only keyword arguments."""

#: the datasets read from files the user downloaded, with what ``root`` should point at
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
FILE_DATASETS: dict[str, str] = {
    "cifar10": f"the folder holding cifar-10-batches-bin/ or the .tar.gz from {_CIFAR_URL}",
    "cifar100": f"the folder holding cifar-100-binary/ or the .tar.gz from {_CIFAR_URL}",
    "mnist": "the folder holding train-images-idx3-ubyte[.gz] etc. from https://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": (
        "the folder holding train-images-idx3-ubyte[.gz] etc. from https://github.com/zalandoresearch/fashion-mnist"
    ),
    "svhn": "the folder holding train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/",
}


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, **kwargs: Any) -> ImageDataset:
    """Load dataset ``name`` (see ``DATASETS``); ``kwargs`` go to its loader.

    ``root`` is required for the file-based sets (cifar10, cifar100, mnist, fashion_mnist, svhn) and ignored by
    the built-in ones (digits, signal_noise).  Names are case-insensitive and '-' may replace '_'.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key in FILE_DATASETS:
        if root is None:
            raise ValueError(f"dataset {key!r} is read from files: pass root=, {FILE_DATASETS[key]}")
        return DATASETS[key](root, **kwargs)
    return DATASETS[key](**kwargs)
