"""Tests for the digits split and symmetric label noise."""

from __future__ import annotations

import pytest
import torch

from flatminima.data import load_digits_split, symmetric_label_noise

# ---------------------------------------------------------------- label noise


def _labels(n: int = 1000, num_classes: int = 10, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 0.3333])
def test_label_noise_changes_exactly_round_rate_n(rate):
    labels = _labels()
    noisy = symmetric_label_noise(labels, rate, 10, seed=0)
    assert int((noisy != labels).sum()) == round(rate * labels.numel())
    assert noisy.dtype == labels.dtype and noisy.shape == labels.shape
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10


def test_label_noise_two_classes_flips():
    labels = _labels(n=200, num_classes=2)
    noisy = symmetric_label_noise(labels, 0.5, 2, seed=1)
    assert int((noisy != labels).sum()) == 100


def test_label_noise_reproducible_and_seed_dependent():
    labels = _labels()
    a = symmetric_label_noise(labels, 0.4, 10, seed=7)
    b = symmetric_label_noise(labels, 0.4, 10, seed=7)
    c = symmetric_label_noise(labels, 0.4, 10, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_label_noise_does_not_modify_input():
    labels = _labels()
    before = labels.clone()
    noisy = symmetric_label_noise(labels, 0.5, 10, seed=0)
    assert torch.equal(labels, before)
    assert noisy.data_ptr() != labels.data_ptr()


def test_label_noise_rate_zero_returns_equal_copy():
    labels = _labels()
    noisy = symmetric_label_noise(labels, 0.0, 10, seed=0)
    assert torch.equal(noisy, labels)
    assert noisy.data_ptr() != labels.data_ptr()


def test_label_noise_new_labels_roughly_uniform_over_other_classes():
    labels = torch.zeros(9000, dtype=torch.long)
    noisy = symmetric_label_noise(labels, 1.0, 10, seed=0)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert int(counts[1:].min()) > 800 and int(counts[1:].max()) < 1200


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": -0.1}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"num_classes": 1}, "num_classes"),
        ({"labels": torch.tensor([0, 1, 10])}, r"\[0, 9\]"),
        ({"labels": torch.tensor([-1, 1, 2])}, r"\[0, 9\]"),
        ({"labels": torch.tensor([0.0, 1.0])}, "integer"),
        ({"labels": torch.zeros(2, 2, dtype=torch.long)}, "1-D"),
    ],
)
def test_label_noise_bad_args(kwargs, match):
    args = {"labels": _labels(n=10), "rate": 0.2, "num_classes": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        symmetric_label_noise(**args)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def split():
    return load_digits_split(test_fraction=0.25, seed=0)


def test_digits_shapes_and_dtypes(split):
    n_train, n_test = len(split.y_train), len(split.y_test)
    assert n_train + n_test == 1797
    assert split.x_train.shape == (n_train, 1, 8, 8)
    assert split.x_test.shape == (n_test, 1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.x_test.dtype == torch.float32
    assert split.y_train.dtype == torch.int64 and split.y_test.dtype == torch.int64
    assert abs(n_test - 0.25 * 1797) <= 1


def test_digits_stratified(split):
    train_counts = torch.bincount(split.y_train, minlength=10)
    test_counts = torch.bincount(split.y_test, minlength=10)
    assert (test_counts > 0).all() and (train_counts > 0).all()
    # class proportions are preserved to within one image
    total = train_counts + test_counts
    assert ((test_counts - 0.25 * total).abs() <= 1).all()


def test_digits_train_standardised(split):
    assert abs(float(split.x_train.mean())) < 1e-4
    assert abs(float(split.x_train.std()) - 1.0) < 1e-3
    # the test set uses the train statistics, so it is only approximately standardised
    assert abs(float(split.x_test.mean())) < 0.1


def test_digits_deterministic_and_seed_dependent(split):
    again = load_digits_split(test_fraction=0.25, seed=0)
    assert torch.equal(split.x_train, again.x_train) and torch.equal(split.y_test, again.y_test)
    other = load_digits_split(test_fraction=0.25, seed=1)
    assert not torch.equal(split.y_train, other.y_train)


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)
