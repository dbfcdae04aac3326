"""Models used in the experiments: CIFAR ResNets, wide ResNets, a small CNN for 8x8 digits, an MLP and the
two-layer patch CNN of the SAM-versus-SGD analysis, plus a name-based registry (``build_model``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from flatminima.models.mlp import MLP
from flatminima.models.resnet_cifar import BasicBlock, CifarResNet, cifar_resnet, resnet20, resnet32, resnet56
from flatminima.models.small_cnn import SmallCNN
from flatminima.models.two_layer_cnn import TwoLayerCNN, noise_memorisation
from flatminima.models.wide_resnet import WideBasicBlock, WideResNet, wrn16_8, wrn28_10

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "TwoLayerCNN",
    "WideBasicBlock",
    "WideResNet",
    "build_model",
    "cifar_resnet",
    "count_parameters",
    "noise_memorisation",
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn16_8",
    "wrn28_10",
]

MODEL_NAMES: tuple[str, ...] = (
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn28_10",
    "wrn16_8",
    "wrn28_10_nobn",
    "wrn16_8_nobn",
    "wrn40_10_nobn",
    "wrn",
    "small_cnn",
    "small_cnn_bn",
    "mlp",
    "two_layer_cnn",
)
"""The names ``build_model`` (and ``flatminima train --model``) accept."""


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    size = tuple(image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or a pair, got {image_size!r}")
    return int(size[0]), int(size[1])


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int | tuple[int, int], **kwargs: Any
) -> nn.Module:
    """Build a model by name so experiment configs can select it with a string.

    ``image_size`` is the input's spatial size (an int for square images or ``(height, width)``); the
    convolutional networks with global pooling ignore it, the MLP uses it for its input width and the small
    CNN needs it square.  For ``"two_layer_cnn"`` it is ``(P, d)``, the number and dimension of the patches
    (``in_channels`` is ignored), and ``num_classes`` must be 2.  ``"wrn"`` takes ``depth`` and
    ``widen_factor`` keyword arguments; any other ``kwargs`` go to the model's constructor. ``"wrn28_10_nobn"``,
    ``"wrn16_8_nobn"`` and ``"wrn40_10_nobn"`` are the WideResNets without BatchNorm (``batch_norm=False``); the
    last is the network of the SAM paper's Hessian-spectrum figure (WRN-40-10 without BatchNorm). ``"small_cnn_bn"`` is
    the small CNN with BatchNorm after each convolution (``batch_norm=True``).
    """
    key = name.lower()
    if key == "wrn40_10_nobn":
        key, kwargs = "wrn", {**kwargs, "depth": 40, "widen_factor": 10, "batch_norm": False}
    if key.endswith("_nobn") and key[: -len("_nobn")] in ("wrn28_10", "wrn16_8"):
        key = key[: -len("_nobn")]
        kwargs = {**kwargs, "batch_norm": False}
    height, width = _pair(image_size)
    if key in ("resnet20", "resnet32", "resnet56"):
        return cifar_resnet(int(key[6:]), num_classes=num_classes, in_channels=in_channels, **kwargs)
    if key == "wrn28_10":
        return wrn28_10(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if key == "wrn16_8":
        return wrn16_8(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if key == "wrn":
        return WideResNet(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if key == "small_cnn_bn":
        key, kwargs = "small_cnn", {**kwargs, "batch_norm": True}
    if key == "small_cnn":
        if height != width:
            raise ValueError(f"small_cnn needs square images, got image_size={image_size!r}")
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, image_size=height, **kwargs)
    if key == "mlp":
        return MLP(in_channels * height * width, num_classes=num_classes, **kwargs)
    if key == "two_layer_cnn":
        if num_classes != 2:
            raise ValueError(
                f"two_layer_cnn is a binary classifier (labels +1/-1), needs num_classes=2, got {num_classes}"
            )
        return TwoLayerCNN(dim=width, **kwargs)
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
