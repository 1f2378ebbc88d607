"""Training and evaluation: datasets, loop, metrics and reports.

``histotile.train.train(...)`` and ``histotile.train.evaluate(...)`` are the library calls behind
``histotile train`` and ``histotile evaluate``.
"""

from __future__ import annotations

from histotile.train.loop import evaluate, train

__all__ = ["evaluate", "train"]
