"""The CIFAR ResNet-34: torchvision's BasicBlocks and module names, with a 3x3 stride-1 stem and no max-pool.

CIFAR images are 32x32, so the ImageNet stem (7x7 stride-2 conv, then max-pool) would shrink them to 8x8 before
the first block. The module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer4.2.bn2``, ``fc``), so the same tensorization patterns (``layer\\d\\.\\d+\\.conv[12]``) select the same
layers here as in torchvision's ``resnet34``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

__all__ = ["CifarResNet", "cifar_resnet34"]


class CifarResNet(nn.Module):
    """A ResNet of ``BasicBlock`` stages for small images: stage ``i`` has ``width * 2**i`` channels."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for i, count in enumerate(blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            layers = []
            for j in range(count):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                    )
                # BasicBlock's base_width check only concerns its own base_width argument, so any planes work.
                layers.append(BasicBlock(inplanes, planes, stride if j == 0 else 1, downsample))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        # torchvision's initialisation, so a model built here trains like torchvision's.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet34(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """The CIFAR ResNet-34: [3, 4, 6, 3] BasicBlocks of widths width * (1, 2, 4, 8); 21.3M parameters at width 64."""
    return CifarResNet((3, 4, 6, 3), num_classes=num_classes, width=width)
