"""The reader pool (histotile.readers): processes that outlive a slide, order, bounded window,
unreadable patches, a dead worker; the same patches as the in-process reader thread."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from damaged_tiff import damaged_pyramid
from helpers import HE_REFERENCE, real_data
from PIL import Image

from histotile.engine import EngineStats, RegionDataset, iter_regions, rebatch
from histotile.grid import make_grid
from histotile.patches import plan_regions
from histotile.readers import ReaderPool, ReaderProcessError, RegionJob, shared_pool
from histotile.slide import open_slide


def _setup(path: Path, patch: int, mpp: float, region_size: int):
    with open_slide(path) as slide:
        grid = make_grid(slide, patch, target_mpp=mpp)
        return slide.spec, grid, plan_regions(grid, slide, region_size=region_size)


@pytest.fixture(scope="module")
def cmu(cmu_small: Path):
    """The real CMU slide: 28 px at 2 um/px, regions of 256 level px (many small regions)."""
    return _setup(cmu_small, 28, 2.0, 256)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory):
    """GENERATED: a JPEG pyramid of real H&E pixels with one level-0 tile's header zeroed."""
    he = np.asarray(Image.open(real_data(HE_REFERENCE)).convert("RGB"))
    rgb = np.ascontiguousarray(np.tile(he, (3, 3, 1))[:1024, :1024])
    path = damaged_pyramid(tmp_path_factory.mktemp("damaged"), rgb, "header", 300, 300)
    return _setup(path, 32, 0.5, 512)


def _items(spec, grid, regions, workers, pool=None):
    return list(iter_regions(RegionDataset(spec, grid, regions), workers, pool=pool))


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in (0, 1, 4):  # idx, patches, unreadable rows
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


def test_reader_pool_gives_the_thread_readers_patches_with_1_and_2_workers(cmu) -> None:
    spec, grid, regions = cmu
    assert len(regions) > 6
    thread = _items(spec, grid, regions, 0)
    for workers in (1, 2):
        _assert_same(_items(spec, grid, regions, workers), thread)
    assert sum(len(it[0]) for it in thread) == len(grid)


def test_reader_pool_lives_across_slides_and_keeps_their_patches_apart(cmu, damaged) -> None:
    pool = shared_pool(2)
    pids = {p.pid for p in pool._procs}  # noqa: SLF001 - the same processes serve both slides
    first = _items(*cmu, 2)
    second = _items(*damaged, 2)
    again = _items(*cmu, 2)
    assert shared_pool(2) is pool and {p.pid for p in pool._procs} == pids  # noqa: SLF001
    assert all(p.is_alive() for p in pool._procs)  # noqa: SLF001
    _assert_same(first, _items(*cmu, 0))
    _assert_same(second, _items(*damaged, 0))
    _assert_same(again, first)


def test_reader_pool_reports_unreadable_patches_like_the_thread(damaged) -> None:
    spec, grid, regions = damaged
    thread = _items(spec, grid, regions, 0)
    bad = sorted(int(v) for it in thread for v in it[4])
    assert bad, "the damaged tile must cost some patches"
    stats = EngineStats()
    batches = list(rebatch(iter_regions(RegionDataset(spec, grid, regions), 2), 16,
                           stats=stats))
    assert sorted(stats.unreadable) == bad
    got = np.concatenate([idx for idx, _ in batches])
    assert len(got) + len(bad) == len(grid) and not set(got.tolist()) & set(bad)
    assert stats.reader_cpu_s > 0  # the reader processes' CPU is counted


def _slow_reader(slide, grid, region):
    """Regions take longer the earlier they come, so the workers finish out of order."""
    from histotile.patches import read_region_patches

    time.sleep(0.02 * (int(region.idx[0]) % 3))
    return read_region_patches(slide, grid, region)


def test_reader_pool_keeps_region_order_and_its_window(cmu) -> None:
    spec, grid, regions = cmu
    with ReaderPool(2, window=3) as pool:
        out = list(pool.map(RegionJob(spec, grid, reader=_slow_reader), regions))
        assert 1 <= pool.max_inflight <= 3
    np.testing.assert_array_equal(np.concatenate([it[0] for it in out]),
                                  np.concatenate([r.idx for r in regions]))


def test_reader_pool_drops_an_abandoned_slide_and_reads_the_next(cmu) -> None:
    spec, grid, regions = cmu
    with ReaderPool(2, window=4) as pool:
        it = pool.map(RegionJob(spec, grid, reader=_slow_reader), regions)
        next(it)
        it.close()  # the consumer stopped (an error downstream): the rest is dropped
        _assert_same(list(pool.map(RegionJob(spec, grid), regions)), _items(*cmu, 0))


def _dying_reader(slide, grid, region):
    os._exit(3)


def test_reader_pool_names_a_dead_reader_process(cmu) -> None:
    spec, grid, regions = cmu
    with ReaderPool(1) as pool, pytest.raises(ReaderProcessError, match="exit code 3"):
        list(pool.map(RegionJob(spec, grid, reader=_dying_reader), regions))


def test_region_read_in_one_resize_equals_single_patch_reads(cmu_small: Path) -> None:
    from histotile.patches import CELLS_PER_PATCH, read_patch, read_region_patches

    with open_slide(cmu_small) as slide:
        grid = make_grid(slide, 28, target_mpp=2.0)  # every patch: regions are full lattices
        regions = plan_regions(grid, slide, region_size=256)
        psl = grid.patch_size_level
        full = [r for r in regions
                if -(-r.w // psl) * -(-r.h // psl) <= CELLS_PER_PATCH * len(r)]
        assert len(full) > 3
        for region in full[:4]:
            idx, patches = read_region_patches(slide, grid, region)
            for k in range(len(idx)):
                np.testing.assert_array_equal(patches[k], read_patch(slide, grid, int(idx[k])))


def test_reader_pool_starts_after_opencv_ran_threads_in_the_parent(cmu_small: Path) -> None:
    """Forked reader processes hung in ``cv2.setNumThreads(1)`` when the parent had already
    run OpenCV's thread pool (tissue detection, the resampler): a forked child inherits the
    pool's state but not its threads. Run in a fresh interpreter, with a time limit."""
    import subprocess
    import sys

    code = f"""
import cv2, numpy as np
cv2.setNumThreads(2)
img = np.random.default_rng(0).integers(0, 255, (3000, 3000, 3), dtype=np.uint8)
for _ in range(3):
    cv2.resize(img, (1531, 1531), interpolation=cv2.INTER_AREA)
from histotile.grid import make_grid
from histotile.patches import plan_regions
from histotile.readers import ReaderPool, RegionJob
from histotile.slide import open_slide
with open_slide({str(cmu_small)!r}) as slide:
    grid = make_grid(slide, 28, target_mpp=2.0)
    regions = plan_regions(grid, slide, region_size=512)
    spec = slide.spec
with ReaderPool(2) as pool:
    n = sum(len(item[0]) for item in pool.map(RegionJob(spec, grid), regions))
print("read", n, len(grid))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    read, total = proc.stdout.split()[1:3]
    assert int(read) == int(total) > 0
