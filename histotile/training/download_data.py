"""``--download``: the official PathMNIST and PatchCamelyon files, resumed and checksum-verified.

PathMNIST comes from the MedMNIST Zenodo record 10519652 with the md5 published by MedMNIST
(``medmnist/info.py``); PCam's ``.h5.gz`` files come from Zenodo record 2546921 with the md5s
torchvision publishes, and are gunzipped after verification. Transfers resume from ``.part``
files (:func:`histotile.download.download`).
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

from histotile.download import download
from histotile.errors import DatasetError
from histotile.fileio import atomic_path

log = logging.getLogger(__name__)

MEDMNIST_RECORD = "https://zenodo.org/records/10519652/files"
PATHMNIST_MD5 = {
    "pathmnist.npz": "a8b06965200029087d5bd730944a56c1",
    "pathmnist_64.npz": "55aa9c1e0525abe5a6b9d8343a507616",
    "pathmnist_128.npz": "ac42d08fb904d92c244187169d1fd1d9",
    "pathmnist_224.npz": "2c51a510bcdc9cf8ddb2af93af1eadec",
}
PCAM_RECORD = "https://zenodo.org/records/2546921/files"
PCAM_MD5 = {  # of the .h5.gz files (torchvision.datasets.PCAM)
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
}


def pathmnist_filename(size: int | None) -> str:
    """``pathmnist.npz`` (28 px) or ``pathmnist_SIZE.npz``."""
    if size in (None, 28):
        return "pathmnist.npz"
    if size not in (64, 128, 224):
        raise DatasetError(f"PathMNIST comes at 28, 64, 128 or 224 px, not {size}",
                           "use --size 28, 64, 128 or 224")
    return f"pathmnist_{size}.npz"


def download_pathmnist(folder: str | Path, size: int | None = None, *, url: str | None = None,
                       md5: str | None = None, progress: bool = True) -> Path:
    """Fetch ``pathmnist[_SIZE].npz`` into ``folder`` (md5-checked); ``url``/``md5`` override
    the official source (mirrors, tests)."""
    name = pathmnist_filename(size)
    url = url or f"{MEDMNIST_RECORD}/{name}?download=1"
    return download(url, Path(folder) / name, md5=md5 or PATHMNIST_MD5[name], progress=progress)


def download_pcam(folder: str | Path, splits: tuple[str, ...] = ("train", "valid", "test"), *,
                  base_url: str = PCAM_RECORD, md5: dict[str, str] | None = None,
                  progress: bool = True) -> list[Path]:
    """Fetch and gunzip the PCam ``camelyonpatch_level_2_split_{split}_{x,y}.h5`` files."""
    folder = Path(folder)
    sums = {**PCAM_MD5, **(md5 or {})}
    out = []
    for split in splits:
        for xy in "yx":
            h5 = folder / f"camelyonpatch_level_2_split_{split}_{xy}.h5"
            if not h5.is_file():
                gz = download(f"{base_url}/{h5.name}.gz?download=1", folder / f"{h5.name}.gz",
                              md5=sums[f"{h5.name}.gz"], progress=progress)
                gunzip(gz, h5)
                gz.unlink()
            out.append(h5)
    return out


def gunzip(src: Path, dest: Path) -> Path:
    """Decompress ``src`` to ``dest`` through a temporary file (renamed when complete)."""
    try:
        with atomic_path(dest) as tmp, gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot decompress {src.name} ({exc})",
                           "delete it and download again", subject=str(src)) from None
    log.info("decompressed %s", dest)
    return dest
