"""Smoke tests of the benchmark harness in bench/ (tiny sizes; speed is never asserted here)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT, real_data

BENCH = ROOT / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(cmu_small: Path) -> Path:
    return cmu_small


@pytest.fixture()
def make_slide(source: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("HISTOTILE_BENCH_SOURCE", str(source))
    return _load("make_slide")


@pytest.mark.slow  # two mosaic slides written: ~7 s quiet, ~30 s busy
def test_benchmark_slide_is_pyramidal_with_mpp_and_deterministic(make_slide: ModuleType,
                                                                  tmp_path: Path) -> None:
    import numpy as np
    import openslide

    a = make_slide.make_benchmark_slide(tmp_path / "a.tif", size=1536, seed=3)
    b = make_slide.make_benchmark_slide(tmp_path / "b.tif", size=1536, seed=3)
    c = make_slide.make_benchmark_slide(tmp_path / "c.tif", size=1536, seed=4)
    assert _sha(a) == _sha(b), "same seed must give the same bytes"
    assert _sha(a) != _sha(c)
    with openslide.OpenSlide(str(a)) as s:
        assert s.dimensions == (1536, 1536)
        assert s.level_count >= 3
        assert s.level_downsamples[1] in (2.0, 4.0)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        rgb = np.asarray(s.read_region((0, 0), 0, (1536, 1536)).convert("RGB"))
        low = np.asarray(s.read_region((0, 0), 2, s.level_dimensions[2]).convert("RGB"))
        ds = round(s.level_downsamples[2])
    # real H&E pixels (saturated) and near-white background both present
    sat = rgb.max(axis=2).astype(int) - rgb.min(axis=2)
    assert (sat > 40).mean() > 0.05
    assert ((rgb.min(axis=2) > 220) & (sat < 15)).mean() > 0.05
    # a lower level is the area-mean of level 0 (same content at every level)
    h, w = low.shape[:2]
    ref = rgb[:h * ds, :w * ds].reshape(h, ds, w, ds, 3).mean(axis=(1, 3))
    assert np.abs(ref - low).mean() < 6  # JPEG noise only


def test_svs_like_variant_opens_with_the_aperio_driver(make_slide: ModuleType,
                                                       tmp_path: Path) -> None:
    import openslide

    path = make_slide.make_benchmark_slide(tmp_path / "s.svs", size=1024, seed=0, svs_like=True)
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.properties["openslide.objective-power"] == "20"
        assert s.level_count >= 3
        assert "thumbnail" in s.associated_images


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_export_model_gives_the_same_network_to_every_tool(tmp_path: Path) -> None:
    import torch

    from histotile.models.loading import load_model, preprocess

    export = _load("export_model")
    dirs = export.export_all(tmp_path / "model", seed=0)
    st = load_model(dirs["histotile"], "cpu")
    ts = load_model(dirs["histotile-ts"], "cpu")
    assert st.card.architecture.name == "resnet18" and st.card.num_classes == 2
    x = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = st.module(preprocess(x, st.card))
        b = ts.module(preprocess(x, ts.card))
        jit = torch.jit.load(str(dirs["wsinfer"] / "model.ts"))(preprocess(x, st.card))
    assert a.shape == (3, 2)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, jit, rtol=1e-4, atol=1e-4)
    cfg = json.loads((dirs["wsinfer"] / "config.json").read_text())
    assert cfg["patch_size_pixels"] == st.card.patch_size
    assert cfg["spacing_um_px"] == st.card.mpp
    assert cfg["num_classes"] == 2 and len(cfg["class_names"]) == 2
    # validate against the schemas shipped with WSInfer when it is installed
    import jsonschema

    for schema in (BENCH / ".venvs" / "wsinfer").glob(
            "lib/python*/site-packages/wsinfer*/schemas/model-config.schema.json"):
        jsonschema.validate(cfg, json.loads(schema.read_text()))


def test_tiatoolbox_mask_marks_each_patch_centre_once(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    anchors = _load("anchors")
    coords = np.array([[0, 0], [187, 0], [374, 187]])
    path = anchors.centre_mask(coords, 187, (600, 400), tmp_path / "m.png", downsample=8)
    mask = np.asarray(Image.open(path)) > 0
    assert mask.shape == (50, 75)
    assert mask.sum() == 3
    ys, xs = np.nonzero(mask)
    assert sorted(zip(xs.tolist(), ys.tolist(), strict=True)) == [(11, 11), (35, 11), (58, 35)]


@pytest.mark.slow  # the whole benchmark in quick mode: ~45 s on 2 cores
def test_run_quick_runs_histotile(source: Path, tmp_path: Path) -> None:
    real_data("slides/CMU-1-Small-Region.svs")
    slide = tmp_path / "quick.tif"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--size", "1024", "--slide",
         str(slide), "--model-dir", str(tmp_path / "model"), "--out", str(out),
         "--tools", "histotile"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "HISTOTILE_BENCH_SOURCE": str(source)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    row = result["rows"]["histotile"]
    assert row["patches"] > 0 and row["runs"] == 1
    assert set(row["stages"]) >= {"tissue", "read", "model", "stitch", "export"}
    alone = result["model_alone"]  # both ways of running the model, and the startup cost
    assert alone["plan_per_s"] > 0 and alone["one_stream_per_s"] > 0
    assert alone["patches_per_s"] == max(alone["plan_per_s"], alone["one_stream_per_s"])
    assert alone["startup_s"] > alone["bare_start_s"] > 0
    report = (out / "results.md").read_text()
    assert "| histotile |" in report and "paid once per process" in report


def test_bench_read_checks_pixels_and_prints_ratios(cmu_small: Path) -> None:
    bench_read = _load("bench_read")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_read.py"), str(cmu_small), "--region", "512",
         "--count", "3", "--runs", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pixel reader tifffile-tiles" in proc.stdout
    assert "| histotile auto |" in proc.stdout and "| openslide | " in proc.stdout
    assert bench_read.regions((2220, 2967), 1024, 4) == [(0, 0), (1024, 0), (0, 1024),
                                                         (1024, 1024)]


@pytest.mark.slow  # two copies of the sample slide through one histotile process: ~25 s
def test_run_folder_mode_sums_patches_over_the_cohort(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--folder", "2", "--folder-source", str(source),
         "--model-dir", str(tmp_path / "model"), "--out", str(out), "--tools", "histotile",
         "--runs", "1", "--warmup", "0", "--no-model-alone", "--histotile-args",
         "--min-tissue 0.2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    folder = out / "folder2"
    assert sorted(p.name for p in folder.iterdir()) == ["slide-01.svs", "slide-02.svs"]
    assert _sha(folder / "slide-01.svs") == _sha(source)
    result = json.loads((out / "results.json").read_text())
    assert result["header"]["slides"] == 2
    run = result["runs"]["histotile"][0]
    assert run["slides"] == 2
    assert "--min-tissue" in result["header"]["command"]
    assert run["patches"] % 2 == 0 and run["patches"] > 0  # identical copies, summed
    assert "folder of 2 slides" in (out / "results.md").read_text()


def test_bench_overlap_smoke(tmp_path: Path) -> None:
    """bench/bench_overlap.py: both modes on 2 slides, one round; per-slide figures reported."""
    from helpers import make_untrained_model

    model = make_untrained_model(tmp_path / "model")
    results = _load("bench_overlap").main(["--model", str(model), "--slides", "2", "--rounds",
                                           "1", "--work", str(tmp_path / "work")])
    assert [r["mode"] for r in results] == ["one at a time", "overlapped"]
    for r in results:
        assert r["slides"] == 2 and r["wall_s"] > 0 and r["model_s"] > 0
        assert set(r["stages"]) == {"open", "tissue", "stain", "stitch", "export"}
