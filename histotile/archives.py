"""Patch archives as predict inputs: PCam-layout HDF5 and MedMNIST ``.npz``, read batch by batch.

* **PCam HDF5** (``*.h5``/``*.hdf5``): dataset ``x`` uint8 (N, P, P, 3); optional ``coords``
  (N, 2) level-0 (x, y) and labels ``y`` (any shape with N values, PCam stores (N, 1, 1, 1)),
  either in the same file or in the sibling file whose name has ``_x`` replaced by ``_y``
  (``camelyonpatch_level_2_split_test_x.h5`` → ``..._test_y.h5``).
* **MedMNIST npz**: ``<split>_images`` (N, P, P[, 3]) uint8 and ``<split>_labels`` (N, 1); the
  split is chosen with ``split`` (``train``/``val``/``test``). The ``.npy`` member is streamed out
  of the zip (stored or deflated) a batch at a time, so even the 224 px MedMNIST+ files never sit
  in memory whole.

Nothing here knows about models; ``histotile.predict`` checks the patch size against the card.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import DatasetError, InputNotFoundError
from histotile.items import item_format, item_kind

SPLITS = ("train", "val", "test")


def is_archive(path: str | Path) -> bool:
    """True for the file types :func:`open_archive` reads (by extension, :mod:`histotile.items`)."""
    return item_kind(path) == "archive"


@dataclass
class PatchArchive:
    """An open archive of N square RGB patches (see the module docstring)."""

    path: Path
    kind: str  # "pcam-h5" | "medmnist-npz"
    length: int
    patch_shape: tuple[int, ...]  # (P, P, 3) or (P, P) for grey MedMNIST sets
    labels: np.ndarray | None = field(default=None, repr=False)  # (N,) int64
    coords: np.ndarray | None = field(default=None, repr=False)  # (N, 2) level-0 x, y
    split: str | None = None
    labels_source: str | None = None
    _reader: Any = field(default=None, repr=False)
    _closers: list[Any] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return self.length

    @property
    def patch_size(self) -> int:
        return int(self.patch_shape[0])

    def iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(idx int64 (b,), uint8 (b, P, P, 3))`` in archive order."""
        for start, block in self._reader(batch_size):
            block = np.asarray(block)
            if block.dtype != np.uint8:
                raise DatasetError(f"patches are {block.dtype}, not uint8",
                                   "store RGB patches as uint8", subject=str(self.path))
            if block.ndim == 3:
                block = np.repeat(block[..., None], 3, axis=3)
            yield np.arange(start, start + len(block), dtype=np.int64), np.ascontiguousarray(block)

    def close(self) -> None:
        for closer in self._closers:
            closer.close()
        self._closers.clear()

    def __enter__(self) -> PatchArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_archive(path: str | Path, split: str = "test") -> PatchArchive:
    """Open a PCam HDF5 or MedMNIST npz archive (:class:`DatasetError` on a bad layout)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError("no such file", "check the path", subject=str(path))
    fmt = item_format(path)
    if fmt == "medmnist-npz":
        return _open_npz(path, split)
    if fmt == "pcam-h5":
        return _open_h5(path)
    raise DatasetError("not a patch archive", "use a PCam .h5 or a MedMNIST .npz",
                       subject=str(path))


# --------------------------------------------------------------------------- PCam HDF5
def _labels_1d(values: np.ndarray, n: int, source: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.shape[0] != n:
        raise DatasetError(f"{arr.shape[0]} labels for {n} patches",
                           "labels must have one value per patch", subject=source)
    return arr.astype(np.int64)


def _open_h5(path: Path) -> PatchArchive:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"not a readable HDF5 file ({exc})", "re-copy the file",
                           subject=str(path)) from None
    try:
        if "x" not in f:
            raise DatasetError(f"no dataset 'x' (has: {', '.join(sorted(f.keys())) or 'none'})",
                               "PCam layout: x uint8 (N, P, P, 3)", subject=str(path))
        x = f["x"]
        if x.ndim != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
            raise DatasetError(f"x has shape {x.shape}, not (N, P, P, 3)",
                               "PCam layout: x uint8 (N, P, P, 3)", subject=str(path))
        n = int(x.shape[0])
        labels, source = None, None
        if "y" in f:
            labels, source = _labels_1d(f["y"][()], n, str(path)), str(path)
        else:
            sibling = _sibling_y(path)
            if sibling is not None:
                with h5py.File(sibling, "r") as fy:
                    if "y" in fy:
                        labels, source = _labels_1d(fy["y"][()], n, str(sibling)), str(sibling)
        coords = None
        if "coords" in f:
            coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(n, -1)[:, :2]
    except BaseException:
        f.close()
        raise

    def reader(batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        # read whole HDF5 chunks' worth of rows at a time
        for start in range(0, n, batch_size):
            yield start, x[start:start + batch_size]

    return PatchArchive(path=path, kind="pcam-h5", length=n, patch_shape=tuple(x.shape[1:]),
                        labels=labels, coords=coords, labels_source=source,
                        _reader=reader, _closers=[f])


def _sibling_y(path: Path) -> Path | None:
    stem = path.stem
    if "_x" not in stem:
        return None
    head, _, tail = stem.rpartition("_x")
    candidate = path.with_name(f"{head}_y{tail}{path.suffix}")
    return candidate if candidate.is_file() else None


# --------------------------------------------------------------------------- MedMNIST npz
def _open_npz(path: Path, split: str) -> PatchArchive:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}", f"use --split {'|'.join(SPLITS)}",
                           subject=str(path))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"not a readable .npz file ({exc})", "re-copy the file",
                           subject=str(path)) from None
    try:
        members = {Path(n).stem: n for n in zf.namelist() if n.endswith(".npy")}
        key = f"{split}_images"
        if key not in members:
            splits = sorted({k.rsplit("_", 1)[0] for k in members if k.endswith("_images")})
            raise DatasetError(
                f"no split {split!r} in this npz (has: {', '.join(splits) or 'none'})",
                f"pass --split {splits[0] if splits else 'test'}", subject=str(path))
        shape, dtype, fortran = _npy_header(zf, members[key])
        if len(shape) not in (3, 4) or shape[1] != shape[2] or (len(shape) == 4 and
                                                                 shape[3] != 3):
            raise DatasetError(f"{key} has shape {shape}, not (N, P, P[, 3])",
                               "MedMNIST layout: <split>_images (N, P, P, 3)", subject=str(path))
        if dtype != np.uint8 or fortran:
            raise DatasetError(f"{key} is {dtype}{' (Fortran order)' if fortran else ''}",
                               "MedMNIST layout: C-ordered uint8 images", subject=str(path))
        labels, source = None, None
        lkey = f"{split}_labels"
        if lkey in members:
            with zf.open(members[lkey]) as fh:
                labels = _labels_1d(np.lib.format.read_array(fh, allow_pickle=False),
                                    shape[0], f"{path}:{lkey}")
            source = f"{path}:{lkey}"
    except BaseException:
        zf.close()
        raise
    n = int(shape[0])
    per = int(np.prod(shape[1:]))

    def reader(batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        with zf.open(members[key]) as fh:
            _header(fh)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                buf = fh.read(count * per)
                if len(buf) != count * per:
                    raise DatasetError(f"{key} is truncated at patch {start}",
                                       "re-download the file", subject=str(path))
                yield start, np.frombuffer(buf, np.uint8).reshape(count, *shape[1:])

    return PatchArchive(path=path, kind="medmnist-npz", length=n, patch_shape=tuple(shape[1:]),
                        labels=labels, split=split, labels_source=source,
                        _reader=reader, _closers=[zf])


def _header(fh: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Read the ``.npy`` magic and header; the stream is left at the first data byte."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran)


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    with zf.open(member) as fh:
        return _header(fh)
