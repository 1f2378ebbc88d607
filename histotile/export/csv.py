"""``predictions.csv``: one row per patch, ``minx,miny,width,height`` (level-0 px),
``prob_<class>``..., ``label`` (the argmax class name): WSInfer's columns plus the argmax; optional
extra measurement columns (e.g. ``gradcam_mean``) follow ``label``; with ``status_column`` a
last ``status`` column says ``ok`` or ``unreadable`` (a patch whose pixels could not be decoded:
empty probabilities and label). Streamed and atomic."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histotile.errors import InputNotFoundError, InvalidArgumentError
from histotile.fileio import AtomicTextWriter
from histotile.units import Level0Side

GEOMETRY_COLUMNS = ["minx", "miny", "width", "height"]
STATUS_OK, STATUS_UNREADABLE = "ok", "unreadable"


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{n}" for n in class_names]


class PredictionsCSVWriter(AtomicTextWriter):
    """Append batches of predictions to ``path`` (written to a temporary file, renamed on close)."""

    def __init__(self, path: str | Path, class_names: Sequence[str],
                 patch_size_level0: Level0Side | None = None,
                 extra_columns: Sequence[str] = (), status_column: bool = False) -> None:
        super().__init__(path)
        self.class_names = list(class_names)
        self.size = patch_size_level0
        self.extra_columns = list(extra_columns)
        self.status_column = status_column
        self._ok = f",{STATUS_OK}" if status_column else ""
        self._fh = open(self.tmp, "w", newline="")  # noqa: SIM115 - closed in close()
        header = GEOMETRY_COLUMNS + prob_columns(self.class_names) + ["label"] \
            + self.extra_columns + (["status"] if status_column else [])
        self._fh.write(",".join(header) + "\n")
        self.rows = 0

    def write(self, coords: np.ndarray, probs: np.ndarray,
              size: Level0Side | np.ndarray | None = None,
              extra: dict[str, np.ndarray] | None = None) -> None:
        """``coords`` (n, 2) level-0 (x, y) top-left; ``probs`` (n, C); ``size`` per patch (or the
        constructor's ``patch_size_level0``); ``extra`` one (n,) array per ``extra_columns``."""
        coords = np.asarray(coords).reshape(-1, 2)
        probs = np.asarray(probs, dtype=np.float64).reshape(len(coords), len(self.class_names))
        size = self.size if size is None else size
        if size is None:
            raise InvalidArgumentError("no patch size for predictions.csv",
                                       "pass patch_size_level0")
        wh = np.broadcast_to(np.asarray(size).reshape(-1, 2) if np.ndim(size) else
                             np.asarray([size, size]), (len(coords), 2))
        labels = np.asarray(self.class_names)[probs.argmax(axis=1)] if len(coords) else []
        more = np.stack([np.asarray((extra or {})[k], np.float64).reshape(-1)
                         for k in self.extra_columns], 1).tolist() if self.extra_columns \
            else [[]] * len(coords)
        lines = []
        for (x, y), (w, h), p, lab, e in zip(coords.tolist(), wh.tolist(), probs.tolist(), labels,
                                             more, strict=True):
            lines.append(f"{_num(x)},{_num(y)},{_num(w)},{_num(h)},"
                         + ",".join(f"{v:.7g}" for v in p) + f",{lab}"
                         + "".join(f",{v:.7g}" for v in e) + self._ok + "\n")
        self._fh.write("".join(lines))
        self.rows += len(coords)

    def write_unreadable(self, coords: np.ndarray) -> None:
        """Rows for patches whose pixels could not be decoded: geometry, empty probabilities,
        label and extras, status ``unreadable`` (needs ``status_column``)."""
        coords = np.asarray(coords).reshape(-1, 2)
        if not self.status_column:
            raise InvalidArgumentError("unreadable rows need the status column",
                                       "create the writer with status_column=True")
        w, h = np.broadcast_to(np.asarray(self.size, np.float64), (2,)).tolist()
        empty = "," * (len(self.class_names) + 1 + len(self.extra_columns))
        self._fh.write("".join(f"{_num(x)},{_num(y)},{_num(w)},{_num(h)}{empty},"
                               f"{STATUS_UNREADABLE}\n" for x, y in coords.tolist()))
        self.rows += len(coords)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


@dataclass
class Predictions:
    """A block of rows of ``predictions.csv``."""

    class_names: list[str]
    coords: np.ndarray  # (n, 2) level-0 x, y (int64 when whole numbers)
    sizes: np.ndarray  # (n, 2) width, height
    probs: np.ndarray  # (n, C) float64 (exactly the written decimals)
    labels: np.ndarray  # (n,) str
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # columns after ``label``

    def __len__(self) -> int:
        return len(self.coords)


def _header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    """Class names (columns after ``label`` are extra measurements: :class:`Predictions`)."""
    header = next(reader, None)
    if not header or header[:4] != GEOMETRY_COLUMNS or "label" not in header:
        raise InvalidArgumentError(f"{path} is not a histotile predictions.csv",
                                   "expected minx,miny,width,height,prob_<class>...,label")
    return [h[len("prob_"):] for h in header[4:header.index("label")]]


def iter_predictions_csv(path: str | Path, chunk_rows: int = 20000) -> Iterator[Predictions]:
    """Read ``predictions.csv`` in blocks of ``chunk_rows`` rows (memory bounded by the block)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"no predictions at {path}", "run histotile predict first")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        names = _header(path, iter([header] if header is not None else []))
        extra = _extra_names(header or [])  # _header refused a missing header
        rows: list[list[str]] = []
        for row in reader:
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield _block(names, rows, extra)
                rows = []
        if rows:
            yield _block(names, rows, extra)


def _extra_names(header: list[str]) -> list[str]:
    """The measurement columns after ``label`` (e.g. ``gradcam_mean``; not ``status``)."""
    return [h for h in header[header.index("label") + 1:] if h != "status"]


def _block(names: list[str], rows: list[list[str]], extra: Sequence[str] = ()) -> Predictions:
    end = 4 + len(names)  # the label column
    rows = [r for r in rows if r[end]]  # unreadable patches have no label (nor probabilities)
    geo = np.asarray([r[:4] for r in rows], dtype=np.float64).reshape(-1, 4)
    if np.all(geo == np.rint(geo)):
        geo = geo.astype(np.int64)
    probs = np.asarray([r[4:end] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    more = {k: np.asarray([r[end + 1 + i] for r in rows], dtype=np.float64)
            for i, k in enumerate(extra)}
    return Predictions(names, geo[:, :2], geo[:, 2:], probs, np.asarray([r[end] for r in rows]),
                       more)


def read_predictions_csv(path: str | Path) -> Predictions:
    """All of ``predictions.csv`` at once (small results; use :func:`iter_predictions_csv` else)."""
    blocks = list(iter_predictions_csv(path))
    if not blocks:
        with open(path, newline="") as fh:
            names = _header(Path(path), csv.reader(fh))
        c = len(names)
        return Predictions(names, np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64),
                           np.zeros((0, c), np.float64), np.zeros(0, str))
    return Predictions(
        blocks[0].class_names,
        np.concatenate([b.coords for b in blocks]), np.concatenate([b.sizes for b in blocks]),
        np.concatenate([b.probs for b in blocks]), np.concatenate([b.labels for b in blocks]),
        {k: np.concatenate([b.extra[k] for b in blocks]) for k in blocks[0].extra},
    )
