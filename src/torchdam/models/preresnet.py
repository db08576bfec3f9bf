"""Pre-activation bottleneck ResNet from the Network Slimming code (Liu et al. 2017), the
DAM paper's PreResNet-164: depth = 9n + 2, block outputs 64/128/256 channels."""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from torchdam.errors import ConfigError

EXPANSION = 4


class PreActBottleneck(nn.Module):
    """bn1-relu-conv1(1x1) -> bn2-relu-conv2(3x3, stride) -> bn3-relu-conv3(1x1) + shortcut.

    Children are registered in the order bn1, conv1, bn2, conv2, bn3, conv3, downsample,
    so each inner conv's BatchNorm is its next sibling. The downsample is a bare 1x1 conv
    on the block input (no BN), as in the reference; an Identity where shapes match. The
    reference's channel-selection layer is left out: DAM gates do that job.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * EXPANSION
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + self.downsample(x)


class PreResNet(nn.Module):
    """Stem conv 3x3 -> 16, three stages of ``n`` bottlenecks, final bn-relu-pool, ``fc`` last."""

    def __init__(self, depth: int = 164, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ConfigError(f"PreResNet depth must be 9n+2 (11, 20, 29, ..., 164), got {depth}")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBottleneck(in_planes, planes, stride))
                in_planes = planes * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Network Slimming's init: He-normal (fan_out) convs, BN scale 0.5 (its sparsity
        # penalty acts on that scale; we keep the same start so results compare).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(self.flatten(self.pool(out)))


def preresnet(
    depth: int = 164, in_channels: int = 3, num_classes: int = 10, image_size: int = 32
) -> PreResNet:
    """PreResNet of any depth 9n+2; ``image_size`` is accepted for a uniform CLI."""
    return PreResNet(depth, in_channels, num_classes)


def preresnet164(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> PreResNet:
    """PreResNet-164 (n = 18), the DAM paper's deep CIFAR model."""
    return PreResNet(164, in_channels, num_classes)
