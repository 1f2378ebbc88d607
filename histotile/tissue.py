"""Tissue detection: Otsu on a thumbnail at ~8 um/px, morphology sized in um (not pixels).

``otsu`` thresholds the HSV saturation (stained tissue is coloured, glass is grey/white) after a
median blur; ``otsu-gray`` thresholds darkness instead (for unstained or fluorescence-like
pictures). Thresholds are clamped so a blank slide gives an empty mask rather than noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histotile.errors import InvalidArgumentError

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.slide import Slide

log = logging.getLogger(__name__)

METHODS = ("otsu", "otsu-gray")
MASK_MPP = 8.0  # um/px of the thumbnail the mask is computed on
MIN_SATURATION = 0.08  # saturation below this is never tissue (white/grey glass, JPEG noise)
MAX_GRAY = 220.0  # for otsu-gray: brighter than this is never tissue
CLOSING_UM = 16.0
MIN_OBJECT_UM2 = 10_000.0  # 0.01 mm^2
MIN_HOLE_UM2 = 10_000.0
_DEFAULT_PX = {"closing": 2, "object": 64, "hole": 64}  # when the picture has no mpp


@dataclass
class TissueMask:
    """Boolean tissue mask of a slide thumbnail (see docs/CONTRACTS.md)."""

    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 px per mask px
    mpp: float | None  # um per mask px
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    method: str
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the thumbnail covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _median(channel: np.ndarray, size: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(channel, size=size, mode="nearest") if size > 1 else channel


def _threshold(rgb: np.ndarray, method: str, median_size: int) -> tuple[np.ndarray, float]:
    from skimage.filters import threshold_otsu

    if method == "otsu":
        from skimage.color import rgb2hsv

        value = _median(rgb2hsv(rgb)[..., 1].astype(np.float32), median_size)
        thr = max(_otsu(value, threshold_otsu), MIN_SATURATION)
        return value > thr, thr
    gray = _median(rgb.astype(np.float32).mean(axis=2), median_size)
    thr = min(_otsu(gray, threshold_otsu), MAX_GRAY)
    return gray < thr, thr


def _otsu(values: np.ndarray, threshold_otsu) -> float:  # noqa: ANN001
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def tissue_mask_rgb(rgb: np.ndarray, mpp: float | None = None, method: str = "otsu",
                    median_size: int = 5, closing_um: float = CLOSING_UM,
                    min_object_um2: float = MIN_OBJECT_UM2,
                    min_hole_um2: float = MIN_HOLE_UM2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 picture (``mpp`` sizes the morphology; else pixels)."""
    return _mask(rgb, mpp, method, median_size, closing_um, min_object_um2, min_hole_um2)[0]


def _mask(rgb: np.ndarray, mpp: float | None, method: str, median_size: int, closing_um: float,
          min_object_um2: float, min_hole_um2: float) -> tuple[np.ndarray, float]:
    from skimage import morphology

    if method not in METHODS:
        raise InvalidArgumentError(f"unknown tissue method {method!r}",
                                   f"use one of {', '.join(METHODS)}")
    rgb = np.asarray(rgb)[..., :3].astype(np.uint8)
    mask, thr = _threshold(rgb, method, median_size)
    if mpp:
        radius = int(round(closing_um / mpp))
        min_obj = int(round(min_object_um2 / mpp**2))
        min_hole = int(round(min_hole_um2 / mpp**2))
    else:
        radius, min_obj, min_hole = (_DEFAULT_PX[k] for k in ("closing", "object", "hole"))
    if radius > 0:
        from scipy.ndimage import binary_closing

        padded = np.pad(mask, radius, mode="edge")
        mask = binary_closing(padded, morphology.disk(radius).astype(bool))[radius:-radius,
                                                                            radius:-radius]
    mask = _drop_small(mask, min_obj)
    mask = ~_drop_small(~mask, min_hole)  # fill small holes
    return mask.astype(bool), float(thr)


def _drop_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without 8-connected components of at most ``max_size`` pixels."""
    from scipy.ndimage import label

    if max_size < 1 or not mask.any():
        return mask
    labels, _ = label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_size
    small[0] = False
    return mask & ~small[labels]


def detect_tissue(slide: Slide, method: str = "otsu", mask_mpp: float = MASK_MPP,
                  median_size: int = 5, closing_um: float = CLOSING_UM,
                  min_object_um2: float = MIN_OBJECT_UM2,
                  min_hole_um2: float = MIN_HOLE_UM2) -> TissueMask:
    """Tissue mask of ``slide`` computed on a thumbnail at about ``mask_mpp`` um/px.

    Without a slide mpp the thumbnail is 1/16 of level 0 and morphology is sized in pixels.
    """
    if slide.mpp is not None:
        slide_mpp = slide.require_mpp()
        thumb, ds = slide.read_downsampled(mask_mpp / slide_mpp)
        mpp: float | None = ds * slide_mpp
    else:
        thumb, ds = slide.read_downsampled(16.0)
        mpp = None
    mask, thr = _mask(thumb, mpp, method, median_size, closing_um, min_object_um2, min_hole_um2)
    if not mask.any():
        log.warning("%s: no tissue found (%s threshold %.3f)", slide.path, method, thr)
    return TissueMask(mask=mask, downsample=ds, mpp=mpp, thumbnail=thumb, method=method,
                      threshold=thr)


def overlay(tissue: TissueMask, grid: PatchGrid | None = None, min_side: int = 1024) -> np.ndarray:
    """Thumbnail with the mask tinted green, its outline, and the kept patch grid in blue."""
    from PIL import Image, ImageDraw

    thumb, mask = tissue.thumbnail, tissue.mask
    scale = max(1, int(np.ceil(min_side / max(thumb.shape[:2]))))
    tinted = thumb.astype(np.float32)
    tinted[mask] = 0.65 * tinted[mask] + 0.35 * np.array([0, 200, 0], np.float32)
    img = Image.fromarray(np.rint(tinted).astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    edge = _outline(mask)
    if scale > 1:
        edge = np.kron(edge, np.ones((scale, scale), bool))
    pixels = np.asarray(img).copy()
    pixels[edge] = (0, 120, 0)
    img = Image.fromarray(pixels)
    if grid is not None and len(grid):
        draw = ImageDraw.Draw(img)
        f = scale / tissue.downsample
        size = float(grid.patch_size_level0) * f
        for x, y in grid.coords:
            x0, y0 = x * f, y * f
            draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], outline=(30, 60, 220))
    return np.asarray(img)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)
