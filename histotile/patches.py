"""Patch pixels: read large tile-aligned regions once and slice them into patches.

A patch always equals ``resize_patch(slide.read_region(coords, level, (psl, psl)), P)`` with
``psl = grid.patch_size_level``; reading 2048^2 regions and slicing them is just much faster
than one ``read_region`` per patch. :class:`Region` is small and picklable, so reader
workers can receive regions and read them from their own ``open_slide(**slide.spec)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import TooMuchUnreadableError, UnreadableRegionError
from histotile.resample import resize_cells, resize_patch
from histotile.slide import level_to_level0
from histotile.units import Level0Px, LevelPx

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.slide import Slide
    from histotile.tissue import TissueMask

log = logging.getLogger(__name__)
#: a region is shrunk in one call when its lattice cells are at most this many per patch
#: (else the patches are shrunk one by one: little tissue in a big bounding box)
CELLS_PER_PATCH = 1.5


@dataclass(frozen=True)
class Region:
    """A block of level pixels ``[x, x+w) x [y, y+h)`` and the grid patches (``idx``) inside it."""

    level: int
    x: LevelPx
    y: LevelPx
    w: LevelPx
    h: LevelPx
    idx: np.ndarray  # (n,) int64 positions in grid.coords

    def __len__(self) -> int:
        return int(self.idx.shape[0])


def tile_size(slide: Slide, level: int) -> int:
    """The file's tile width at ``level`` (1 when untiled or unknown)."""
    return slide.tile_size(level)


