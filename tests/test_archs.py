"""Seed architectures (vit, resnet50-attention, efficientnet-b0), ViT attention maps and
ImageNet-weight loading, on real patches (PathMNIST subset, Kaggle PCam folder) and the CMU slide.
"""

from __future__ import annotations

import csv
import functools
import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import real_data

PATHMNIST = "patches/pathmnist_train_first1000.npz"
KAGGLE = "patches/pcam-kaggle"
NEW_ARCHS = ("vit", "resnet50-attention", "efficientnet-b0")


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 real PathMNIST images of each class (90), same npz layout."""
    with np.load(real_data(PATHMNIST)) as npz:
        x, y = npz["train_images"], npz["train_labels"]
    idx = np.sort(np.concatenate([np.flatnonzero(y[:, 0] == k)[:10] for k in range(9)]))
    path = tmp_path_factory.mktemp("data") / "pathmnist_first10perclass.npz"
    np.savez(path, train_images=x[idx], train_labels=y[idx])
    return path


def _train(data: Path, out: Path, arch: str, **kw: object) -> Path:
    import torch

    from histotile import train

    torch.manual_seed(0)
    return train(data, out, arch=arch, epochs=1, batch_size=16, max_steps=2, device="cpu",
                 val_fraction=0.2, progress=False, n_boot=0, plots=False, **kw)


def test_registered_and_listed() -> None:
    from histotile.models.architectures import architecture_names, default_cam_layer

    for name in NEW_ARCHS:  # registered by the plugin loader, without importing them by hand
        assert name in architecture_names()
    assert default_cam_layer("resnet50-attention") == "cbam4"
    assert default_cam_layer("efficientnet-b0") == "features.8"


@pytest.mark.slow  # a training each: ~4-15 s quiet, ~12-50 s on a busy 2-core machine
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_trains_on_pathmnist_and_predicts_on_slide(arch: str, small_npz: Path, tmp_path: Path,
                                                   cmu_small: Path) -> None:
    import torch

    from histotile import predict
    from histotile.models.loading import load_model

    folder = _train(small_npz, tmp_path / arch, arch)
    loaded = load_model(folder, "cpu")
    assert loaded.card.architecture.name == arch
    assert loaded.card.patch_size == 28
    # the weights moved away from the seed-0 initialisation train() starts from
    from histotile.models.architectures import build_model

    torch.manual_seed(0)
    init = build_model(arch, 9, 28).state_dict()
    trained = loaded.module.state_dict()
    moved = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert moved, "no parameter changed in training"
    summary = predict(cmu_small, tmp_path / "pred", model=folder, device="cpu", batch_size=64,
                      stain_norm="none", progress=False)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    rows = list(csv.DictReader((tmp_path / "pred" / cmu_small.stem / "predictions.csv")
                               .read_text().splitlines()))
    assert len(rows) > 10
    probs = np.array([[float(r[f"prob_{c}"]) for c in loaded.card.class_names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)


def test_vit_trains_on_kaggle_pcam_96px(tmp_path: Path) -> None:
    from histotile.models.loading import load_model

    folder = _train(real_data(KAGGLE), tmp_path / "vit96", "vit")
    loaded = load_model(folder, "cpu")
    assert loaded.card.patch_size == 96
    assert loaded.module.grid == 12  # 8 px patches at 96 px
    assert loaded.card.class_names == ["normal", "tumor"]


# --------------------------------------------------------------------------- attention
def _tiny_vit(patch_size: int = 28) -> object:
    import torch

    from histotile.models.architectures import build_model

    torch.manual_seed(0)
    return build_model("vit", 3, patch_size, patch=7, dim=16, depth=2, heads=2).eval()


def _real_batch(n: int = 4) -> object:
    import torch

    with np.load(real_data(PATHMNIST)) as npz:
        x = npz["train_images"][:n]
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


def test_cls_attention_matches_hand_computed_softmax() -> None:
    """softmax(QKᵀ/√d) computed here from the module's own weights, CLS row, last block."""
    import torch

    from histotile.attention import cls_attention

    model, x = _tiny_vit(), _real_batch()
    maps, probs = cls_attention(model, x)
    assert maps.shape == (4, 2, 4, 4)  # (B, heads, grid, grid): 28 px / 7 px patches
    with torch.no_grad():
        t = model.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([model.cls_token.expand(4, -1, -1), t], 1) + model.pos_embed
        t = model.blocks[0](t)
        last = model.blocks[1]
        h = last.norm1(t)
        w, b = last.attn.qkv.weight, last.attn.qkv.bias
        q = h @ w[:16].T + b[:16]
        k = h @ w[16:32].T + b[16:32]
        for head in range(2):
            sl = slice(8 * head, 8 * head + 8)
            scores = q[:, 0:1, sl] @ k[:, :, sl].transpose(1, 2) / math.sqrt(8)
            row = torch.softmax(scores, dim=-1)[:, 0, 1:]  # CLS row without the CLS column
            np.testing.assert_allclose(maps[:, head].reshape(4, -1).numpy(), row.numpy(),
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(model(x), 1).detach().numpy(),
                               atol=1e-5)  # capture does not change the output
    assert model.attentions() == []  # capture switched off afterwards


