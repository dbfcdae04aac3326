"""Tests for the dataset loaders, built on tiny files in the real on-disk formats, plus label noise and splits."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.data import (
    CIFAR10_ASYMMETRIC_MAPPING,
    DATASETS,
    ImageDataset,
    RefusedGlobalError,
    RestrictedUnpickler,
    asymmetric_label_noise,
    channel_mean_std,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_digits_split,
    load_fashion_mnist,
    load_mnist,
    load_svhn,
    make_signal_noise_patches,
    to_float,
    validation_split,
)

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


# ---------------------------------------------------------------- builders for the real formats


def write_cifar_binary(
    folder: Path, names: list[str], n: int, label_bytes: int, num_classes: int, rng: np.random.Generator
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write CIFAR binary batches of ``n`` records; return {name: (images [n,3,32,32], labels of the last byte)}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=(n, label_bytes), dtype=np.uint8)
        records = np.concatenate([labels, images.reshape(n, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        out[name] = (images, labels[:, -1].astype(np.int64), labels[:, 0].astype(np.int64))
    return out


def write_cifar_python(
    folder: Path,
    names: list[str],
    n: int,
    label_keys: tuple[str, ...],
    num_classes: int,
    rng: np.random.Generator,
    protocol: int = 2,
    bytes_keys: bool = True,
) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Write python-version CIFAR batches (pickled dicts with a uint8 [n, 3072] 'data' array and label lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = {key: rng.integers(0, num_classes, size=n) for key in label_keys}
        batch = {
            "batch_label": "testing batch",
            "data": images.reshape(n, -1),
            "filenames": [f"img_{i}.png".encode() for i in range(n)],
            **{key: [int(v) for v in value] for key, value in labels.items()},
        }
        if bytes_keys:  # how the official Python 2 pickles look when loaded
            batch = {key.encode(): value for key, value in batch.items()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        out[name] = (images, labels)
    return out


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(folder: Path, n_train: int, n_test: int, rng: np.random.Generator, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_svhn(folder: Path, name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
    y[0, 0] = 10  # make sure the "10 means digit 0" case is present
    savemat(str(folder / name), {"X": x, "y": y})
    return x, y


def make_tar_gz(archive: Path, folder: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


@pytest.fixture
def cifar10_bin(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "cifar-10-batches-bin"
    written = write_cifar_binary(folder, [*CIFAR10_TRAIN, "test_batch.bin"], 3, 1, 10, _rng())
    return folder, written


def _expected_split(written: dict, names: list[str], index: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([written[n][0] for n in names])
    labels = np.concatenate([written[n][index] for n in names])
    return torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------- ImageDataset and to_float


def test_to_float_and_channel_stats():
    x = torch.tensor([[[[0, 255]], [[51, 51]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f, x.float() / 255)
    g = torch.randn(2, 3)
    assert to_float(g) is g
    with pytest.raises(ValueError, match=r"uint8"):
        to_float(torch.zeros(2, dtype=torch.int64))
    mean, std = channel_mean_std(x, chunk=1)
    assert mean == pytest.approx((0.5, 0.2)) and std == pytest.approx((0.5, 0.0), abs=1e-7)


def test_channel_stats_match_torch_and_chunking():
    x = torch.randint(0, 256, (37, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_mean_std(x, chunk=8)
    f = x.double() / 255
    assert mean == pytest.approx(tuple(f.mean(dim=(0, 2, 3)).tolist()), abs=1e-12)
    assert std == pytest.approx(tuple(f.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-9)


def test_image_dataset_validates_and_repr_is_short():
    ds = load_digits()
    assert "1347" in repr(ds) and len(repr(ds)) < 300
    assert ds.image_shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"labels"):
        ImageDataset("x", torch.zeros(3, 1), torch.zeros(2, dtype=torch.int64), torch.zeros(0, 1),
                     torch.zeros(0, dtype=torch.int64), 2, (0.0,), (1.0,))  # fmt: skip


# ---------------------------------------------------------------- CIFAR binary


@pytest.mark.parametrize("point_at", ["folder", "parent"])
def test_cifar10_binary_roundtrip(cifar10_bin, point_at):
    folder, written = cifar10_bin
    ds = load_cifar10(folder if point_at == "folder" else folder.parent)
    x_train, y_train = _expected_split(written, CIFAR10_TRAIN)
    x_test, y_test = _expected_split(written, ["test_batch.bin"])
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_images.shape == (3, 3, 32, 32)
    assert torch.equal(ds.train_images, x_train) and torch.equal(ds.train_labels, y_train)
    assert torch.equal(ds.test_images, x_test) and torch.equal(ds.test_labels, y_test)
    assert ds.mean == pytest.approx(channel_mean_std(x_train)[0]) and len(ds.std) == 3
    # the stored layout is the official one: record = label byte + R plane + G plane + B plane
    raw = (folder / "data_batch_1.bin").read_bytes()
    assert raw[0] == int(ds.train_labels[0]) and raw[1] == int(ds.train_images[0, 0, 0, 0])
    assert raw[1 + 1024 + 33] == int(ds.train_images[0, 1, 1, 1])


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    written = write_cifar_binary(folder, ["train.bin", "test.bin"], 4, 2, 20, _rng())
    ds = load_cifar100(tmp_path)
    assert ds.num_classes == 100 and ds.train_images.shape == (4, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(written["train.bin"][0]))
    assert torch.equal(ds.train_labels, torch.from_numpy(written["train.bin"][1]))  # second byte = fine
    coarse = load_cifar100(folder, label_type="coarse")
    assert coarse.num_classes == 20 and torch.equal(coarse.test_labels, torch.from_numpy(written["test.bin"][2]))
    with pytest.raises(ValueError, match=r"label_type"):
        load_cifar100(folder, label_type="medium")


def test_cifar_missing_root_folder_and_file(tmp_path, cifar10_bin):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-bin") as info:
        load_cifar10(tmp_path / "nowhere")
    assert "does not exist" in str(info.value) and "cs.toronto.edu" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"cifar-10-binary\.tar\.gz") as info:
        load_cifar10(empty)
    assert str(empty) in str(info.value)
    folder, _ = cifar10_bin
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3\.bin") as info:
        load_cifar10(folder)
    assert str(folder) in str(info.value) and "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)


def test_cifar_truncated_and_bad_labels(cifar10_bin):
    folder, _ = cifar10_bin
    path = folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"data_batch_2\.bin.*not a positive multiple of the 3073-byte record"):
        load_cifar10(folder)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_2\.bin"):
        load_cifar10(folder)
    path.write_bytes(bytes([12]) + bytes(3072))  # label 12 in a 10-class set
    with pytest.raises(ValueError, match=r"data_batch_2.bin.*\[12, 12\]"):
        load_cifar10(folder)


# ---------------------------------------------------------------- CIFAR python version and the restricted unpickler


@pytest.mark.parametrize(("protocol", "bytes_keys"), [(2, True), (4, False), (5, True)])
def test_cifar10_python_roundtrip(tmp_path, protocol, bytes_keys):
    folder = tmp_path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    written = write_cifar_python(
        folder, [*names, "test_batch"], 2, ("labels",), 10, _rng(), protocol=protocol, bytes_keys=bytes_keys
    )
    (folder / "batches.meta").write_bytes(b"ignored")
    ds = load_cifar10(tmp_path)
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert torch.equal(ds.train_images, torch.from_numpy(np.concatenate([written[n][0] for n in names])))
    assert ds.train_labels.tolist() == [int(v) for n in names for v in written[n][1]["labels"]]
    assert torch.equal(ds.test_images, torch.from_numpy(written["test_batch"][0]))


def test_cifar100_python_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    written = write_cifar_python(folder, ["train", "test"], 3, ("fine_labels", "coarse_labels"), 20, _rng())
    ds = load_cifar100(folder)
    assert ds.train_labels.tolist() == written["train"][1]["fine_labels"].tolist()
    assert torch.equal(ds.test_images, torch.from_numpy(written["test"][0]))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo hi > {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Evil(marker)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    # through the loader: the error names the file and the refused global, and nothing ran
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 1, ("labels",), 10, _rng())
    (folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(RefusedGlobalError, match=r"data_batch_1.*(posix|os)\.system"):
        load_cifar10(folder)
    assert not marker.exists()
    # and from the command line: one line naming the file and the fix, exit 2, no traceback
    from flatminima.cli import main

    argv = ["train", "--dataset", "cifar10", "--data-root", str(tmp_path), "--output", str(tmp_path / "run")]
    assert main([*argv, "--optimizer", "sgd", "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "data_batch_1" in err and "not an official batch file: delete it and download" in err
    assert not marker.exists()
    # control: the payload is live, an ordinary pickle.loads runs the (harmless) command
    pickle.loads(payload)
    assert marker.exists()


def test_restricted_unpickler_refuses_other_globals():
    for obj in (eval, Path("x"), np.random.default_rng):
        with pytest.raises(pickle.UnpicklingError, match=r"refused"):
            RestrictedUnpickler(io.BytesIO(pickle.dumps(obj))).load()
    # but plain containers and numpy arrays load
    value = {"a": [1, 2.5, "s", b"b"], "x": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(value, protocol=protocol))).load()
        assert loaded["a"] == value["a"] and np.array_equal(loaded["x"], value["x"])


def test_cifar_python_truncated(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_python(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 2, ("labels",), 10, _rng())
    path = folder / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"test_batch.*cannot be unpickled"):
        load_cifar10(folder)


# ---------------------------------------------------------------- CIFAR archives


@pytest.mark.parametrize("version", ["binary", "python"])
def test_cifar10_from_tar_gz(tmp_path, version):
    src = tmp_path / "src"
    if version == "binary":
        folder = src / "cifar-10-batches-bin"
        written = write_cifar_binary(folder, [*CIFAR10_TRAIN, "test_batch.bin"], 2, 1, 10, _rng())
        expected = load_cifar10(folder)
        archive = make_tar_gz(tmp_path / "cifar-10-binary.tar.gz", folder)
    else:
        folder = src / "cifar-10-batches-py"
        written = write_cifar_python(folder, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 2,
                                     ("labels",), 10, _rng())  # fmt: skip
        expected = load_cifar10(folder)
        archive = make_tar_gz(tmp_path / "cifar-10-python.tar.gz", folder)
    assert written
    for root in (archive, tmp_path):  # the archive itself, or a folder holding it
        ds = load_cifar10(root)
        assert torch.equal(ds.train_images, expected.train_images)
        assert torch.equal(ds.train_labels, expected.train_labels)
        assert torch.equal(ds.test_images, expected.test_images)


def test_cifar_tar_gz_corrupt_or_incomplete(tmp_path):
    folder = tmp_path / "src" / "cifar-10-batches-bin"
    write_cifar_binary(folder, ["data_batch_1.bin", "test_batch.bin"], 2, 1, 10, _rng())
    archive = make_tar_gz(tmp_path / "cifar-10-binary.tar.gz", folder)
    with pytest.raises(FileNotFoundError, match=r"data_batch_2\.bin") as info:
        load_cifar10(archive)
    assert "cifar-10-binary.tar.gz" in str(info.value)
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz"):
        load_cifar10(archive)
    not_tar = tmp_path / "cifar-10-binary.tar.gz"
    not_tar.write_bytes(b"this is not an archive")
    with pytest.raises(ValueError, match=r"cifar-10-binary\.tar\.gz"):
        load_cifar10(not_tar)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader", [load_mnist, load_fashion_mnist])
def test_mnist_roundtrip(tmp_path, gz, loader):
    arrays = write_mnist(tmp_path, 7, 3, _rng(), gz=gz)
    ds = loader(tmp_path)
    assert ds.train_images.shape == (7, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (3, 1, 28, 28) and ds.test_labels.dtype == torch.int64
    assert torch.equal(ds.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(ds.train_labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    assert torch.equal(ds.test_images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(ds.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    assert ds.num_classes == 10 and len(ds.mean) == 1


def test_mnist_torchvision_layout_and_mixed_gz(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder, 4, 2, _rng(), gz=True)
    plain = folder / "t10k-labels-idx1-ubyte"
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(plain, arrays["t10k-labels-idx1-ubyte"])
    ds = load_mnist(tmp_path)
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte") as info:
        load_mnist(tmp_path / "absent")
    assert "does not exist" in str(info.value) and "yann.lecun.com" in str(info.value)
    arrays = write_mnist(tmp_path, 5, 2, _rng(), gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte") as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value) and "fashion-mnist" in str(info.value)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"], magic=2049)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*bad magic number 2049, expected 2051"):
        load_mnist(tmp_path)
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*implies"):
        load_mnist(tmp_path)
    write_idx(path, arrays["t10k-images-idx3-ubyte"][:1])  # 1 image for 2 labels
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*2 labels"):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip(tmp_path):
    write_mnist(tmp_path, 5, 2, _rng(), gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------- SVHN


def test_svhn_roundtrip(tmp_path):
    folder = tmp_path / "svhn"
    x, y = write_svhn(folder, "train_32x32.mat", 6, _rng())
    xt, _ = write_svhn(folder, "test_32x32.mat", 4, np.random.default_rng(7))
    ds = load_svhn(tmp_path)
    assert ds.train_images.shape == (6, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_images.shape == (4, 3, 32, 32)
    # image i, channel c, row r, column k comes from X[r, k, c, i]
    assert int(ds.train_images[2, 1, 3, 5]) == int(x[3, 5, 1, 2])
    assert torch.equal(ds.train_images, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert ds.train_labels.tolist() == [int(v) % 10 for v in y[:, 0]] and ds.train_labels[0] == 0
    assert torch.equal(ds.test_images, torch.from_numpy(xt).permute(3, 2, 0, 1))
    assert int(ds.train_labels.max()) <= 9


def test_svhn_extra_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat") as info:
        load_svhn(tmp_path)
    assert "ufldl.stanford.edu" in str(info.value) and str(tmp_path) in str(info.value)
    write_svhn(tmp_path, "train_32x32.mat", 3, _rng())
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat"):
        load_svhn(tmp_path)
    write_svhn(tmp_path, "test_32x32.mat", 2, _rng())
    with pytest.raises(FileNotFoundError, match=r"extra_32x32\.mat"):
        load_svhn(tmp_path, include_extra=True)
    write_svhn(tmp_path, "extra_32x32.mat", 5, _rng())
    assert load_svhn(tmp_path, include_extra=True).train_images.shape[0] == 8
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"test_32x32\.mat"):
        load_svhn(tmp_path)
    path.write_bytes(b"garbage" * 40)
    with pytest.raises(ValueError, match=r"test_32x32\.mat"):
        load_svhn(tmp_path)


# ---------------------------------------------------------------- digits


def test_load_digits_matches_load_digits_split():
    ds = load_digits(seed=3, test_fraction=0.3)
    split = load_digits_split(test_fraction=0.3, seed=3)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == split.x_train.shape
    assert torch.equal(ds.train_labels, split.y_train) and torch.equal(ds.test_labels, split.y_test)
    # same images: undo the standardisation (values are k/16) and compare with the uint8 k*255/16
    sixteenths = torch.round((split.x_test * split.std + split.mean) * 16)
    assert torch.equal(torch.round(sixteenths * 255 / 16).to(torch.uint8), ds.test_images)
    assert int(ds.train_images.max()) == 255 and ds.num_classes == 10


# ---------------------------------------------------------------- signal/noise patch model


def test_patches_shapes_signal_and_orthogonal_noise():
    ds = make_signal_noise_patches(200, 100, dim=16, signal_norm=3.0, noise_std=2.0, flip_prob=0.1, seed=0)
    assert ds.train_images.shape == (200, 2, 16) and ds.test_images.shape == (100, 2, 16)
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.num_classes == 2 and ds.mean == (0.0,) and ds.std == (1.0,)
    mu = torch.zeros(16)
    mu[0] = 3.0
    for images, labels in ((ds.train_images, ds.clean_train_labels), (ds.test_images, ds.test_labels)):
        sign = (2 * labels - 1).float()[:, None]
        is_signal = (images == sign[:, None] * mu).all(dim=2)  # [N, 2]: which patch is exactly y * mu
        assert (is_signal.sum(dim=1) == 1).all()
        assert 0 < int(is_signal[:, 0].sum()) < len(labels)  # the order is random
        noise = torch.where(is_signal[:, :1], images[:, 1], images[:, 0])
        assert ((noise @ mu).abs() < 1e-4 * noise.norm(dim=1) * mu.norm()).all()
        assert float(noise.std()) == pytest.approx(2.0 * (15 / 16) ** 0.5, rel=0.1)


def test_patches_flip_rate_clean_test_and_determinism():
    ds = make_signal_noise_patches(20000, 500, dim=4, signal_norm=1.0, flip_prob=0.2, seed=5)
    assert ds.clean_train_labels is not None
    rate = float((ds.train_labels != ds.clean_train_labels).float().mean())
    assert abs(rate - 0.2) < 0.015
    assert abs(float(ds.train_labels.float().mean()) - 0.5) < 0.02
    # test labels are the true ones: the signal patch carries them
    signal = ds.test_images[:, :, 0].sum(dim=1)  # the noise has no e_1 component
    assert torch.equal((signal > 0).long(), ds.test_labels)
    again = make_signal_noise_patches(20000, 500, dim=4, signal_norm=1.0, flip_prob=0.2, seed=5)
    assert torch.equal(ds.train_images, again.train_images) and torch.equal(ds.train_labels, again.train_labels)
    other = make_signal_noise_patches(20000, 500, dim=4, signal_norm=1.0, flip_prob=0.2, seed=6)
    assert not torch.equal(ds.train_images, other.train_images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dim": 1}, "dim"), ({"signal_norm": 0.0}, "signal_norm"), ({"flip_prob": 1.5}, "flip_prob"),
     ({"n_train": 0}, "n_train"), ({"noise_std": -1.0}, "noise_std")],
)  # fmt: skip
def test_patches_bad_args(kwargs, match):
    args = {"n_train": 4, "n_test": 2, "dim": 3, "signal_norm": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_signal_noise_patches(**args)


# ---------------------------------------------------------------- registry


def test_load_dataset_registry(tmp_path, cifar10_bin):
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "signal_noise"}
    assert load_dataset("digits").name == "digits"
    ds = load_dataset("signal_noise", n_train=8, n_test=4, dim=3, signal_norm=1.0)
    assert ds.train_images.shape == (8, 2, 3)
    folder, _ = cifar10_bin
    assert load_dataset("CIFAR10", root=folder).train_images.shape == (15, 3, 32, 32)
    write_mnist(tmp_path / "fm", 2, 1, _rng(), gz=True)
    assert load_dataset("fashion-mnist", root=tmp_path / "fm").name == "fashion_mnist"
    with pytest.raises(ValueError, match=r"valid names: digits, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"root=.*train_32x32\.mat"):
        load_dataset("svhn")


# ---------------------------------------------------------------- asymmetric label noise


def test_asymmetric_noise_cifar10_mapping_exact_counts():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 110, 10))  # class c has 10 * (c + 1) examples
    noisy = asymmetric_label_noise(labels, 0.4, 10, seed=0)
    expected_targets = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert dict(CIFAR10_ASYMMETRIC_MAPPING) == expected_targets
    for c in range(10):
        members = labels == c
        changed = noisy[members] != c
        if c in expected_targets:
            assert int(changed.sum()) == round(0.4 * int(members.sum()))
            assert (noisy[members][changed] == expected_targets[c]).all()
        else:
            assert not changed.any()
    assert torch.equal(labels, torch.arange(10).repeat_interleave(torch.arange(10, 110, 10)))  # input untouched


def test_asymmetric_noise_default_cyclic_custom_mapping_and_seed():
    labels = torch.arange(5).repeat(20)
    noisy = asymmetric_label_noise(labels, 0.25, 5, seed=1)
    for c in range(5):
        changed = noisy[labels == c] != c
        assert int(changed.sum()) == 5 and (noisy[labels == c][changed] == (c + 1) % 5).all()
    assert torch.equal(noisy, asymmetric_label_noise(labels, 0.25, 5, seed=1))
    assert not torch.equal(noisy, asymmetric_label_noise(labels, 0.25, 5, seed=2))
    custom = asymmetric_label_noise(labels, 1.0, 5, seed=0, mapping={0: 4})
    assert torch.equal(custom, torch.where(labels == 0, 4, labels))
    seq = asymmetric_label_noise(labels, 1.0, 5, seed=0, mapping=[1, 0, 2, 3, 4])
    assert torch.equal(seq, torch.tensor([1, 0, 2, 3, 4])[labels])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rate": 1.2}, "rate"), ({"num_classes": 1}, "num_classes"), ({"mapping": {0: 7}}, "target"),
     ({"mapping": {9: 0}}, "source"), ({"mapping": [0, 1]}, "one target per class"),
     ({"labels": torch.tensor([0, 6])}, r"\[0, 4\]")],
)  # fmt: skip
def test_asymmetric_noise_bad_args(kwargs, match):
    args = {"labels": torch.tensor([0, 1, 2]), "rate": 0.5, "num_classes": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        asymmetric_label_noise(**args)


# ---------------------------------------------------------------- validation split


def test_validation_split_stratified_exact_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 21)
    images = torch.arange(len(labels)).float()[:, None] * 10
    tx, ty, vx, vy = validation_split(images, labels, 0.2, seed=0)
    assert len(vy) == round(0.2 * 101) and len(ty) + len(vy) == 101
    counts = torch.bincount(vy, minlength=3)
    assert ((counts.double() - 0.2 * torch.tensor([50.0, 30.0, 21.0])).abs() < 1).all()
    ids = torch.cat([tx[:, 0], vx[:, 0]]) / 10
    assert sorted(ids.long().tolist()) == list(range(101))  # a partition
    assert torch.equal(labels[(vx[:, 0] / 10).long()], vy)  # images and labels stay paired
    again = validation_split(images, labels, 0.2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((tx, ty, vx, vy), again))
    assert not torch.equal(vx, validation_split(images, labels, 0.2, seed=1)[2])
    plain = validation_split(images, labels, 0.2, seed=0, stratify=False)
    assert len(plain[3]) == 20
    with pytest.raises(ValueError, match=r"fraction"):
        validation_split(images, labels, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"labels"):
        validation_split(images, labels[:-1], 0.2, seed=0)
