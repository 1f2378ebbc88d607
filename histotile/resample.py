"""The one resampler: every patch histotile reads, trains on or explains is resized here.

* :func:`resize_patch` — shrinking is a true area average (OpenCV ``INTER_AREA``: each output
  pixel is the mean of the source pixels it covers, fractional edge pixels weighted by their
  overlap; within 0.5 grey levels of the exact float64 average, i.e. exact up to rounding);
  enlarging is bicubic (OpenCV ``INTER_CUBIC``); a patch already at the size is returned as is.
* :func:`resize_cells` — the same area average for a block of adjacent patches in one call
  (the patch reader's fast path; each patch's pixels equal :func:`resize_patch`'s).
* :func:`block_mean` — the exact area average for an integer factor (``f x f`` block means),
  used by the slide reader to build thumbnails from a finer level.
* :func:`upsample_maps` — bilinear resize (half-pixel centres, as OpenCV's ``INTER_LINEAR``) of
  (B, h, w) explanation maps, torch or numpy.

Slides (``patches``), training sets (``training.datasets``), ``explain`` and ``attention`` all
call these, so the model sees the same pixels whichever command feeds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histotile.errors import InvalidArgumentError

SHRINK_FILTER = "area average (OpenCV INTER_AREA)"
ENLARGE_FILTER = "bicubic (OpenCV INTER_CUBIC)"


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """An (h, w, C) uint8 patch resized to (size, size, C): area average when shrinking,
    bicubic when enlarging, untouched (made contiguous) when already that size."""
    patch = np.asarray(patch)
    h, w = patch.shape[:2]
    if h == size and w == size:
        return np.ascontiguousarray(patch)
    if size < 1 or h < 1 or w < 1:
        raise InvalidArgumentError(f"cannot resize a {h}x{w} patch to {size} px",
                                   "patch sizes must be positive")
    import cv2

    shrink = h >= size and w >= size
    out = cv2.resize(np.ascontiguousarray(patch), (size, size),
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    if out.ndim == patch.ndim - 1:  # OpenCV drops a single channel axis
        out = out[..., None]
    return out


def resize_cells(block: np.ndarray, cell: int, size: int) -> np.ndarray:
    """A (rows*cell, cols*cell, C) uint8 block of whole ``cell``-px cells shrunk to
    (rows*size, cols*size, C) in one area-average call (``size <= cell``).

    Output cell (i, j) is the area average of input cell (i, j) alone, the pixels
    :func:`resize_patch` gives for that cell (the overlap weights of a cell do not depend on
    where it sits: cell ``j`` starts at output pixel ``j * size``, exactly at input ``j * cell``),
    at a fraction of the cost of one call per cell.
    """
    block = np.ascontiguousarray(block)
    h, w = block.shape[:2]
    if size > cell or h % cell or w % cell:
        raise InvalidArgumentError(f"a {h}x{w} block is not whole {cell} px cells to shrink to "
                                   f"{size} px", "pass a block of whole cells, size <= cell")
    if size == cell:
        return block
    import cv2

    out = cv2.resize(block, (w // cell * size, h // cell * size), interpolation=cv2.INTER_AREA)
    return out[..., None] if out.ndim == block.ndim - 1 else out


def upsample_maps(maps: Any, size: int | tuple[int, int]) -> Any:
    """Bilinear (half-pixel centres) resize of (B, h, w) maps to ``size`` ((H, W) or an int);
    torch in → torch out, numpy in → numpy float32 out."""
    import torch
    import torch.nn.functional as F

    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))
    is_np = isinstance(maps, np.ndarray)
    t = torch.from_numpy(np.asarray(maps, np.float32)) if is_np else maps.float()
    if tuple(t.shape[-2:]) != hw:
        t = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
    return t.numpy() if is_np else t


def block_mean(tile: np.ndarray, f: int) -> np.ndarray:
    """Mean of ``f x f`` blocks of a uint8 (h, w, 3) tile, rounded (uint32 sums, no float64):
    the exact area average for an integer factor (the slide reader's thumbnails)."""
    if f == 1:
        return tile
    h, w = tile.shape[0] // f, tile.shape[1] // f
    sums = tile.reshape(h, f, w, f * 3).sum(axis=1, dtype=np.uint32)
    sums = sums.reshape(h, w, f, 3).sum(axis=2, dtype=np.uint32)
    mean = sums.astype(np.float32)
    mean /= np.float32(f * f)
    return np.rint(mean, out=mean).astype(np.uint8)