def test_rollout_and_explain_method_shapes() -> None:
    import torch

    from histotile.attention import attention, forward_with_attention, rollout

    model, x = _tiny_vit(), _real_batch()
    _, maps = forward_with_attention(model, x, "all")
    assert len(maps) == 2 and maps[0].shape == (4, 2, 17, 17)
    r = rollout(maps)
    # by hand: ((0.5 A2 + 0.5 I) @ (0.5 A1 + 0.5 I)), rows sum to 1 already
    eye = torch.eye(17)
    a1, a2 = (0.5 * m.mean(1) + 0.5 * eye for m in maps)
    np.testing.assert_allclose(r.reshape(4, -1).numpy(), (a2 @ a1)[:, 0, 1:].numpy(), atol=1e-6)
    up, probs = attention(model, x)  # the explain METHODS signature, upsampled, min-max
    assert up.shape == (4, 28, 28) and probs.shape == (4, 3)
    assert float(up.min()) >= 0 and float(up.max()) <= 1 + 1e-6
    grid, _ = attention(model, x, normalise="none", size=0)
    assert grid.shape == (4, 4, 4)
    np.testing.assert_allclose(grid.sum((1, 2)).numpy() <= 1 + 1e-6, True)


def test_attention_needs_a_vit() -> None:
    from histotile.attention import cls_attention
    from histotile.errors import ModelError
    from histotile.models.architectures import build_model

    with pytest.raises(ModelError, match="Vision Transformer"):
        cls_attention(build_model("smallcnn", 3, 28), _real_batch())


@pytest.mark.slow  # ~2 s quiet, ~11 s busy
def test_attention_grid_picture(tmp_path: Path) -> None:
    from histotile.attention import all_maps
    from histotile.export.figures import write_attention_grid

    model = _tiny_vit()
    with np.load(real_data(PATHMNIST)) as npz:
        patches, labels = npz["train_images"][:4], npz["train_labels"][:4, 0] % 3
    maps = all_maps(model, _real_batch())
    path = write_attention_grid(tmp_path / "attention_grid.png", patches, maps,
                                class_names=["a", "b", "c"], true=labels)
    assert path.stat().st_size > 10_000


