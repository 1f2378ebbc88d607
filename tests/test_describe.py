"""``histotile describe``: balance, t-SNE, samples and summary on real patches (PathMNIST subset,
Kaggle PCam folder, and a PCam-layout HDF5 derived from those Kaggle patches)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import real_data

PATHMNIST = "patches/pathmnist_train_first1000.npz"
KAGGLE = "patches/pcam-kaggle"
PICTURES = ("balance.png", "tsne.png", "samples.png")


def _pictures_ok(folder: Path) -> None:
    from PIL import Image

    for name in PICTURES:
        with Image.open(folder / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name
    assert not list(folder.glob(".*.tmp*")) and not list(folder.glob("*.tmp"))


@pytest.mark.slow  # t-SNE of the 1,000-image subset
def test_pathmnist_subset(tmp_path: Path) -> None:
    from histotile.describe import describe

    npz = real_data(PATHMNIST)
    with np.load(npz) as f:
        y = f["train_labels"][:, 0]
        x = f["train_images"]
    s = describe(npz, tmp_path, n=80, seed=3, progress=False)
    _pictures_ok(tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == s
    assert s["total"] == 1000 and list(s["counts"]) == ["train"]  # held-out val merged back
    assert list(s["class_totals"].values()) == np.bincount(y, minlength=9).tolist()
    assert s["image_size"] == [28, 28, 3] and s["subsample"]["n"] == 80
    assert sum(s["subsample"]["counts"].values()) == 80
    # the channel statistics are those of the seeded subsample
    rng = np.random.default_rng(3)
    take = np.sort(rng.choice(1000, size=80, replace=False))
    sub = x[take].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(s["channel_mean"], sub.mean(0), atol=1e-4)
    np.testing.assert_allclose(s["channel_std"], sub.std(0), atol=1e-4)


def _kaggle_labels(folder: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader((folder / "train_labels.csv").read_text().splitlines()))
    return [r["id"] for r in rows], np.array([int(r["label"]) for r in rows])


def test_kaggle_folder(tmp_path: Path) -> None:
    from histotile.describe import describe

    folder = real_data(KAGGLE)
    _, labels = _kaggle_labels(folder)
    s = describe(folder, tmp_path, progress=False)
    _pictures_ok(tmp_path)
    assert s["class_totals"] == {"normal": int((labels == 0).sum()),
                                 "tumor": int((labels == 1).sum())}
    assert s["image_size"] == [96, 96, 3] and s["subsample"]["n"] == len(labels)


def test_pcam_hdf5_derived(tmp_path: Path) -> None:
    """PCam-layout files built here from the real Kaggle 96 px patches (DERIVED, not PCam)."""
    import h5py
    from PIL import Image

    from histotile.describe import describe

    folder = real_data(KAGGLE)
    ids, labels = _kaggle_labels(folder)
    x = np.stack([np.array(Image.open(folder / "train" / f"{i}.tif").convert("RGB"))
                  for i in ids])
    data = tmp_path / "pcam-derived"
    data.mkdir()
    with h5py.File(data / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(data / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f["y"] = labels.astype(np.uint8).reshape(-1, 1, 1, 1)
    s = describe(data, tmp_path / "out", n=12, progress=False)
    _pictures_ok(tmp_path / "out")
    assert s["total"] == len(ids) and s["subsample"]["n"] == 12
    assert s["class_totals"]["tumor"] == int(labels.sum())
    np.testing.assert_allclose(s["channel_mean"][0], 0, atol=1)  # a fraction in [0, 1]


@pytest.mark.slow  # t-SNE of 1,000 embeddings
def test_tsne_on_model_embeddings(tmp_path: Path) -> None:
    from histotile import train
    from histotile.describe import describe

    npz = real_data(PATHMNIST)
    model = train(npz, tmp_path / "m", arch="smallcnn", epochs=1, max_steps=1, batch_size=32,
                  device="cpu", progress=False, n_boot=0, plots=False)
    s = describe(npz, tmp_path / "out", n=40, model=model, device="cpu", progress=False)
    assert "input of head.3 (128-d)" in s["tsne"]["features"]
    _pictures_ok(tmp_path / "out")


def test_cli_describe_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from histotile.cli import main

    folder = real_data(KAGGLE)
    try:
        main(["describe", str(folder), "-o", str(tmp_path / "d"), "-n", "10", "--seed", "1"])
    except SystemExit as ok:  # main() exits 0 or returns, depending on the CLI version
        assert not ok.code
    assert "15 patches in 2 classes, 96 px" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["describe", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "e")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
