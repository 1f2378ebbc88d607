"""PredictOptions: validated once, up front; the resume fingerprint derived from its fields."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from helpers import PATHMNIST, make_untrained_model, real_data, run_cli

from histotile.errors import InvalidArgumentError
from histotile.inference.fingerprint import NEUTRAL, RESOLVED, derive_fingerprint
from histotile.models.card import ClassInfo, ModelCard
from histotile.options import BatchOptions, PredictOptions, TileOptions

REF_A = {"stain_matrix": [[0.45, 0.22], [0.77, 0.93], [0.45, 0.30]],
         "max_concentrations": [1.54, 0.96], "source": "fit A"}
REF_B = {"stain_matrix": [[0.56, 0.22], [0.72, 0.80], [0.41, 0.56]],
         "max_concentrations": [1.97, 1.03], "source": "fit B"}

#: One other value per options field. A new field without an entry here fails
#: test_issue16_every_option_is_fingerprinted_or_neutral: decide whether it changes outputs.
OTHER_VALUE = {
    "model": "another-model-folder", "device": "cuda:1", "batch_size": 64, "workers": 3,
    "slide_mpp": 0.25, "stain_norm": "none", "min_tissue": 0.3, "overlap": 0.5,
    "split": "val", "backend": "openslide", "region_size": 1024, "gradcam": True,
    "cam_class": "a", "cam_layer": "features.3", "cam_resolution": 16.0, "attention": True,
    "geojson_plain": True, "qupath_object_type": "detection", "qupath_min_prob": 0.5,
    "qupath_merge": True, "ome_tiff": True, "allow_darkfield": True, "max_unreadable": 0.2,
    "tissue_mask": __file__, "progress": False, "command": "histotile x",
    "batch": BatchOptions(executor="local", jobs=4, overwrite=True),
}


def card(stain: dict | None = None, name: str = "m") -> ModelCard:
    return ModelCard(
        name=name, version="1", architecture={"name": "smallcnn"},
        classes=[ClassInfo("a", (1, 2, 3)), ClassInfo("b", (4, 5, 6))], patch_size=28, mpp=4.0,
        input={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
        weights={"file": "w.safetensors", "sha256": "0" * 64},
        stain=stain or {"method": "macenko", "reference": REF_A, "in_training": True})


def fp(options: PredictOptions, c: ModelCard | None = None) -> str:
    return json.dumps(derive_fingerprint(options, c or card(), lambda d: d.split(":")[0]),
                      sort_keys=True)


def test_issue16_every_option_is_fingerprinted_or_neutral() -> None:
    names = {f.name for f in dataclasses.fields(PredictOptions)}
    assert set(OTHER_VALUE) == names, "new option: add it to OTHER_VALUE and decide if neutral"
    assert NEUTRAL <= names and RESOLVED <= names and not NEUTRAL & RESOLVED
    base = PredictOptions(device="cpu")
    for name, value in OTHER_VALUE.items():
        if name in ("attention", "model"):
            continue  # attention excludes gradcam only; model is resolved from the card below
        changed = fp(base.replace(**{name: value})) != fp(base)
        assert changed == (name not in NEUTRAL), name
    # the model enters through its card: another card (weights) is another fingerprint
    other = dataclasses.replace(card(), weights={"file": "w.safetensors", "sha256": "1" * 64})
    assert fp(base, other) != fp(base)
    assert fp(base.replace(attention=True)) != fp(base)
    # the device class decides, not the index
    assert fp(base.replace(device="cuda:0")) == fp(base.replace(device="cuda:1"))


def test_issue16_stain_auto_and_macenko_with_different_references_differ() -> None:
    """The bug: ``auto`` (the card's reference) and ``macenko`` (then the standard reference)
    had equal fingerprints, so a rerun with the other option skipped every finished slide."""
    opts = PredictOptions(device="cpu")
    with_card_ref = card({"method": "macenko", "reference": REF_A, "in_training": True})
    no_card_ref = card({"method": "macenko", "reference": None, "in_training": True})
    other_ref = card({"method": "macenko", "reference": REF_B, "in_training": True})
    prints = {fp(opts.replace(stain_norm=s), c) for s in ("auto", "macenko")
              for c in (with_card_ref, no_card_ref, other_ref)}
    assert len(prints) == 3  # one per reference actually used
    # auto and macenko that resolve to the same reference are the same work
    assert fp(opts, with_card_ref) == fp(opts.replace(stain_norm="macenko"), with_card_ref)
    # a model trained on patches as they are: auto does not normalise, macenko does
    raw = card({"method": "macenko", "reference": REF_A, "in_training": False})
    assert fp(opts, raw) == fp(opts.replace(stain_norm="none"), raw)
    assert fp(opts, raw) != fp(opts.replace(stain_norm="macenko"), raw)


@pytest.mark.parametrize("kwargs", [
    {"slide_mpp": 0}, {"slide_mpp": float("nan")}, {"slide_mpp": float("inf")},
    {"slide_mpp": -1.0}, {"batch_size": 0}, {"workers": -1}, {"min_tissue": 1.5},
    {"overlap": 1.0}, {"overlap": float("nan")}, {"stain_norm": "reinhard"},
    {"cam_resolution": 0.0}, {"qupath_min_prob": 2.0}, {"device": "gpu"},
    {"gradcam": True, "attention": True}, {"executor": "mpi"}, {"jobs": 0},
])
def test_issue17_item11_bad_predict_options_are_refused_up_front(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        PredictOptions().replace(**kwargs)
    assert err.value.hint


@pytest.mark.parametrize("kwargs", [
    {"mpp": float("nan")}, {"mpp": float("inf")}, {"mpp": 0.0}, {"slide_mpp": 0.0},
    {"slide_mpp": float("nan")}, {"patch_size": 0}, {"limit": -1}, {"overlap": 1.0},
])
def test_issue17_item11_bad_tile_options_are_refused_up_front(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        TileOptions(**kwargs)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="stain_nrom"):
        PredictOptions().replace(stain_nrom="none")


@pytest.mark.parametrize("args", [["--slide-mpp", "0"], ["--slide-mpp", "nan"],
                                  ["--slide-mpp", "inf"], ["--batch-size", "0"]])
def test_issue17_item11_cli_predict_refuses_before_opening_a_slide(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import histotile.slide as slide

    opened: list[str] = []
    monkeypatch.setattr(slide, "open_slide", lambda *a, **k: opened.append(str(a[0])))
    missing = tmp_path / "never-opened.svs"
    missing.write_bytes(b"not a slide")
    code, _, err = run_cli(["-q", "predict", str(missing), "-o", str(tmp_path / "out"), *args],
                           capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code != 0 and len(lines) == 1 and args[0] in lines[0], err
    assert "Traceback" not in err and not opened and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--mpp", "nan"], ["--mpp", "inf"], ["--slide-mpp", "0"]])
def test_issue17_item11_cli_tile_refuses_before_opening_a_slide(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "never-opened.svs"
    missing.write_bytes(b"not a slide")
    code, _, err = run_cli(["-q", "tile", str(missing), "-o", str(tmp_path / "out"), *args],
                           capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code != 0 and len(lines) == 1 and args[0] in lines[0], err
    assert "Traceback" not in err and "OverflowError" not in err and "ValueError" not in err


def test_issue17_item11_model_error_is_reported_once(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Weights that do not match the card fail every item the same way: one error line."""
    model = make_untrained_model(tmp_path / "model")
    data = json.loads((model / "model.json").read_text())
    data["weights"]["sha256"] = "f" * 64
    (model / "model.json").write_text(json.dumps(data))
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.npz", "b.npz", "c.npz"):
        shutil.copy(real_data(PATHMNIST), inputs / name)
    code, _, err = run_cli(["-q", "predict", str(inputs), "-o", str(tmp_path / "out"),
                            "--model", str(model), "--split", "train"], capsys)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "sha256" in lines[0], err
    assert "2 more items" in err


def test_issue16_run_json_records_the_options(tmp_path: Path) -> None:
    from histotile import predict

    model = make_untrained_model(tmp_path / "model")
    summary = predict(real_data(PATHMNIST), tmp_path / "out",
                      PredictOptions(model=str(model), split="train", device="cpu"),
                      progress=False, batch_size=128)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    run = json.loads((tmp_path / "out" / "pathmnist_train_first1000" / "run.json").read_text())
    assert run["options"]["batch_size"] == 128 and run["options"]["stain_norm"] == "auto"
    assert run["options"]["batch"]["executor"] == "serial"
    assert run["preprocessing"]["stain"]["method"] == "macenko"  # generated card: in training
    assert run["stain"]["mode"] == "per patch"