# --------------------------------------------------------------------------- pretrained
class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (SimpleHTTPRequestHandler has none)."""

    ranges: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if rng is None or not path.is_file():
            return super().send_head()
        self.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0])
        data = path.read_bytes()
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        import io

        return io.BytesIO(data[start:])


@pytest.fixture(scope="module")
def weights_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, str]]:
    """127.0.0.1 server of a REAL torchvision-format state dict: a seeded, untrained
    EfficientNet-B0 (no ImageNet weights exist on this machine), saved with torch.save and
    named torchvision-style ``efficientnet_b0_GENERATED-<sha256[:8]>.pth``."""
    import torch
    import torchvision

    from histotile.download import file_digest

    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    tmp = root / "tmp.pth"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), tmp)
    sha = file_digest(tmp)
    path = root / f"efficientnet_b0_GENERATED-{sha[:8]}.pth"
    tmp.rename(path)
    handler = functools.partial(_RangeHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", path, sha
    server.shutdown()


@pytest.fixture
def served_entry(weights_server: tuple[str, Path, str], monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[Path, str]:
    from histotile.models import pretrained

    base, path, sha = weights_server
    entry = pretrained.WeightsFile("GENERATED (test)", f"{base}/{path.name}", sha)
    monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, "efficientnet-b0", entry)
    return path, sha


def test_load_pretrained_from_local_server(served_entry: tuple[Path, str], tmp_path: Path
                                           ) -> None:
    import torch

    from histotile.models.architectures import build_model
    from histotile.models.pretrained import load_pretrained

    path, sha = served_entry
    model = build_model("efficientnet-b0", 9, 28)  # other head, stride-1 stem
    report = load_pretrained(model, "efficientnet-b0", cache=tmp_path, progress=False)
    source = torch.load(path, weights_only=True)
    assert report["sha256"] == sha and (tmp_path / path.name).is_file()
    assert set(report["skipped"]) == {"classifier.1.weight", "classifier.1.bias"}
    assert report["loaded"] == len(source) - 2
    state = model.state_dict()
    for key in ("features.0.0.weight", "features.8.1.running_var"):
        assert torch.equal(state[key], source[key])


def test_pretrained_resumes_and_reuses_cache(served_entry: tuple[Path, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from histotile.models import pretrained

    path, sha = served_entry
    data = path.read_bytes()
    (tmp_path / (path.name + ".part")).write_bytes(data[: len(data) // 3])
    _RangeHandler.ranges.clear()
    got = pretrained.fetch_weights("efficientnet-b0", cache=tmp_path, progress=False)
    assert _RangeHandler.ranges == [f"bytes={len(data) // 3}-"]
    assert got.read_bytes() == data
    # cached: no network at all (the URL now points at a closed port)
    entry = pretrained.IMAGENET_WEIGHTS["efficientnet-b0"]
    monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, "efficientnet-b0", pretrained.WeightsFile(
        entry.enum, f"http://127.0.0.1:9/{path.name}", sha))
    assert pretrained.fetch_weights("efficientnet-b0", cache=tmp_path, progress=False) == got


def test_pretrained_offline_is_one_line_error(served_entry: tuple[Path, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from histotile.errors import ChecksumError, DownloadError
    from histotile.models import pretrained

    path, sha = served_entry
    monkeypatch.setenv(pretrained.BASE_URL_ENV, "http://127.0.0.1:9")  # nothing listens
    with pytest.raises(DownloadError) as exc:
        pretrained.fetch_weights("efficientnet-b0", cache=tmp_path, progress=False)
    assert "\n" not in exc.value.one_line() and "127.0.0.1:9" in exc.value.one_line()
    monkeypatch.delenv(pretrained.BASE_URL_ENV)
    entry = pretrained.IMAGENET_WEIGHTS["efficientnet-b0"]
    monkeypatch.setitem(pretrained.IMAGENET_WEIGHTS, "efficientnet-b0",
                        pretrained.WeightsFile(entry.enum, entry.url, "0" * 64))
    with pytest.raises(ChecksumError):
        pretrained.fetch_weights("efficientnet-b0", cache=tmp_path / "bad", progress=False)
    assert not list((tmp_path / "bad").glob("*.pth*"))  # nothing unverified left behind


def test_imagenet_table_matches_torchvision() -> None:
    import torchvision.models as tvm

    from histotile.models.pretrained import IMAGENET_WEIGHTS

    for arch, entry in IMAGENET_WEIGHTS.items():
        enum_name, member = entry.enum.split(".")
        assert getattr(getattr(tvm, enum_name), member).url == entry.url, arch
        assert entry.sha256.startswith(entry.prefix) and len(entry.sha256) == 64, arch


def test_pretrained_unknown_arch() -> None:
    from histotile.errors import InvalidArgumentError
    from histotile.models.architectures import build_model
    from histotile.models.pretrained import load_pretrained

    with pytest.raises(InvalidArgumentError, match="no ImageNet weights"):
        load_pretrained(build_model("vit", 2, 28), "vit")


def test_train_with_pretrained_imagenet(served_entry: tuple[Path, str], small_npz: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from histotile.models.card import load_card

    _, sha = served_entry
    monkeypatch.setenv("HISTOTILE_CACHE", str(tmp_path / "cache"))
    folder = _train(small_npz, tmp_path / "m", "efficientnet-b0", pretrained="imagenet")
    info = load_card(folder).training.pretrained
    assert info["sha256"] == sha and info["loaded"] > 300
