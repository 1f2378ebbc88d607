"""The XGBoost baseline as a model: hand-made patch features and the booster in an ``nn.Module``.

Features (:func:`patch_features`, ``features="colour-texture"``, the default): per RGB channel a
16-bin histogram, mean, std and 10/50/90th percentiles; HSV means/stds; grey-level gradient
magnitude mean/std, Laplacian variance, grey std and a uniform LBP histogram (P=8, R=1, 10 bins):
83 values. ``features="pixels"`` flattens the patch instead (MedMNIST's XGBoost baseline).

The fitted booster is stored in ``weights.safetensors`` as a uint8 tensor (``booster``, the UBJSON
model) inside the small ``nn.Module`` :func:`xgboost_module` builds (architecture ``xgboost``):
the model folder has the same layout and card as a CNN's, and ``histotile predict`` / ``evaluate``
run it (the module turns the normalised batch back into uint8 patches, computes the features and
returns log-probabilities as logits). The card's input mean/std are 0/1 so the round trip is
exact. Training is :mod:`histotile.training.xgboost`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError, ModelError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
FEATURES = ("colour-texture", "pixels")
HIST_BINS = 16


# --------------------------------------------------------------------------- features
def patch_features(patches: np.ndarray, features: str = "colour-texture") -> np.ndarray:
    """uint8 (N, P, P, 3) patches → float32 (N, F) feature rows."""
    if features not in FEATURES:
        raise InvalidArgumentError(f"unknown XGBoost features {features!r}",
                                   f"use one of: {', '.join(FEATURES)}")
    x = np.asarray(patches)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InvalidArgumentError(f"patches have shape {x.shape}, expected (N, P, P, 3)",
                                   "pass RGB uint8 patches")
    if features == "pixels":
        return x.reshape(len(x), -1).astype(np.float32) / 255.0
    return np.concatenate([_colour(x), _texture(x)], axis=1).astype(np.float32)


def _colour(x: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    n = len(x)
    flat = x.reshape(n, -1, 3)
    offsets = (np.arange(n * 3) * HIST_BINS).reshape(n, 1, 3)
    hist = np.bincount(((flat >> 4) + offsets).ravel(), minlength=n * 3 * HIST_BINS)
    hist = hist.reshape(n, 3, HIST_BINS)  # per patch, per channel
    shares = hist.reshape(n, -1) / flat.shape[1]
    f = flat.astype(np.float32) / 255.0
    pct = np.percentile(f, [10, 50, 90], axis=1).transpose(1, 0, 2).reshape(n, -1)
    hsv = rgb2hsv(x).reshape(n, -1, 3)
    return np.concatenate([shares, f.mean(1), f.std(1), pct, hsv.mean(1), hsv.std(1)], axis=1)


def _texture(x: np.ndarray) -> np.ndarray:
    from skimage.feature import local_binary_pattern

    grey = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    gy, gx = np.gradient(grey, axis=(1, 2))
    mag = np.hypot(gx, gy).reshape(len(x), -1)
    lap = (np.roll(grey, 1, 1) + np.roll(grey, -1, 1) + np.roll(grey, 1, 2)
           + np.roll(grey, -1, 2) - 4 * grey)[:, 1:-1, 1:-1].reshape(len(x), -1)
    g8 = np.round(grey * 255).astype(np.uint8)
    lbp = np.stack([np.bincount(local_binary_pattern(g, 8, 1, "uniform").astype(np.int64)
                                .ravel(), minlength=10)[:10] for g in g8]) / g8[0].size
    return np.concatenate([mag.mean(1, keepdims=True), mag.std(1, keepdims=True),
                           lap.var(1, keepdims=True), grey.reshape(len(x), -1).std(1)[:, None],
                           lbp], axis=1)


# --------------------------------------------------------------------------- torch wrapper
def xgboost_module(num_classes: int, patch_size: int,
                   features: str = "colour-texture") -> nn.Module:
    """The booster as an ``nn.Module``: ``forward(x normalised with mean 0, std 1) -> log p``."""
    import torch
    from torch import nn

    if features not in FEATURES:
        raise TypeError(f"unknown features {features!r}")

    class XGBoostClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("booster", torch.zeros(0, dtype=torch.uint8))
            self.features, self.num_classes = features, num_classes
            self._model: Any = None

        def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                                  *args: Any) -> None:
            key = prefix + "booster"
            if key in state_dict:  # the booster's size is only known from the file
                self.booster = torch.empty_like(state_dict[key])
                self._model = None
            super()._load_from_state_dict(state_dict, prefix, *args)

        def model(self) -> Any:
            if self._model is None:
                self._model = booster_from_bytes(self.booster.cpu().numpy().tobytes())
            return self._model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.booster.numel() == 0:
                raise ModelError("this XGBoost module holds no trained booster",
                                 "load weights.safetensors from a trained model folder")
            u8 = (x.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
            patches = u8.permute(0, 2, 3, 1).cpu().numpy()
            probs = predict_proba(self.model(), patch_features(patches, self.features))
            return torch.from_numpy(np.log(np.clip(probs, 1e-12, None))).to(x.device)

    return XGBoostClassifier()


def booster_from_bytes(raw: bytes) -> Any:
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster


def predict_proba(booster: Any, feats: np.ndarray) -> np.ndarray:
    """(N, C) probabilities; binary boosters give (N,) P(class 1), widened to two columns."""
    p = np.asarray(booster.inplace_predict(feats), dtype=np.float32)
    return np.stack([1 - p, p], axis=1) if p.ndim == 1 else p
