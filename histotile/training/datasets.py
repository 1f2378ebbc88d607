"""Training/evaluation data sources, all yielding ``(uint8 HWC patch, int label)``.

* ``pathmnist`` — MedMNIST ``pathmnist.npz`` / ``pathmnist_{64,128,224}.npz`` (or any ``.npz``
  with ``train_images``/``train_labels``, e.g. a subset with only the train split);
* ``pcam`` — the PatchCamelyon HDF5 files (a folder, or an ``*_x.h5`` file with its ``*_y.h5``),
  read lazily: each DataLoader worker opens its own h5py handle;
* a Kaggle "Histopathologic Cancer Detection" folder (``train/<id>.tif`` + ``train_labels.csv``);
* an image folder (one sub-folder per class);
* an HDF5 patch archive written by ``histotile tile`` (``x``) plus a labels CSV (``--labels``);
* archives written by ``histotile tile --labels`` (one, or a folder of them): ``y``, class names
  and slide names inside; validation holds whole slides out (:mod:`histotile.training.labelled`).

Validation uses the official split when there is one, else a stratified ``val_fraction`` of train.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histotile.download import cache_dir
from histotile.errors import DatasetError
from histotile.palette import PATHMNIST_COLOURS, PCAM_COLOURS
from histotile.resample import resize_patch
from histotile.training.download_data import download_pathmnist, download_pcam, pathmnist_filename
from histotile.training.labelled import is_labelled, labelled_in, read_labelled, split_by_slide

log = logging.getLogger(__name__)

PATHMNIST_CLASSES = list(PATHMNIST_COLOURS.items())  # (name, colour), label order
PCAM_CLASSES = list(PCAM_COLOURS.items())
PCAM_MPP = 0.972  # Camelyon16 level 0 (0.243 µm/px) downsampled 4× (PCam paper)
PATHMNIST_MPP_28 = 4.0  # NCT-CRC-HE-100K 224 px at 0.5 µm/px shrunk to 28 px
PCAM_FILE = "camelyonpatch_level_2_split_{split}_{xy}.h5"
PCAM_SPLITS = {"train": "train", "val": "valid", "test": "test"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# --------------------------------------------------------------------------- patch sets
class PatchSet:
    """Base: ``len``, ``[i] -> (uint8 (P,P,3), int)``, ``labels`` (N,) int64; resize to ``size``."""

    labels: np.ndarray
    size: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        img = self.read_image(int(i))
        if self.size is not None and img.shape[0] != self.size:
            img = resize_patch(img, self.size)
        return img, int(self.labels[i])

    def read_image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> Subset:
        return Subset(self, np.asarray(indices, dtype=np.int64))


class Subset(PatchSet):
    def __init__(self, base: PatchSet, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices
        self.labels = base.labels[indices]
        self.size = base.size

    def read_image(self, i: int) -> np.ndarray:
        return self.base.read_image(int(self.indices[i]))


class ArrayPatches(PatchSet):
    """Patches held in memory (MedMNIST npz arrays)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int | None = None) -> None:
        self.images, self.labels, self.size = images, labels.astype(np.int64).reshape(-1), size

    def read_image(self, i: int) -> np.ndarray:
        return self.images[i]


class H5Patches(PatchSet):
    """Patches read lazily from an HDF5 dataset ``key``; the handle is opened per process."""

    def __init__(self, path: Path, labels: np.ndarray, key: str = "x",
                 size: int | None = None) -> None:
        self.path, self.key, self.size = Path(path), key, size
        self.labels = labels.astype(np.int64).reshape(-1)
        self._h5: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_h5": None}  # never send an open handle to a worker

    def read_image(self, i: int) -> np.ndarray:
        if self._h5 is None or self._pid != os.getpid():  # a forked worker opens its own
            import h5py

            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return np.asarray(self._h5[self.key][i])


class ConcatPatches(PatchSet):
    """Several patch sets one after the other (the archives of several slides)."""

    def __init__(self, parts: list[PatchSet], labels: np.ndarray) -> None:
        self.parts, self.labels, self.size = parts, np.asarray(labels, np.int64), parts[0].size
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def read_image(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k].read_image(i - int(self.starts[k]))


