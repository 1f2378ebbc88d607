"""Training and evaluation: datasets, loop, metrics and reports.

``histotile.train(...)`` (also ``histotile.train.train``) and ``histotile.evaluate(...)`` are the
library calls behind ``histotile train`` and ``histotile evaluate``.
"""

from __future__ import annotations

from histotile._callable import make_module_callable
from histotile.train.evaluation import evaluate
from histotile.train.loop import train

__all__ = ["evaluate", "train"]

make_module_callable(__name__, "train")
