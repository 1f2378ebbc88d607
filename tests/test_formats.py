"""VSI and CZI through slideio (the ``[formats]`` extra): levels, mpp and its source, pixels.

Files: a real Olympus VSI with its ``.ets`` (``tests/data/slides/vsi-ets-test-jpg2k.vsi``, a
2-channel 16-bit fluorescence z-stack; see tests/data/README.md) and a GENERATED CZI written
with Zeiss's pylibCZIrw from a crop of the real CMU slide (lossless, tiled, with its pixel size
in the scaling metadata), so the CZI's pixels can be compared exactly with OpenSlide's.
Not covered by a file: a brightfield (RGB) VSI, a multi-level CZI or VSI pyramid, a JPEG XR CZI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import make_untrained_model, read_csv, real_data, run_cli, without_slideio

from histotile.errors import UnsupportedFormatError
from histotile.items import item_kind
from histotile.slide import open_slide

VSI = real_data("slides/vsi-ets-test-jpg2k.vsi")  # its pixels: _vsi-ets-test-jpg2k_/stack1/
CROP = (600, 800, 1024, 1024)  # x, y, w, h of the CMU crop the CZI holds (level-0 pixels)
CZI_MPP = 0.499


def write_czi(path: Path, rgb: np.ndarray, mpp: float, compression: str = "uncompressed:",
              tile: int = 256) -> Path:
    """A GENERATED CZI (Bgr24 tiles, like a slide scanner's mosaic) holding ``rgb``."""
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True, compression_options=compression) as w:
        for y in range(0, rgb.shape[0], tile):
            for x in range(0, rgb.shape[1], tile):
                bgr = np.ascontiguousarray(rgb[y:y + tile, x:x + tile, ::-1])  # CZI is BGR
                w.write(data=bgr, plane={"C": 0, "T": 0, "Z": 0}, location=(x, y))
        w.write_metadata("generated from CMU-1-Small-Region", channel_names={0: "TL"},
                         scale_x=mpp * 1e-6, scale_y=mpp * 1e-6)
    return path


@pytest.fixture(scope="module")
def cmu_crop(cmu_small: Path) -> np.ndarray:
    with open_slide(cmu_small, backend="openslide") as s:
        return s.read_region(CROP[:2], 0, CROP[2:])


@pytest.fixture(scope="module")
def czi(tmp_path_factory: pytest.TempPathFactory, cmu_crop: np.ndarray) -> Path:
    return write_czi(tmp_path_factory.mktemp("czi") / "cmu-crop.czi", cmu_crop, CZI_MPP)


def test_formats_vsi_czi_are_slides_for_folder_discovery() -> None:
    assert item_kind("scan.vsi") == item_kind("scan.CZI") == "slide"


def test_formats_czi_levels_mpp_and_pixels_equal_openslide(czi: Path,
                                                          cmu_crop: np.ndarray) -> None:
    with open_slide(czi) as s:
        assert (s.backend, s.vendor, s.dimensions) == ("slideio", "zeiss", (1024, 1024))
        assert s.mpp == pytest.approx((CZI_MPP, CZI_MPP)) and s.mpp_source == "vendor-metadata"
        assert s.level_count == len(s.level_dimensions) == len(s.level_downsamples) >= 1
        # a region across tile borders, and one hanging over the edge (white beyond it)
        assert np.array_equal(s.read_region((200, 300), 0, (500, 400)),
                              cmu_crop[300:700, 200:700])
        edge = s.read_region((900, 1000), 0, (200, 100))
        assert np.array_equal(edge[:24, :124], cmu_crop[1000:, 900:])
        assert (edge[24:] == 255).all() and (edge[:, 124:] == 255).all()
        thumb = s.thumbnail(256)
        assert thumb.shape == (256, 256, 3) and thumb.dtype == np.uint8


def test_formats_czi_bgr24_comes_back_rgb_like_libczi(czi: Path) -> None:
    """Regression: slideio returns CZI colour as stored (BGR); histotile gives RGB. Parity with
    Zeiss's own reader (pylibCZIrw, which also returns BGR) on the same region."""
    from pylibCZIrw import czi as pyczi

    with pyczi.open_czi(str(czi)) as d:
        bgr = d.read(roi=(128, 64, 300, 200), plane={"C": 0})
    with open_slide(czi) as s:
        rgb = s.read_region((128, 64), 0, (300, 200))
    assert rgb.mean(axis=(0, 1))[0] > rgb.mean(axis=(0, 1))[2]  # H&E: more red than blue
    assert np.array_equal(rgb, bgr[..., ::-1])


def test_formats_slideio_and_openslide_same_pixels_on_svs(cmu_small: Path) -> None:
    """Pixel parity of the readers on one file both open (level 0, JPEG tiles)."""
    with open_slide(cmu_small, backend="slideio") as a, open_slide(cmu_small) as b:
        assert a.backend == "slideio" and a.dimensions == b.dimensions
        assert a.mpp == pytest.approx(b.mpp)
        assert np.array_equal(a.read_region((700, 900), 0, (512, 384)),
                              b.read_region((700, 900), 0, (512, 384)))


