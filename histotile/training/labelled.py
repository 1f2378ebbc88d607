"""Labelled tile archives (``histotile tile --labels``) as one dataset, split by slide.

Each archive holds ``x``, ``y`` ((N, 1, 1, 1) uint8, PatchCamelyon's layout) and the attributes
``class_names`` (JSON list: what ``y`` indexes) and ``slide_name``. Several archives (a folder of
them, one per slide) are read as one set: their class lists are merged by name (sorted) and
every ``y`` is mapped onto the merged list. The validation split holds whole slides out
(:func:`split_by_slide`): patches of one slide are never on both sides, since neighbouring
patches of a slide look alike and would flatter the validation figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histotile.errors import DatasetError


@dataclass
class LabelledArchives:
    """What the archives hold (no pixels): per archive its path, patch count and merged labels."""

    paths: list[Path]
    counts: list[int]
    labels: np.ndarray  # (N,) int64 into class_names, archives concatenated in order
    slides: np.ndarray  # (N,) str: the slide of each patch
    class_names: list[str]
    patch_size: int
    attrs: dict


def is_labelled(path: Path) -> bool:
    """Whether ``path`` is an HDF5 archive written by ``histotile tile --labels``."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return "y" in h5 and "class_names" in h5.attrs and "x" in h5
    except OSError:
        return False


def labelled_in(folder: Path) -> list[Path]:
    """The labelled archives of ``folder`` (sorted; empty when it holds none)."""
    return [p for p in sorted(folder.glob("*.h5")) if is_labelled(p)]


def read_labelled(paths: list[Path]) -> LabelledArchives:
    """Labels, slides and the merged class list of ``paths`` (see the module docstring)."""
    import h5py

    parts = []
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                names = json.loads(str(h5.attrs["class_names"]))
                y = np.asarray(h5["y"]).reshape(-1).astype(np.int64)
                shape = h5["x"].shape
                slide = str(h5.attrs.get("slide_name", path.stem))
                attrs = dict(h5.attrs)
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"cannot read a labelled archive ({exc})",
                               "give archives written by 'histotile tile --labels'",
                               subject=str(path)) from None
        if len(y) != shape[0] or (len(y) and y.max() >= len(names)):
            raise DatasetError(f"y ({len(y)} labels) does not match x ({shape[0]} patches) or "
                               "class_names", "tile the slide again", subject=str(path))
        parts.append((path, names, y, shape, slide, attrs))
    if not parts:
        raise DatasetError("no labelled archive", "tile slides with --labels first")
    sizes = {p[3][1] for p in parts}
    if len(sizes) > 1:
        raise DatasetError(f"the archives have different patch sizes {sorted(sizes)}",
                           "tile every slide with the same --patch-size",
                           subject=str(parts[0][0].parent))
    classes = sorted({n for p in parts for n in p[1]})
    labels = [np.asarray([classes.index(n) for n in p[1]], np.int64)[p[2]]
              if len(p[2]) else np.zeros(0, np.int64) for p in parts]
    slides = [np.full(len(p[2]), p[4], dtype=object) for p in parts]
    return LabelledArchives([p[0] for p in parts], [len(p[2]) for p in parts],
                            np.concatenate(labels), np.concatenate(slides).astype(str), classes,
                            int(sizes.pop()), parts[0][5])


def split_by_slide(slides: np.ndarray, fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train indices, val indices, the held-out slides): about ``fraction`` of the slides (at
    least one, never all) go to validation, whole (scikit-learn ``GroupShuffleSplit``)."""
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {fraction}",
                           "use e.g. --val-fraction 0.2")
    names = sorted(set(slides.tolist()))
    if len(names) < 2:
        raise DatasetError(f"the labelled patches come from {len(names)} slide; the validation "
                           "split holds whole slides out", "tile and label at least 2 slides")
    groups = np.asarray([names.index(s) for s in slides.tolist()])
    try:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        tr, va = next(splitter.split(np.zeros(len(groups)), groups=groups))
    except ValueError as exc:
        raise DatasetError(f"cannot hold out {fraction:g} of {len(names)} slides ({exc})",
                           "use another --val-fraction or more slides") from None
    held = sorted({names[g] for g in groups[va]})
    return np.sort(tr), np.sort(va), held
