"""Re-exporting a finished result without the model: QuPath tiles keep every measurement."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

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