def test_formats_zstd_czi_is_refused_when_opened(tmp_path: Path, cmu_crop: np.ndarray) -> None:
    path = write_czi(tmp_path / "z.czi", cmu_crop[:256, :256], CZI_MPP,
                     compression="zstd1:ExplicitLevel=1")
    with pytest.raises(UnsupportedFormatError, match="codec slideio cannot decode"):
        open_slide(path)


def test_formats_real_vsi_with_ets() -> None:
    with open_slide(VSI) as s:
        assert (s.backend, s.vendor, s.dimensions) == ("slideio", "olympus", (1645, 1682))
        assert s.mpp == pytest.approx((0.10833, 0.10833), rel=1e-3)
        assert s.mpp_source == "vendor-metadata" and s.objective_power == 60
        assert s.properties["slideio.z-slices"] == 11 and s.properties["slideio.z-slice"] == 5
        assert s.fluorescence_channel == "C405, C488"  # from the channels, not the pixels
        region = s.read_region((600, 600), 0, (256, 256))
    import slideio

    scene = slideio.open_slide(str(VSI), "VSI").get_scene(0)
    raw = scene.read_block_from_level(0, (600, 600, 256, 256), slices=(5, 6))[..., 0]
    # 16 significant bits -> /257, first channel as grey, one scale for the whole slide
    expected = np.clip(np.rint(raw / 257.0), 0, 255).astype(np.uint8)
    assert region.dtype == np.uint8 and region.shape == (256, 256, 3)
    assert np.array_equal(region[..., 0], expected) and np.array_equal(region[..., 2], expected)
    assert expected.max() > 0  # the middle focal plane holds signal (the first is empty)


def test_formats_vsi_without_its_ets_folder_is_refused_with_where(tmp_path: Path) -> None:
    """Regression (issue: a .vsi's overview passed off as the slide): without the pixel files
    the VSI is refused in one line saying where they should be."""
    lone = tmp_path / VSI.name
    shutil.copy(VSI, lone)
    with pytest.raises(UnsupportedFormatError, match=r"_vsi-ets-test-jpg2k_.*frame\*\.ets"):
        open_slide(lone)


def test_formats_vsi_with_unreadable_ets_is_not_read_as_its_overview(tmp_path: Path) -> None:
    """Regression: with a damaged .ets, slideio offers the .vsi's own overview picture as the
    scene (it did here: 320 x 240, no mpp); histotile refuses the file instead."""
    import tifffile

    vsi = tmp_path / "damaged.vsi"
    tifffile.imwrite(vsi, np.full((240, 320, 3), 210, np.uint8), photometric="rgb")
    stack = tmp_path / "_damaged_" / "stack1"
    stack.mkdir(parents=True)
    (stack / "frame_t.ets").write_bytes(b"SIS\0" + bytes(60))
    with pytest.raises(UnsupportedFormatError, match=r"Olympus VSI.*frame\*\.ets.*1 found"):
        open_slide(vsi)


def test_formats_without_the_extra_the_refusal_names_it(monkeypatch: pytest.MonkeyPatch,
                                                         czi: Path) -> None:
    without_slideio(monkeypatch)
    for path, says in ((czi, "Zeiss CZI"), (VSI, "frame*.ets")):
        with pytest.raises(UnsupportedFormatError) as err:
            open_slide(path)
        assert says in err.value.message and "histotile[formats]" in err.value.hint


def test_formats_cli_info_tile_predict_on_czi_and_vsi(tmp_path: Path, czi: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for path, vendor in ((czi, "zeiss"), (VSI, "olympus")):
        code, out, err = run_cli(["info", "--json", str(path)], capsys)
        assert code == 0, err
        info = json.loads(out)
        assert info["backend"] == "slideio" and info["vendor"] == vendor
        assert info["mpp_source"] == "vendor-metadata"
    code, _, err = run_cli(["-q", "tile", str(czi), str(VSI), "-o", str(tmp_path / "t"),
                            "--mpp", "1.0", "--patch-size", "64"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "t" / "cmu-crop.h5") as f:
        assert f["x"].shape[1:] == (64, 64, 3) and f["x"].shape[0] > 0
    assert (tmp_path / "t" / "vsi-ets-test-jpg2k.h5").exists()
    model = make_untrained_model(tmp_path / "model", patch_size=28, mpp=4.0)
    code, _, err = run_cli(["-q", "predict", str(czi), "-o", str(tmp_path / "p"),
                            "--model", str(model)], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "p" / "cmu-crop" / "predictions.csv")
    assert rows and all(float(r["minx"]) + float(r["width"]) <= 1024 + 1 for r in rows)
    assert all(float(r["miny"]) + float(r["height"]) <= 1024 + 1 for r in rows)
    # the VSI is fluorescence: refused for a brightfield model, run when the user says so (the
    # whole 178 x 182 um scene: one 112 um patch at the model's 4 um/px)
    code, _, err = run_cli(["-q", "predict", str(VSI), "-o", str(tmp_path / "p"),
                            "--model", str(model)], capsys)
    assert code != 0 and "--allow-darkfield" in err
    code, _, err = run_cli(["-q", "predict", str(VSI), "-o", str(tmp_path / "p"),
                            "--model", str(model), "--allow-darkfield", "--min-tissue", "0"],
                           capsys)
    assert code == 0, err
    assert len(read_csv(tmp_path / "p" / "vsi-ets-test-jpg2k" / "predictions.csv")) == 1