def plan_regions(grid: PatchGrid, slide: Slide, region_size: int = 2048) -> list[Region]:
    """Group the grid's patches into tile-aligned blocks of about ``region_size`` level pixels.

    Each patch goes to the block holding its top-left corner; a region is the bounding box of
    its patches, so it is at most ``(block + patch_size_level)^2`` pixels.
    """
    if len(grid) == 0:
        return []
    align = tile_size(slide, grid.level)
    block = max(align, (int(region_size) // align) * align)
    xy = grid.level_coords()
    bx, by = xy[:, 0] // block, xy[:, 1] // block
    key = by * (int(bx.max()) + 1) + bx
    order = np.lexsort((xy[:, 0], xy[:, 1], key))
    key_sorted = key[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    psl = grid.patch_size_level
    regions = []
    for group in np.split(order, starts[1:]):
        gx, gy = xy[group, 0], xy[group, 1]
        x, y = int(gx.min()), int(gy.min())
        regions.append(Region(level=grid.level, x=LevelPx(x), y=LevelPx(y),
                              w=LevelPx(int(gx.max()) + psl - x),
                              h=LevelPx(int(gy.max()) + psl - y), idx=group.astype(np.int64)))
    return regions


def read_region_patches(slide: Slide, grid: PatchGrid, region: Region,
                        unreadable: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``region`` once and cut its patches: (idx (n,), patches uint8 (n, P, P, 3)).

    A region that cannot be decoded (a damaged tile) raises
    :class:`~histotile.errors.UnreadableRegionError`, unless ``unreadable`` is a list: then its
    patches are read one by one, the ones that still fail are left out of the result and their
    grid positions appended to ``unreadable`` (a bad tile costs only the patches it covers).
    """
    ds = slide.level_downsamples[region.level]
    try:
        pixels = slide.read_region((level_to_level0(region.x, ds),
                                    level_to_level0(region.y, ds)),
                                   region.level, (region.w, region.h))
    except UnreadableRegionError:
        if unreadable is None:
            raise
        return _read_one_by_one(slide, grid, region.idx, unreadable)
    psl, size = int(grid.patch_size_level), grid.patch_size
    xy = grid.level_coords()[region.idx]
    dx, dy = xy[:, 0] - int(region.x), xy[:, 1] - int(region.y)
    rows, cols = -(-int(region.h) // psl), -(-int(region.w) // psl)
    if (size < psl and not (dx % psl).any() and not (dy % psl).any()
            and rows * cols <= CELLS_PER_PATCH * len(region)):
        # patches on one lattice (no overlap) filling most of the region: one resize call
        cells = resize_cells(pixels[:rows * psl, :cols * psl], psl, size)
        cells = cells.reshape(rows, size, cols, size, 3)
        return region.idx, np.ascontiguousarray(
            cells[dy // psl, :, dx // psl].reshape(len(region), size, size, 3))
    out = np.empty((len(region), size, size, 3), np.uint8)
    for k in range(len(region)):
        x, y = int(dx[k]), int(dy[k])
        out[k] = resize_patch(pixels[y:y + psl, x:x + psl], size)
    return region.idx, out


def _read_one_by_one(slide: Slide, grid: PatchGrid, idx: np.ndarray,
                     unreadable: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The readable patches of ``idx`` read alone; the others' positions go to ``unreadable``."""
    size = grid.patch_size
    keep: list[int] = []
    patches: list[np.ndarray] = []
    for i in idx.tolist():
        try:
            patches.append(read_patch(slide, grid, int(i)))
        except UnreadableRegionError as exc:
            log.debug("%s: patch at level-0 %s is unreadable (%s)", slide.path,
                        tuple(int(v) for v in grid.coords[i]), exc.message)
            unreadable.append(int(i))
            continue
        keep.append(int(i))
    out = np.stack(patches) if patches else np.empty((0, size, size, 3), np.uint8)
    return np.asarray(keep, dtype=np.int64), out


def read_patch(slide: Slide, grid: PatchGrid, i: int) -> np.ndarray:
    """Patch ``i`` read on its own (the reference the region reads must equal)."""
    x, y = (Level0Px(int(v)) for v in grid.coords[i])
    crop = slide.read_region((x, y), grid.level, (grid.patch_size_level,) * 2)
    return resize_patch(crop, grid.patch_size)


def iter_patch_batches(slide: Slide, grid: PatchGrid, batch_size: int,
                       region_size: int = 2048, unreadable: list[int] | None = None,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (idx, patches) batches of at most ``batch_size`` in region order.

    Memory holds one region plus one batch, never the slide. ``unreadable``: see
    :func:`read_region_patches` (without it a damaged tile raises).
    """
    pending_idx: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    count = 0
    for region in plan_regions(grid, slide, region_size):
        idx, patches = read_region_patches(slide, grid, region, unreadable)
        pending_idx.append(idx)
        pending.append(patches)
        count += len(idx)
        while count >= batch_size:
            all_idx, all_p = np.concatenate(pending_idx), np.concatenate(pending)
            yield all_idx[:batch_size], all_p[:batch_size]
            pending_idx, pending = [all_idx[batch_size:]], [all_p[batch_size:]]
            count -= batch_size
    if count:
        yield np.concatenate(pending_idx), np.concatenate(pending)


def sample_patches(slide: Slide, grid: PatchGrid, n: int = 64, seed: int = 0,
                   unreadable: list[int] | None = None) -> np.ndarray:
    """A seeded sample of at most ``n`` grid patches, uint8 (k, P, P, 3) in grid order.

    The stain fit of a slide is made on it (``predict`` and ``tile --stain-norm``). Patches
    that lie close together are cut from one region read; scattered ones are read alone.
    The pixels equal :func:`read_patch` either way. Patches that cannot be decoded are left
    out of the sample (so it may hold fewer than ``n``) and their grid positions appended to
    ``unreadable`` when given: a damaged tile never stops the fit.
    """
    k = min(int(n), len(grid))
    size = grid.patch_size
    if k <= 0:
        return np.empty((0, size, size, 3), np.uint8)
    pick = np.sort(np.random.default_rng(seed).choice(len(grid), size=k, replace=False))
    sub = grid.subset(pick)
    out = np.empty((k, size, size, 3), np.uint8)
    good = np.zeros(k, bool)
    failed: list[int] = []
    area = grid.patch_size_level ** 2
    for region in plan_regions(sub, slide):
        if region.w * region.h <= 4 * len(region) * area:  # mostly patch pixels: one read
            idx, patches = read_region_patches(slide, sub, region, failed)
        else:
            idx, patches = _read_one_by_one(slide, sub, region.idx, failed)
        out[idx] = patches
        good[idx] = True
    if unreadable is not None:
        unreadable.extend(int(pick[i]) for i in failed)
    return out if good.all() else out[good]


def unreadable_record(grid: PatchGrid, rows: list[int], tissue: TissueMask | None,
                      max_fraction: float,
                      subject: str, recorded_in: str) -> dict[str, Any]:
    """run.json's ``unreadable`` record of the grid ``rows`` that could not be decoded (count,
    fraction, level-0 boxes, the thumbnail's bad boxes), one warning when there are any (naming
    ``recorded_in``); :class:`~histotile.errors.TooMuchUnreadableError` above ``max_fraction``.
    The one rule ``predict`` and ``tile`` share."""
    n = len(rows)
    fraction = n / len(grid) if len(grid) else 0.0
    if fraction > max_fraction:
        raise TooMuchUnreadableError(
            f"{n} of {len(grid)} patches ({fraction:.1%}) cannot be decoded (damaged tiles), "
            f"more than --max-unreadable {max_fraction:g}",
            "re-copy the slide if it was damaged in transfer, or raise --max-unreadable to "
            "keep what can be read", subject=subject)
    size = grid.patch_size_level0
    boxes = [[int(x), int(y), size, size] for x, y in grid.coords[rows].tolist()]
    if n:
        log.warning("%s: %d of %d patches (%.1f%%) could not be decoded (damaged tiles): %s",
                    subject, n, len(grid), 100 * fraction, recorded_in)
    return {"patches": n, "fraction": fraction, "max_fraction": max_fraction,
            "boxes_level0": boxes,
            "thumbnail_boxes_level0": [list(b) for b in (getattr(tissue, "unreadable", None)
                                                         or [])]}
