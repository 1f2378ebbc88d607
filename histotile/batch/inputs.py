"""Inputs of a multi-item command: files, folders, globs and list files -> a fixed item list.

Which files are items is decided by :mod:`histotile.items` (one table for every command).
Folders and globs expand sorted and recursively; list files (``.txt`` one path per line with ``#``
comments, ``.csv`` with a path/slide column) keep their order; the first occurrence of a duplicate
wins (two files of one DICOM series are one slide). A path that does not exist -- named on the
command line or in a list -- is kept as an item, so the run records it as failed and the others
still run; only when *no* input exists at all is the call refused up front.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Collection, Iterable
from pathlib import Path

from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.items import DICOM_SUFFIX, ItemKind, extensions, item_kind, item_suffix

LIST_COLUMNS = ("path", "slide", "filename", "file")
RUN_JSON = "run.json"
DEFAULT_KINDS: tuple[ItemKind, ...] = ("slide", "archive")


def has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def scan_folder(folder: Path, kinds: Collection[ItemKind] = DEFAULT_KINDS) -> list[Path]:
    """Items inside ``folder`` (recursive, sorted): one per file, one per DICOM folder.

    Hidden entries, MIRAX data folders (``x/`` beside ``x.mrxs``) and histotile output folders
    (holding a ``run.json``) are not entered.
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        mrxs = {n[: -len(".mrxs")] for n in files if n.lower().endswith(".mrxs")}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in mrxs
                         and not (here / d / RUN_JSON).exists())
        visible = sorted(n for n in files if not n.startswith("."))
        dcm = [n for n in visible if n.lower().endswith(DICOM_SUFFIX)]
        if dcm and "slide" in kinds:
            found.append(here / dcm[0])  # a DICOM WSI is a folder: any one file opens it
        for name in visible:
            if name.lower().endswith(DICOM_SUFFIX):
                continue
            if item_kind(name) in kinds:
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_list_file(path: Path) -> list[Path]:
    """Paths listed in a .txt/.lst (one per line, ``#`` comments) or .csv (a path/slide column).

    Relative entries are relative to the list file's folder. Order is kept.
    """
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        col = next((cols[c] for c in LIST_COLUMNS if c in cols), None)
        if col is None:
            raise InvalidArgumentError(
                f"no column named {' or '.join(LIST_COLUMNS[:2])} (columns: {list(cols)})",
                hint="name the column of slide paths 'path' or 'slide'", subject=str(path))
        entries = [(row.get(col) or "").strip() for row in reader]
    else:
        entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def _expand_one(text: str, kinds: Collection[ItemKind]) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_dir():
        return scan_folder(path, kinds)
    if path.is_file():
        if item_kind(path) == "list":
            return read_list_file(path)
        return [path]
    if has_glob(text):
        out: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
            m = Path(match)
            if m.is_dir():
                out.extend(scan_folder(m, kinds))
            elif m.is_file() and item_kind(m) in kinds:
                out.append(m)
        return out or [path]  # a glob matching nothing is recorded like a missing file
    return [path]  # missing: recorded as failed by the run, the others still run


def expand_inputs(inputs: Iterable[str | os.PathLike[str]],
                  kinds: Collection[ItemKind] = DEFAULT_KINDS) -> list[Path]:
    """Expand files, folders, globs and list files into a deterministic item list.

    ``kinds``: which item kinds a folder or glob contributes (``tile`` takes slides only).
    Missing paths stay in the list (see the module docstring). Raises
    :class:`InputNotFoundError` when no input exists at all or nothing is found.
    """
    items: list[Path] = []
    seen: set[str] = set()
    texts = [os.fspath(i) for i in inputs]
    for text in texts:
        if not text.strip():  # e.g. "$(cmd)" that printed nothing: never expand to the cwd
            raise InputNotFoundError("empty input path", hint="name a slide, folder, glob or "
                                     "list file", subject="''")
        for item in _expand_one(text, kinds):
            key = os.path.normpath(os.path.abspath(item))
            if item_suffix(item) == DICOM_SUFFIX:  # any file of a series is the series
                key = os.path.dirname(key)
            if key not in seen:
                seen.add(key)
                items.append(item)
    if items and not any(os.path.exists(i) for i in items):
        missing = items[0]
        what = ("the pattern matches no slide" if has_glob(os.fspath(missing))
                else "no such file or folder")
        more = f" (nor do the other {len(items) - 1} inputs exist)" if len(items) > 1 else ""
        raise InputNotFoundError(what + more, hint="check the path", subject=str(missing))
    if not items:
        known = " ".join(e for k in kinds for e in extensions(k))
        raise InputNotFoundError("no slide found", hint="known extensions: " + known,
                                 subject=" ".join(texts) or "inputs")
    return items
