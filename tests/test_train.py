"""``histotile train`` / ``evaluate`` on real patches: outputs, resume, CLI errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kaggle_patches, real_data, write_pcam_h5

from histotile import evaluate, train
from histotile.models.loading import load_model
from histotile.models.preprocess import BatchPipeline
from histotile.training.loop import augment_batch, predict_probs

PATHMNIST = "patches/pathmnist_train_first1000.npz"
TINY = {"width": 8}  # a narrow smallcnn keeps these tests fast; the recipe is the real one


def _train(dataset: object, out: Path, **kw: object) -> Path:
    args = {"epochs": 1, "batch_size": 64, "device": "cpu", "progress": False,
            "arch_kwargs": TINY, "val_fraction": 0.2, "n_boot": 20, "plots": False}
    args.update(kw)
    return train(dataset, out, **args)  # type: ignore[arg-type]


def _cli(args: list[str]) -> None:
    """Run the histotile entry point in-process; success may end in SystemExit(0)."""
    from histotile.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def _first_n(tmp_path: Path, n: int, name: str | None = None) -> Path:
    """The first ``n`` real PathMNIST images as an npz of the same layout (smaller, faster)."""
    with np.load(real_data(PATHMNIST)) as src:
        out = tmp_path / (name or f"pathmnist_first{n}.npz")
        np.savez(out, train_images=src["train_images"][:n], train_labels=src["train_labels"][:n])
    return out


def test_train_pathmnist_writes_a_usable_model(tmp_path: Path) -> None:
    npz = _first_n(tmp_path, 300, "pathmnist.npz")
    out = _train("pathmnist", tmp_path / "m", data_dir=npz.parent, max_steps=3, plots=True)
    for name in ("model.json", "weights.safetensors", "metrics.json", "history.csv",
                 "checkpoint.pt", "training_curves.png", "confusion_matrix.png",
                 "roc_curves.png"):
        assert (out / name).is_file(), name
    loaded = load_model(out)
    card = loaded.card
    assert card.patch_size == 28 and card.mpp == 4.0 and card.num_classes == 9
    assert card.class_names[5] == "smooth_muscle"
    assert card.training.data_md5 == hashlib.md5(npz.read_bytes()).hexdigest()
    assert card.training.seed == 0 and card.stain.method == "none"
    assert card.weights.sha256 == loaded.weights_sha256
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["n"] == 60
    # the card's validation accuracy is what the saved weights give on the held-out split
    from histotile.training.datasets import load_dataset

    data = load_dataset(npz, val_fraction=0.2, seed=0)
    probs = predict_probs(loaded.module, data.val, BatchPipeline(card, loaded.device))
    assert card.metrics.validation["accuracy"] == pytest.approx(
        float(np.mean(probs.argmax(1) == data.val.labels)))
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_train_pcam_derived_h5(tmp_path: Path) -> None:
    x, y, _ = kaggle_patches()
    write_pcam_h5(tmp_path / "pcam", "train", x[:10], y[:10])  # derived from real patches
    write_pcam_h5(tmp_path / "pcam", "valid", x[10:], y[10:])
    out = _train("pcam", tmp_path / "m", data_dir=tmp_path / "pcam", batch_size=4, max_steps=2)
    card = load_model(out).card
    assert card.patch_size == 96 and card.mpp == pytest.approx(0.972)
    assert card.class_names == ["normal", "tumor"] and card.metrics.validation["n"] == 5


def test_train_kaggle_folder_through_cli(tmp_path: Path, capsys) -> None:
    folder = real_data("patches/pcam-kaggle")
    out = tmp_path / "kaggle-model"
    _cli(["-q", "train", str(folder), "-o", str(out), "--epochs", "1", "--batch-size", "4",
          "--val-fraction", "0.34", "--device", "cpu", "--arch", "smallcnn"])
    assert "wrote" in capsys.readouterr().out
    card = load_model(out).card
    # the command as typed (one recorder for train and predict: histotile.fileio.command_line)
    assert card.training.command.startswith(f"histotile -q train {folder} -o {out}")
    assert "--epochs 1 --batch-size 4" in card.training.command
    assert card.training.n_train + card.training.n_val == 15



def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path) -> None:
    npz = _first_n(tmp_path, 300)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch: int, row: dict) -> None:
        if epoch == 0:
            raise Killed

    common = {"epochs": 2, "max_steps": None, "seed": 7, "batch_size": 32}
    with pytest.raises(Killed):
        _train(npz, tmp_path / "resumed", on_epoch_end=kill_after_first_epoch, **common)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "model.json").exists()
    _train(npz, tmp_path / "resumed", resume=True, **common)
    _train(npz, tmp_path / "straight", **common)
    a = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and len(a["history"]) == 2
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    assert a["history"] == b["history"]
    ca = json.loads((tmp_path / "resumed" / "model.json").read_text())
    cb = json.loads((tmp_path / "straight" / "model.json").read_text())
    assert ca["weights"]["sha256"] == cb["weights"]["sha256"]


def test_resume_refuses_other_options(tmp_path: Path) -> None:
    from histotile.errors import InvalidArgumentError

    npz = _first_n(tmp_path, 100)
    _train(npz, tmp_path / "m", max_steps=1)
    with pytest.raises(InvalidArgumentError, match="different run configuration"):
        _train(npz, tmp_path / "m", max_steps=1, resume=True, lr=0.1)


def test_evaluate_and_compare(tmp_path: Path, capsys) -> None:
    npz = _first_n(tmp_path, 300)
    model = _train(npz, tmp_path / "m", max_steps=2)
    m = evaluate(model, npz, split="val", out_dir=tmp_path / "report", compare=model,
                 device="cpu", progress=False, val_fraction=0.2, n_boot=20, plots=False)
    assert m["n"] == 60 and 0 <= m["accuracy"] <= 1
    assert m["comparison"]["mcnemar"]["p_value"] == 1.0  # a model against itself
    assert (tmp_path / "report" / "metrics.json").is_file()
    _cli(["evaluate", str(model), str(npz), "--split", "val", "--val-fraction", "0.2",
          "--device", "cpu", "--n-boot", "20", "--compare", str(model)])
    out = capsys.readouterr().out
    assert f"accuracy           {m['accuracy']:.4f}" in out and "McNemar" in out
    with pytest.raises(Exception, match="no test split"):
        evaluate(model, npz, split="test", device="cpu", progress=False)


def test_train_missing_data_is_one_line(tmp_path: Path, capsys) -> None:
    from histotile.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "pathmnist", "--data-dir", str(tmp_path), "-o", str(tmp_path / "m")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pathmnist.npz" in err and str(tmp_path) in err


def test_macenko_is_recorded_and_applied(tmp_path: Path) -> None:
    npz = _first_n(tmp_path, 100)
    out = _train(npz, tmp_path / "m", max_steps=1, stain_norm="macenko")
    loaded = load_model(out)
    assert loaded.card.stain.method == "macenko"
    assert loaded.card.stain.reference["stain_matrix"]
    pipe = BatchPipeline(loaded.card, loaded.device)
    assert pipe.normalizer is not None


def test_augment_batch_is_seeded_and_keeps_layout() -> None:
    x = torch.from_numpy(np.load(real_data(PATHMNIST))["train_images"][:16])
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, x)


def test_fitted_stain_reference_without_training_normalisation(tmp_path: Path) -> None:
    """--stain-reference fit --no-stain-train: the card carries a Macenko reference fitted on the
    (already normalised) training patches, training sees them as they are, and predict will
    normalise slides to that reference."""
    from histotile.stain import MacenkoNormalizer, StainReference
    from histotile.training.datasets import load_dataset

    npz = _first_n(tmp_path, 200)
    out = train(npz, tmp_path / "m", epochs=1, batch_size=32, max_steps=1, device="cpu",
                val_fraction=0.2, progress=False, n_boot=0, plots=False,
                stain_norm="macenko", stain_reference="fit", stain_train=False)
    card = load_model(out).card
    assert card.stain.method == "macenko" and card.stain.in_training is False
    ref = StainReference.from_dict(card.stain.reference)
    assert ref.source != "macenko-default"
    # the reference is the pooled fit of the training split's patches
    data = load_dataset(npz, val_fraction=0.2, seed=0)
    train_patches = np.stack([data.train[i][0] for i in range(len(data.train))])
    fit = MacenkoNormalizer(channels_last=True).fit(train_patches)
    assert np.allclose(np.asarray(ref.stain_matrix), fit.stain_matrix.numpy(), atol=0.02)
    assert BatchPipeline(card, torch.device("cpu")).normalizer is None
