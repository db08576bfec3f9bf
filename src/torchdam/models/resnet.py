"""CIFAR ResNets with basic blocks (He et al. 2016, section 4.2): depth = 6n + 2."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from torchdam.errors import ConfigError


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN pairs and a shortcut.

    Children are registered in the order conv1, bn1, conv2, bn2, shortcut: gate placement
    finds a conv's BatchNorm as its next registered sibling. The shortcut is option B (a
    1x1 conv + BN) where the shape changes, so it has its own channels to gate and compact
    instead of option A's parameter-free zero padding.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv 3x3 -> 16, three stages of ``n`` blocks (16/32/64), pool, ``fc`` last."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = (16, 32, 64)
        in_planes = 16
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


def _kaiming_init(model: nn.Module) -> None:
    """He-normal convs and unit BN, as in the reference CIFAR ResNet code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> CifarResNet:
    """ResNet-20 (n = 3). ``image_size`` is accepted for a uniform CLI; pooling is adaptive."""
    return CifarResNet(20, in_channels, num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> CifarResNet:
    """ResNet-56 (n = 9), the DAM paper's CIFAR ResNet."""
    return CifarResNet(56, in_channels, num_classes)