class FilePatches(PatchSet):
    """One image file per patch (Kaggle folder, image folder)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int | None = None) -> None:
        self.paths, self.labels, self.size = paths, np.asarray(labels, np.int64), size

    def read_image(self, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[i]) as im:
                return np.array(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image ({exc})", "replace or remove the file",
                               subject=str(self.paths[i])) from None


# --------------------------------------------------------------------------- splits
@dataclass
class DatasetSplits:
    """A dataset ready for training: splits, classes, geometry and provenance."""

    name: str
    train: PatchSet
    val: PatchSet
    test: PatchSet | None
    class_names: list[str]
    colors: list[tuple[int, int, int]]
    patch_size: int
    mpp: float | None
    files: list[Path] = field(default_factory=list)
    val_source: str = "official"
    description: str = ""

    def split(self, name: str) -> PatchSet:
        sets = {"train": self.train, "val": self.val, "test": self.test}
        if name not in sets:
            raise DatasetError(f"unknown split {name!r}", "use train, val or test")
        chosen = sets[name]
        if chosen is None:
            raise DatasetError(f"{self.name} has no {name} split",
                               "evaluate on --split val, or give data that has a test split")
        return chosen


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train_idx, val_idx) with ``fraction`` of each class held out (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {fraction}",
                           "use e.g. --val-fraction 0.2")
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    try:
        tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    except ValueError as exc:
        raise DatasetError(f"cannot hold out {fraction:g} of {len(labels)} patches ({exc})",
                           "use more data or another --val-fraction") from None
    return np.sort(tr), np.sort(va)


def _with_val(train: PatchSet, val_fraction: float, seed: int) -> tuple[PatchSet, PatchSet, str]:
    tr, va = stratified_split(train.labels, val_fraction, seed)
    return train.subset(tr), train.subset(va), f"stratified {val_fraction:g} of train (seed {seed})"


def _train_val(train: PatchSet, val: PatchSet | None, val_fraction: float,
               seed: int) -> tuple[PatchSet, PatchSet, str]:
    """The data's own validation split, else a stratified hold-out of train."""
    if val is None:
        return _with_val(train, val_fraction, seed)
    return train, val, "official"


# --------------------------------------------------------------------------- entry point
def load_dataset(dataset: str | Path, data_dir: str | Path | None = None, *,
                 download: bool = False, size: int | None = None, val_fraction: float = 0.1,
                 seed: int = 0, labels: str | Path | None = None,
                 mpp: float | None = None) -> DatasetSplits:
    """Open ``dataset`` (``pathmnist``, ``pcam`` or a path) as train/val/test patch sets."""
    name = str(dataset)
    if name.lower() == "pathmnist":
        return load_pathmnist(_find_pathmnist(data_dir, size, download), size, val_fraction, seed)
    if name.lower() == "pcam":
        folder = Path(data_dir) if data_dir else _default_dir("pcam")
        if download:
            download_pcam(folder)
        return load_pcam(folder, size, val_fraction, seed)
    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetError("no such dataset or path",
                           "use pathmnist, pcam, a .npz/.h5 file or a folder", subject=name)
    if path.suffix == ".npz":
        return load_pathmnist(path, size, val_fraction, seed)
    if path.suffix in {".h5", ".hdf5"}:
        if labels is None and is_labelled(path):
            return load_labelled([path], size, val_fraction, seed, mpp)
        if labels is not None or not re.search(r"_x\.h5$", path.name):
            return load_archive(path, labels, size, val_fraction, seed, mpp)
        return load_pcam(path, size, val_fraction, seed)
    if path.is_dir():
        if (path / "train_labels.csv").is_file():
            return load_kaggle(path, size, val_fraction, seed)
        if list(path.glob("*_x.h5")):
            return load_pcam(path, size, val_fraction, seed)
        if archives := labelled_in(path):
            return load_labelled(archives, size, val_fraction, seed, mpp)
        return load_image_folder(path, size, val_fraction, seed, mpp)
    raise DatasetError("unrecognised dataset file", "use a .npz, an .h5 or a folder", subject=name)


def _default_dir(name: str) -> Path:
    return cache_dir("data", name)


