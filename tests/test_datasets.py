"""Training data sources (real PathMNIST and PCam patches) and the ``--download`` path."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import KAGGLE, PATHMNIST, kaggle_patches, real_data, write_pcam_h5

from histotile.errors import ChecksumError, DatasetError
from histotile.training.datasets import H5Patches, load_dataset, stratified_split


def test_pathmnist_subset_stratified_split() -> None:
    npz = real_data(PATHMNIST)
    data = load_dataset("pathmnist", npz.parent, val_fraction=0.2, seed=3)
    assert data.val_source.startswith("stratified") and data.test is None
    assert len(data.train) + len(data.val) == 1000 and len(data.val) == 200
    all_labels = np.load(npz)["train_labels"].reshape(-1)
    expected = np.bincount(all_labels) * 0.2
    assert np.all(np.abs(np.bincount(data.val.labels, minlength=9) - expected) <= 1)
    img, label = data.val[0]
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    idx = int(data.val.indices[0])
    np.testing.assert_array_equal(img, np.load(npz)["train_images"][idx])
    assert label == all_labels[idx]
    assert data.mpp == 4.0 and data.patch_size == 28 and len(data.class_names) == 9
    assert set(data.train.indices).isdisjoint(data.val.indices)


def test_pathmnist_npz_path_and_resize() -> None:
    data = load_dataset(real_data(PATHMNIST), size=64, val_fraction=0.1)
    assert data.patch_size == 64 and data.mpp == pytest.approx(4.0 * 28 / 64)
    assert data.train[0][0].shape == (64, 64, 3)


def test_pathmnist_missing_says_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("pathmnist", tmp_path, size=64)
    line = info.value.one_line()
    assert "pathmnist_64.npz" in line and str(tmp_path) in line and "--download" in line


def test_pathmnist_truncated(tmp_path: Path) -> None:
    data = real_data(PATHMNIST).read_bytes()
    (tmp_path / "pathmnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_dataset("pathmnist", tmp_path)


def test_stratified_split_is_seeded() -> None:
    labels = np.load(real_data(PATHMNIST))["train_labels"].reshape(-1)
    a = stratified_split(labels, 0.2, 0)
    b = stratified_split(labels, 0.2, 0)
    c = stratified_split(labels, 0.2, 1)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


# --------------------------------------------------------------------------- PCam HDF5
def test_pcam_h5_folder_lazy_and_workers(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    x, y, _ = kaggle_patches()
    write_pcam_h5(tmp_path, "train", x[:10], y[:10])
    write_pcam_h5(tmp_path, "valid", x[10:], y[10:])
    data = load_dataset("pcam", tmp_path)
    assert data.val_source == "official" and len(data.train) == 10 and len(data.val) == 5
    assert data.mpp == pytest.approx(0.972) and data.class_names == ["normal", "tumor"]
    assert isinstance(data.train, H5Patches)
    data.train[0]  # opens a handle in this process ...
    assert pickle.loads(pickle.dumps(data.train))._h5 is None  # ... which is never pickled  # noqa: SLF001 - checks the h5py handle is per process
    parent_handle = data.train._h5  # and forked workers (below) open their own  # noqa: SLF001 - checks the h5py handle is per process
    loader = DataLoader(data.train, batch_size=4, num_workers=2)
    got = np.concatenate([b[0].numpy() for b in loader])
    labels = np.concatenate([b[1].numpy() for b in loader])
    np.testing.assert_array_equal(got, x[:10])
    np.testing.assert_array_equal(labels, y[:10])
    assert data.train._h5 is parent_handle and data.train._pid == os.getpid()  # noqa: SLF001 - checks the h5py handle is per process


def test_pcam_single_file_pair(tmp_path: Path) -> None:
    x, y, _ = kaggle_patches()
    xp = write_pcam_h5(tmp_path, "train", x, y)
    data = load_dataset(xp, val_fraction=0.4)
    assert len(data.val) == 6 and sorted(np.bincount(data.val.labels)) == [2, 4]


def test_pcam_missing_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="camelyonpatch_level_2_split_train_x.h5"):
        load_dataset("pcam", tmp_path)
    x, y, _ = kaggle_patches()
    xp = write_pcam_h5(tmp_path, "train", x, y)
    xp.write_bytes(xp.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("pcam", tmp_path)


# --------------------------------------------------------------------------- folders
def test_kaggle_folder() -> None:
    folder = real_data(KAGGLE)
    data = load_dataset(folder, val_fraction=0.34)
    assert data.name == "pcam-kaggle" and len(data.train) + len(data.val) == 15
    x, y, _ = kaggle_patches()
    img, label = data.train[0]
    i = int(data.train.indices[0])
    np.testing.assert_array_equal(img, x[i])
    assert label == y[i]


def test_kaggle_folder_missing_images(tmp_path: Path) -> None:
    src = real_data(KAGGLE)
    shutil.copy(src / "train_labels.csv", tmp_path / "train_labels.csv")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="15 of 15 images .* missing") as info:
        load_dataset(tmp_path)
    assert str(tmp_path / "train") in info.value.one_line()


def test_image_folder(tmp_path: Path) -> None:
    src = real_data(KAGGLE)
    _, y, ids = kaggle_patches()
    for i, label in zip(ids, y, strict=True):
        dest = tmp_path / ["normal", "tumor"][label]
        dest.mkdir(exist_ok=True)
        shutil.copy(src / "train" / f"{i}.tif", dest / f"{i}.tif")
    with pytest.raises(DatasetError, match="--mpp"):
        from histotile import train

        train(tmp_path, tmp_path.parent / f"{tmp_path.name}-model", epochs=1, val_fraction=0.34,
              progress=False, device="cpu", max_steps=1)
    data = load_dataset(tmp_path, val_fraction=0.34, mpp=0.972)
    assert data.class_names == ["normal", "tumor"] and data.mpp == 0.972
    assert np.bincount(np.concatenate([data.train.labels, data.val.labels])).tolist() == [10, 5]


def test_tile_archive_with_labels_csv(tmp_path: Path) -> None:
    import h5py

    x, y, _ = kaggle_patches()
    archive = tmp_path / "slide.h5"
    with h5py.File(archive, "w") as f:  # the layout 'histotile tile' writes, from real patches
        f.create_dataset("x", data=x)
        f.create_dataset("coords", data=np.arange(30).reshape(15, 2))
        f.attrs["target_mpp"] = 0.5
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("index,label\n" + "".join(f"{i},{['normal', 'tumor'][v]}\n"
                                            for i, v in enumerate(y)))
    data = load_dataset(archive, labels=tmp_path / "labels.csv", val_fraction=0.34)
    assert data.class_names == ["normal", "tumor"] and data.mpp == 0.5
    img, label = data.val[0]
    i = int(data.val.indices[0])
    np.testing.assert_array_equal(img, x[i])
    assert label == y[i]


# --------------------------------------------------------------------------- downloads
class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; the first full GET is cut after half the bytes."""

    cut_first = True
    requests: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # http.server API
        path = Path(self.translate_path(self.path.split("?")[0]))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        type(self).requests.append(rng or "full")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not rng and type(self).cut_first:
            type(self).cut_first = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def flaky_server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(_FlakyHandler):
        cut_first = True
        requests: list[str] = []

        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", Handler
    server.shutdown()
    server.server_close()


