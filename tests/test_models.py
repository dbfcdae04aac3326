"""Tests for the models: parameter counts, output shapes and argument validation."""

from __future__ import annotations

import pytest
import torch

from flatminima.models import MLP, SmallCNN, cifar_resnet, resnet20, resnet32, resnet56


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "expected"),
    [(resnet20, 269_722), (resnet32, 464_154), (resnet56, 853_018)],
)
def test_resnet_option_a_parameter_counts(factory, expected):
    # option A (parameter-free shortcuts), as in He et al. 2016 and akamaster/pytorch_resnet_cifar10
    assert _num_params(factory(num_classes=10)) == expected


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(20, 272_474), (32, 466_906), (56, 855_770)],
)
def test_resnet_option_b_parameter_counts(depth, expected):
    # the often-quoted 272,474 for ResNet-20 is the count with 1x1 projection shortcuts (option B)
    assert _num_params(cifar_resnet(depth, shortcut="B")) == expected


def test_resnet_option_a_shortcut_has_no_parameters():
    model = resnet20()
    for name, _ in model.named_parameters():
        assert "shortcut" not in name


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_output_shape(shortcut):
    model = resnet20(num_classes=10, shortcut=shortcut)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_num_classes_and_in_channels():
    model = cifar_resnet(20, num_classes=100, in_channels=1)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 100)
    # global average pooling makes the network work on 8x8 digits too
    assert cifar_resnet(8, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("depth", [19, 21, 30, 2, 0])
def test_cifar_resnet_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6n\+2"):
        cifar_resnet(depth)


def test_cifar_resnet_rejects_bad_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        cifar_resnet(20, shortcut="C")  # type: ignore[arg-type]


def test_resnet_backward():
    model = resnet20()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_small_cnn_shape(batch_norm):
    model = SmallCNN(batch_norm=batch_norm)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == batch_norm


def test_small_cnn_other_sizes():
    model = SmallCNN(in_channels=3, num_classes=5, width=8, image_size=16)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_mlp_flattens_input():
    model = MLP(64, hidden=(32, 16), num_classes=10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [32, 16, 10]


def test_mlp_no_hidden_and_activation():
    model = MLP(10, hidden=(), num_classes=3)
    assert model(torch.randn(2, 10)).shape == (2, 3)
    model = MLP(10, hidden=(4,), activation=torch.nn.Tanh)
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())