# --------------------------------------------------------------------------- PathMNIST
def _find_pathmnist(data_dir: str | Path | None, size: int | None, download: bool) -> Path:
    folder = Path(data_dir) if data_dir else _default_dir("medmnist")
    wanted = pathmnist_filename(size)
    if (folder / wanted).is_file():
        return folder / wanted
    if download:
        return download_pathmnist(folder, size)
    # a subset saved under another name, e.g. pathmnist_train_first1000.npz (28 px only)
    others = {f"pathmnist_{s}" for s in (64, 128, 224)}
    stem = wanted.removesuffix(".npz")
    cands = sorted(p for p in folder.glob("pathmnist*.npz")
                   if (p.name.startswith(stem + "_") if stem != "pathmnist"
                       else not any(p.name.startswith(o) for o in others)))
    if len(cands) == 1:
        log.info("using %s", cands[0])
        return cands[0]
    raise DatasetError(
        f"{wanted} not found in {folder}",
        f"put {wanted} (MedMNIST, zenodo.org/records/10519652) there, pass --data-dir, "
        "or add --download",
        subject="pathmnist",
    )


def load_pathmnist(path: Path, size: int | None, val_fraction: float,
                   seed: int) -> DatasetSplits:
    """A MedMNIST-layout npz: ``{train,val,test}_{images,labels}`` (val/test optional)."""
    arrays = _read_npz(path)
    if "train_images" not in arrays and "test_images" not in arrays:
        raise DatasetError(f"no train_images/test_images in {path.name} (keys: {sorted(arrays)})",
                           "use a MedMNIST npz file", subject=str(path))
    sets = {s: ArrayPatches(arrays[f"{s}_images"], arrays[f"{s}_labels"])
            for s in ("train", "val", "test") if f"{s}_images" in arrays}
    native = int(next(iter(sets.values())).images.shape[1])
    for s in sets.values():
        s.size = size if size and size != native else None
        if s.images.ndim != 4 or s.images.shape[-1] != 3:
            raise DatasetError(f"images have shape {s.images.shape}, expected (N,H,W,3)",
                               "PathMNIST is RGB; use pathmnist*.npz", subject=str(path))
    if "train" in sets:
        train, val, source = _train_val(sets["train"], sets.get("val"), val_fraction, seed)
    else:
        train, val, source = sets["test"], sets["test"], "test only"
    patch = size or native
    return DatasetSplits(
        name="pathmnist", train=train, val=val, test=sets.get("test"),
        class_names=[c for c, _ in PATHMNIST_CLASSES], colors=[c for _, c in PATHMNIST_CLASSES],
        patch_size=patch, mpp=PATHMNIST_MPP_28 * 28 / patch, files=[path], val_source=source,
        description=f"PathMNIST (MedMNIST v2, CC BY 4.0) {path.name}",
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise DatasetError(f"cannot read {path.name} ({type(exc).__name__}: {exc})",
                           "the file is truncated or corrupt; download it again (--download)",
                           subject=str(path)) from None


# --------------------------------------------------------------------------- PCam HDF5
def _h5_labels(path: Path) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["y"]).reshape(-1)
    except (OSError, KeyError) as exc:
        raise DatasetError(f"cannot read labels 'y' ({exc})",
                           "the file is truncated or not a PCam *_y.h5; download it again",
                           subject=str(path)) from None


def _h5_patches(x_path: Path, y_path: Path, size: int | None) -> H5Patches:
    import h5py

    for p in (x_path, y_path):
        if not p.is_file():
            raise DatasetError(f"missing {p.name}",
                               f"put the PCam files {x_path.name} and {y_path.name} in {p.parent} "
                               "(zenodo.org/records/2546921, gunzipped) or add --download",
                               subject=str(p.parent))
    labels = _h5_labels(y_path)
    try:
        with h5py.File(x_path, "r") as f:
            shape = f["x"].shape
    except (OSError, KeyError) as exc:
        raise DatasetError(f"cannot read images 'x' ({exc})",
                           "the file is truncated or not a PCam *_x.h5; download it again",
                           subject=str(x_path)) from None
    if shape[0] != len(labels) or len(shape) != 4 or shape[-1] != 3:
        raise DatasetError(f"x has shape {shape} but y has {len(labels)} labels",
                           "x must be (N,P,P,3) uint8 with one label per patch",
                           subject=str(x_path))
    native = int(shape[1])
    return H5Patches(x_path, labels, size=size if size and size != native else None)


