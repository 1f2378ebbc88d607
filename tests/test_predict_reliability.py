"""``predict`` on bad inputs and faults (issue 17, items 2, 4, 9, 12): a clean result or one line.

Generated inputs: a damaged JPEG pyramid of real H&E pixels (tests/damaged_tiff.py), copies of
the real PCam tiles, a path under a regular file; real: the fluorescence NDPI, the CMU slide.
"""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data
from damaged_tiff import damaged_pyramid
from helpers import HE_REFERENCE, make_untrained_model, run_cli
from PIL import Image


@pytest.fixture(scope="module")
def model32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GENERATED untrained model: 32 px patches at 0.5 um/px (the pyramid's level 0)."""
    return make_untrained_model(tmp_path_factory.mktemp("m") / "generated-untrained-32",
                                patch_size=32, mpp=0.5)


@pytest.fixture(scope="module")
def model_cmu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GENERATED untrained model: 32 px patches at 2 um/px (a few hundred on the CMU slide)."""
    return make_untrained_model(tmp_path_factory.mktemp("m") / "generated-untrained-32-2um",
                                patch_size=32, mpp=2.0)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    he = np.asarray(Image.open(real_data(HE_REFERENCE)).convert("RGB"))
    return np.ascontiguousarray(np.tile(he, (6, 6, 1))[:2000, :2000])  # 2000 x 2000 px




def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- item 4
@pytest.mark.slow  # a 2000 x 2000 px mosaic through predict (~30-60 s on 2 cores)
@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_issue17_corrupt_tile_costs_only_its_patches_in_predict(tmp_path, mosaic, model32,
                                                                capsys, caplog, backend):
    slide = damaged_pyramid(tmp_path, mosaic, "header")
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(slide), "-o", str(out), "--model", str(model32),
                        "--backend", backend, "--stain-norm", "none"], capsys)
    assert code == 0, err
    assert not error_lines(err)  # a warning, not an error
    assert any("64 of" in r.getMessage() and "could not be decoded" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    folder = out / slide.stem
    run_json = json.loads((folder / "run.json").read_text())
    with open(folder / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    bad = [r for r in rows if r["status"] == "unreadable"]
    good = [r for r in rows if r["status"] == "ok"]
    # the broken tile covers level-0 [512, 768)^2: 8 x 8 patches of 32 px
    assert len(bad) == 64 and len(good) == run_json["patches"] - 64
    assert all(512 <= int(r["minx"]) < 768 and 512 <= int(r["miny"]) < 768 for r in bad)
    assert all(r["label"] == "" and r["prob_ADI"] == "" for r in bad)
    info = run_json["unreadable"]
    assert info["patches"] == 64 and info["fraction"] == pytest.approx(64 / run_json["patches"])
    assert info["max_fraction"] == 0.05
    assert [512, 512, 32, 32] in info["boxes_level0"] and len(info["boxes_level0"]) == 64
    from histotile.stitch import COVERAGE_UNREADABLE, open_heatmap

    cover = np.asarray(open_heatmap(folder / "heatmap.ome.zarr")["labels/coverage"]["0"][0])
    assert (cover == COVERAGE_UNREADABLE).sum() == 64 and (cover == 1).sum() == len(good)


@pytest.mark.slow  # a 2000 x 2000 px mosaic through predict (~30-60 s on 2 cores)
def test_issue17_too_much_unreadable_fails_the_slide(tmp_path, mosaic, model32, capsys):
    slide = damaged_pyramid(tmp_path, mosaic, "garbage")
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(slide), "-o", str(out), "--model", str(model32),
                        "--max-unreadable", "0.01"], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1
    assert "unreadable" in lines[0] and "--max-unreadable" in lines[0]
    assert not (out / slide.stem / "run.json").exists()


@pytest.mark.slow  # a 2000 x 2000 px mosaic through predict (~30-60 s on 2 cores)
def test_issue17_stain_sample_survives_a_bad_tile(tmp_path, mosaic, model32, capsys):
    """Macenko on (the card asks for it): the sample skips the unreadable patches."""
    slide = damaged_pyramid(tmp_path, mosaic, "truncated")
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(slide), "-o", str(out), "--model", str(model32)],
                       capsys)
    assert code == 0, err
    run_json = json.loads((out / slide.stem / "run.json").read_text())
    assert run_json["stain"]["method"] == "macenko" and run_json["unreadable"]["patches"] == 64


def test_issue17_stain_norm_none_reads_no_stain_sample(tmp_path, cmu_small, model_cmu,
                                                      monkeypatch, capsys):
    import histotile.inference.slides as slides

    calls = []
    monkeypatch.setattr(slides, "sample_patches", lambda *a, **k: calls.append(1))
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path / "o"),
                        "--model", str(model_cmu), "--stain-norm", "none"], capsys)
    assert code == 0, err
    assert calls == []


# --------------------------------------------------------------------------- item 2
def test_issue17_fluorescence_slide_is_refused_for_an_he_model(tmp_path, capsys):
    ndpi = real_data("slides/fluorescence-DAPI.ndpi")
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(ndpi), "-o", str(out)], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1
    assert "fluorescence" in lines[0] and "--allow-darkfield" in lines[0]
    assert not (out / ndpi.stem / "predictions.csv").exists()


def test_issue17_allow_darkfield_runs_and_is_recorded(tmp_path, capsys):
    ndpi = real_data("slides/fluorescence-DAPI.ndpi")
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(ndpi), "-o", str(out), "--allow-darkfield"],
                       capsys)
    assert code == 0, err
    run_json = json.loads((out / ndpi.stem / "run.json").read_text())
    assert run_json["tissue"]["illumination"]["kind"] == "darkfield"
    assert run_json["settings"]["allow_darkfield"] is True
    assert run_json["tissue"]["fraction"] < 0.6  # bright-on-dark mask, not "1.0"


def test_he_slide_is_not_refused(tmp_path, cmu_small, model_cmu, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(out), "--model",
                        str(model_cmu)], capsys)
    assert code == 0, err
    run_json = json.loads((out / cmu_small.stem / "run.json").read_text())
    assert run_json["tissue"]["illumination"]["kind"] == "brightfield"
    assert run_json["unreadable"]["patches"] == 0


# --------------------------------------------------------------------------- item 12
def test_issue17_pcam_tiles_passed_as_slides_get_one_line(tmp_path, capsys):
    src = real_data("patches/pcam-kaggle/train_labels.csv").parent / "train"
    tiles = sorted(src.glob("*.tif"))
    folder = tmp_path / "tiles"
    folder.mkdir()
    for t in tiles:
        shutil.copyfile(t, folder / t.name)
    code, _, err = run_cli(["-q", "predict", *map(str, sorted(folder.glob("*.tif"))), "-o",
                        str(tmp_path / "out")], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1, err
    assert f"{len(tiles)} of {len(tiles)} inputs" in lines[0] and "patches, not slides" in lines[0]
    assert "HDF5" in lines[0] and "--slide-mpp" not in lines[0]
    code, _, err = run_cli(["-q", "predict", str(folder), "-o", str(tmp_path / "out")], capsys)
    assert len(error_lines(err)) == 1


def test_issue17_predict_hints_name_only_predict_options(tmp_path, cmu_small, model_cmu,
                                                         capsys):
    # a 2 um/px model on a slide said to be 5 um/px: far finer than the slide
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path / "out"),
                        "--model", str(model_cmu), "--slide-mpp", "5"], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1
    for option in ("--mpp ", "--mpp/", "--level", "--patch-size"):
        assert option not in lines[0] + " ", lines[0]
    assert "--slide-mpp" in lines[0]


# --------------------------------------------------------------------------- item 9
def test_issue17_output_under_a_regular_file_is_one_line(tmp_path, cmu_small, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(blocker / "out")], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1
    assert "is a file" in lines[0] and "output folder" in lines[0]


def test_issue17_full_disk_is_one_line_with_a_hint(tmp_path, cmu_small, model_cmu,
                                                   monkeypatch, capsys):
    from histotile.export import csv as csv_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.csv"))

    monkeypatch.setattr(csv_export.PredictionsCSVWriter, "write", full)
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path / "out"),
                        "--model", str(model_cmu)], capsys)
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1
    assert "disk is full" in lines[0] and "free some space" in lines[0]
