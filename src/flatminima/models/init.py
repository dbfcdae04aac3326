"""Weight initialisation shared by the convolutional models."""

from __future__ import annotations

from torch import nn

__all__ = ["kaiming_init"]


def kaiming_init(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out) convolutions, unit BatchNorm scale and zero shift (He et al. 2016, torchvision)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif zero_linear_bias and isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
