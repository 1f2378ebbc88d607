"""histotile: patch classifiers over whole-slide images.

Importing this package is cheap: torch, zarr, dask and scikit-image load only inside
the functions that need them. The library entry points mirror the CLI commands.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute", resolved on first access (PEP 562)
_LAZY = {
    "open_slide": "histotile.slide:open_slide",
    "tile": "histotile.tiling:tile",
    "predict": "histotile.inference:predict",
    "train": "histotile.training.api:train",
    "evaluate": "histotile.training.evaluation:evaluate",
    "HistotileError": "histotile.errors:HistotileError",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'histotile' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
