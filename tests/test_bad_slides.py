"""Slides that must be refused, or whose metadata must not be trusted (issue 17, items 1, 3, 13).

Every file here is generated (tifffile writes the TIFFs and their resolution tags; the DICOM
case is the real CMU DICOM series with one attribute blanked).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import real_data
from helpers import without_slideio

from histotile.errors import CorruptSlideError, MissingMppError, UnsupportedFormatError
from histotile.mpp import MPP_PLAUSIBLE
from histotile.slide import open_slide


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "histotile", *args], capture_output=True,
                          text=True, timeout=300)


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0, run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def make_vsi(folder: Path, stem: str = "generated-slide", frames: int = 1) -> Path:
    """Generated Olympus VSI layout: a small TIFF overview at 96 dpi (what the format stores
    there) beside ``_<stem>_/stack1/frame_t.ets`` (frames=0: the folder is missing)."""
    vsi = folder / f"{stem}.vsi"
    overview = np.full((240, 320, 3), 210, np.uint8)
    overview[60:180, 80:240] = (170, 90, 150)  # something pink and tissue-like
    tifffile.imwrite(vsi, overview, photometric="rgb", resolution=(96, 96),
                     resolutionunit="INCH")
    for k in range(frames):
        stack = folder / f"_{stem}_" / f"stack{k + 1}"
        stack.mkdir(parents=True)
        (stack / "frame_t.ets").write_bytes(b"SIS\0" + bytes(60))
    return vsi


# --------------------------------------------------------------------------- item 1: VSI
def test_issue17_vsi_overview_is_refused_with_where_the_pixels_are(tmp_path, monkeypatch):
    without_slideio(monkeypatch)  # with the [formats] extra: tests/test_formats.py
    vsi = make_vsi(tmp_path)
    with pytest.raises(UnsupportedFormatError) as err:
        open_slide(vsi)
    line = err.value.one_line()
    assert "Olympus VSI" in line and "overview" in line
    assert str(tmp_path / "_generated-slide_" / "stack*" / "frame*.ets") in line
    assert "histotile[formats]" in line


def test_issue17_vsi_without_its_pixel_folder_says_it_is_missing(tmp_path):
    vsi = make_vsi(tmp_path, frames=0)
    with pytest.raises(UnsupportedFormatError, match="which is missing"):
        open_slide(vsi, slide_mpp=0.5)


def test_issue17_renamed_vsi_and_ets_files_are_refused(tmp_path):
    vsi = make_vsi(tmp_path)
    renamed = vsi.with_suffix(".tif")
    vsi.rename(renamed)
    with pytest.raises(UnsupportedFormatError, match="Olympus VSI"):
        open_slide(renamed)
    ets = next((tmp_path / "_generated-slide_").glob("stack*/frame*.ets"))
    with pytest.raises(UnsupportedFormatError, match="Olympus .ets"):
        open_slide(ets)


@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["tile", "-o", "OUT"],
                                     ["predict", "-o", "OUT", "--slide-mpp", "0.5"]])
def test_issue17_vsi_gives_one_line_for_every_command(tmp_path, command):
    vsi = make_vsi(tmp_path)
    out = str(tmp_path / "out")
    run = _cli("-q", *[out if a == "OUT" else a for a in command], str(vsi))
    line = _one_error_line(run)
    assert "Olympus VSI" in line and "frame*.ets" in line
    assert not (tmp_path / "out" / vsi.stem / "predictions.csv").exists()


# --------------------------------------------------------------------------- embedded pictures
@pytest.mark.parametrize("kind", ["label", "macro", "overview"])
def test_issue17_tiff_whose_first_image_is_a_label_or_macro_is_refused(tmp_path, kind):
    path = tmp_path / f"generated-{kind}-first.tif"
    with tifffile.TiffWriter(path) as tw:  # the embedded picture first, then the slide
        tw.write(np.full((100, 300, 3), 120, np.uint8), photometric="rgb",
                 description=f"{kind.capitalize()} 300x100")
        tw.write(np.full((1024, 1024, 3), 200, np.uint8), photometric="rgb", tile=(256, 256),
                 resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER")
    with pytest.raises(UnsupportedFormatError, match=f"{kind} picture"):
        open_slide(path)


def test_issue17_ome_tiff_whose_first_series_is_a_macro_is_refused(tmp_path):
    path = tmp_path / "generated-macro-first.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:  # as converters write vendor slides
        tw.write(np.full((100, 300, 3), 120, np.uint8), photometric="rgb",
                 metadata={"Name": "macro image"})
        tw.write(np.full((1024, 1024, 3), 200, np.uint8), photometric="rgb", tile=(256, 256),
                 metadata={"Name": "slide"})
    with pytest.raises(UnsupportedFormatError, match="macro picture"):
        open_slide(path)


def test_vendor_slides_keep_their_associated_images_apart(cmu_small):
    with open_slide(cmu_small) as s:  # SVS: label/macro/thumbnail are associated, not level 0
        assert {"label", "macro"} <= set(s.associated_images)
        assert s.dimensions == (2220, 2967) and s.mpp_source == "openslide"


# --------------------------------------------------------------------------- item 3: mpp tags
def _tiff(path: Path, **resolution) -> Path:
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), photometric="rgb",
                     tile=(256, 256), **resolution)
    return path


@pytest.mark.parametrize("dpi", [72, 96, 300])
@pytest.mark.parametrize("unit", ["INCH", "CENTIMETER"])
def test_issue17_screen_default_resolution_is_not_a_pixel_size(tmp_path, dpi, unit):
    per_unit = dpi if unit == "INCH" else dpi / 2.54
    path = _tiff(tmp_path / f"generated-{dpi}dpi.tif", resolution=(per_unit, per_unit),
                 resolutionunit=unit)
    for backend in ("auto", "openslide", "tiffslide"):
        with open_slide(path, backend=backend) as s:
            assert s.mpp is None and s.mpp_source is None, backend
            assert s.mpp_rejected["value_um_per_px"] == pytest.approx(25400 / dpi, rel=1e-4)
            assert "screen or print default" in s.mpp_rejected["rule"]
            assert s.info()["mpp_rejected"] == s.mpp_rejected
            with pytest.raises(MissingMppError) as err:
                s.require_mpp()
            line = err.value.one_line()
            assert "--slide-mpp" in line and "set aside" in line and "dpi" in line
        with open_slide(path, backend=backend, slide_mpp=0.5) as s:
            assert s.mpp == (0.5, 0.5) and s.mpp_source == "override"


def test_issue17_resolution_tags_without_a_unit_are_not_a_pixel_size(tmp_path):
    path = _tiff(tmp_path / "generated-unitless.tif", resolution=(20000, 20000),
                 resolutionunit="NONE")
    with open_slide(path) as s:
        assert s.mpp is None
        assert "no physical unit" in s.mpp_rejected["rule"]
        assert s.mpp_rejected["source"] == "tiff-tags"


@pytest.mark.parametrize("unit,per_unit", [("CENTIMETER", 1e4 / 0.25), ("INCH", 25400 / 0.5)])
def test_real_microscope_resolution_tags_are_kept(tmp_path, unit, per_unit):
    path = _tiff(tmp_path / "generated-microscope.tif", resolution=(per_unit, per_unit),
                 resolutionunit=unit)
    with open_slide(path) as s:
        assert s.mpp_source == "tiff-tags" and s.mpp_rejected is None
        assert MPP_PLAUSIBLE[0] < s.mpp[0] < MPP_PLAUSIBLE[1]


def test_issue17_info_of_a_72dpi_tiff_says_unknown_mpp(tmp_path):
    path = _tiff(tmp_path / "generated-72dpi.tif", resolution=(72, 72), resolutionunit="INCH")
    run = _cli("info", str(path))
    assert run.returncode == 0, run.stderr
    mpp_line = next(ln for ln in run.stdout.splitlines() if ln.startswith("mpp:"))
    assert mpp_line.split()[1] == "unknown" and "352.8" in mpp_line and "set aside" in mpp_line
    assert "(source: tiff-tags)" not in mpp_line


# --------------------------------------------------------------------------- item 13: DICOM
def test_issue17_dicom_with_empty_image_type_says_what_is_wrong(tmp_path):
    src = real_data("slides/CMU-1-Small-Region-dicom")
    folder = tmp_path / "generated-dicom-empty-imagetype"
    shutil.copytree(src, folder)
    level0 = next(folder.glob("level-0-*.dcm"))
    data = bytearray(level0.read_bytes())
    at = data.find(b"\x08\x00\x08\x00CS")  # ImageType, explicit VR little endian
    length = int.from_bytes(data[at + 6:at + 8], "little")
    data[at + 8:at + 8 + length] = b" " * length  # blank, same length
    level0.write_bytes(bytes(data))
    other = next(folder.glob("level-3-*.dcm"))
    for path in (folder, level0, other):
        with pytest.raises(CorruptSlideError) as err:
            open_slide(path)
        line = err.value.one_line()
        assert "empty ImageType (0008,0008)" in line, line
        assert "truncated" not in line
    assert level0.name in str(err.value)  # opened from another file: names the culprit
