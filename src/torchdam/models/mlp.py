"""Fully connected nets for MNIST-sized inputs: the DAM paper's simplest test beds."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation`` per hidden width, then a Linear head.

    Kept as one ``nn.Sequential`` (``layers``) so every Linear is followed by its
    activation as the next sibling and the head is the last registered Linear, which is
    what :func:`torchdam.attach` expects when it leaves the head ungated.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def mlp(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    hidden: Sequence[int] = (256, 256),
) -> MLP:
    """A generic MLP on flattened images (default 784-256-256-10)."""
    return MLP(in_channels * image_size**2, hidden, num_classes)


def lenet300(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998), the classic pruning benchmark: 784-300-100-10."""
    return MLP(in_channels * image_size**2, (300, 100), num_classes)
