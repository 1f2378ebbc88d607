"""`histotile info` / `tile` through the console entry point: output, one-line errors, exits."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
from helpers import real_data

from histotile.cli import main

SLIDES = ["CMU-1-Small-Region.svs", "fluorescence-DAPI.ndpi", "boxes-synthetic.tiff",
          "CMU-1-Small-Region-dicom"]


def run(args, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) >= 1 and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("name", SLIDES)
def test_info_json_on_every_slide(name, capsys):
    path = real_data(f"slides/{name}")
    code, out, _ = run(["info", "--json", str(path)], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["level_count"] == len(info["levels"]) >= 1
    if name == "boxes-synthetic.tiff":  # its tags say 72 dpi: no pixel size (issue 17 item 3)
        assert info["mpp_x"] is None and "screen" in info["mpp_rejected"]["rule"]
    else:
        assert info["mpp_x"] > 0 and info["mpp_source"] in ("openslide", "tiff-tags")
    code, text, _ = run(["info", str(path)], capsys)
    assert code == 0 and "mpp:" in text and info["backend"] in text


def test_tile_every_slide(tmp_path, capsys):
    d = {n: str(real_data(f"slides/{n}")) for n in SLIDES}
    code, out, err = run(["-q", "tile", d["CMU-1-Small-Region.svs"], d["fluorescence-DAPI.ndpi"],
                          d["CMU-1-Small-Region-dicom"], "-o", str(tmp_path)], capsys)
    assert code == 0, err
    for stem in ("CMU-1-Small-Region", "fluorescence-DAPI", "CMU-1-Small-Region-dicom"):
        with h5py.File(tmp_path / f"{stem}.h5") as f:
            assert f["x"].shape[1:] == (96, 96, 3) and f["x"].shape[0] > 0
        assert (tmp_path / f"{stem}.tissue.png").exists()
    # boxes-synthetic: 352.8 um/px from its (synthetic) TIFF tags, so 0.972 um/px cannot work...
    code, _, err = run(["tile", d["boxes-synthetic.tiff"], "-o", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "boxes-synthetic.tiff", "--slide-mpp")
    # ...but a level, or a given slide mpp, does
    for extra in (["--level", "0", "--patch-size", "16"],
                  ["--slide-mpp", "0.25", "--mpp", "0.5", "--patch-size", "28"]):
        code, _, err = run(["-q", "tile", d["boxes-synthetic.tiff"], "-o", str(tmp_path / "b"),
                            *extra], capsys)
        assert code == 0, err
        with h5py.File(tmp_path / "b" / "boxes-synthetic.h5") as f:
            assert f["x"].shape[0] > 0


def test_bad_inputs_are_one_line_errors(tmp_path, cmu_small, capsys):
    out = str(tmp_path / "out")
    code, _, err = run(["tile", str(tmp_path / "missing.svs"), "-o", out], capsys)
    assert_one_line_error(code, err, "missing.svs", "no such file")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    code, _, err = run(["info", str(junk)], capsys)
    assert_one_line_error(code, err, "folder")
    notes = tmp_path / "notes.dat"  # (a .txt is a list of inputs for every multi-item command)
    notes.write_text("not a slide")
    code, _, err = run(["tile", str(notes), "-o", out], capsys)
    assert_one_line_error(code, err, "notes.dat", "not a slide format")
    truncated = tmp_path / "generated-truncated.svs"  # generated: a cut copy of the real SVS
    data = cmu_small.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    code, _, err = run(["tile", str(truncated), "-o", out], capsys)
    assert_one_line_error(code, err, "generated-truncated.svs")
    no_mpp = tmp_path / "generated-no-mpp.tif"  # generated: TIFF without resolution tags
    tifffile.imwrite(no_mpp, np.full((400, 400, 3), 120, np.uint8))
    code, _, err = run(["tile", str(no_mpp), "-o", out], capsys)
    assert_one_line_error(code, err, "generated-no-mpp.tif", "--slide-mpp")
    code, _, err = run(["tile", str(cmu_small), "-o", out, "--patch-size", "5000",
                        "--level", "0"], capsys)
    assert_one_line_error(code, err, "CMU-1-Small-Region.svs", "patch")


def test_multi_slide_with_a_corrupt_one(tmp_path, cmu_small, capsys):
    bad = tmp_path / "generated-corrupt.svs"
    bad.write_bytes(cmu_small.read_bytes()[:5000])
    code, _, err = run(["-q", "tile", str(bad), str(cmu_small), "-o", str(tmp_path / "o"),
                        "--limit", "5"], capsys)
    assert code == 1
    assert "generated-corrupt.svs" in err and "1 of 2 slides failed" in err
    with h5py.File(tmp_path / "o" / "CMU-1-Small-Region.h5") as f:
        assert f["x"].shape == (5, 96, 96, 3)
    assert not (tmp_path / "o" / "generated-corrupt.h5").exists()


def test_subprocess_error_has_no_traceback_and_debug_shows_it(tmp_path):
    args = [sys.executable, "-m", "histotile", "info", str(tmp_path / "none.svs")]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    p = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr
