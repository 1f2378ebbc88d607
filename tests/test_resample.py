"""The one resampler (histotile.resample): a true area average when shrinking, on every path."""

from __future__ import annotations

import numpy as np
import pytest

from histotile.resample import resize_patch


def exact_area_average(img: np.ndarray, size: int) -> np.ndarray:
    """Reference: each output pixel integrates the source pixels it overlaps (float64),
    fractional edge pixels weighted by their overlap, divided by its area in source pixels."""

    def weights(n: int, m: int) -> np.ndarray:
        scale = n / m
        w = np.zeros((m, n))
        for k in range(m):
            a, b = k * scale, (k + 1) * scale
            for j in range(n):
                w[k, j] = max(0.0, min(b, j + 1) - max(a, j))
        return w / scale

    wy, wx = weights(img.shape[0], size), weights(img.shape[1], size)
    return np.einsum("ih,hwc,jw->ijc", wy, img.astype(np.float64), wx, optimize=True)


@pytest.mark.parametrize(("side", "size"), [(96, 28), (50, 23), (37, 16), (30, 7), (64, 32)])
def test_issue16_resize_patch_is_an_exact_area_average_not_pil_box(side, size):
    # PIL's BOX filter gave each source pixel wholly to one output pixel: up to 82 grey levels
    # (mean 3.6-5.9) from the exact area average at fractional factors such as 96 -> 28.
    rng = np.random.default_rng(side * 100 + size)
    patch = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = resize_patch(patch, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    err = np.abs(out.astype(np.float64) - exact_area_average(patch, size))
    assert err.max() <= 0.5 + 1e-6  # exact up to rounding to uint8


def test_issue16_one_resampler_for_slides_training_and_explain():
    import histotile.patches
    import histotile.resample
    import histotile.training.datasets as datasets

    assert histotile.patches.resize_patch is histotile.resample.resize_patch
    assert datasets.resize_patch is histotile.resample.resize_patch
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    ps = datasets.ArrayPatches(images, np.zeros(3, np.int64), size=28)
    np.testing.assert_array_equal(ps[1][0], resize_patch(images[1], 28))


def test_resize_patch_same_size_and_enlarging():
    patch = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    assert (resize_patch(patch, 8) == patch).all()
    big = resize_patch(np.full((8, 8, 3), 77, np.uint8), 20)
    assert big.shape == (20, 20, 3) and (big == 77).all()


@pytest.mark.parametrize(("cell", "size"), [(187, 96), (448, 224), (96, 28), (50, 23), (37, 16)])
def test_resize_cells_gives_each_cell_its_own_area_average(cell, size):
    from histotile.resample import resize_cells

    rng = np.random.default_rng(cell)
    rows, cols = 3, 4
    block = rng.integers(0, 256, (rows * cell, cols * cell, 3), dtype=np.uint8)
    out = resize_cells(block, cell, size)
    assert out.shape == (rows * size, cols * size, 3)
    for i in range(rows):
        for j in range(cols):
            alone = resize_patch(block[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell], size)
            np.testing.assert_array_equal(
                out[i * size:(i + 1) * size, j * size:(j + 1) * size], alone)
