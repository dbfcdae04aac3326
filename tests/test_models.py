"""Tests for the models: parameter counts, output shapes and argument validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatminima.models import (
    MLP,
    MODEL_NAMES,
    SmallCNN,
    TwoLayerCNN,
    WideResNet,
    build_model,
    cifar_resnet,
    count_parameters,
    noise_memorisation,
    resnet20,
    resnet32,
    resnet56,
    wrn16_8,
    wrn28_10,
)


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


def test_small_cnn_bn_is_the_small_cnn_with_batch_norm():
    layers = [type(m).__name__ for m in build_model("small_cnn_bn", 10, 1, 8).features]
    assert layers == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


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


# --- wide ResNets -------------------------------------------------------------------------------------------


def test_wrn28_10_parameter_count():
    # the published 36.5M; identical to xternalz/WideResNet-pytorch and the official Torch code
    assert count_parameters(wrn28_10(num_classes=10)) == 36_479_194


def test_wrn16_8_parameter_count():
    # the published 11.0M
    assert count_parameters(wrn16_8(num_classes=10)) == 10_961_370


def test_wrn_without_batch_norm_drops_only_bn_parameters():
    # 2 * channels BN parameters per BN layer: WRN-28-10 loses 17,952 of them
    assert count_parameters(wrn28_10(batch_norm=False)) == 36_461_242


@pytest.mark.parametrize(("depth", "widen_factor"), [(10, 1), (16, 1), (10, 2)])
def test_wrn_output_shape(depth, widen_factor):
    model = WideResNet(depth, widen_factor, num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_structure():
    model = WideResNet(16, 2, num_classes=7, in_channels=1, dropout=0.3)
    assert [len(g) for g in (model.block1, model.block2, model.block3)] == [2, 2, 2]
    assert model.linear.in_features == 128
    # 1x1 shortcuts exactly where the shape changes: the first block of each group (16 -> 32 also changes)
    shortcuts = [b.shortcut is not None for g in (model.block1, model.block2, model.block3) for b in g]
    assert shortcuts == [True, False, True, False, True, False]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    # with widen_factor 1 the first group keeps 16 channels, so its first block has an identity shortcut
    assert WideResNet(10, 1).block1[0].shortcut is None


def test_wrn_dropout_only_in_training():
    model = WideResNet(10, 1, dropout=0.5).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))


def test_wrn_without_batch_norm_trains():
    torch.manual_seed(0)
    model = WideResNet(16, 1, batch_norm=False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    assert torch.isfinite(F.cross_entropy(model(x), y))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("depth", [27, 12, 30, 4, 0])
def test_wrn_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6n\+4"):
        WideResNet(depth)


# --- two-layer CNN of Chen et al. (2023) --------------------------------------------------------------------


def test_two_layer_cnn_only_first_layer_is_a_parameter():
    model = TwoLayerCNN(dim=7, width=5, init_std=0.1)
    params = list(model.parameters())
    assert len(params) == 1
    assert params[0].shape == (2, 5, 7)
    assert count_parameters(model) == 70
    assert abs(params[0].std().item() - 0.1) < 0.03


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_two_layer_cnn_cross_entropy_is_logistic_loss(power):
    torch.manual_seed(0)
    model = TwoLayerCNN(dim=6, width=4, init_std=1.0, power=power).double()
    x = torch.randn(16, 2, 6, dtype=torch.float64)
    c = torch.randint(0, 2, (16,))
    y = 2.0 * c.double() - 1.0
    out = model(x)
    assert out.shape == (16, 2)
    f = model.margin(x)
    torch.testing.assert_close(f, out[:, 1] - out[:, 0])
    ce = F.cross_entropy(out, c, reduction="none")
    torch.testing.assert_close(ce, F.softplus(-y * f), atol=1e-6, rtol=0)


def test_two_layer_cnn_matches_definition():
    torch.manual_seed(0)
    model = TwoLayerCNN(dim=3, width=2, init_std=1.0, power=2.0)
    x = torch.randn(4, 2, 3)
    w = model.weight.detach()
    expected = torch.zeros(4, 2)
    for n in range(4):
        for j in range(2):
            expected[n, j] = sum(torch.clamp(w[j, r] @ x[n, p], min=0) ** 2 for r in range(2) for p in range(2)) / 2
    torch.testing.assert_close(model(x), expected)


def test_noise_memorisation_coefficients():
    model = TwoLayerCNN(dim=5, width=3)
    xi = torch.randn(4, 5)
    coef = noise_memorisation(model, xi)
    assert coef.shape == (2, 3, 4)
    torch.testing.assert_close(coef[1, 2, 3], model.weight[1, 2].detach() @ xi[3])


def test_two_layer_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="power"):
        TwoLayerCNN(dim=3, power=0.5)
    with pytest.raises(ValueError, match="shape"):
        TwoLayerCNN(dim=3)(torch.randn(2, 3))


# --- registry -----------------------------------------------------------------------------------------------

_REGISTRY_CASES = {
    "resnet20": (10, 3, 16, {}),
    "resnet32": (10, 3, 16, {}),
    "resnet56": (10, 1, 8, {}),
    "wrn28_10": (10, 3, 8, {}),
    "wrn16_8": (100, 3, 8, {}),
    "wrn28_10_nobn": (10, 3, 8, {}),
    "wrn40_10_nobn": (10, 3, 8, {}),
    "wrn16_8_nobn": (100, 3, 8, {}),
    "wrn": (10, 3, 16, {"depth": 10, "widen_factor": 1}),
    "small_cnn": (10, 1, 8, {"width": 4}),
    "small_cnn_bn": (10, 1, 8, {"width": 4}),
    "mlp": (10, 3, (4, 6), {"hidden": (8,)}),
    "two_layer_cnn": (2, 1, (3, 5), {"width": 4}),
}


def test_registry_cases_cover_all_names():
    assert set(_REGISTRY_CASES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_forward(name):
    num_classes, in_channels, image_size, kwargs = _REGISTRY_CASES[name]
    if name.startswith(("wrn28_10", "wrn16_8", "wrn40_10")):
        # too big to run on a CPU in a unit test: only check the architecture (and that _nobn has no BatchNorm)
        model = build_model(name, num_classes, in_channels, image_size, **kwargs)
        assert isinstance(model, WideResNet) and model.linear.out_features == num_classes
        has_batch_norm = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert has_batch_norm == (not name.endswith("_nobn")) == model.batch_norm
        return
    model = build_model(name, num_classes, in_channels, image_size, **kwargs).eval()
    size = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    x = torch.randn(2, *size) if name == "two_layer_cnn" else torch.randn(2, in_channels, *size)
    assert model(x).shape == (2, num_classes)


def test_build_model_wrn_kwargs():
    model = build_model("wrn", 10, 3, 32, depth=16, widen_factor=8, batch_norm=False)
    assert isinstance(model, WideResNet) and (model.depth, model.widen_factor) == (16, 8)
    assert count_parameters(model) == 10_954_170
    assert count_parameters(build_model("resnet20", 10, 3, 32)) == 269_722
    # the SAM paper's Hessian-spectrum network: WRN-40-10 (published: 55.8M with BatchNorm), here without it
    paper = build_model("wrn40_10_nobn", 10, 3, 32)
    assert (paper.depth, paper.widen_factor, paper.batch_norm) == (40, 10, False)
    assert count_parameters(paper) == 55_814_842


def test_build_model_errors():
    with pytest.raises(ValueError, match="valid names: resnet20"):
        build_model("vgg16", 10, 3, 32)
    with pytest.raises(ValueError, match="num_classes=2"):
        build_model("two_layer_cnn", 10, 1, (2, 8))
    with pytest.raises(ValueError, match="square"):
        build_model("small_cnn", 10, 1, (8, 6))


def test_count_parameters_trainable_only():
    model = MLP(4, hidden=(3,), num_classes=2)
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    model.net[-1].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 4 * 3 + 3
