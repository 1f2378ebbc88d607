"""The XGBoost baseline: features, training on the real PathMNIST subset, the model folder, and
the folder running through load_model / histotile.predict like any other model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import real_data

PATHMNIST = "patches/pathmnist_train_first1000.npz"


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real subset split 600 train / 200 test (npz layout), so test metrics exist."""
    with np.load(real_data(PATHMNIST)) as npz:
        x, y = npz["train_images"], npz["train_labels"]
    path = tmp_path_factory.mktemp("data") / "pathmnist_600_200.npz"
    np.savez(path, train_images=x[:600], train_labels=y[:600], test_images=x[800:],
             test_labels=y[800:])
    return path


@pytest.fixture(scope="module")
def model(subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from histotile.training.xgboost import train_xgboost

    return train_xgboost(subset, tmp_path_factory.mktemp("m") / "xgb", n_estimators=30,
                         n_jobs=2, n_boot=50, progress=False, epochs=3)


def test_features() -> None:
    from histotile.errors import InvalidArgumentError
    from histotile.models.xgboost import patch_features

    with np.load(real_data(PATHMNIST)) as npz:
        x = npz["train_images"][:5]
    f = patch_features(x)
    assert f.shape == (5, 83) and f.dtype == np.float32 and np.isfinite(f).all()
    # colour histogram block: 16 bins per channel summing to 1
    np.testing.assert_allclose(f[:, :48].reshape(5, 3, 16).sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(f[:, 48:51], x.reshape(5, -1, 3).mean(1) / 255, atol=1e-5)
    assert patch_features(x, "pixels").shape == (5, 28 * 28 * 3)
    with pytest.raises(InvalidArgumentError):
        patch_features(x, "sift")


def test_trains_and_writes_model_folder(model: Path) -> None:
    from histotile.models.card import load_card

    card = load_card(model)
    assert card.architecture.to_dict() == {"name": "xgboost",
                                           "kwargs": {"features": "colour-texture"}}
    metrics = json.loads((model / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] == 200
    assert test["accuracy"] > 1 / 9 and test["auc"] > 0.5  # better than chance on real data
    for name in ("history.csv", "training_curves.png", "confusion_matrix.png", "roc_curves.png"):
        assert (model / name).is_file(), name
    assert card.input.to_dict() == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def test_folder_loads_and_matches_booster(model: Path, subset: Path) -> None:
    import torch

    from histotile.models.loading import load_model, preprocess
    from histotile.models.xgboost import patch_features, predict_proba

    loaded = load_model(model, "cpu")
    with np.load(subset) as npz:
        x = npz["test_images"][:16]
    probs = torch.softmax(loaded.module(preprocess(x, loaded.card, "cpu")), 1).numpy()
    direct = predict_proba(loaded.module.model(), patch_features(x))
    np.testing.assert_allclose(probs, direct, atol=1e-5)


def test_folder_predicts_on_slide(model: Path, cmu_small: Path, tmp_path: Path) -> None:
    from histotile import predict

    summary = predict(cmu_small, tmp_path, model=model, device="cpu", stain_norm="none",
                      progress=False)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    rows = list(csv.DictReader((tmp_path / cmu_small.stem / "predictions.csv")
                               .read_text().splitlines()))
    assert len(rows) > 10


@pytest.mark.slow  # a full xgboost training through the CLI
def test_cli_train_arch_xgboost(subset: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from histotile.cli import main

    try:
        main(["-q", "train", str(subset), "--arch", "xgboost", "-o", str(tmp_path / "x"),
              "--epochs", "2"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "model.json").read_text())["architecture"]["name"] \
        == "xgboost"


def test_issue16_library_train_arch_xgboost_does_not_crash(subset: Path, tmp_path: Path) -> None:
    """``histotile.train(..., arch="xgboost")`` built the booster's empty nn.Module and handed it
    to Adam ("optimizer got an empty parameter list"): only the CLI dispatched to the trainer."""
    import histotile

    folder = histotile.train(subset, tmp_path / "lib", arch="xgboost", epochs=2, progress=False,
                             n_boot=0, plots=False)
    card = json.loads((folder / "model.json").read_text())
    assert card["architecture"]["name"] == "xgboost"
    assert card["metrics"]["validation"]["accuracy"] > 0.3


def test_issue16_train_help_lists_every_architecture_of_the_table() -> None:
    from click.testing import CliRunner

    from histotile.cli import cli
    from histotile.models.architectures import ARCHITECTURES

    out = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    assert all(name in out for name in ARCHITECTURES), out
