"""ResNet-18/50 in plain ``torch.nn``, so a ResNet model predicts without importing torchvision.

The modules, their attribute names and the initialisation are torchvision's ``ResNet``,
``BasicBlock`` and ``Bottleneck`` (He et al. 2016; torchvision's variant with the stride on the
3×3 convolution of a bottleneck, "ResNet v1.5"): the same ``state_dict`` keys and shapes, so
weights trained with or exported from torchvision load unchanged, and the same outputs for the
same weights (``tests/test_resnet.py`` holds all three against torchvision). Why: importing
torchvision imports ``torchvision.ops`` and with it ``torch._dynamo``, seconds before the first
batch of every predict process, for two dozen lines of module definitions.

Only what histotile builds is here: plain ResNets (no groups, width or dilation variants), batch
norm, no zero-initialised residual branches. torch is imported when :func:`classes` is first
called (the classes are defined then, once).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {  # depth -> (block, blocks per stage)
    18: ("BasicBlock", (2, 2, 2, 2)),
    50: ("Bottleneck", (3, 4, 6, 3)),
}


@functools.cache
def classes() -> dict[str, type]:
    """``{"BasicBlock", "Bottleneck", "ResNet"}`` → the module classes (imports torch)."""
    import torch
    from torch import nn

    def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)

    def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        """Two 3×3 convolutions and the shortcut (ResNet-18)."""

        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1,
                     downsample: nn.Module | None = None) -> None:
            super().__init__()
            self.conv1 = conv3x3(inplanes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4, and the shortcut (ResNet-50+)."""

        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1,
                     downsample: nn.Module | None = None) -> None:
            super().__init__()
            self.conv1 = conv1x1(inplanes, planes)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = conv1x1(planes, planes * self.expansion)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """7×7 stride-2 stem, max-pool, four stages (64–512 planes), global pool, linear."""

        def __init__(self, block: Any, layers: tuple[int, ...] | list[int],
                     num_classes: int = 1000) -> None:
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            for m in self.modules():  # torchvision's initialisation (training from scratch)
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, block: Any, planes: int, blocks: int,
                        stride: int = 1) -> nn.Sequential:
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._forward_impl(x)

    return {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck, "ResNet": ResNet}


def resnet(depth: int, num_classes: int) -> nn.Module:
    """An untrained ResNet-``depth`` (18 or 50) with ``num_classes`` outputs."""
    if depth not in DEPTHS:
        raise ValueError(f"no ResNet-{depth}; depths: {sorted(DEPTHS)}")
    block, layers = DEPTHS[depth]
    found = classes()
    return found["ResNet"](found[block], layers, num_classes=num_classes)
