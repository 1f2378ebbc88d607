"""``histotile tile`` on a slide with a tile that cannot be decoded (issue 17, item 4): the tile
costs only the patches it covers.

GENERATED pyramids (tests/damaged_tiff.py: real H&E pixels, tifffile's tiled JPEG, 256 px tiles)
with the level-0 tile at (512, 512) broken three ways, tiled through each pixel path: the direct
tifffile tile reader (``auto``), OpenSlide and tiffslide. A 64 px grid at level 0 without a
tissue filter has 15 x 15 = 225 patches; the broken tile [512, 768)^2 covers 16 of them (7.1 %).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import real_data
from damaged_tiff import MODES, damaged_pyramid, write_pyramid
from helpers import HE_REFERENCE, run_cli
from PIL import Image

from histotile.errors import InvalidArgumentError
from histotile.options import PredictOptions, TileOptions
from histotile.tiling import tile_fingerprint

BACKENDS = ("auto", "openslide", "tiffslide")
BAD = (512, 512)  # level-0 pixel inside the damaged level-0 tile
GRID = ["--patch-size", "64", "--level", "0", "--min-tissue", "0", "--slide-mpp", "0.5"]
N_GRID, N_BAD = 225, 16


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """1000 x 1000 px of real, dense H&E (TIAToolbox's target crop, tiled 3 x 3)."""
    rgb = np.asarray(Image.open(real_data(HE_REFERENCE)).convert("RGB"))
    return np.ascontiguousarray(np.tile(rgb, (3, 3, 1))[:1000, :1000])


def clean_slide(folder: Path, he: np.ndarray) -> Path:
    return write_pyramid(folder / "generated-clean.tif", he)




def read_archive(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return h5["x"][:], h5["coords"][:], dict(h5.attrs)


def covered(coords: np.ndarray) -> np.ndarray:
    """Patches (64 px) that overlap the damaged tile [512, 768)^2."""
    x, y = coords[:, 0], coords[:, 1]
    return (x < 768) & (x + 64 > 512) & (y < 768) & (y + 64 > 512)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_issue17_4_tile_damaged_tile_costs_only_its_patches(tmp_path, he, mode, backend,
                                                            capsys):
    clean, bad = clean_slide(tmp_path, he), damaged_pyramid(tmp_path, he, mode, *BAD)
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "tile", str(clean), str(bad), "-o", str(out), "--backend",
                            backend, "--max-unreadable", "0.1", *GRID], capsys)
    assert code == 0, err
    ref_x, ref_coords, ref_attrs = read_archive(out / f"{clean.stem}.h5")
    x, coords, attrs = read_archive(out / f"{bad.stem}.h5")
    assert len(ref_x) == len(ref_coords) == N_GRID and ref_attrs["unreadable_patches"] == 0
    # exactly the readable patches, each with the pixels of the undamaged copy
    lost = covered(ref_coords)
    assert lost.sum() == N_BAD
    assert len(x) == len(coords) == N_GRID - N_BAD
    assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, ref_coords[~lost].tolist()))
    where = {tuple(c): i for i, c in enumerate(ref_coords.tolist())}
    np.testing.assert_array_equal(x, ref_x[[where[tuple(c)] for c in coords.tolist()]])
    # recorded in the archive and in run.json
    assert attrs["unreadable_patches"] == N_BAD
    assert attrs["unreadable_fraction"] == pytest.approx(N_BAD / N_GRID)
    boxes = sorted(map(tuple, attrs["unreadable_boxes_level0"].tolist()))
    assert boxes == sorted((int(a), int(b), 64, 64) for a, b in ref_coords[lost])
    run_json = json.loads((out / f"{bad.stem}.run.json").read_text())
    assert run_json["patches"] == N_GRID - N_BAD
    assert run_json["unreadable"]["patches"] == N_BAD
    assert run_json["unreadable"]["fraction"] == pytest.approx(N_BAD / N_GRID)
    assert run_json["unreadable"]["max_fraction"] == 0.1
    assert sorted(map(tuple, run_json["unreadable"]["boxes_level0"])) == boxes
    clean_json = json.loads((out / f"{clean.stem}.run.json").read_text())
    assert clean_json["unreadable"]["patches"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue17_4_tile_over_max_unreadable_fails_in_one_line_others_finish(tmp_path, he,
                                                                          backend, capsys):
    """Default --max-unreadable 0.05 < 16/225: the damaged slide fails, the clean one is done."""
    clean, bad = clean_slide(tmp_path, he), damaged_pyramid(tmp_path, he, "garbage", *BAD)
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "tile", str(bad), str(clean), "-o", str(out), "--backend",
                            backend, *GRID], capsys)
    assert code != 0
    lines = [ln for ln in err.splitlines() if "--max-unreadable" in ln]
    assert len(lines) == 1, err
    assert "16 of 225" in lines[0] and "cannot be decoded" in lines[0]
    assert "Traceback" not in err
    assert not (out / f"{bad.stem}.h5").exists() and not (out / f"{bad.stem}.run.json").exists()
    assert json.loads((out / f"{clean.stem}.run.json").read_text())["patches"] == N_GRID


def test_issue17_4_tile_warns_once_and_stain_sample_skips_unreadable(tmp_path, he, capsys,
                                                                     caplog):
    """Macenko: the stain fit is made (on the readable sample) and the slide is warned about
    once, through logging."""
    bad = damaged_pyramid(tmp_path, he, "header", *BAD)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["tile", str(bad), "-o", str(out), "--stain-norm", "macenko",
                            "--max-unreadable", "0.1", *GRID], capsys)
    assert code == 0, err
    _, coords, attrs = read_archive(out / f"{bad.stem}.h5")
    assert attrs["stain_method"] == "macenko" and "stain_fit" in attrs
    assert len(coords) == N_GRID - N_BAD and not covered(coords).any()
    warned = [r for r in caplog.records if r.levelname == "WARNING"
              and "could not be decoded" in r.getMessage()]
    assert len(warned) == 1 and "16 of 225" in warned[0].getMessage()


def test_issue17_4_tile_max_unreadable_option_shared_with_predict():
    assert TileOptions().max_unreadable == PredictOptions().max_unreadable == 0.05
    with pytest.raises(InvalidArgumentError):
        TileOptions(max_unreadable=1.5)
    assert tile_fingerprint(TileOptions(max_unreadable=0.2))["max_unreadable"] == 0.2
