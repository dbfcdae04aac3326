"""Inconsistent data is refused at load time with one-line errors naming the file, the problem and the fix.

Each test builds tiny files in the real on-disk formats (the builders of ``test_datasets.py``) with one fault.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.data import (
    ImageDataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_digits_split,
    load_fashion_mnist,
    load_mnist,
    load_svhn,
)
from tests.test_datasets import write_cifar_python, write_idx, write_mnist, write_svhn

MNIST_LOADERS = [load_mnist, load_fashion_mnist]


def _rng() -> np.random.Generator:
    return np.random.default_rng(99)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def _save_svhn(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"X": x, "y": y})


# ---------------------------------------------------------------- the shared check in ImageDataset


def _dataset(**changes: object) -> ImageDataset:
    args: dict[str, object] = {
        "name": "toy",
        "train_images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
        "train_labels": torch.tensor([0, 1, 2, 1]),
        "test_images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
        "test_labels": torch.tensor([2, 0]),
        "num_classes": 3,
        "mean": (0.0,),
        "std": (1.0,),
        **changes,
    }
    return ImageDataset(**args)  # type: ignore[arg-type]


def test_image_dataset_accepts_consistent_splits_and_empty_test():
    assert _dataset().image_shape == (1, 8, 8)
    empty = _dataset(test_images=torch.zeros(0, 1, 8, 8, dtype=torch.uint8), test_labels=torch.zeros(0).long())
    assert empty.test_images.shape[0] == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"test_images": torch.zeros(2, 1, 28, 28, dtype=torch.uint8)},
         r"toy: train images are 1x8x8 but test images are 1x28x28"),
        ({"test_labels": torch.tensor([2, 3])}, r"toy: test labels range over \[2, 3\], expected \[0, 2\]"),
        ({"train_labels": torch.tensor([0, 1, -1, 1])}, r"toy: train labels range over \[-1, 1\]"),
        ({"num_classes": 0}, r"num_classes must be >= 1"),
        ({"clean_train_labels": torch.tensor([0, 1])}, r"clean_train_labels has shape \(2,\).*\(4,\)"),
    ],
)  # fmt: skip
def test_image_dataset_refuses_inconsistent_splits(changes, match):
    with pytest.raises(ValueError, match=match) as info:
        _dataset(**changes)
    _one_line(info)


# ---------------------------------------------------------------- fault 1: MNIST train 8x8, test 28x28


@pytest.mark.parametrize("loader", MNIST_LOADERS)
def test_mnist_train_and_test_image_shapes_differ(tmp_path, loader):
    write_mnist(tmp_path, 5, 3, _rng(), gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", _rng().integers(0, 256, size=(5, 8, 8)))
    with pytest.raises(ValueError, match=r"train images .*8x8 but test images .*28x28") as info:
        loader(tmp_path)
    message = _one_line(info)
    assert str(tmp_path / "train-images-idx3-ubyte") in message
    assert str(tmp_path / "t10k-images-idx3-ubyte") in message
    assert "download" in message.lower() and "https://" in message


def test_mnist_label_count_and_range_name_the_labels_file(tmp_path):
    arrays = write_mnist(tmp_path, 5, 3, _rng(), gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"][:4], gz=True)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.* 4 labels .*5 images") as info:
        load_mnist(tmp_path)
    _one_line(info)
    bad = arrays["t10k-labels-idx1-ubyte"].copy()
    bad[1] = 10
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"], gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", bad, gz=True)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*range over \[\d+, 10\], expected \[0, 9\]"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------- fault 2: label arrays of the wrong shape


def test_svhn_two_column_labels_refused(tmp_path):
    folder = tmp_path / "svhn"
    write_svhn(folder, "test_32x32.mat", 4, _rng())
    x = _rng().integers(0, 256, size=(32, 32, 3, 64), dtype=np.uint8)
    _save_svhn(folder / "train_32x32.mat", x, _rng().integers(1, 11, size=(32, 2)).astype(np.uint8))
    with pytest.raises(ValueError, match=r"train_32x32\.mat.*'y' has shape \(32, 2\)") as info:
        load_svhn(tmp_path)
    message = _one_line(info)
    assert "(N, 1)" in message and "ufldl.stanford.edu" in message


@pytest.mark.parametrize("y_shape", [(64,), (64, 1)])
def test_svhn_label_vector_or_column_accepted(tmp_path, y_shape):
    x = _rng().integers(0, 256, size=(32, 32, 3, 64), dtype=np.uint8)
    y = _rng().integers(1, 11, size=y_shape).astype(np.uint8)
    _save_svhn(tmp_path / "train_32x32.mat", x, y)
    write_svhn(tmp_path, "test_32x32.mat", 2, _rng())
    ds = load_svhn(tmp_path)
    assert ds.train_labels.tolist() == [int(v) % 10 for v in y.reshape(-1)]


def test_svhn_label_count_differs_from_image_count(tmp_path):
    x = _rng().integers(0, 256, size=(32, 32, 3, 6), dtype=np.uint8)
    _save_svhn(tmp_path / "test_32x32.mat", x, np.ones((5, 1), dtype=np.uint8))
    write_svhn(tmp_path, "train_32x32.mat", 3, _rng())
    with pytest.raises(ValueError, match=r"test_32x32\.mat.*5 labels") as info:
        load_svhn(tmp_path)
    _one_line(info)


def test_cifar_python_nested_labels_refused(tmp_path):
    """A labels list of pairs used to be flattened into twice as many labels (then refused only by count)."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    write_cifar_python(folder, [*names, "test_batch"], 4, ("labels",), 10, _rng(), bytes_keys=False)
    with open(folder / "data_batch_2", "rb") as handle:
        batch = pickle.load(handle)
    batch["data"] = np.concatenate([batch["data"], batch["data"]])  # 8 images, 4 pairs of labels
    batch["labels"] = [[1, 2], [3, 4], [5, 6], [7, 8]]
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2.*'labels' has shape \(4, 2\)") as info:
        load_cifar10(folder)
    _one_line(info)


