"""One preprocessing definition per model: uint8 RGB patches -> the model's input tensor.

Everything is read from the model card, in one place, and every path that feeds a model calls
it: ``predict`` (slides and archives), ``evaluate``, ``train``'s validation, ``explain``,
``describe --model`` and attention.

1. **Patch geometry**: ``card.patch_size`` px at ``card.mpp`` µm/px (slides are cut to it by the
   readers; archives and datasets must already be at that size or are resized by their loader).
2. **Stain** (:class:`StainPlan`, resolved from the card and the requested ``stain_norm``):
   ``auto`` applies what the card says training saw: the card's method and reference when
   ``stain.in_training`` is true, else nothing (the model was trained on patches as they are);
   ``macenko`` normalises to the card's reference (the standard one when the card has none);
   ``none`` never normalises. A slide is normalised with one Macenko fit on a seeded sample of
   :data:`STAIN_SAMPLE` tissue patches; archive and dataset patches (from many slides) are
   fitted one by one, as in training.
3. **Input normalisation**: scale to [0, 1], subtract ``input.mean``, divide by ``input.std``
   (per RGB channel), NCHW channels-last float32 on the device (:meth:`Preprocessing.to_tensor`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from histotile.errors import ModelError
from histotile.stain import DEFAULT_HE, DEFAULT_MAX_C, make_normalizer

if TYPE_CHECKING:
    import torch

    from histotile.models.card import ModelCard

STAIN_SAMPLE = 64  # tissue patches a slide's stain fit is made on
STAIN_SEED = 0


def reference_sha256(reference: dict[str, Any] | None) -> str:
    """sha256 of a stain reference's numbers (``None``: the standard reference)."""
    if reference is None:
        numbers = {"stain_matrix": [list(r) for r in DEFAULT_HE],
                   "max_concentrations": list(DEFAULT_MAX_C)}
    else:
        numbers = {"stain_matrix": [[float(v) for v in row] for row in reference["stain_matrix"]],
                   "max_concentrations": [float(v) for v in reference["max_concentrations"]]}
    text = json.dumps(numbers, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StainPlan:
    """The stain step a run applies: ``method`` none|macenko to ``reference`` (``None`` with
    macenko: the standard reference), resolved from the card and the request."""

    requested: str
    method: str
    reference: dict[str, Any] | None
    reference_source: str | None  # "model card" | "standard" | None (no normalisation)
    in_training: bool  # whether the model's training saw normalised patches

    @classmethod
    def resolve(cls, card: ModelCard, requested: str = "auto") -> StainPlan:
        stain = card.stain
        card_ref = stain.reference if stain.method != "none" else None
        if requested == "none" or (requested == "auto" and
                                   (stain.method == "none" or not stain.in_training)):
            return cls(requested, "none", None, None, stain.in_training)
        if requested not in ("auto", "macenko"):
            raise ModelError(f"unknown stain normalisation {requested!r}",
                             "use auto, none or macenko", subject="--stain-norm")
        return cls(requested, "macenko", card_ref, "model card" if card_ref else "standard",
                   stain.in_training)

    @property
    def reference_sha256(self) -> str | None:
        return None if self.method == "none" else reference_sha256(self.reference)

    def normalizer(self) -> Any:
        """A :class:`histotile.stain.MacenkoNormalizer` (channels last) or ``None``."""
        if self.method == "none":
            return None
        return make_normalizer(self.method, reference=self.reference, channels_last=True)

    def describe(self) -> dict[str, Any]:
        """What decides the numbers (run.json and the resume fingerprint)."""
        return {"requested": self.requested, "method": self.method,
                "reference": self.reference_source, "reference_sha256": self.reference_sha256,
                "model_trained_on_normalised": self.in_training}


@dataclass(frozen=True)
class Preprocessing:
    """A model's preprocessing (see the module docstring); build with :meth:`from_card`."""

    patch_size: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stain: StainPlan

    @classmethod
    def from_card(cls, card: ModelCard, stain_norm: str = "auto") -> Preprocessing:
        return cls(patch_size=card.patch_size, mpp=card.mpp,
                   mean=tuple(float(v) for v in card.input.mean),  # type: ignore[arg-type]
                   std=tuple(float(v) for v in card.input.std),  # type: ignore[arg-type]
                   stain=StainPlan.resolve(card, stain_norm))

    def describe(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "mpp": self.mpp, "mean": list(self.mean),
                "std": list(self.std), "stain": self.stain.describe()}

    def to_tensor(self, batch: Any, device: Any = None, check_size: bool = True,
                  subject: str | None = None) -> torch.Tensor:
        """uint8 NHWC patches (tensor or array) -> float32 NCHW channels-last, normalised on
        ``device``. The uint8 batch is moved first (4x fewer bytes), then scaled and normalised
        there. No stain step: that is :attr:`stain` (:class:`BatchPipeline` per patch, predict's
        readers per slide)."""
        import numpy as np
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ModelError(f"expected patches as (N,H,W,3), got shape {tuple(batch.shape)}",
                             "pass RGB uint8 patches in NHWC layout")
        if check_size and tuple(batch.shape[1:3]) != (self.patch_size, self.patch_size):
            raise ModelError(
                f"patches are {batch.shape[1]}×{batch.shape[2]} px but the model expects "
                f"{self.patch_size}×{self.patch_size}",
                "tile at the model's patch size or pick a model made for this size",
                subject=subject)
        dev = torch.device(device) if device is not None else batch.device
        x = batch.to(dev, non_blocking=True)
        if dev.type == "cpu" and x.is_contiguous() and x.numel() % 384 == 0:
            # the same three IEEE operations per value, on rows of 128 pixels: torch's CPU
            # kernels do not vectorise a broadcast over an innermost dimension of 3 (10x slower)
            out = torch.empty(x.shape, dtype=torch.float32)
            flat = out.view(-1, 384)
            flat.copy_(x.view(-1, 384)).div_(255.0)
            flat.sub_(torch.tensor(self.mean, dtype=torch.float32).repeat(128))
            flat.div_(torch.tensor(self.std, dtype=torch.float32).repeat(128))
            return out.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


class BatchPipeline:
    """uint8 NHWC batch -> (stain, per patch) -> (``augment``) -> the model's input tensor.

    The one path from dataset patches to a model: ``evaluate``, ``train``'s validation,
    ``explain``, ``describe`` and attention use it; ``predict`` on an archive applies the same
    stain step and :meth:`Preprocessing.to_tensor`. ``augment(x_uint8_nhwc, generator)`` is
    injected by training (``None``: no augmentation).
    """

    def __init__(self, card: ModelCard, device: torch.device,
                 augment: Callable[[Any, Any], Any] | None = None,
                 stain_norm: str = "auto") -> None:
        self.card, self.device, self.augment = card, device, augment
        self.preprocessing = Preprocessing.from_card(card, stain_norm)
        self.normalizer = self.preprocessing.stain.normalizer()

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.normalizer is not None:
            x = self.normalizer.normalize(x)
        if self.augment is not None:
            x = self.augment(x, gen)
        return self.preprocessing.to_tensor(x, self.device, check_size=False)


__all__ = ["STAIN_SAMPLE", "STAIN_SEED", "BatchPipeline", "Preprocessing", "StainPlan",
           "reference_sha256"]
