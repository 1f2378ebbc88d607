"""``histotile predict`` end to end on real data: the CMU slide, PathMNIST npz, PCam-layout HDF5.

The model is a *generated untrained* smallcnn folder with a proper card (so these tests do not
depend on the bundled model); its outputs are checked against the model run on single patches.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    PATHMNIST,
    PATHMNIST_CLASSES,
    make_untrained_model,
    read_csv,
    real_data,
    run_cli,
)

from histotile.cli import main


@pytest.fixture(scope="module")
def model28(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_untrained_model(tmp_path_factory.mktemp("models") / "generated-untrained-28")


@pytest.fixture(scope="module")
def cmu_out(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path, model28: Path) -> Path:
    """One CLI run on the CMU slide; returns the output root."""
    out = tmp_path_factory.mktemp("predict-cmu")
    with pytest.MonkeyPatch.context():
        try:
            main(["-q", "predict", str(cmu_small), "-o", str(out), "--model", str(model28)])
        except SystemExit as exc:
            assert exc.code in (0, None), f"predict exited {exc.code}"
    return out


# --------------------------------------------------------------------------- slides
def test_all_outputs_and_run_json(cmu_out: Path, model28: Path) -> None:
    from histotile.download import file_digest

    folder = cmu_out / "CMU-1-Small-Region"
    for name in ("heatmap.ome.zarr", "predictions.csv", "tiles.geojson.gz", "overlay.png",
                 "tissue.png", "tissue_mask.png", "run.json"):
        assert (folder / name).exists(), name
    assert not list(cmu_out.glob(".tmp-*")), "temporary folder left behind"
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "done" and run["kind"] == "slide"
    assert run["model"]["weights_sha256"] == file_digest(model28 / "weights.safetensors",
                                                         "sha256")
    assert run["model"]["card"]["name"] == "generated-untrained-smallcnn-28px"
    assert run["device"] == "cpu" and run["torch_version"]
    assert run["command"].startswith("histotile") and "predict" in run["command"]
    assert run["mpp"]["source"] == "openslide" and run["mpp"]["slide_mpp"] == pytest.approx(0.499)
    assert run["mpp"]["target_mpp"] == 4.0
    assert {"tissue", "read", "stain", "model", "stitch", "export"} <= set(run["timings"])
    rows = read_csv(folder / "predictions.csv")
    assert run["patches"] == len(rows) > 0
    assert run["stain"]["method"] == "macenko" and run["stain"]["sample_patches"] == min(64,
                                                                                        len(rows))


def test_heatmap_validates_as_ome_zarr(cmu_out: Path) -> None:
    import zarr
    from ome_zarr_models.v04 import Image

    path = cmu_out / "CMU-1-Small-Region" / "heatmap.ome.zarr"
    image = Image.from_zarr(zarr.open_group(str(path), mode="r", zarr_format=2))
    names = [c.label for c in image.attributes.omero.channels]
    assert names == PATHMNIST_CLASSES


def _model_on_patch_alone(folder: Path, run: dict, row: dict[str, str]) -> np.ndarray:
    """Read one patch with read_region + resize, stain with the recorded fit, run the model."""
    import torch

    from histotile.models.loading import load_model, preprocess
    from histotile.patches import resize_patch
    from histotile.slide import open_slide
    from histotile.stain import StainFit, make_normalizer

    x, y, w, h = (int(row[k]) for k in ("minx", "miny", "width", "height"))
    with open_slide(run["slide"]) as slide:
        pixels = slide.read_region((x, y), 0, (w, h))
    patch = resize_patch(pixels, run["grid"]["patch_size"])[None]
    fit = run["stain"]["fit"]
    normalizer = make_normalizer("macenko")
    stain_fit = StainFit(torch.tensor(fit["stain_matrix"], dtype=torch.float32),
                         torch.tensor(fit["max_concentrations"], dtype=torch.float32))
    patch = np.asarray(normalizer.normalize(patch, stain_fit))
    loaded = load_model(run["model"]["folder"], "cpu")
    with torch.inference_mode():
        logits = loaded.module(preprocess(torch.from_numpy(patch), loaded.card, "cpu"))
    return torch.softmax(logits.float(), 1)[0].numpy()


def test_patch_probabilities_equal_model_on_patch_alone(cmu_out: Path) -> None:
    from histotile.stitch import level0_to_heatmap_pixel, read_heatmap

    folder = cmu_out / "CMU-1-Small-Region"
    run = json.loads((folder / "run.json").read_text())
    rows = read_csv(folder / "predictions.csv")
    heat, attrs = read_heatmap(folder / "heatmap.ome.zarr")
    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        alone = _model_on_patch_alone(folder, run, row)
        csv_probs = np.array([float(row[f"prob_{c}"]) for c in PATHMNIST_CLASSES])
        np.testing.assert_allclose(csv_probs, alone, atol=2e-5)
        col, r = level0_to_heatmap_pixel(int(row["minx"]), int(row["miny"]), attrs)
        np.testing.assert_allclose(heat[:, r, col], alone, atol=0.5 / 255 + 1e-4)
        assert row["label"] == PATHMNIST_CLASSES[int(np.argmax(alone))]


def check_overlay(folder: Path, rows: list[dict[str, str]]) -> float:
    """Inside each patch box overlay.png is the thumbnail blended toward the colour of the CSV's
    argmax (by an opacity that follows the patch's confidence; hatched stripes more): per pixel,
    the class whose line thumbnail -> colour passes nearest, summed over the box's central half.
    The overlay may be an enlarged thumbnail: try the scales it can have. Returns the share of
    patches that agree."""
    from PIL import Image

    from histotile.slide import open_slide

    xy = np.array([[int(r["minx"]), int(r["miny"])] for r in rows])
    run = json.loads((folder / "run.json").read_text())
    names = [c["name"] for c in run["model"]["card"]["classes"]]
    palette = np.array([c["color"] for c in run["model"]["card"]["classes"]], float)
    ds = run["tissue"]["downsample"]
    with open_slide(run["slide"]) as slide:
        thumb, _ = slide.read_downsampled(ds)
    overlay = np.asarray(Image.open(folder / "overlay.png").convert("RGB")).astype(float)
    h, w = thumb.shape[:2]
    assert overlay.shape[0] >= h and overlay.shape[1] > w  # the legend is on the right
    size = int(rows[0]["width"]) / ds  # a patch's side in thumbnail px
    x0, y0 = (xy[:, 0] / ds + size / 4), (xy[:, 1] / ds + size / 4)
    want = np.array([names.index(r["label"]) for r in rows])
    best = 0.0
    for height in range(h, overlay.shape[0] + 1):
        f = height / h
        width = round(w * f)
        if width >= overlay.shape[1]:
            break
        under_img = np.asarray(Image.fromarray(thumb).resize(
            (width, height), Image.Resampling.BILINEAR)).astype(float)
        got = []
        for x, y in zip(x0, y0, strict=True):
            box = np.s_[int(y * f):int((y + size / 2) * f), int(x * f):int((x + size / 2) * f)]
            px, under = overlay[box].reshape(-1, 3), under_img[box].reshape(-1, 3)
            d = palette[None] - under[:, None]  # (pixels, classes, 3)
            a = np.clip(((px - under)[:, None] * d).sum(2) / np.maximum((d * d).sum(2), 1e-9),
                        0, 1)
            miss = np.linalg.norm(under[:, None] + a[..., None] * d - px[:, None], axis=2)
            got.append(int(miss.sum(axis=0).argmin()))
        best = max(best, float((np.array(got) == want).mean()))
        if best == 1.0:
            break
    assert best > 0.9, f"only {best:.2f} of patch centres show the CSV's label colour"
    return best


def test_csv_zarr_and_overlay_agree(cmu_out: Path) -> None:
    from PIL import Image

    from histotile.stitch import level0_to_heatmap_pixel, read_coverage, read_heatmap

    folder = cmu_out / "CMU-1-Small-Region"
    rows = read_csv(folder / "predictions.csv")
    heat, attrs = read_heatmap(folder / "heatmap.ome.zarr")
    coverage = read_coverage(folder / "heatmap.ome.zarr")
    assert coverage.sum() == len(rows)
    xy = np.array([[int(r["minx"]), int(r["miny"])] for r in rows])
    cols, rr = level0_to_heatmap_pixel(xy[:, 0], xy[:, 1], attrs)
    assert coverage[rr, cols].all()
    probs = np.array([[float(r[f"prob_{c}"]) for c in PATHMNIST_CLASSES] for r in rows])
    np.testing.assert_allclose(heat[:, rr, cols].T, probs, atol=0.5 / 255 + 1e-6)
    assert {int(r["width"]) for r in rows} == {attrs["patch_size_level0"]}
    check_overlay(folder, rows)
    run = json.loads((folder / "run.json").read_text())
    tissue = np.asarray(Image.open(folder / "tissue_mask.png")) > 0
    assert tissue.shape == tuple(run["tissue"]["mask_shape"])
    assert tissue.any() and not tissue.all()


def test_second_run_skips_finished_slide(cmu_out: Path, cmu_small: Path, model28: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_json = cmu_out / "CMU-1-Small-Region" / "run.json"
    before = run_json.read_text()
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(cmu_out),
                            "--model", str(model28)], capsys)
    assert code == 0, err
    manifest = read_csv(cmu_out / "manifest.csv")
    assert [m["status"] for m in manifest] == ["skipped"]
    assert run_json.read_text() == before


# --------------------------------------------------------------------------- archives
def test_pathmnist_npz_prints_accuracy(tmp_path: Path, model28: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    npz = real_data(PATHMNIST)
    code, out, err = run_cli(["-q", "predict", str(npz), "--split", "train", "-o",
                              str(tmp_path), "--model", str(model28)], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "pathmnist_train_first1000" / "predictions.csv")
    labels = np.load(npz)["train_labels"].ravel()
    assert len(rows) == 1000
    assert [r["true_label"] for r in rows] == [PATHMNIST_CLASSES[i] for i in labels]
    correct = sum(r["label"] == r["true_label"] for r in rows)
    assert f"accuracy {correct / 1000:.4f} ({correct}/1000)" in out
    run = json.loads((tmp_path / "pathmnist_train_first1000" / "run.json").read_text())
    assert run["kind"] == "medmnist-npz" and run["split"] == "train"
    assert run["correct"] == correct


def write_pcam_h5(folder: Path, stem: str = "derived-pcam-kaggle_split_test") -> Path:
    """A DERIVED PCam-layout pair ``<stem>_x.h5`` / ``<stem>_y.h5`` from the 15 real Kaggle
    PCam patches (x uint8 (N,96,96,3), y uint8 (N,1,1,1), as in camelyonpatch_level_2_*)."""
    import h5py
    from PIL import Image

    src = real_data("patches/pcam-kaggle/train_labels.csv")
    with open(src, newline="") as fh:
        labels = {r["id"]: int(r["label"]) for r in csv.DictReader(fh)}
    ids = sorted(labels)
    x = np.stack([np.asarray(Image.open(src.parent / "train" / f"{i}.tif").convert("RGB"))
                  for i in ids])
    y = np.array([labels[i] for i in ids], np.uint8).reshape(-1, 1, 1, 1)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{stem}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(4, 96, 96, 3))
    with h5py.File(folder / f"{stem}_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    return folder / f"{stem}_x.h5"


def test_pcam_h5_prints_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h5 = write_pcam_h5(tmp_path / "data")
    model = make_untrained_model(tmp_path / "generated-untrained-96", patch_size=96, mpp=0.972,
                                 classes=["normal", "tumor"])
    code, out, err = run_cli(["-q", "predict", str(h5), "-o", str(tmp_path / "out"),
                              "--model", str(model)], capsys)
    assert code == 0, err
    folder = tmp_path / "out" / h5.stem
    rows = read_csv(folder / "predictions.csv")
    assert [r["index"] for r in rows] == [str(i) for i in range(15)]
    assert sum(r["true_label"] == "tumor" for r in rows) == 5
    correct = sum(r["label"] == r["true_label"] for r in rows)
    assert f"{h5.name}: accuracy {correct / 15:.4f} ({correct}/15)" in out


# --------------------------------------------------------------------------- bad inputs
def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_unreadable_slide_in_folder_fails_alone(tmp_path: Path, model28: Path, cmu_small: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "generated-truncated.svs").write_bytes(cmu_small.read_bytes()[:4096])
    shutil.copy(real_data(PATHMNIST), folder / "pathmnist.npz")
    code, _, err = run_cli(["-q", "predict", str(folder), "--split", "train", "-o",
                            str(tmp_path / "out"), "--model", str(model28)], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "generated-truncated.svs" in lines[0], err
    status = {Path(m["slide"]).name: m["status"] for m in read_csv(tmp_path / "out" /
                                                                   "manifest.csv")}
    assert status == {"generated-truncated.svs": "failed", "pathmnist.npz": "done"}


def test_patch_size_mismatch_is_one_line(tmp_path: Path, model28: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    h5 = write_pcam_h5(tmp_path / "data")
    code, _, err = run_cli(["-q", "predict", str(h5), str(real_data(PATHMNIST)), "--split",
                            "train", "-o", str(tmp_path / "out"), "--model", str(model28)],
                           capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "patches are 96 px" in lines[0] and "28 px" in lines[0], err
    assert (tmp_path / "out" / "pathmnist_train_first1000" / "run.json").exists()


@pytest.mark.parametrize("damage", ["sha-mismatch", "not-safetensors"])
def test_bad_model_is_one_line(tmp_path: Path, model28: Path, damage: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from histotile.download import file_digest

    model = tmp_path / f"generated-{damage}"
    shutil.copytree(model28, model)
    weights = model / "weights.safetensors"
    if damage == "sha-mismatch":
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        expected = "sha256"
    else:
        weights.write_bytes(b"GENERATED: this is not a safetensors file\n" * 10)
        card = json.loads((model / "model.json").read_text())
        card["weights"]["sha256"] = file_digest(weights, "sha256")
        (model / "model.json").write_text(json.dumps(card))
        expected = "safetensors"
    code, _, err = run_cli(["-q", "predict", str(real_data(PATHMNIST)), "--split", "train",
                            "-o", str(tmp_path / "out"), "--model", str(model)], capsys)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err


def test_unknown_model_name_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    code, _, err = run_cli(["-q", "predict", str(real_data(PATHMNIST)), "-o", str(tmp_path),
                            "--model", "no-such-model"], capsys)
    assert code != 0
    lines = _error_lines(err)
    assert len(lines) == 1 and "no-such-model" in lines[0]


# --------------------------------------------------------------------------- laziness
def test_cli_import_does_not_load_torch() -> None:
    code = ("import sys, histotile.cli.predict, histotile.inference, histotile.options, "
            "histotile.archives; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_model_loaded_once_per_run(tmp_path: Path, model28: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import histotile.models.loading as loading
    from histotile import predict

    calls: list[str] = []
    real = loading.load_model

    def counting(spec, device="cpu"):
        calls.append(str(spec))
        return real(spec, device)

    monkeypatch.setattr(loading, "load_model", counting)
    npz = real_data(PATHMNIST)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.npz", "b.npz"):
        shutil.copy(npz, inputs / name)
    summary = predict(inputs, tmp_path / "out", model=model28, split="train", progress=False)
    assert [r.status for r in summary.results] == ["done", "done"]
    assert len(calls) == 1


# --------------------------------------------------------------------------- bundled model
def test_default_model_on_cmu(tmp_path: Path, cmu_small: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """``histotile predict CMU-1-Small-Region.svs`` with no --model: the bundled default."""
    from histotile.models import zoo

    assert zoo.DEFAULT_MODEL in zoo.list_models()
    code, _, err = run_cli(["-q", "predict", str(cmu_small), "-o", str(tmp_path)], capsys)
    assert code == 0, err
    folder = tmp_path / "CMU-1-Small-Region"
    run = json.loads((folder / "run.json").read_text())
    assert run["model"]["name"] == zoo.DEFAULT_MODEL
    rows = read_csv(folder / "predictions.csv")
    assert len(rows) == run["patches"] > 0
    assert len({r["label"] for r in rows}) > 1  # a trained model tells tissue types apart
    check_overlay(folder, rows)


def test_unavailable_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(["-q", "predict", str(real_data(PATHMNIST)), "--split", "train",
                            "-o", str(tmp_path), "--device", "cuda"], capsys)
    assert code != 0
    lines = _error_lines(err)
    assert len(lines) == 1 and "CUDA" in lines[0]
    assert not (tmp_path / "pathmnist_train_first1000").exists()


@pytest.mark.slow  # a dask LocalCluster start and stop: ~25 s on 2 busy cores
def test_quiet_local_executor_prints_no_dask_info(tmp_path: Path, model28: Path) -> None:
    """``-q --executor local``: no INFO lines from dask's scheduler/nanny/workers."""
    proc = subprocess.run([sys.executable, "-m", "histotile", "-q", "predict",
                           str(real_data(PATHMNIST)), "--split", "train", "-o", str(tmp_path),
                           "--model", str(model28), "--executor", "local", "--jobs", "1"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "INFO" not in proc.stderr and "Scheduler" not in proc.stderr, proc.stderr
    assert (tmp_path / "pathmnist_train_first1000" / "predictions.csv").is_file()
