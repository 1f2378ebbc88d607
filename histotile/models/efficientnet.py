"""torchvision EfficientNet-B0 (``--arch efficientnet-b0``).

The network downsamples 32×; for inputs ≤ 64 px (PathMNIST) the stem convolution's stride is set
to 1 (``small_input``), so a 28 px patch still ends in a 2×2 map rather than 1×1. Only a stride
changes, so ImageNet weights load unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def efficientnet_b0(num_classes: int, patch_size: int, small_input: bool | None = None,
                    dropout: float = 0.2) -> nn.Module:
    """torchvision EfficientNet-B0 (~4.0 M parameters with a 9-class head)."""
    import torchvision

    model = torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes,
                                               dropout=dropout)
    if (patch_size <= 64) if small_input is None else small_input:
        model.features[0][0].stride = (1, 1)
    return model
