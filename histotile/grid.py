"""The patch grid at a target mpp: level choice, overlap, tissue filter and level-0 coordinates.

The grid lives in the pixels of the read level: patch ``(col, row)`` starts at level pixel
``(col, row) * stride_level`` and covers ``patch_size_level`` level pixels, which are resized to
``patch_size`` (so ``effective_mpp = patch_size_level * level_mpp / patch_size``). Its level-0
top-left is ``ceil(level_px * downsample)`` (exactly ``origin_level0 + (col, row) *
stride_level0`` when the downsample is an integer, as on level 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError
from histotile.slide import _EPS
from histotile.units import Level0Px, LevelPx, MicronsPerPixel

MAX_UPSAMPLE = 2.0  # refuse targets more than 2x finer than the finest level

if TYPE_CHECKING:
    from histotile.slide import Slide
    from histotile.tissue import TissueMask


def _num(value: float) -> Level0Px:
    """An int when ``value`` is integral (level-0 sizes on integer downsamples), else a float."""
    return Level0Px(int(round(value)) if abs(value - round(value)) < 1e-9 else float(value))


@dataclass
class PatchGrid:
    """Where the patches are; no pixels (see docs/CONTRACTS.md)."""

    patch_size: int
    target_mpp: MicronsPerPixel | None
    effective_mpp: MicronsPerPixel | None
    level: int
    level_downsample: float
    patch_size_level: LevelPx
    stride_level: LevelPx
    patch_size_level0: Level0Px  # an int on integer downsamples, else a float
    stride_level0: Level0Px
    origin_level0: tuple[Level0Px, Level0Px]
    grid_shape: tuple[int, int]  # (cols, rows)
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    indices: np.ndarray  # (N, 2) int64 col, row
    tissue_fraction: np.ndarray  # (N,) float32
    slide_mpp: MicronsPerPixel | None
    mpp_source: str | None
    overlap: float = 0.0
    min_tissue: float = 0.0
    tissue_method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def level_coords(self) -> np.ndarray:
        """(N, 2) int64 top-left of each patch in level pixels."""
        return self.indices * self.stride_level

    def subset(self, keep: np.ndarray | slice) -> PatchGrid:
        """The same grid with only the patches selected by ``keep`` (mask, indices or slice)."""
        import dataclasses

        return dataclasses.replace(self, coords=self.coords[keep], indices=self.indices[keep],
                                   tissue_fraction=self.tissue_fraction[keep])

    def to_attrs(self) -> dict[str, Any]:
        """Flat metadata for HDF5/zarr/JSON (``None`` values left out)."""
        attrs = {
            "patch_size": self.patch_size, "target_mpp": self.target_mpp,
            "effective_mpp": self.effective_mpp, "level": self.level,
            "level_downsample": self.level_downsample,
            "patch_size_level": self.patch_size_level, "stride_level": self.stride_level,
            "patch_size_level0": self.patch_size_level0, "stride_level0": self.stride_level0,
            "origin_level0": list(self.origin_level0), "grid_shape": list(self.grid_shape),
            "slide_mpp": self.slide_mpp, "mpp_source": self.mpp_source,
            "overlap": self.overlap, "min_tissue": self.min_tissue,
            "tissue_method": self.tissue_method, "coordinates": "level-0 top-left (x, y)",
        }
        return {k: v for k, v in attrs.items() if v is not None}


def make_grid(slide: Slide, patch_size: int, target_mpp: float | None = None,
              level: int | None = None, overlap: float = 0.0, tissue: TissueMask | None = None,
              min_tissue: float = 0.5) -> PatchGrid:
    """Lay a grid of ``patch_size`` px patches at ``target_mpp`` (or at ``level``'s own mpp).

    ``level`` forces the read level; otherwise the coarsest level not coarser than the target.
    With neither, level 0 at its own resolution. ``tissue`` keeps patches whose mask fraction is
    at least ``min_tissue``.
    """
    subject = str(slide.path)
    if int(patch_size) < 1:
        raise InvalidArgumentError(f"patch size {patch_size} is not positive",
                                   "use e.g. --patch-size 96", subject)
    if not 0.0 <= overlap < 1.0:
        raise InvalidArgumentError(f"overlap {overlap} is outside [0, 1)",
                                   "use e.g. --overlap 0.5 for half-patch steps", subject)
    patch_size = int(patch_size)
    slide_mpp = slide.require_mpp() if (target_mpp is not None or slide.mpp) else None
    if level is None:
        level = slide.best_level_for_mpp(target_mpp) if target_mpp is not None else 0
    slide.check_level(level)
    ds = slide.level_downsamples[level]
    level_mpp = slide_mpp * ds if slide_mpp else None
    if target_mpp is not None and level_mpp is not None:  # require_mpp() above: known
        if target_mpp <= 0 or target_mpp < level_mpp / MAX_UPSAMPLE:
            raise InvalidArgumentError(
                f"target {target_mpp:g} um/px is far finer than level {level} "
                f"({level_mpp:.4g} um/px)",
                f"use --mpp >= {level_mpp / MAX_UPSAMPLE:.4g}, --level, or --slide-mpp if the "
                "slide's pixel size is wrong", subject)
        psl = LevelPx(max(1, int(round(patch_size * target_mpp / level_mpp))))
    else:
        psl = LevelPx(patch_size)
    effective = MicronsPerPixel(psl * level_mpp / patch_size) if level_mpp else None
    stride = LevelPx(max(1, int(round(psl * (1.0 - overlap)))))
    lw, lh = slide.level_dimensions[level]
    if psl > lw or psl > lh:
        raise InvalidArgumentError(
            f"a {patch_size} px patch covers {psl} px at level {level}, larger than the "
            f"level ({lw}x{lh})", "use a smaller --patch-size or a finer --mpp/--level", subject)
    cols, rows = (lw - psl) // stride + 1, (lh - psl) // stride + 1
    cc, rr = np.meshgrid(np.arange(cols, dtype=np.int64), np.arange(rows, dtype=np.int64))
    indices = np.stack([cc.ravel(), rr.ravel()], axis=1)
    coords = _to_level0(indices * stride, ds)
    psl0 = _num(psl * ds)
    if tissue is not None:
        fraction = tissue_fractions(tissue.mask, tissue.downsample, coords,
                                    Level0Px(float(psl * ds)))
    else:
        fraction = np.ones(len(indices), np.float32)
    grid = PatchGrid(
        patch_size=patch_size, effective_mpp=effective, level=level,
        target_mpp=MicronsPerPixel(target_mpp) if target_mpp is not None else None,
        level_downsample=ds, patch_size_level=psl, stride_level=stride,
        patch_size_level0=psl0, stride_level0=_num(stride * ds),
        origin_level0=(Level0Px(0), Level0Px(0)),
        grid_shape=(int(cols), int(rows)), coords=coords, indices=indices,
        tissue_fraction=fraction, slide_mpp=slide_mpp, mpp_source=slide.mpp_source,
        overlap=float(overlap), min_tissue=float(min_tissue) if tissue is not None else 0.0,
        tissue_method=tissue.method if tissue is not None else None,
    )
    if tissue is not None:
        grid = grid.subset(fraction >= min_tissue)
    return grid


def _to_level0(level_xy: np.ndarray, ds: float) -> np.ndarray:
    if ds == 1.0:
        return level_xy.astype(np.int64)
    return np.ceil(level_xy * ds - _EPS).astype(np.int64)  # same as slide.level_to_level0


def tissue_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray,
                     size_level0: Level0Px) -> np.ndarray:
    """Fraction of mask pixels set under each level-0 box ``coords + [0, size_level0)``.

    One integral image of the mask (OpenCV, int32 counts; float64, exact, past 2**31 pixels)
    and four look-ups per box.
    """
    import cv2

    flat = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    depth = cv2.CV_32S if flat.size < 2**31 else cv2.CV_64F
    integral = cv2.integral(flat, sdepth=depth) if flat.size else np.zeros(
        (mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / downsample).astype(np.int64), 0, h)
    area = (x1 - x0) * (y1 - y0)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where(area > 0, total / np.maximum(area, 1), 0.0).astype(np.float32)
