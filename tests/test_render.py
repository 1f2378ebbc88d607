"""Re-exporting a finished result without the model: QuPath tiles keep every measurement."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_untrained_model

from histotile.export.csv import PredictionsCSVWriter, read_predictions_csv
from histotile.export.qupath import export_qupath


def _result_with_gradcam(folder: Path) -> Path:
    folder.mkdir(parents=True)
    classes = [{"name": "normal", "color": [0, 160, 0]}, {"name": "tumor", "color": [220, 0, 0]}]
    (folder / "run.json").write_text(json.dumps({"slide": "s.svs",
                                                 "model": {"card": {"classes": classes}}}))
    coords = np.array([[0, 0], [192, 0], [0, 192]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    cam = np.array([0.25, 0.5, 0.125])
    with PredictionsCSVWriter(folder / "predictions.csv", ["normal", "tumor"], 192,
                              extra_columns=["gradcam_mean"]) as writer:
        writer.write(coords, probs, extra={"gradcam_mean": cam})
    return folder


def test_export_qupath_keeps_gradcam_mean(tmp_path: Path) -> None:
    """Regression: ``export qupath`` rebuilt tiles with the prob_* measurements only, dropping the
    ``gradcam_mean`` column that ``predict --gradcam`` wrote to predictions.csv."""
    folder = _result_with_gradcam(tmp_path / "s")
    assert read_predictions_csv(folder / "predictions.csv").extra["gradcam_mean"].tolist() == [
        0.25, 0.5, 0.125]
    [out] = export_qupath(folder)
    with gzip.open(out, "rt") as fh:
        features = json.load(fh)["features"]
    got = [f["properties"]["measurements"] for f in features]
    assert [m["gradcam_mean"] for m in got] == [0.25, 0.5, 0.125]
    assert [m["prob_tumor"] for m in got] == [0.1, 0.8, 0.5]


# --------------------------------------------------------------------------- render
STEM = "CMU-1-Small-Region"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    """A predict --gradcam result on the real CMU slide, with its model folder deleted."""
    from histotile.cli import main

    root = tmp_path_factory.mktemp("render")
    model = make_untrained_model(root / "model", classes=["normal", "tumor"])
    try:
        main(["-q", "predict", str(cmu_small), "-o", str(root / "out"), "--model", str(model),
              "--device", "cpu", "--stain-norm", "none", "--gradcam"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    shutil.rmtree(model)  # render must not need it
    return root / "out" / STEM


def _render(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``histotile render ARGS`` in a fresh interpreter that fails if torch got imported."""
    code = ("import sys\nfrom histotile.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "assert 'torch' not in sys.modules, 'render imported torch'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code, "-q", "render", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # > 10 s on 2 cores
def test_render_redraws_pictures_without_model_or_torch(finished: Path, tmp_path: Path) -> None:
    from PIL import Image

    before = (finished / "overlay.png").read_bytes()
    done = _render([str(finished), "--class", "tumor", "--threshold", "0.3", "--opacity", "0.8",
                    "--cmap", "magma", "--size", "700", "--qupath"])
    assert done.returncode == 0, done.stderr
    overlay = Image.open(finished / "overlay.png")
    assert max(overlay.size) >= 700 and (finished / "overlay.png").read_bytes() != before
    assert (finished / "prob_tumor.png").stat().st_size > 5_000
    assert (finished / "gradcam_overlay.png").exists()
    record = json.loads((finished / "render.json").read_text())
    assert record["options"]["class_name"] == "tumor" and record["options"]["cmap"] == "magma"
    assert {"overlay.png", "prob_tumor.png", "gradcam_overlay.png",
            "tiles.geojson.gz"} <= set(record["files"])
    # --qupath with --threshold 0.3: every tile's top probability reaches it; gradcam_mean kept
    with gzip.open(finished / "tiles.geojson.gz", "rt") as fh:
        tiles = json.load(fh)["features"]
    probs = read_predictions_csv(finished / "predictions.csv").probs
    assert len(tiles) == int((probs.max(axis=1) >= 0.3).sum()) > 0
    assert all("gradcam_mean" in t["properties"]["measurements"] for t in tiles)


def test_render_into_another_folder_and_refusals(finished: Path, tmp_path: Path) -> None:
    done = _render([str(finished), "-o", str(tmp_path / "pics"), "--size", "300"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pics" / "overlay.png").exists()
    assert not (tmp_path / "pics" / "prob_tumor.png").exists()
    bad = _render([str(finished), "--class", "mucus"])
    assert bad.returncode != 0 and "no class 'mucus'" in bad.stderr + bad.stdout
    moved = tmp_path / "moved"
    shutil.copytree(finished, moved)
    run = json.loads((moved / "run.json").read_text())
    run["slide"] = str(tmp_path / "gone.svs")
    (moved / "run.json").write_text(json.dumps(run))
    lost = _render([str(moved), "-o", str(tmp_path / "p2")])
    assert lost.returncode != 0 and "--slide" in lost.stderr + lost.stdout
