"""Architectures, safe model loading, the bundled zoo and ``histotile models``."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import real_data

from histotile.errors import ChecksumError, ModelError
from histotile.models import zoo
from histotile.models.architectures import (
    ARCHITECTURES,
    build_model,
    default_cam_layer,
    register,
)
from histotile.models.card import ClassInfo, ModelCard, load_card
from histotile.models.loading import load_model, preprocess, resolve_model


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "resnet50"])
@pytest.mark.parametrize("size", [28, 96])
def test_architectures_forward_shapes(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=9, patch_size=size).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, size, size).to(memory_format=torch.channels_last))
    assert out.shape == (2, 9)
    assert torch.isfinite(out).all()
    cam = model.get_submodule(default_cam_layer(name))
    assert any(isinstance(m, torch.nn.Conv2d) for m in cam.modules())


def test_resnet_small_input_stem() -> None:
    small = build_model("resnet18", 2, 28)
    large = build_model("resnet18", 2, 224)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, torch.nn.MaxPool2d)


def test_register_new_architecture_and_unknown_name() -> None:
    def tiny(num_classes: int, patch_size: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, num_classes))

    register("tiny-test-net", tiny, cam_layer="0")
    try:
        assert build_model("tiny-test-net", 3, 16)(torch.rand(1, 3, 16, 16)).shape == (1, 3)
        assert default_cam_layer("tiny-test-net") == "0"
    finally:
        ARCHITECTURES.pop("tiny-test-net")
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("no-such-net", 2, 28)


# --------------------------------------------------------------------------- model folders
def _make_model(folder: Path, arch: str = "smallcnn", classes: int = 3, size: int = 28,
                fmt: str = "safetensors") -> Path:
    """A model folder with untrained (seeded) weights: generated, for loader edge cases."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    module = build_model(arch, classes, size, width=8).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        wfile = "weights.safetensors"
        save_file(module.state_dict(), str(folder / wfile))
    else:
        wfile = "model.pt"
        torch.jit.script(module).save(str(folder / wfile))
    sha = hashlib.sha256((folder / wfile).read_bytes()).hexdigest()
    card = ModelCard(
        name="test-model", version="0", architecture={"name": arch, "kwargs": {"width": 8}},
        classes=[ClassInfo(f"c{i}", (i * 50, 100, 200)) for i in range(classes)],
        patch_size=size, mpp=4.0, input={"mean": [0.7, 0.5, 0.7], "std": [0.2, 0.25, 0.2]},
        weights={"file": wfile, "sha256": sha, "format": fmt},
    )
    card.save(folder)
    return folder


def test_card_round_trip(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "m")
    card = load_card(folder)
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again.to_dict() == card.to_dict()
    assert card.class_names == ["c0", "c1", "c2"] and card.class_colors[1] == (50, 100, 200)


def test_load_model_and_preprocess(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "m")
    loaded = load_model(folder)
    assert not loaded.module.training
    assert loaded.weights_sha256 == loaded.card.weights.sha256
    patches = np.load(real_data("patches/pathmnist_train_first1000.npz"))["train_images"][:4]
    x = preprocess(torch.from_numpy(patches), loaded.card, "cpu")
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (patches[0, 5, 7] / 255.0 - np.array([0.7, 0.5, 0.7])) / np.array([0.2, 0.25, 0.2])
    np.testing.assert_allclose(x[0, :, 5, 7].numpy(), expected, rtol=1e-5)
    with torch.inference_mode():
        probs = torch.softmax(loaded.module(x), 1)
    assert probs.shape == (4, 3)
    with pytest.raises(ModelError, match="expects 28"):
        preprocess(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), loaded.card)


def test_load_model_sha_mismatch(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    data["weights"]["sha256"] = "0" * 64
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ChecksumError, match="sha256"):
        load_model(folder)


def test_load_model_missing_weights(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "m")
    (folder / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="missing") as info:
        load_model(folder)
    assert "\n" not in info.value.one_line()


def test_load_model_wrong_file(tmp_path: Path) -> None:
    """A pickle (torch.save) under the card's name is refused, never unpickled."""
    folder = _make_model(tmp_path / "m")
    wfile = folder / "weights.safetensors"
    torch.save(build_model("smallcnn", 3, 28, width=8).state_dict(), wfile)
    data = json.loads((folder / "model.json").read_text())
    data["weights"]["sha256"] = hashlib.sha256(wfile.read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="safetensors"):
        load_model(folder)


def test_load_model_weights_of_another_architecture(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    data["classes"].append({"name": "extra", "color": [1, 2, 3]})
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="do not fit"):
        load_model(folder)


def test_load_model_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model.json"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="not a bundled model name"):
        resolve_model(str(tmp_path / "nope"))
    folder = _make_model(tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    data["weights"]["file"] = "../outside.safetensors"
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="not inside"):
        load_model(folder)


def test_torchscript_model(tmp_path: Path) -> None:
    folder = _make_model(tmp_path / "ts", fmt="torchscript")
    ref = load_model(_make_model(tmp_path / "st"))
    loaded = load_model(folder)
    x = preprocess(torch.randint(0, 255, (2, 28, 28, 3), dtype=torch.uint8), loaded.card)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), ref.module(x))


def test_hf_spec_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ModelError, match="huggingface_hub"):
        resolve_model("hf://org/repo")


