"""``predict`` over a folder with items overlapped (the next slide prepared, the previous one
finished in the background) writes exactly what a one-slide-at-a-time run writes."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import PATHMNIST, ROOT, make_untrained_model, real_data

import histotile.batch.runner
from histotile.batch.pipeline import is_staged
from histotile.inference import make_predict_process, predict
from histotile.options import PredictOptions

# run.json fields that say when, where and how long, not what
VOLATILE = {"started", "finished", "seconds", "host", "timings"}
ENGINE_SECONDS = {"read_s", "stain_s", "wait_s", "model_s", "model_load_s", "forward_s", "stream_s",
                  "reader_cpu_s", "cpu_s"}


@pytest.fixture(scope="module")
def model28(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained smallcnn whose card asks for Macenko: each slide's stain is fitted."""
    return make_untrained_model(tmp_path_factory.mktemp("models") / "generated-untrained-28")


def _mosaic_slide(path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Another small slide (blocks of the CMU slide's pixels, rotated and shuffled by the seed:
    bench/make_slide.py), so that consecutive slides have different tissue and stain fits."""
    monkeypatch.setenv("HISTOTILE_BENCH_SOURCE", str(source))
    spec = importlib.util.spec_from_file_location("bench_make_slide", ROOT / "bench" /
                                                  "make_slide.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.make_benchmark_slide(path, size=1024, seed=1, svs_like=True))


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[0].startswith(".")}


def _run_json(path: Path, out: Path) -> dict[str, Any]:
    run = json.loads(path.read_text().replace(str(out), "<OUT>"))
    for key in VOLATILE:
        run.pop(key)
    run["engine"] = {k: v for k, v in run["engine"].items() if k not in ENGINE_SECONDS}
    return run


def _bytes(path: Path) -> bytes:
    """The file's bytes; an OME-TIFF's UUID (tifffile draws a new one for every file it writes,
    so two one-at-a-time runs differ there too) masked."""
    data = path.read_bytes()
    return re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:-", data) if path.suffix == ".tif" \
        else data


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("seconds")
        row["output"] = row["output"].replace(str(out), "<OUT>")
    return rows


def test_overlap_predict_folder_byte_identical_to_one_at_a_time(
        tmp_path: Path, cmu_small: Path, model28: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cmu_small, folder / "1-cmu.svs")
    (folder / "2-truncated.svs").write_bytes(cmu_small.read_bytes()[:4096])  # fails in prepare
    shutil.copy(real_data(PATHMNIST), folder / "3-pathmnist.npz")
    shutil.copy(cmu_small, folder / "4-cmu-copy.svs")
    _mosaic_slide(folder / "5-mosaic.svs", cmu_small, monkeypatch)  # prepared while 4 runs
    assert is_staged(make_predict_process(PredictOptions(model=str(model28))))
    kwargs = {"model": model28, "split": "train", "progress": False, "ome_tiff": True,
              "qupath_merge": True, "command": "histotile predict (test)"}
    errors: dict[str, list[str]] = {"piped": [], "plain": []}
    piped = predict(folder, tmp_path / "piped", on_error=lambda i, r: errors["piped"].append(
        r.error), **kwargs)
    monkeypatch.setattr(histotile.batch.runner, "is_staged", lambda process: False)
    plain = predict(folder, tmp_path / "plain", on_error=lambda i, r: errors["plain"].append(
        r.error), **kwargs)

    assert [r.status for r in piped.results] == ["done", "failed", "done", "done", "done"]
    assert [(r.status, r.patches, r.error) for r in piped.results] == \
        [(r.status, r.patches, r.error) for r in plain.results]
    assert errors["piped"] == errors["plain"] and len(errors["piped"]) == 1
    assert "2-truncated.svs" in errors["piped"][0]
    assert _manifest(tmp_path / "piped") == _manifest(tmp_path / "plain")

    a, b = _files(tmp_path / "piped"), _files(tmp_path / "plain")
    assert list(a) == list(b)
    assert {"1-cmu/overlay.png", "1-cmu/heatmap.ome.tif", "1-cmu/classes.geojson.gz",
            "4-cmu-copy/heatmap.ome.zarr/.zattrs", "3-pathmnist/predictions.csv"} <= set(a)
    compared = 0
    for rel, path in a.items():
        if rel == "manifest.csv":
            continue
        if path.name == "run.json":
            assert _run_json(path, tmp_path / "piped") == _run_json(b[rel], tmp_path / "plain"), rel
        else:
            assert _bytes(path) == _bytes(b[rel]), rel
        compared += 1
    assert compared == len(a) - 1
    stains = [json.loads((tmp_path / "piped" / s / "run.json").read_text())["stain"]
              for s in ("1-cmu", "4-cmu-copy", "5-mosaic")]
    assert all(s["mode"] == "per slide" for s in stains)
    assert stains[0]["fit"] == stains[1]["fit"] != stains[2]["fit"]  # each slide its own fit
