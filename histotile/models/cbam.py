"""ResNet-50 with CBAM attention after each stage (``--arch resnet50-attention``).

CBAM (Woo et al. 2018): channel attention (a shared MLP, reduction 16, over the average- and
max-pooled features, sigmoid) followed by spatial attention (a 7×7 conv over the channel mean and
max, sigmoid), applied to the output of each of ResNet-50's four stages (the ResNet of
:mod:`histotile.models.resnet`, torchvision's layout, without importing torchvision). The ResNet's
own parameter names are kept (``conv1``, ``layer1``…, ``fc``), so ImageNet weights load into
it unchanged; the CBAM modules (``cbam1``…``cbam4``) start as fresh parameters. Inputs ≤ 64 px
get the same 3×3 stride-1 stem without max-pool as the plain ``resnet50``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def _build(num_classes: int, small_input: bool, reduction: int) -> nn.Module:
    import torch
    from torch import nn

    from histotile.models.resnet import classes

    ResNet, Bottleneck = classes()["ResNet"], classes()["Bottleneck"]

    class ChannelAttention(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            hidden = max(channels // reduction, 8)
            self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False),
                                     nn.ReLU(inplace=True),
                                     nn.Conv2d(hidden, channels, 1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
            mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
            return x * torch.sigmoid(avg + mx)

    class SpatialAttention(nn.Module):
        def __init__(self, kernel: int = 7) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
            return x * torch.sigmoid(self.conv(pooled))

    class CBAM(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.channel = ChannelAttention(channels)
            self.spatial = SpatialAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.spatial(self.channel(x))

    class ResNetAttention(ResNet):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
            if small_input:
                self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                self.maxpool = nn.Identity()
            self.cbam1, self.cbam2 = CBAM(256), CBAM(512)
            self.cbam3, self.cbam4 = CBAM(1024), CBAM(2048)

        def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.cbam1(self.layer1(x))
            x = self.cbam2(self.layer2(x))
            x = self.cbam3(self.layer3(x))
            x = self.cbam4(self.layer4(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNetAttention()


def resnet50_attention(num_classes: int, patch_size: int, small_input: bool | None = None,
                       reduction: int = 16) -> nn.Module:
    """ResNet-50 (torchvision's layout) + CBAM after each stage (~28 M parameters)."""
    return _build(num_classes, patch_size <= 64 if small_input is None else small_input,
                  reduction)
