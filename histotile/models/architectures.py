"""Patch-classifier architectures, chosen by name in the model card.

Add one with::

    @register("mynet", cam_layer="blocks.3")
    def mynet(num_classes: int, patch_size: int, **kwargs) -> nn.Module: ...

``build_model(card.architecture.name, num_classes, patch_size, **card.architecture.kwargs)``
rebuilds it; ``default_cam_layer(name)`` gives the module path Grad-CAM hooks by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histotile.errors import ModelError

if TYPE_CHECKING:  # torch is imported only inside the builders
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[..., nn.Module]
    cam_layer: str


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str, cam_layer: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding ``builder(num_classes, patch_size, **kwargs)`` to the registry."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        ARCHITECTURES[name] = Architecture(name, builder, cam_layer)
        return builder

    return wrap


_CORE_MODULES = {"architectures", "card", "loading", "zoo"}
_plugins_loaded = False


# architectures registered outside histotile/models (the XGBoost baseline lives with training)
_EXTRA_PLUGINS = ("histotile.train.xgboost_baseline",)


def load_plugins() -> None:
    """Import the other modules of ``histotile.models`` once, so their ``@register`` run
    (vit, efficientnet, resnet50-attention... live in their own modules)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    import pkgutil

    import histotile.models as pkg

    names = [f"histotile.models.{info.name}" for info in pkgutil.iter_modules(pkg.__path__)
             if info.name not in _CORE_MODULES and not info.ispkg]
    for name in [*names, *_EXTRA_PLUGINS]:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional dependency is missing: skip that module
            logging.getLogger(__name__).debug("skipping %s: %s", name, exc)


def _get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        load_plugins()
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
    """Every registered architecture (plugins included)."""
    load_plugins()
    return sorted(ARCHITECTURES)


# --------------------------------------------------------------------------- smallcnn
@register("smallcnn", cam_layer="features.2")
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

        def forward(self, x):  # noqa: ANN001, ANN202
            f = self.features
            x = self.pool(f[0](x))
            x = self.pool(f[1](x))
            x = f[2](x)
            return self.head(x)

    return SmallCNN()


# --------------------------------------------------------------------------- resnets
def _resnet(depth: int, num_classes: int, patch_size: int, small_input: bool | None) -> nn.Module:
    """torchvision ResNet; for inputs ≤ 64 px a 3×3 stride-1 stem without max-pool."""
    import torchvision
    from torch import nn

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    if small_input is None:
        small_input = patch_size <= 64
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@register("resnet18", cam_layer="layer4")
def resnet18(num_classes: int, patch_size: int, small_input: bool | None = None) -> nn.Module:
    return _resnet(18, num_classes, patch_size, small_input)


@register("resnet50", cam_layer="layer4")
def resnet50(num_classes: int, patch_size: int, small_input: bool | None = None) -> nn.Module:
    return _resnet(50, num_classes, patch_size, small_input)
