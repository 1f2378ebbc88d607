"""Patch-classifier architectures, chosen by name in the model card: one table, as data.

:data:`ARCHITECTURES` maps each name to its builder ``builder(num_classes, patch_size,
**kwargs) -> nn.Module`` and the module path Grad-CAM hooks by default. Builders live in their
own modules (imported here; each imports torch only when called). Add one by adding a row, or
from outside the package with :func:`register`.

``build_model(card.architecture["name"], num_classes, patch_size, **card.architecture["kwargs"])``
rebuilds a model; ``default_cam_layer(name)`` gives its default Grad-CAM layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histotile.errors import ModelError
from histotile.models import cbam, cnn, efficientnet, vit, xgboost

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., nn.Module]
    cam_layer: str  # "" = none (e.g. XGBoost); the ViT's is its final LayerNorm (use attention)
    summary: str


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("smallcnn", cnn.smallcnn, "features.2", "3 conv blocks, ~0.29 M parameters"),
    Architecture("resnet18", cnn.resnet18, "layer4", "ResNet-18 (torchvision layout)"),
    Architecture("resnet50", cnn.resnet50, "layer4", "ResNet-50 (torchvision layout)"),
    Architecture("resnet50-attention", cbam.resnet50_attention, "cbam4", "ResNet-50 + CBAM"),
    Architecture("efficientnet-b0", efficientnet.efficientnet_b0, "features.8",
                 "torchvision EfficientNet-B0"),
    Architecture("vit", vit.vit, "norm", "small Vision Transformer (attention maps)"),
    Architecture("xgboost", xgboost.xgboost_module, "",
                 "gradient-boosted trees on colour/texture features"),
)}


def register(name: str, builder: Callable[..., Any], cam_layer: str = "",
             summary: str = "") -> None:
    """Add an architecture from outside the package (a plugin calls this explicitly)."""
    ARCHITECTURES[name] = Architecture(name, builder, cam_layer, summary)


def _get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {name!r}",
            f"choose one of: {', '.join(architecture_names())}",
        )
    return ARCHITECTURES[name]


def build_model(name: str, num_classes: int, patch_size: int, **kwargs: Any) -> nn.Module:
    """Build an untrained ``name`` network for ``num_classes`` outputs on ``patch_size`` inputs."""
    arch = _get(name)
    try:
        return arch.builder(num_classes=num_classes, patch_size=patch_size, **kwargs)
    except TypeError as exc:
        raise ModelError(f"cannot build {name!r}: {exc}",
                         "check architecture.kwargs in model.json") from None


def default_cam_layer(name: str) -> str:
    """Module path (``model.get_submodule(path)``) of the last conv block, for Grad-CAM."""
    return _get(name).cam_layer


def architecture_names() -> list[str]:
    """Every architecture in the table, in table order."""
    return list(ARCHITECTURES)