@pytest.fixture()
def http_dir(tmp_path: Path):
    """Serve ``tmp_path/www`` on 127.0.0.1 (a local stand-in for a model host)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_model_from_url(tmp_path: Path, http_dir, monkeypatch) -> None:
    monkeypatch.setenv("HISTOTILE_CACHE", str(tmp_path / "cache"))
    root, base = http_dir
    folder = _make_model(tmp_path / "mymodel")
    with zipfile.ZipFile(root / "mymodel.zip", "w") as zf:
        for p in folder.iterdir():
            zf.write(p, f"mymodel/{p.name}")
    sha = hashlib.sha256((root / "mymodel.zip").read_bytes()).hexdigest()
    loaded = load_model(f"{base}/mymodel.zip#sha256={sha}")
    assert loaded.card.name == "test-model"
    assert (tmp_path / "cache" / "models").is_dir()
    with pytest.raises(ChecksumError):
        resolve_model(f"{base}/mymodel.zip?again=1#sha256={'1' * 64}")


# --------------------------------------------------------------------------- the bundled zoo
def test_bundled_default_model_loads_and_validates() -> None:
    assert zoo.DEFAULT_MODEL in zoo.list_models()
    folder = zoo.model_path(zoo.DEFAULT_MODEL)
    weights = folder / load_card(folder).weights.file
    assert weights.stat().st_size < 2_000_000
    loaded = load_model(None)
    card = loaded.card
    assert card.patch_size == 28 and card.num_classes == 9
    assert card.training.command.startswith("histotile train")
    assert "demonstration model" in card.notes.lower()
    from histotile.models.card import validate_card

    validate_card(json.loads((folder / "model.json").read_text()))


def test_bundled_model_reproduces_its_validation_accuracy() -> None:
    """Re-run the card's held-out split on the real PathMNIST subset: same accuracy."""
    from histotile.models.preprocess import BatchPipeline
    from histotile.training.datasets import load_pathmnist
    from histotile.training.loop import predict_probs

    loaded = load_model(zoo.DEFAULT_MODEL)
    card = loaded.card
    data = load_pathmnist(real_data("patches/pathmnist_train_first1000.npz"), None,
                          card.training.val_fraction, card.training.seed)
    probs = predict_probs(loaded.module, data.val, BatchPipeline(card, loaded.device))
    acc = float(np.mean(probs.argmax(1) == data.val.labels))
    assert acc == pytest.approx(card.metrics.validation["accuracy"], abs=1e-9)


# --------------------------------------------------------------------------- CLI
def test_cli_models_list_and_show(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from histotile.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["models", "list"])
    assert res.exit_code == 0, res.output
    assert zoo.DEFAULT_MODEL in res.output and "*" in res.output
    res = runner.invoke(cli, ["models", "show", zoo.DEFAULT_MODEL])
    assert res.exit_code == 0, res.output
    assert "smallcnn" in res.output and "adipose" in res.output
    res = runner.invoke(cli, ["models", "show", "--json", str(_make_model(tmp_path / "m"))])
    assert json.loads(res.output)["name"] == "test-model"


def test_cli_models_show_unknown_is_one_line(capsys) -> None:
    from histotile.cli import main

    with pytest.raises(SystemExit) as info:
        main(["models", "show", "no-such-model"])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no-such-model:") and "\n" not in err


def test_zoo_folder_is_a_copyable_model(tmp_path: Path) -> None:
    dest = shutil.copytree(zoo.model_path(zoo.DEFAULT_MODEL), tmp_path / "copy")
    assert load_model(dest).card.name == zoo.DEFAULT_MODEL


def test_issue16_card_parts_are_typed_and_round_trip() -> None:
    """The card's parts are dataclasses (no dict reads), ``stain.in_training`` is in the schema
    and the bundled card says its model was trained on patches as they are."""
    from histotile.models.card import (
        Architecture,
        InputNorm,
        Metrics,
        StainSpec,
        Training,
        Weights,
        validate_card,
    )

    path = zoo.model_path(zoo.DEFAULT_MODEL) / "model.json"
    card = load_card(path.parent)
    assert isinstance(card.architecture, Architecture) and card.architecture.name == "smallcnn"
    assert isinstance(card.weights, Weights) and card.weights.resolved_format == "safetensors"
    assert isinstance(card.stain, StainSpec) and card.stain.in_training is False
    assert isinstance(card.input, InputNorm) and len(card.input.mean) == 3
    assert isinstance(card.training, Training) and card.training.val_fraction == 0.2
    assert isinstance(card.metrics, Metrics) and card.metrics.validation["accuracy"] == 0.87
    assert card.to_dict() == json.loads(path.read_text())  # nothing lost or added
    data = json.loads(path.read_text())
    data["stain"]["in_training"] = "no"
    with pytest.raises(ModelError, match="in_training"):
        validate_card(data)
    # dicts given later are converted too (train assigns metrics as a dict)
    card.metrics = {"validation": {"accuracy": 0.5}, "best_epoch": 3, "custom": 1}
    assert card.metrics.best_epoch == 3 and card.metrics.to_dict()["custom"] == 1


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_model_archive_with_parent_members_is_refused_before_unpacking(tmp_path: Path,
                                                                       kind: str) -> None:
    """A downloaded model archive whose members climb out of the folder (``../``) is refused and
    writes nothing outside it (zip: every member checked first; tar: the ``data`` filter)."""
    import io
    import tarfile

    from histotile.models.loading import _extract

    archive = tmp_path / f"evil.{'zip' if kind == 'zip' else 'tar.gz'}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("model/model.json", "{}")
            zf.writestr("../escaped.txt", "x")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name in ("model/model.json", "../escaped.txt"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tf.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "cache" / "extracted"
    dest.parent.mkdir()
    with pytest.raises(ModelError):
        _extract(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "cache" / "escaped.txt"
                                                            ).exists()
    assert not dest.exists()