# ---------------------------------------------------------------- fault 3: digits with a negative seed


@pytest.mark.parametrize(
    "load",
    [lambda seed: load_digits(seed=seed), lambda seed: load_digits_split(seed=seed),
     lambda seed: load_dataset("digits", seed=seed)],
)  # fmt: skip
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_digits_bad_seed_is_our_value_error(load: Callable[[int], object], seed: int):
    with pytest.raises(ValueError, match=r"seed must be >= 0") as info:
        load(seed)
    assert type(info.value) is ValueError  # not scikit-learn's InvalidParameterError
    assert str(seed) in _one_line(info)


def test_digits_largest_seed_still_works():
    assert load_digits(seed=2**32 - 1).train_images.shape[1:] == (1, 8, 8)


# ---------------------------------------------------------------- fault 4: --data-root pointing nowhere


@pytest.mark.parametrize(
    ("name", "url"),
    [("cifar10", "https://www.cs.toronto.edu/~kriz/cifar.html"),
     ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar.html"),
     ("mnist", "https://yann.lecun.com/exdb/mnist/"),
     ("fashion_mnist", "https://github.com/zalandoresearch/fashion-mnist"),
     ("svhn", "http://ufldl.stanford.edu/housenumbers/")],
)  # fmt: skip
def test_missing_data_root_names_folder_and_download(tmp_path, name, url):
    root = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root=root)
    message = _one_line(info)
    assert f"'{root}'" in message and "that folder does not exist" in message
    assert f"Download them from {url}" in message or f"Download it from {url}" in message


@pytest.mark.parametrize("loader", [load_mnist, load_svhn])
def test_data_root_that_is_a_file(tmp_path, loader):
    root = tmp_path / "a_file"
    root.write_text("not a folder")
    with pytest.raises(FileNotFoundError, match=r"is a file, not a folder") as info:
        loader(root)
    assert f"'{root}'" in _one_line(info)


def test_a_decompression_bomb_is_refused_without_being_read(tmp_path: Path) -> None:
    """A gzipped IDX file that inflates far beyond what its header promises (or whose header promises terabytes)
    is refused after reading at most one byte more than the header's promise."""
    import gzip
    import tracemalloc

    from flatminima.data.mnist import read_idx

    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (5, 2, 2))
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as handle:
        handle.write(header)
        chunk = bytes(2**20)
        for _ in range(64):  # 64 MiB of zeros, a few kilobytes on disk
            handle.write(chunk)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"it has more than 36 bytes but its header \(5, 2, 2\) implies 36"):
        read_idx(bomb, 3, "MNIST")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20  # the 64 MiB were never held
    huge = tmp_path / "huge-idx3-ubyte.gz"
    with gzip.open(huge, "wb") as handle:
        handle.write((2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2**31, 2**10, 2**10)))
    with pytest.raises(ValueError, match=r"claims 2251799813685248 bytes, more than the 2 GiB"):
        read_idx(huge, 3, "MNIST")
    with gzip.open(huge, "wb") as handle:  # a header whose product overflows 64 bits
        handle.write((2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2**31, 2**31, 2)))
    with pytest.raises(ValueError, match=r"claims 9223372036854775808 bytes"):
        read_idx(huge, 3, "MNIST")


def test_a_cifar_member_larger_than_any_batch_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    import flatminima.data.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 2, ("labels",), 10, _rng())
    monkeypatch.setattr(cifar, "MAX_BATCH_BYTES", 1000)  # the files here are small; the limit is made smaller
    with pytest.raises(ValueError, match=r"data_batch_1.*more than any batch file of it"):
        cifar.load_cifar10(folder)
