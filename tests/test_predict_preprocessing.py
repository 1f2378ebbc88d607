"""One preprocessing definition: predict (archives) and evaluate give the same probabilities,
and the bundled model's card figure is what predict delivers (issue 16)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import PATHMNIST, make_untrained_model, real_data

from histotile.models.card import ClassInfo, ModelCard
from histotile.models.preprocess import Preprocessing, StainPlan
from histotile.options import EvaluateOptions


def _bundled() -> str:
    from histotile.models import zoo

    assert zoo.DEFAULT_MODEL in zoo.list_models(), "the bundled model is missing"
    return zoo.DEFAULT_MODEL


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled card's 200 held-out PathMNIST images (its recorded split of the first 1,000
    training images) as a MedMNIST npz with only a test split."""
    from histotile.models.card import load_card
    from histotile.models.loading import resolve_model
    from histotile.training.datasets import load_pathmnist

    card = load_card(resolve_model(_bundled()))
    data = load_pathmnist(real_data(PATHMNIST), None, card.training.val_fraction,
                          card.training.seed)
    images = np.stack([data.val[i][0] for i in range(len(data.val))])
    path = tmp_path_factory.mktemp("held-out") / "pathmnist_held_out.npz"
    np.savez(path, test_images=images, test_labels=data.val.labels.reshape(-1, 1))
    return path


def _predict_csv(npz: Path, out: Path, model: str) -> tuple[np.ndarray, dict]:
    from histotile import predict

    summary = predict(npz, out, model=model, split="test", device="cpu", progress=False)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    folder = out / npz.stem
    with open(folder / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c.startswith("prob_")]
    probs = np.array([[float(r[c]) for c in cols] for r in rows])
    return probs, json.loads((folder / "run.json").read_text())


def _evaluate_probs(npz: Path, model: str) -> np.ndarray:
    from histotile.models.loading import load_model
    from histotile.training.evaluation import load_dataset_for, split_probabilities

    options = EvaluateOptions(split="test", device="cpu", progress=False)
    loaded = load_model(model, "cpu")
    data, _ = load_dataset_for(loaded.card, npz, options)
    return split_probabilities(loaded, data.split("test"), options)


@pytest.mark.parametrize("which", ["bundled (trained on raw patches)",
                                   "generated (trained on Macenko-normalised patches)"])
def test_issue16_predict_archive_and_evaluate_give_identical_probabilities(
        which: str, held_out: Path, tmp_path: Path) -> None:
    """Before: predict Macenko-normalised the archive (one fit per archive) while evaluate fed
    the patches as they are, for the same model: 0.800 vs 0.870 on these 200 images."""
    model = _bundled() if which.startswith("bundled") else str(
        make_untrained_model(tmp_path / "model", stain="macenko"))
    predicted, run = _predict_csv(held_out, tmp_path / "out", model)
    evaluated = _evaluate_probs(held_out, model)
    assert predicted.shape == evaluated.shape == (200, 9)
    # predictions.csv holds 6 significant digits: identical up to that printing
    printed = np.array([[float(f"{v:.6g}") for v in row] for row in evaluated])
    np.testing.assert_array_equal(predicted, printed)
    assert run["preprocessing"]["stain"]["method"] == (
        "none" if which.startswith("bundled") else "macenko")


def test_issue16_predict_on_held_out_archive_gives_the_card_accuracy(
        held_out: Path, tmp_path: Path) -> None:
    from histotile.models.card import load_card
    from histotile.models.loading import resolve_model

    card = load_card(resolve_model(_bundled()))
    _, run = _predict_csv(held_out, tmp_path / "out", _bundled())
    assert run["patches"] == card.metrics.validation["n"] == 200
    assert run["accuracy"] == card.metrics.validation["accuracy"] == 0.87
    assert run["stain"]["method"] == "none" and run["options"]["stain_norm"] == "auto"


def test_issue16_evaluate_uses_the_card_split_by_default(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """Before: evaluate held out its own 10 % (seed 0), overlapping the card's training 800."""
    from histotile import evaluate

    npz = real_data(PATHMNIST)
    m = evaluate(_bundled(), npz, split="val", device="cpu", progress=False, n_boot=0,
                 plots=False)
    assert m["n"] == 200 and m["accuracy"] == 0.87
    assert "from the model card" in m["split_source"]
    assert m["preprocessing"]["stain"]["method"] == "none"  # the same definition as predict
    assert m["options"]["val_fraction"] is None  # not given: the card's
    with caplog.at_level(logging.WARNING):
        other = evaluate(_bundled(), npz, split="val", device="cpu", progress=False, n_boot=0,
                         plots=False, val_fraction=0.1)
    assert other["n"] == 100 and "differs from the model card" in other["split_source"]
    assert "overlaps the images" in caplog.text


def _card(method: str, reference: dict | None, in_training: bool) -> ModelCard:
    return ModelCard(
        name="m", version="1", architecture={"name": "smallcnn"},
        classes=[ClassInfo("a", (1, 2, 3)), ClassInfo("b", (4, 5, 6))], patch_size=28, mpp=4.0,
        input={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
        weights={"file": "w.safetensors", "sha256": "0" * 64},
        stain={"method": method, "reference": reference, "in_training": in_training})


REF = {"stain_matrix": [[0.45, 0.22], [0.77, 0.93], [0.45, 0.30]],
       "max_concentrations": [1.54, 0.96]}


@pytest.mark.parametrize(("card_stain", "requested", "method", "source"), [
    (("macenko", REF, True), "auto", "macenko", "model card"),
    (("macenko", REF, False), "auto", "none", None),
    (("macenko", REF, False), "macenko", "macenko", "model card"),
    (("macenko", None, True), "auto", "macenko", "standard"),
    (("none", None, True), "auto", "none", None),
    (("none", None, True), "macenko", "macenko", "standard"),
    (("macenko", REF, True), "none", "none", None),
])
def test_stain_plan_resolution(card_stain: tuple, requested: str, method: str,
                               source: str | None) -> None:
    plan = StainPlan.resolve(_card(*card_stain), requested)
    assert (plan.method, plan.reference_source) == (method, source)
    assert (plan.reference_sha256 is None) == (method == "none")


def test_preprocessing_to_tensor_matches_the_card() -> None:
    import torch

    pre = Preprocessing.from_card(_card("none", None, True))
    x = np.full((2, 28, 28, 3), 153, np.uint8)  # 0.6
    t = pre.to_tensor(x, "cpu")
    assert t.shape == (2, 3, 28, 28) and t.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(t, torch.full_like(t, (0.6 - 0.5) / 0.2))
