"""What a batch run records: per-item results, the manifest, the per-item state record.

* :class:`ItemResult` — one manifest row: ``done`` (computed now), ``skipped`` (finished before,
  same settings), ``busy`` (another run holds the item's lock: not computed here, not success)
  or ``failed`` (with a one-line reason).
* ``OUT/manifest.csv`` (``manifest-I-of-N.csv`` for a shard) — every item of the run.
* ``OUT/.state/<stem>.json`` — a small record per item, written only by the process holding the
  item's lock: ``status`` (``running``, then ``done`` or ``failed``), ``reason``, ``attempts``
  (computations started), host, pid, times. A ``running`` record whose process is gone shows a
  killed attempt; the next run takes the item over and counts one more attempt.

Every file here is written through :func:`atomic_write_text` (unique temporary name in the same
folder, fsync, rename; the temporary file is removed on any failure, so a full disk leaves no
``.part`` file behind).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histotile import fileio
from histotile.errors import HistotileError

MANIFEST_FIELDS = ("slide", "status", "error", "patches", "seconds", "output")
STATUSES = ("done", "skipped", "busy", "failed")
STATE_DIR = ".state"
EXIT_FAILED = 1
EXIT_BUSY = 75  # EX_TEMPFAIL: nothing failed, but some items were left to another run


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing, empty, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a unique temporary file (created with the user's
    umask), fsync and rename; the temporary file never outlives a failure."""
    return fileio.write_text(path, text)


def error_line(exc: BaseException) -> str:
    """One line for the manifest: HistotileError.one_line(), else ``Type: message``."""
    if isinstance(exc, HistotileError):
        text = exc.one_line()
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        text = (f"no space left on device ({exc.filename or 'output folder'}) (free space and "
                "run the command again: finished items are kept)")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


# --------------------------------------------------------------------------- results

@dataclass
class ItemResult:
    """One manifest row."""

    slide: str
    status: str  # done | skipped | busy | failed
    error: str = ""
    patches: int | None = None
    seconds: float = 0.0
    output: str = ""

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = f"{self.seconds:.2f}"
        d["patches"] = "" if self.patches is None else self.patches
        return d


@dataclass
class BatchSummary:
    """Results of a batch, one :class:`ItemResult` per item, in item order."""

    results: list[ItemResult] = field(default_factory=list)
    manifest: Path | None = None
    shard: tuple[int, int] | None = None

    def _with(self, status: str) -> list[ItemResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> list[ItemResult]:
        return self._with("done")

    @property
    def skipped(self) -> list[ItemResult]:
        return self._with("skipped")

    @property
    def busy(self) -> list[ItemResult]:
        return self._with("busy")

    @property
    def failed(self) -> list[ItemResult]:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        """0 when every item is finished; 1 when one failed; 75 when none failed but some
        were left busy in another run (run the command again once that run has ended)."""
        if self.failed:
            return EXIT_FAILED
        return EXIT_BUSY if self.busy else 0

    def table(self, messages: bool = True) -> str:
        return summary_table(self.results, messages=messages)

    def busy_line(self) -> str | None:
        """The closing line of a run that left items to another run, else None."""
        return busy_line(self.results)


def summary_table(results: Sequence[ItemResult], max_listed: int = 20,
                  messages: bool = True) -> str:
    """A short plain-text summary: counts, then one line per failed or busy item (its name
    only when ``messages`` is false: the errors were said as they happened)."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    total_s = sum(r.seconds for r in results)
    patches = sum(r.patches or 0 for r in results if r.status == "done")
    lines = [f"{'status':<8} {'items':>6}"]
    lines += [f"{s:<8} {counts[s]:>6}" for s in STATUSES]
    lines.append(f"{'total':<8} {len(results):>6}   {total_s:.1f} s, {patches} patches computed")
    listed = [r for r in results if r.status in ("failed", "busy")]
    for r in listed[:max_listed]:
        lines.append(f"{r.status}: {Path(r.slide).name}"
                     + (f": {r.error}" if messages or r.status != "failed" else ""))
    if len(listed) > max_listed:
        lines.append(f"... and {len(listed) - max_listed} more (see the manifest)")
    return "\n".join(lines)


def busy_line(results: Sequence[ItemResult]) -> str | None:
    """The closing line of a run that left items to another run, else None."""
    busy = [r for r in results if r.status == "busy"]
    if not busy:
        return None
    return (f"{len(busy)} of {len(results)} items are being computed by another run "
            f"({busy[0].error}{', ...' if len(busy) > 1 else ''}): they are not done here; "
            f"run the command again once that run has ended (exit code {EXIT_BUSY})")


def manifest_name(shard: tuple[int, int] | None) -> str:
    return "manifest.csv" if shard is None else f"manifest-{shard[0]}-of-{shard[1]}.csv"


def write_manifest(path: Path, results: Iterable[ItemResult]) -> Path:
    """Write the manifest CSV atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(r.row())
    return atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- state record

def state_path(out_dir: Path, stem: str) -> Path:
    return out_dir / STATE_DIR / f"{stem}.json"


def read_state(out_dir: Path, stem: str) -> dict[str, Any]:
    return read_json(state_path(out_dir, stem)) or {}


def write_state(out_dir: Path, stem: str, item: str, status: str, reason: str = "",
                new_attempt: bool = False) -> dict[str, Any]:
    """Record ``status`` for ``stem`` (call only while holding its lock)."""
    old = read_state(out_dir, stem)
    attempts = int(old.get("attempts") or 0) + (1 if new_attempt else 0)
    record = {"item": item, "stem": stem, "status": status, "reason": reason,
              "attempts": attempts, "host": socket.gethostname(), "pid": os.getpid(),
              "started": now() if new_attempt else old.get("started"), "updated": now()}
    path = state_path(out_dir, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record