def load_pcam(where: Path, size: int | None, val_fraction: float, seed: int) -> DatasetSplits:
    """The official split folder, or one ``*_x.h5`` file (its ``*_y.h5`` beside it)."""
    where = Path(where)
    sets: dict[str, H5Patches] = {}
    if where.is_dir():
        for split, tag in PCAM_SPLITS.items():
            x = where / PCAM_FILE.format(split=tag, xy="x")
            if x.is_file() or split == "train":
                sets[split] = _h5_patches(x, where / PCAM_FILE.format(split=tag, xy="y"), size)
        files = [where / PCAM_FILE.format(split=PCAM_SPLITS[s], xy=xy) for s in sets for xy in "xy"]
    else:
        y = where.with_name(re.sub(r"_x\.h5$", "_y.h5", where.name))
        sets["train"] = _h5_patches(where, y, size)
        files = [where, y]
    train, val, source = _train_val(sets["train"], sets.get("val"), val_fraction, seed)
    native = size or int(_first_shape(sets["train"])[0])
    return DatasetSplits(
        name="pcam", train=train, val=val, test=sets.get("test"),
        class_names=[c for c, _ in PCAM_CLASSES], colors=[c for _, c in PCAM_CLASSES],
        patch_size=native, mpp=PCAM_MPP * 96 / native, files=files, val_source=source,
        description=f"PatchCamelyon HDF5 ({where.name}, CC0)",
    )


def _first_shape(ps: PatchSet) -> tuple[int, ...]:
    return tuple(ps.read_image(0).shape) if ps.size is None else (ps.size, ps.size, 3)


# --------------------------------------------------------------------------- Kaggle folder
def load_kaggle(folder: Path, size: int | None, val_fraction: float, seed: int) -> DatasetSplits:
    """Kaggle "Histopathologic Cancer Detection": ``train/<id>.tif`` + ``train_labels.csv``."""
    csv_path = folder / "train_labels.csv"
    rows = _read_csv(csv_path, ("id", "label"))
    paths = [folder / "train" / f"{r['id']}.tif" for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(paths)} images listed in train_labels.csv are "
                           f"missing (first: {missing[0].name})",
                           f"put the Kaggle train/*.tif files in {folder / 'train'}",
                           subject=str(folder))
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    base = FilePatches(paths, labels)
    native = int(base.read_image(0).shape[0])
    base.size = size if size and size != native else None
    train, val, source = _with_val(base, val_fraction, seed)
    patch = size or native
    return DatasetSplits(
        name="pcam-kaggle", train=train, val=val, test=None,
        class_names=[c for c, _ in PCAM_CLASSES], colors=[c for _, c in PCAM_CLASSES],
        patch_size=patch, mpp=PCAM_MPP * 96 / patch, files=[csv_path], val_source=source,
        description="Kaggle Histopathologic Cancer Detection folder (PCam-derived, CC0)",
    )


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetError(f"missing {path.name}", f"put {path.name} in {path.parent}",
                           subject=str(path.parent))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(k not in rows[0] for k in required):
        raise DatasetError(f"{path.name} needs columns {', '.join(required)}",
                           "write a header line with these column names", subject=str(path))
    return rows


# --------------------------------------------------------------------------- image folder
def load_image_folder(folder: Path, size: int | None, val_fraction: float, seed: int,
                      mpp: float | None) -> DatasetSplits:
    """One sub-folder per class (sorted); optional ``train``/``val``/``test`` level above."""
    splits = {s: folder / s for s in ("train", "val", "test") if (folder / s).is_dir()}
    if "train" not in splits:
        splits = {"train": folder}
    sets: dict[str, FilePatches] = {}
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetError("an image folder needs at least two class sub-folders",
                           "arrange images as FOLDER/<class>/<image>.png", subject=str(folder))
    for split, root in splits.items():
        paths, labels = [], []
        for k, cls in enumerate(classes):
            files = sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [k] * len(files)
        if not paths:
            raise DatasetError(f"no images in the class folders of {root}",
                               "put .png/.jpg/.tif images in FOLDER/<class>/", subject=str(root))
        sets[split] = FilePatches(paths, np.array(labels))
    native = int(sets["train"].read_image(0).shape[0])
    for s in sets.values():
        s.size = size if size and size != native else None
    train, val, source = _train_val(sets["train"], sets.get("val"), val_fraction, seed)
    return DatasetSplits(
        name="folder", train=train, val=val, test=sets.get("test"), class_names=classes,
        colors=[_PALETTE[i % len(_PALETTE)] for i in range(len(classes))],
        patch_size=size or native, mpp=mpp, files=[], val_source=source,
        description=f"image folder {folder.name}",
    )


