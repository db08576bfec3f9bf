"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as used in pruning papers."""
from __future__ import annotations

from torch import Tensor, nn

from torchdam.errors import ConfigError


class LeNet5(nn.Module):
    """conv 6@5x5 (pad 2) -> pool -> conv 16@5x5 -> pool -> fc 120 -> fc 84 -> head.

    The first conv is padded so 28x28 MNIST and 32x32 CIFAR both work; the flatten size is
    computed from ``image_size`` rather than hard-coded to the 32x32 original.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"LeNet-5 needs image_size >= 10, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> LeNet5:
    """LeNet-5 for ``in_channels`` x ``image_size`` x ``image_size`` inputs."""
    return LeNet5(in_channels, num_classes, image_size)
