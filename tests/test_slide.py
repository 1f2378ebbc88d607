"""histotile.slide on the real slides in ../shared/data/slides (generated files only for edges)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
from helpers import HE_REFERENCE, real_data
from PIL import Image

from histotile.errors import (
    CorruptSlideError,
    InputNotFoundError,
    InvalidArgumentError,
    MissingMppError,
    UnsupportedFormatError,
)
from histotile.slide import level0_to_level, level_to_level0, open_slide


@pytest.fixture(scope="module")
def ndpi():
    return real_data("slides/fluorescence-DAPI.ndpi")


@pytest.fixture(scope="module")
def boxes():
    return real_data("slides/boxes-synthetic.tiff")


@pytest.fixture(scope="module")
def dicom_dir():
    return real_data("slides/CMU-1-Small-Region-dicom")


def test_auto_backend_and_metadata(cmu_small, ndpi, boxes, dicom_dir):
    with open_slide(cmu_small) as s:
        assert s.backend == "openslide" and s.vendor == "aperio"
        assert s.mpp_source == "openslide"
        assert s.mpp == (float(s.properties["openslide.mpp-x"]),
                         float(s.properties["openslide.mpp-y"]))
        assert s.objective_power == float(s.properties["openslide.objective-power"])
        assert {"label", "macro", "thumbnail"} <= set(s.associated_images)
        info = s.info()
        assert info["width"], info["height"] == s.dimensions
        assert len(info["levels"]) == s.level_count
    with open_slide(boxes) as s:  # generic TIFF whose tags hold 72 dpi: no pixel size (item 3)
        assert s.mpp is None and s.mpp_source is None
        unit_um = {"centimeter": 1e4, "inch": 25400.0}[s.properties["tiff.ResolutionUnit"]]
        assert s.mpp_rejected["value_um_per_px"] == pytest.approx(
            unit_um / float(s.properties["tiff.XResolution"]))
    with open_slide(ndpi) as s:
        assert s.backend == "openslide" and s.vendor == "hamamatsu"
    with open_slide(dicom_dir) as s:  # a DICOM folder opens through any one of its files
        assert s.backend == "openslide" and s.vendor == "dicom"


def test_mpp_override_and_missing(cmu_small, tmp_path):
    with open_slide(cmu_small, slide_mpp=0.25) as s:
        assert s.mpp == (0.25, 0.25) and s.mpp_source == "override"
        assert s.level_mpp(0) == 0.25
    plain = tmp_path / "generated-no-resolution.tif"  # generated: a TIFF without pixel size
    tifffile.imwrite(plain, np.full((64, 80, 3), 200, np.uint8))
    with open_slide(plain) as s:
        assert s.backend == "tiffslide" and s.mpp is None and s.mpp_source is None
        with pytest.raises(MissingMppError) as err:
            s.require_mpp()
    line = err.value.one_line()
    assert str(plain) in line and "--slide-mpp" in line


def test_tiffslide_only_formats_are_routed_to_tiffslide(tmp_path):
    rgb = np.asarray(Image.open(real_data(HE_REFERENCE)).convert("RGB"))
    ome = tmp_path / "generated-pyramid.ome.tif"  # generated OME-TIFF with a SubIFD pyramid
    with tifffile.TiffWriter(ome) as tw:
        opts = {"tile": (256, 256), "photometric": "rgb", "resolution": (1e4 / 0.5, 1e4 / 0.5),
                "resolutionunit": "CENTIMETER"}
        tw.write(rgb, subifds=1, metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, **opts)
        tw.write(rgb[::2, ::2], subfiletype=1, **opts)
    with open_slide(ome) as s:
        assert s.backend == "tiffslide"
        assert s.level_count == 2
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (300, 200)), rgb[:200, :300])


def _shared_levels(a, b):
    return [(i, b.level_downsamples.index(d)) for i, d in enumerate(a.level_downsamples)
            if d in b.level_downsamples]


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "fluorescence-DAPI.ndpi",
                                  "boxes-synthetic.tiff"])
def test_backends_give_identical_pixels(name):
    path = real_data(f"slides/{name}")
    with open_slide(path, backend="openslide") as o, open_slide(path, backend="tiffslide") as t:
        assert o.dimensions == t.dimensions
        pairs = _shared_levels(o, t)
        assert pairs
        for lo, lt in pairs:
            ds = o.level_downsamples[lo]
            if ds != int(ds):  # OpenSlide interpolates fractional level positions: skip
                continue
            w, h = o.level_dimensions[lo]
            # the whole level, an inner block, and a block hanging over the bottom-right edge
            boxes = [((w // 3, h // 4), (min(w // 3, 1024), min(h // 3, 1024))),
                     ((w - w // 5, h - h // 6), (w // 3, h // 3))]
            if w * h <= 7_000_000:
                boxes.append(((0, 0), (w, h)))
            for (lx, ly), size in boxes:
                loc = (level_to_level0(lx, ds), level_to_level0(ly, ds))
                a, b = o.read_region(loc, lo, size), t.read_region(loc, lt, size)
                assert a.shape == (size[1], size[0], 3) and a.dtype == np.uint8
                np.testing.assert_array_equal(a, b, err_msg=f"{name} level {lo} at {loc}")


def _generated_pyramid(path, source, compression="jpeg", tile=(256, 256), photometric="rgb"):
    """Generated edge case: a 3-level tiled generic TIFF (levels by 2) of real CMU pixels."""
    with open_slide(source, backend="openslide") as s:
        base = s.read_region((0, 0), 0, (1536, 1280))
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            img = base[:: 2**k, :: 2**k]
            tw.write(img, tile=tile, compression=compression, photometric=photometric,
                     resolution=(1e4 / 0.5 / 2**k,) * 2, resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0)
    return path


@pytest.mark.parametrize("kind", ["svs", "boxes", "jpeg-rgb", "jpeg-ycbcr", "deflate", "lzw"])
def test_auto_reads_pixels_fast_and_identical(kind, cmu_small, boxes, tmp_path):
    """The direct tile reader (auto on SVS / generic tiled TIFF) gives OpenSlide's pixels."""
    if kind in ("svs", "boxes"):
        path = cmu_small if kind == "svs" else boxes
    else:
        comp, _, photo = kind.partition("-")
        path = _generated_pyramid(tmp_path / "p.tif", cmu_small, compression=comp,
                                  tile=(128, 128) if comp == "lzw" else (256, 256),
                                  photometric=photo or "rgb")
    with (open_slide(path) as auto, open_slide(path, backend="openslide") as ref,
          open_slide(path, backend="tiffslide") as exact):
        assert auto.backend == "openslide" and auto.pixel_reader == "tifffile-tiles"
        assert ref.pixel_reader == "openslide"
        assert auto.info()["pixel_reader"] == "tifffile-tiles" and auto.mpp == ref.mpp
        assert auto.spec["backend"] == "auto"
        for level in range(ref.level_count):
            ds = ref.level_downsamples[level]
            # OpenSlide blends neighbouring pixels at fractional level positions (non-integer
            # downsamples); there the reader must give the level's own pixels, as tiffslide
            other = ref if ds == int(ds) else exact
            w, h = ref.level_dimensions[level]
            for lx, ly, size in [(w // 3, h // 4, (301, 257)), (w - 100, h - 50, (256, 256)),
                                 (-17, -9, (64, 80)), (0, 0, (w, h))]:
                loc = (level_to_level0(lx, ds), level_to_level0(ly, ds))
                np.testing.assert_array_equal(auto.read_region(loc, level, size),
                                              other.read_region(loc, level, size),
                                              err_msg=f"{kind} level {level} at {loc}")
    with open_slide(path, backend="openslide") as forced:
        assert forced.pixel_reader == "openslide" and forced.spec["backend"] == "openslide"


def test_layouts_the_tile_reader_does_not_know_keep_their_library(cmu_small, ndpi, tmp_path):
    with open_slide(ndpi) as auto, open_slide(ndpi, backend="openslide") as ref:
        assert auto.pixel_reader == "openslide"
        np.testing.assert_array_equal(auto.read_region((5, 7), 0, (300, 200)),
                                      ref.read_region((5, 7), 0, (300, 200)))
    striped = tmp_path / "striped.tif"  # generated edge case: one untiled page
    with open_slide(cmu_small, backend="openslide") as s:
        pixels = s.read_region((0, 0), 0, (640, 480))
    tifffile.imwrite(striped, pixels, photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(striped) as auto:
        assert auto.pixel_reader == auto.backend == "tiffslide"
        np.testing.assert_array_equal(auto.read_region((0, 0), 0, (640, 480)), pixels)


def test_dicom_matches_svs_geometry_and_pixels(cmu_small, dicom_dir):
    """DICOM is OpenSlide-only. This wsi2dcm file labels YCbCr JPEG frames (JFIF, 4:2:0) as
    RGB and OpenSlide 4.0 honours the label; the JPEG header gives it away and the slide
    converts, so the pixels match the SVS up to JPEG re-encoding error."""
    from histotile.tissue import detect_tissue

    with open_slide(cmu_small) as svs, open_slide(dicom_dir) as dcm:
        assert dcm.dimensions == svs.dimensions and dcm.mpp == svs.mpp
        assert dcm.ycbcr_fix and not svs.ycbcr_fix
        a = svs.read_region((0, 0), 0, svs.dimensions).astype(np.int16)
        b = dcm.read_region((0, 0), 0, svs.dimensions).astype(np.int16)
        assert (dcm.read_region((-64, -64), 0, (32, 32)) == 255).all()  # outside stays white
        t_svs, t_dcm = detect_tissue(svs), detect_tissue(dcm)
    diff = np.abs(a - b)
    assert diff.mean() < 6 and np.percentile(diff, 99) < 40
    assert abs(t_svs.fraction - t_dcm.fraction) < 0.03


def test_jpeg_colour_space_rule():
    import io

    from histotile.vendor import jpeg_header_is_ycbcr

    rgb = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)  # generated
    def encoded(**kw):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", **kw)
        return buf.getvalue()
    assert jpeg_header_is_ycbcr(encoded()) is True  # JFIF, YCbCr
    assert jpeg_header_is_ycbcr(encoded(keep_rgb=True)) is False  # Adobe marker, no transform
    assert jpeg_header_is_ycbcr(b"not a jpeg") is None


def test_level_coordinates_round_trip(boxes):
    with open_slide(boxes) as s:
        for ds in s.level_downsamples:
            for v in range(0, 200, 7):
                assert level0_to_level(level_to_level0(v, ds), ds) == v


def test_best_level_for_mpp(ndpi):
    with open_slide(ndpi) as s:
        mpps = [s.level_mpp(i) for i in range(s.level_count)]
        for target in (0.1, mpps[0], 0.972, mpps[2] * 1.5, 100.0):
            level = s.best_level_for_mpp(target)
            finer_or_equal = [i for i, m in enumerate(mpps) if m <= target * (1 + 1e-3)]
            assert level == (max(finer_or_equal, key=lambda i: mpps[i]) if finer_or_equal else 0)
            assert mpps[level] <= target * (1 + 1e-3) or level == 0


def test_spec_reopens_the_same_slide(ndpi):
    with open_slide(ndpi, backend="tiffslide", slide_mpp=0.3) as s:
        spec = pickle.loads(pickle.dumps(s.spec))
        with open_slide(**spec) as again:
            assert again.backend == "tiffslide" and again.mpp == (0.3, 0.3)
            np.testing.assert_array_equal(again.read_region((512, 512), 1, (100, 80)),
                                          s.read_region((512, 512), 1, (100, 80)))


def test_read_downsampled_is_an_area_average(cmu_small):
    with open_slide(cmu_small) as s:
        img, ds = s.read_downsampled(16)
        assert ds == 16.0
        w, h = s.dimensions
        assert img.shape == (-(-h // 16), -(-w // 16), 3)
        block = s.read_region((160, 320), 0, (16, 16)).astype(np.float64).mean(axis=(0, 1))
        np.testing.assert_array_equal(img[20, 10], np.rint(block).astype(np.uint8))
        thumb = s.thumbnail(256)
        assert max(thumb.shape[:2]) <= 256


def test_outside_the_slide_is_white(cmu_small):
    with open_slide(cmu_small) as s:
        w, h = s.dimensions
        region = s.read_region((w - 10, h - 10), 0, (30, 30))
        assert (region[10:, 10:] == 255).all() or (region[20:, 20:] == 255).all()


def test_bad_inputs(tmp_path, cmu_small):
    with pytest.raises(InputNotFoundError):
        open_slide(tmp_path / "nope.svs")
    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide\n")
    with pytest.raises(UnsupportedFormatError):
        open_slide(txt)
    with pytest.raises(UnsupportedFormatError):
        open_slide(tmp_path)  # a folder without DICOM files
    truncated = tmp_path / "generated-truncated.svs"  # generated: first 30% of the real SVS
    data = cmu_small.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 10])
    with pytest.raises(CorruptSlideError):
        with open_slide(truncated) as s:
            s.read_region((0, 0), 0, s.dimensions)
    with pytest.raises(InvalidArgumentError):
        open_slide(cmu_small, backend="bioformats")
    with open_slide(cmu_small) as s, pytest.raises(InvalidArgumentError):
        s.read_region((0, 0), 5, (10, 10))


@pytest.mark.parametrize("args", [["info"], ["info", "--json"]])
def test_info_on_truncated_svs_prints_one_error_line(tmp_path, cmu_small, args):
    import subprocess
    import sys

    half = tmp_path / "generated-half.svs"  # generated: the real SVS cut to half its bytes
    data = cmu_small.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    run = subprocess.run([sys.executable, "-m", "histotile", *args, str(half)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"error: {half}") and "corrupt" in lines[0]
