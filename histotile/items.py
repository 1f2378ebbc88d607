"""The item vocabulary: which files are slides, patch archives or lists, and how outputs are named.

One table, used by folder discovery (:mod:`histotile.batch.inputs`), the slide reader's
suffix check (:func:`histotile.slide.open_slide`) and archive opening
(:func:`histotile.archives.open_archive`):

=================================================  =========  ==============================
extension (case-insensitive, longest match wins)   kind       opened by (format)
=================================================  =========  ==============================
.svs .ndpi .mrxs .scn .bif .vms .vmu .svslide      slide      ``slide`` (OpenSlide/TiffSlide)
.tif .tiff .ome.tif .ome.tiff .qptiff .btf .dcm    slide      ``slide``
.vsi .czi (Olympus/Evident VSI, Zeiss CZI)         slide      ``slide`` (slideio, ``[formats]``)
a folder holding ``*.dcm`` (a DICOM WSI series)    slide      ``slide``
.h5 .hdf5 .he5                                     archive    ``pcam-h5``
.npz                                               archive    ``medmnist-npz``
.txt .csv .lst                                     list       one input path per line/row
=================================================  =========  ==============================

Output names (*stems*) come from the absolute, normalised path (so ``.`` and ``x.dcm`` given
relative to a DICOM series folder are named after that folder), never empty, and equal for
``tile`` and ``predict``. :func:`item_stems` makes them unique within a run, deterministically:
the first of equal stems in sorted absolute-path order keeps the name, the others get ``-2``,
``-3``... Symbolic links are not followed for naming (a link named ``case-7.svs`` gives
``case-7``).

Nothing here opens a file: this module sits below the readers and the batch layer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from histotile.errors import InvalidArgumentError

ItemKind = Literal["slide", "archive", "list"]

#: extension -> (kind, format). Multi-part extensions are matched before their last part.
ITEM_TABLE: dict[str, tuple[ItemKind, str]] = {
    **{ext: ("slide", "slide") for ext in (
        ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".tif", ".tiff",
        ".ome.tif", ".ome.tiff", ".qptiff", ".btf", ".dcm", ".vsi", ".czi")},
    ".h5": ("archive", "pcam-h5"),
    ".hdf5": ("archive", "pcam-h5"),
    ".he5": ("archive", "pcam-h5"),
    ".npz": ("archive", "medmnist-npz"),
    ".txt": ("list", "list"),
    ".csv": ("list", "list"),
    ".lst": ("list", "list"),
}
DICOM_SUFFIX = ".dcm"
#: Longest first, so ``x.ome.tiff`` matches ``.ome.tiff`` before ``.tiff``.
_BY_LENGTH = sorted(ITEM_TABLE, key=len, reverse=True)
#: Output names a batch folder uses for itself (a stem equal to one gets ``-item`` appended).
RESERVED_STEMS = re.compile(r"logs|manifest.*\.csv", re.IGNORECASE)


def extensions(kind: ItemKind) -> tuple[str, ...]:
    """The extensions of one kind, table order."""
    return tuple(ext for ext, (k, _) in ITEM_TABLE.items() if k == kind)


def item_suffix(path: str | os.PathLike[str]) -> str:
    """The table extension ``path`` ends with (lower case, e.g. ``.ome.tiff``), or ``""``."""
    name = os.path.basename(os.fspath(path)).lower()
    for ext in _BY_LENGTH:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def is_dicom_folder(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and any(c.suffix.lower() == DICOM_SUFFIX for c in p.iterdir()
                              if c.is_file())


def item_kind(path: str | os.PathLike[str]) -> ItemKind | None:
    """``slide``, ``archive`` or ``list`` by extension (a DICOM series folder is a slide)."""
    ext = item_suffix(path)
    if ext:
        return ITEM_TABLE[ext][0]
    if os.path.isdir(path) and is_dicom_folder(path):
        return "slide"
    return None


def item_format(path: str | os.PathLike[str]) -> str | None:
    """The opener's format name (``slide``, ``pcam-h5``, ``medmnist-npz``...) or None."""
    ext = item_suffix(path)
    if ext:
        return ITEM_TABLE[ext][1]
    return "slide" if item_kind(path) == "slide" else None


def item_stem(path: str | os.PathLike[str]) -> str:
    """Output name of one item (see the module docstring); refuses a path with no name.

    A DICOM file or series folder is named after its folder; other files lose their table
    extension (``x.ome.tiff`` -> ``x``) or, for unknown ones, their last suffix.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    ext = item_suffix(p)
    if ext == DICOM_SUFFIX:
        stem = p.parent.name
    elif p.is_dir():
        stem = p.name
    elif ext:
        stem = p.name[: -len(ext)]
    else:
        stem = p.stem
    stem = stem.lstrip(".").strip()
    if not stem:
        raise InvalidArgumentError(
            "cannot derive an output name from this path",
            hint="give the slide by a path with a file or folder name", subject=os.fspath(path))
    if RESERVED_STEMS.fullmatch(stem):
        stem += "-item"
    return stem


def item_stems(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One unique output name per item (case-insensitive), in input order.

    Equal stems are numbered in sorted absolute-path order: ``s``, ``s-2``, ``s-3``, skipping
    names another item already has, so the names depend on the set of items, not their order.
    """
    stems = [item_stem(p) for p in paths]
    keys = [os.path.normpath(os.path.abspath(os.fspath(p))) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        groups.setdefault(s.lower(), []).append(i)
    used = {s.lower() for s in stems}
    out = list(stems)
    for base, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        ordered = sorted(members, key=lambda i: keys[i])
        n = 1
        for i in ordered[1:]:
            n += 1
            while f"{base}-{n}" in used:
                n += 1
            out[i] = f"{stems[i]}-{n}"
            used.add(f"{base}-{n}")
    return out