def test_download_pathmnist_resumes_and_verifies(tmp_path: Path, flaky_server) -> None:
    from histotile.training.download_data import download_pathmnist

    root, base, handler = flaky_server
    src = real_data(PATHMNIST)
    shutil.copy(src, root / "pathmnist.npz")
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = tmp_path / "data"
    path = download_pathmnist(dest, url=f"{base}/pathmnist.npz?download=1", md5=md5,
                              progress=False)
    assert path == dest / "pathmnist.npz"
    assert handler.requests[0] == "full" and handler.requests[1].startswith("bytes=")
    assert path.read_bytes() == src.read_bytes()
    assert not (dest / "pathmnist.npz.part").exists()
    data = load_dataset("pathmnist", dest, val_fraction=0.2)  # the downloaded file trains
    assert len(data.train) == 800


def test_download_checksum_mismatch_refused(tmp_path: Path, flaky_server) -> None:
    from histotile.training.download_data import download_pathmnist

    root, base, handler = flaky_server
    handler.cut_first = False
    shutil.copy(real_data(PATHMNIST), root / "pathmnist.npz")
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        download_pathmnist(dest, url=f"{base}/pathmnist.npz", progress=False)  # official md5
    assert not (dest / "pathmnist.npz").exists() and not (dest / "pathmnist.npz.part").exists()


def test_download_via_load_dataset(tmp_path: Path, flaky_server, monkeypatch) -> None:
    """``--download`` through the dataset entry point (the official URL points at the server)."""
    from histotile.training import download_data

    root, base, handler = flaky_server
    src = real_data(PATHMNIST)
    shutil.copy(src, root / "pathmnist.npz")
    monkeypatch.setattr(download_data, "MEDMNIST_RECORD", base)
    monkeypatch.setitem(download_data.PATHMNIST_MD5, "pathmnist.npz",
                        hashlib.md5(src.read_bytes()).hexdigest())
    data = load_dataset("pathmnist", tmp_path / "d", download=True, val_fraction=0.2)
    assert len(data.val) == 200 and (tmp_path / "d" / "pathmnist.npz").is_file()


def test_download_pcam_gunzips(tmp_path: Path, flaky_server) -> None:
    from histotile.training.download_data import download_pcam

    root, base, handler = flaky_server
    handler.cut_first = False
    x, y, _ = kaggle_patches()
    write_pcam_h5(tmp_path / "src", "valid", x, y)
    sums = {}
    for p in (tmp_path / "src").iterdir():
        gz = root / f"{p.name}.gz"
        gz.write_bytes(gzip.compress(p.read_bytes()))
        sums[gz.name] = hashlib.md5(gz.read_bytes()).hexdigest()
    files = download_pcam(tmp_path / "pcam", ("valid",), base_url=base, md5=sums, progress=False)
    assert [f.name for f in files] == ["camelyonpatch_level_2_split_valid_y.h5",
                                       "camelyonpatch_level_2_split_valid_x.h5"]
    assert not list((tmp_path / "pcam").glob("*.gz"))
    data = load_dataset(files[1], val_fraction=0.34)
    np.testing.assert_array_equal(data.train[0][0], x[int(data.train.indices[0])])