# --------------------------------------------------------------------------- tile archive
def load_archive(path: Path, labels: str | Path | None, size: int | None, val_fraction: float,
                 seed: int, mpp: float | None) -> DatasetSplits:
    """An HDF5 archive (``x`` (N,P,P,3)) with ``y`` inside or a labels CSV (``label`` column,
    optional ``index`` column giving the row in ``x``); string labels become class names."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            shape = f["x"].shape
            inner = np.asarray(f["y"]).reshape(-1) if "y" in f else None
            attrs = dict(f.attrs)
            if "x" in f:
                attrs.update(f["x"].attrs)
    except (OSError, KeyError) as exc:
        raise DatasetError(f"cannot read patches 'x' ({exc})",
                           "give an HDF5 archive written by 'histotile tile'",
                           subject=str(path)) from None
    if labels is not None:
        rows = _read_csv(Path(labels), ("label",))
        index = np.array([int(r.get("index", i)) for i, r in enumerate(rows)], dtype=np.int64)
        raw = [r["label"] for r in rows]
        classes = _class_names(raw)
        values = np.array([int(v) if v.isdigit() else classes.index(_clean(v)) for v in raw])
        files = [path, Path(labels)]
    elif inner is not None:
        index, values = np.arange(len(inner)), inner.astype(np.int64)
        classes, files = [f"class_{i}" for i in range(int(values.max()) + 1)], [path]
    else:
        raise DatasetError("the archive has no labels", "pass --labels labels.csv (column label)",
                           subject=str(path))
    if index.max(initial=-1) >= shape[0]:
        raise DatasetError(f"labels refer to patch {index.max()} but the archive has {shape[0]}",
                           "the labels file belongs to another archive", subject=str(labels))
    native = int(shape[1])
    base = H5Patches(path, np.zeros(shape[0], np.int64), size=size if size and size != native
                     else None).subset(index)
    base.labels = values.astype(np.int64)
    mpp = mpp or _attr_mpp(attrs)
    train, val, source = _with_val(base, val_fraction, seed)
    return DatasetSplits(
        name="archive", train=train, val=val, test=None, class_names=classes,
        colors=[_PALETTE[i % len(_PALETTE)] for i in range(len(classes))],
        patch_size=size or native, mpp=mpp, files=files, val_source=source,
        description=f"patch archive {path.name}",
    )


def load_labelled(paths: list[Path], size: int | None, val_fraction: float, seed: int,
                  mpp: float | None) -> DatasetSplits:
    """Archives of ``histotile tile --labels``: class names from the archives, split by slide."""
    found = read_labelled(paths)
    native = found.patch_size
    parts: list[PatchSet] = [H5Patches(p, np.zeros(n, np.int64), size=size if size and
                                       size != native else None)
                             for p, n in zip(found.paths, found.counts, strict=True)]
    base = ConcatPatches(parts, found.labels)
    tr, va, held = split_by_slide(found.slides, val_fraction, seed)
    n_slides = len(set(found.slides.tolist()))
    return DatasetSplits(
        name="labelled-archives", train=base.subset(tr), val=base.subset(va), test=None,
        class_names=found.class_names,
        colors=[_PALETTE[i % len(_PALETTE)] for i in range(len(found.class_names))],
        patch_size=size or native, mpp=mpp or _attr_mpp(found.attrs), files=found.paths,
        val_source=f"by slide: {len(held)} of {n_slides} slides held out "
                   f"({', '.join(held)}; seed {seed})",
        description=f"{len(found.paths)} labelled tile archive(s) of {n_slides} slides",
    )


def _class_names(raw: list[str]) -> list[str]:
    if all(v.isdigit() for v in raw):
        return [f"class_{i}" for i in range(max(int(v) for v in raw) + 1)]
    return sorted({_clean(v) for v in raw})


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name.strip())


def _attr_mpp(attrs: dict[str, Any]) -> float | None:
    for key in ("effective_mpp", "target_mpp", "mpp"):
        if key in attrs:
            try:
                return float(np.asarray(attrs[key]).reshape(-1)[0])
            except (TypeError, ValueError):
                continue
    return None
