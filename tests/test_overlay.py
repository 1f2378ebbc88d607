"""overlay.png shows confidence, names and a scale bar; tissue.png its mask and grid (issue 15).

Real CMU-1-Small-Region geometry and thumbnail; probabilities GENERATED (Dirichlet draws).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import CLASSES, COLORS, cmu_overlay_inputs, generated_probs

from histotile.export.drawing import WARN_RED, nice_length
from histotile.export.overlay import (
    HATCH_ALPHA,
    hatch,
    patch_index_image,
    patch_opacity,
    write_overlay,
)


@pytest.fixture(scope="module")
def cmu(cmu_small):
    return cmu_overlay_inputs(cmu_small)


def _read(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(float)


def test_issue15_overlay_opacity_follows_top_probability_and_hatches_uncertain(cmu, tmp_path):
    grid, thumb, ds, mpp = cmu
    probs = generated_probs(len(grid["coords"]), seed=3)
    labels, top = probs.argmax(axis=1), probs.max(axis=1)
    size = grid["attrs"]["patch_size_level0"]
    path = write_overlay(tmp_path / "overlay.png", thumb, ds, grid["coords"], size, labels,
                         CLASSES, COLORS, top_probability=top, uncertain_below=0.5,
                         min_side=0)
    out = _read(path)
    h, w = thumb.shape[:2]
    index = patch_index_image((h, w), ds, grid["coords"], size)
    stripes = hatch(slice(0, h), w)
    alpha = patch_opacity(top, len(CLASSES))
    assert alpha.min() >= 0.15 - 1e-9 and alpha.max() <= 0.75 + 1e-9
    assert np.corrcoef(top, alpha)[0, 1] > 0.99  # more opaque where the model is surer
    checked = {"sure": 0, "stripe": 0, "gap": 0}
    for k, ((x, y), lab) in enumerate(zip(grid["coords"], labels, strict=True)):
        cx, cy = int((x + size / 2) / ds), int((y + size / 2) / ds)
        for px, py in ((cx, cy), (cx + 1, cy), (cx + 2, cy)):
            if index[py, px] != k:
                continue
            uncertain = top[k] < 0.5
            a = HATCH_ALPHA if uncertain and stripes[py, px] else alpha[k]
            want = (1 - a) * thumb[py, px] + a * np.asarray(COLORS[lab])
            np.testing.assert_allclose(out[py, px], want, atol=1)
            checked["sure" if not uncertain else "stripe" if stripes[py, px] else "gap"] += 1
    assert min(checked.values()) > 0, checked  # all three looks were seen and checked
    outside = index < 0
    np.testing.assert_array_equal(out[:h, :w][outside], thumb[outside])  # coordinates kept


def test_issue15_overlay_panel_names_and_warns(cmu, tmp_path):
    grid, thumb, ds, mpp = cmu
    probs = generated_probs(len(grid["coords"]), seed=4)
    args = (thumb, ds, grid["coords"], grid["attrs"]["patch_size_level0"], probs.argmax(1),
            CLASSES, COLORS)
    kw = {"top_probability": probs.max(1), "title": "CMU-1-Small-Region.svs",
          "model": "model m 1.0", "min_side": 0}
    plain = _read(write_overlay(tmp_path / "a.png", *args, **kw))
    warned = _read(write_overlay(tmp_path / "b.png", *args, **kw, warning="out of domain"))
    h, w = thumb.shape[:2]
    def red(img):  # the warning's colour in the panel (a class swatch may be close to it)
        return int((np.abs(img[:, w:] - WARN_RED).sum(axis=2) < 30).sum())

    assert red(warned) > red(plain) + 20
    assert (plain[:40, w:] < 100).all(axis=2).sum() > 50  # the title is drawn in the panel


def test_nice_scale_bar_lengths():
    assert nice_length(730) == (500, "500 µm")
    assert nice_length(2400) == (2000, "2 mm")
    assert nice_length(1.3) == (1, "1 µm")
    with pytest.raises(ValueError):
        nice_length(0)


def test_issue15_overlay_draws_a_scale_bar_of_the_right_length(cmu, tmp_path):
    grid, thumb, ds, mpp = cmu
    probs = generated_probs(len(grid["coords"]), seed=5)
    out = _read(write_overlay(tmp_path / "o.png", thumb, ds, grid["coords"],
                              grid["attrs"]["patch_size_level0"], probs.argmax(1), CLASSES,
                              COLORS, slide_mpp=mpp, min_side=0))
    h, w = thumb.shape[:2]
    um_per_px = ds * mpp
    value, _ = nice_length(0.2 * w * um_per_px)
    corner = (out[h - 60:h, :w // 2] == 0).all(axis=2)  # black pixels, bottom left
    runs = [np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))).max(initial=0)
            for row in corner]
    assert max(runs) == pytest.approx(value / um_per_px, abs=1.5)
    assert sum(r == max(runs) for r in runs) >= 5  # a bar, several rows thick


def test_issue15_tissue_png_shows_mask_grid_and_scale(cmu_small, tmp_path):
    from histotile.export.tissue_picture import GRID_BLUE, write_tissue_png
    from histotile.grid import make_grid
    from histotile.slide import open_slide
    from histotile.tissue import detect_tissue

    with open_slide(cmu_small) as s:
        t = detect_tissue(s)
        grid = make_grid(s, 28, target_mpp=4.0, tissue=t, min_tissue=0.5)
        mpp = s.require_mpp()
    out = _read(write_tissue_png(tmp_path / "tissue.png", t, grid, slide_mpp=mpp,
                                 title="CMU-1-Small-Region.svs", notes=["42 patches"]))
    assert max(out.shape[:2]) >= 1024 and out.shape[1] > out.shape[0] * 0.5
    blue = (out == GRID_BLUE).all(axis=2).sum()
    side = 28 * 4.0 / mpp / t.downsample * np.ceil(1024 / max(t.thumbnail.shape[:2]))
    assert blue > len(grid) * side  # every kept patch's box is drawn


def test_blend_equals_per_pixel_reference() -> None:
    """overlay._blend (only covered pixels, stripes only for uncertain patches) gives exactly
    the per-pixel rule: covered pixels move toward the class colour by the patch's opacity,
    HATCH_ALPHA on the stripes of uncertain patches, uncovered pixels unchanged."""
    import numpy as np

    from histotile.export import overlay

    rng = np.random.default_rng(7)
    h, w, n = 37, 53, 12
    thumb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    coords = np.stack([rng.integers(0, w * 4, n), rng.integers(0, h * 4, n)], 1)
    index = overlay.patch_index_image((h, w), 4.0, coords, 40)
    labels = rng.integers(0, 3, n)
    palette = np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
    opacity = rng.uniform(0.2, 0.7, n)
    for uncertain in (rng.uniform(size=n) < 0.5, np.zeros(n, bool)):
        got = overlay._blend(thumb, index, labels, palette, opacity, uncertain)  # noqa: SLF001
        want = thumb.copy()
        for y in range(h):
            for x in range(w):
                k = index[y, x]
                if k < 0:
                    continue
                stripe = (y + x) % overlay.HATCH_PERIOD < overlay.HATCH_STROKE
                a = np.float32(overlay.HATCH_ALPHA if uncertain[k] and stripe else opacity[k])
                px = thumb[y, x].astype(np.float32)
                want[y, x] = np.rint((1 - a) * px + a * palette[labels[k]])
        assert (index >= 0).any() and (index < 0).any()
        np.testing.assert_array_equal(got, want)
