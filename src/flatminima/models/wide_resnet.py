"""Wide residual networks WRN-d-k of Zagoruyko & Komodakis (2016), the standard model of the SAM papers.

Layout, following the official Torch code and its PyTorch port xternalz/WideResNet-pytorch: a 3x3 stem
convolution with 16 channels, three groups of ``n = (d - 4) / 6`` pre-activation basic blocks with ``16k``,
``32k`` and ``64k`` channels (groups 2 and 3 start with stride 2), then BN-ReLU, global average pooling and a
linear classifier.  A block is ``BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3`` plus a shortcut, which is the
identity when the shape is unchanged and a 1x1 convolution (no BN) otherwise; as in the reference code the
1x1 shortcut reads the block's pre-activated input ``relu(bn1(x))``.  Convolutions have no bias; the linear
layer has one.  With 10 classes WRN-28-10 has 36,479,194 parameters (the published "36.5M") and WRN-16-8 has
10,961,370 ("11.0M").

``batch_norm=False`` replaces every BatchNorm by the identity (the SAM paper's Hessian-spectrum figure uses a
WRN-40-10 without BatchNorm).  The convolutions keep ``bias=False`` so the network stays the same function
class up to the BN affine parameters, and the parameter count drops only by the BN weights and biases
(WRN-28-10: 36,461,242).  Without normalisation the residual stream grows with depth at Kaiming
initialisation, so use a small learning rate (or a shallow/narrow network) when training it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.models.init import kaiming_init

__all__ = ["WideBasicBlock", "WideResNet", "wrn16_8", "wrn28_10"]


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class WideBasicBlock(nn.Module):
    """Pre-activation basic block ``BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3`` with a residual connection."""

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.bn1 = _norm(in_planes, batch_norm)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(planes, batch_norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # the projection shortcut sees the pre-activated input, as in the reference implementations
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs (global average pooling makes any input size work)."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 10, 16, 22, 28, 40), got {depth}; "
                "choose a depth with (depth - 4) % 6 == 0"
            )
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.batch_norm = depth, widen_factor, batch_norm
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, 1, dropout, batch_norm)
        self.block2 = self._make_group(widths[1], widths[2], n, 2, dropout, batch_norm)
        self.block3 = self._make_group(widths[2], widths[3], n, 2, dropout, batch_norm)
        self.bn = _norm(widths[3], batch_norm)
        self.linear = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _make_group(
        in_planes: int, planes: int, n: int, stride: int, dropout: float, batch_norm: bool
    ) -> nn.Sequential:
        blocks = [WideBasicBlock(in_planes, planes, stride, dropout, batch_norm)]
        blocks += [WideBasicBlock(planes, planes, 1, dropout, batch_norm) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        kaiming_init(self, zero_linear_bias=True)  # as in the reference code

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, batch_norm: bool = True) -> WideResNet:
    """WRN-28-10 (36.5M parameters for 10 classes), the main CIFAR model of the SAM paper."""
    return WideResNet(28, 10, num_classes=num_classes, in_channels=in_channels, dropout=dropout, batch_norm=batch_norm)


def wrn16_8(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0, batch_norm: bool = True) -> WideResNet:
    """WRN-16-8 (11.0M parameters for 10 classes)."""
    return WideResNet(16, 8, num_classes=num_classes, in_channels=in_channels, dropout=dropout, batch_norm=batch_norm)
