"""What defines a training run (saved in the checkpoint and the card), and its file names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint and the card)."""

    dataset: str
    arch: str = "smallcnn"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    size: int | None = None
    stain_norm: str = "none"
    stain_reference: str = "default"
    stain_train: bool = True
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # "imagenet": torchvision weights (models/pretrained.py)
