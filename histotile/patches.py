"""Patch pixels: read large tile-aligned regions once and slice them into patches.

A patch always equals ``resize_patch(slide.read_region(coords, level, (psl, psl)), P)`` with
``psl = grid.patch_size_level``; reading 2048^2 regions and slicing them is just much faster
than one ``read_region`` per patch. :class:`Region` is small and picklable, so DataLoader
workers can receive regions and read them from their own ``open_slide(**slide.spec)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histotile.slide import level_to_level0

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.slide import Slide


@dataclass(frozen=True)
class Region:
    """A block of level pixels ``[x, x+w) x [y, y+h)`` and the grid patches (``idx``) inside it."""

    level: int
    x: int
    y: int
    w: int
    h: int
    idx: np.ndarray  # (n,) int64 positions in grid.coords

    def __len__(self) -> int:
        return int(self.idx.shape[0])


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 patch to (size, size, 3): box (area) filter when shrinking,
    bicubic when enlarging, untouched when already that size."""
    h, w = patch.shape[:2]
    if h == size and w == size:
        return np.ascontiguousarray(patch)
    from PIL import Image

    method = Image.Resampling.BOX if (h >= size and w >= size) else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), method))


def tile_size(slide: Slide, level: int) -> int:
    """The file's tile width at ``level`` (1 when untiled or unknown)."""
    value = slide.properties.get(f"{slide.backend}.level[{level}].tile-width")
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


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
        regions.append(Region(level=grid.level, x=x, y=y, w=int(gx.max()) + psl - x,
                              h=int(gy.max()) + psl - y, idx=group.astype(np.int64)))
    return regions


def read_region_patches(slide: Slide, grid: PatchGrid,
                        region: Region) -> tuple[np.ndarray, np.ndarray]:
    """Read ``region`` once and cut its patches: (idx (n,), patches uint8 (n, P, P, 3))."""
    ds = slide.level_downsamples[region.level]
    pixels = slide.read_region((level_to_level0(region.x, ds), level_to_level0(region.y, ds)),
                               region.level, (region.w, region.h))
    psl, size = grid.patch_size_level, grid.patch_size
    out = np.empty((len(region), size, size, 3), np.uint8)
    xy = grid.level_coords()[region.idx]
    for k, (lx, ly) in enumerate(xy):
        dx, dy = int(lx) - region.x, int(ly) - region.y
        out[k] = resize_patch(pixels[dy:dy + psl, dx:dx + psl], size)
    return region.idx, out


def read_patch(slide: Slide, grid: PatchGrid, i: int) -> np.ndarray:
    """Patch ``i`` read on its own (the reference the region reads must equal)."""
    x, y = (int(v) for v in grid.coords[i])
    crop = slide.read_region((x, y), grid.level, (grid.patch_size_level,) * 2)
    return resize_patch(crop, grid.patch_size)


def iter_patch_batches(slide: Slide, grid: PatchGrid, batch_size: int,
                       region_size: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (idx, patches) batches of at most ``batch_size`` in region order.

    Memory holds one region plus one batch, never the slide.
    """
    pending_idx: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    count = 0
    for region in plan_regions(grid, slide, region_size):
        idx, patches = read_region_patches(slide, grid, region)
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


def sample_patches(slide: Slide, grid: PatchGrid, n: int = 64, seed: int = 0) -> np.ndarray:
    """A seeded sample of at most ``n`` grid patches, uint8 (k, P, P, 3) in grid order.

    The stain fit of a slide is made on it (``predict`` and ``tile --stain-norm``). Patches
    that lie close together are cut from one region read; scattered ones are read alone.
    The pixels equal :func:`read_patch` either way.
    """
    k = min(int(n), len(grid))
    size = grid.patch_size
    out = np.empty((max(k, 0), size, size, 3), np.uint8)
    if k <= 0:
        return out
    pick = np.sort(np.random.default_rng(seed).choice(len(grid), size=k, replace=False))
    sub = grid.subset(pick)
    area = grid.patch_size_level ** 2
    for region in plan_regions(sub, slide):
        if region.w * region.h <= 4 * len(region) * area:  # mostly patch pixels: one read
            idx, patches = read_region_patches(slide, sub, region)
            out[idx] = patches
        else:
            for i in region.idx:
                out[i] = read_patch(slide, sub, int(i))
    return out
