"""A small CNN for the 8x8 scikit-learn digits: fast enough to train many runs on a CPU."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv3x3(width)-ReLU-conv3x3(2*width)-ReLU-maxpool2-flatten-linear(128)-ReLU-linear(num_classes).

    Convolutions use padding 1, so the feature map after pooling is ``image_size // 2`` on each side.
    ``batch_norm=True`` inserts BatchNorm2d after each convolution (useful to test optimisers that must
    handle BatchNorm running statistics, such as SAM's two forward passes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        image_size: int = 8,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2 (the network max-pools by 2), got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, kernel_size=3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(2 * width))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
