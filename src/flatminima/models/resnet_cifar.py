"""CIFAR ResNets of He et al. (2016, section 4.2) with option-A identity shortcuts.

The network has a 3x3 stem convolution with 16 channels, three stages of ``n`` basic blocks with 16, 32 and
64 channels (the first block of stages 2 and 3 halves the spatial size with stride 2), global average pooling
and a linear classifier, so depth = 6n + 2.  "Option A" (the paper's CIFAR choice, and the default here) means
every shortcut is parameter-free: when a block downsamples, the shortcut subsamples the input spatially and
zero-pads the missing channels.  With 10 classes this gives 269,722 / 464,154 / 853,018 parameters for
ResNet-20 / 32 / 56, identical to the reference implementation akamaster/pytorch_resnet_cifar10.

``shortcut="B"`` uses a 1x1 conv + BatchNorm projection on the two downsampling shortcuts instead, which adds
2,752 parameters: 272,474 / 466,906 / 855,770.  The frequently quoted "272,474" for ResNet-20 is this
option-B count (e.g. osmr/imgclsmob), not the option-A one.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.models.init import kaiming_init

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet56"]


class _PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: stride-2 spatial subsampling plus zero channel padding."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        extra = out_planes - in_planes
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_planes} -> {out_planes})")
        self.stride = stride
        # split the extra channels as evenly as possible on both sides (planes//4 each side for doubling)
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


Shortcut = Literal["A", "B"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ReLU after the addition)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(in_planes, planes, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 projection), got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (any input size works thanks to global average pooling)."""

    def __init__(self, num_blocks: int, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padding) or 'B' (1x1 projection), got {shortcut!r}")
        self.shortcut_option = shortcut
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, num_blocks, stride=1)
        self.layer2 = self._make_stage(32, num_blocks, stride=2)
        self.layer3 = self._make_stage(64, num_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut=self.shortcut_option))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
    """Build a CIFAR ResNet of the given depth; depth must be 6n + 2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth}; "
            "choose a depth with (depth - 2) % 6 == 0"
        )
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-20 (0.27M parameters for 10 classes)."""
    return cifar_resnet(20, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-32 (0.46M parameters for 10 classes)."""
    return cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def resnet56(num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A") -> CifarResNet:
    """ResNet-56 (0.85M parameters for 10 classes)."""
    return cifar_resnet(56, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
