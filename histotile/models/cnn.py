"""Convolutional builders: the small CNN and the ResNets (registered in
:mod:`histotile.models.architectures`). The ResNets are :mod:`histotile.models.resnet`'s, with
torchvision's module names and state-dict keys, built without importing torchvision."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only inside the builders
    from torch import nn


# --------------------------------------------------------------------------- smallcnn
def smallcnn(num_classes: int, patch_size: int, width: int = 32, dropout: float = 0.2) -> nn.Module:
    """Three conv blocks (2× conv3×3-BN-ReLU, then 2× max-pool) + global average pool + linear.

    ~0.29 M parameters at width 32 (1.2 MB fp32): fits 28 px PathMNIST, and works at 96 px or
    more because the head pools globally.
    """
    from torch import nn

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w))
            self.pool = nn.MaxPool2d(2)
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                nn.Linear(4 * w, num_classes),
            )

        def forward(self, x):
            f = self.features
            x = self.pool(f[0](x))
            x = self.pool(f[1](x))
            x = f[2](x)
            return self.head(x)

    return SmallCNN()


# --------------------------------------------------------------------------- resnets
def _resnet(depth: int, num_classes: int, patch_size: int, small_input: bool | None) -> nn.Module:
    """ResNet (torchvision's layout); for inputs ≤ 64 px a 3×3 stride-1 stem without max-pool."""
    from torch import nn

    from histotile.models.resnet import resnet

    model = resnet(depth, num_classes)
    if small_input is None:
        small_input = patch_size <= 64
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int, patch_size: int, small_input: bool | None = None) -> nn.Module:
    return _resnet(18, num_classes, patch_size, small_input)


def resnet50(num_classes: int, patch_size: int, small_input: bool | None = None) -> nn.Module:
    return _resnet(50, num_classes, patch_size, small_input)
