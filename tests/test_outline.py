"""The pictures' outline (export.drawing.outline) in OpenCV gives scipy.ndimage's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from histotile.export.drawing import outline


def _reference(mask: np.ndarray, width: int, min_fraction: float) -> np.ndarray:
    """The earlier scipy.ndimage implementation, verbatim."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if min_fraction > 0:
        mask = ndimage.binary_fill_holes(mask)
        lab, n = ndimage.label(mask)
        if n:
            sizes = np.bincount(lab.ravel())
            keep = sizes >= max(1, min_fraction * mask.size)
            keep[0] = False
            mask = keep[lab]
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("min_fraction", [0.0, 5e-4, 0.01])
@pytest.mark.parametrize("seed", [0, 1])
def test_outline_equals_scipy_ndimage(width, min_fraction, seed):
    from scipy.ndimage import uniform_filter

    noise = np.random.default_rng(seed).random((97, 131))
    mask = uniform_filter(noise, size=5) > 0.55 - 0.05 * seed  # pieces, holes, specks
    mask[:, :3] = True  # a piece on the edge, with background holes touching the edge
    mask[40:44, 1] = False
    got = outline(mask, width, min_fraction)
    assert got.dtype == bool and got.any()
    np.testing.assert_array_equal(got, _reference(mask, width, min_fraction))


def test_outline_of_empty_and_full_masks():
    assert not outline(np.zeros((5, 6), bool)).any()
    full = outline(np.ones((5, 6), bool), min_fraction=0.1)
    np.testing.assert_array_equal(full, _reference(np.ones((5, 6), bool), 1, 0.1))
    assert outline(np.zeros((0, 4), bool)).shape == (0, 4)
