"""One item of a batch: skip it when finished, claim it (lock, checks, temporary folder), write
its run record last and move its results into place (see :mod:`histotile.batch.runner`).

:class:`ItemClaim` splits :func:`process_item` into the steps a pipelined run
(:mod:`histotile.batch.pipeline`) spreads over threads: :meth:`ItemClaim.begin` (lock and
checks, in the caller's thread), :meth:`ItemClaim.complete` (run record, commit) and
:meth:`ItemClaim.fail`, then :meth:`ItemClaim.release`, which may run in another thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histotile.batch.inputs import has_glob
from histotile.batch.locks import LOCK_TIMEOUT_S, ItemLock, lock_is_stale, remove_stale_parts
from histotile.batch.state import (
    ItemResult,
    atomic_write_text,
    error_line,
    now,
    read_json,
    write_state,
)
from histotile.errors import HistotileError, InputNotFoundError, InvalidArgumentError
from histotile.items import DICOM_SUFFIX, item_suffix

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
ITEM_PREFIX = "item"  # files layout: process writes item.<suffix>
_TMP_RE = r"\.(?:tmp|old)-{stem}-[0-9a-f]{{8}}"

ProcessFn = Callable[[Path, Path], "dict[str, Any] | None"]
ErrorPolicy = Literal["report", "raise"] | Callable[[Path, ItemResult], None]


class OutputConflictError(HistotileError):
    """An item's output name is taken by something that is not this item's result."""


@dataclass(frozen=True)
class Layout:
    """Where one item's results go (see the module docstring)."""

    kind: Literal["folder", "files"] = "folder"
    primary: str = ""  # files: suffix of the file the manifest points at, e.g. ".h5"

    def run_json(self, out: Path, stem: str) -> Path:
        return out / stem / RUN_JSON if self.kind == "folder" else out / f"{stem}.{RUN_JSON}"

    def output(self, out: Path, stem: str) -> Path:
        return out / stem if self.kind == "folder" else out / f"{stem}{self.primary}"


FOLDER = Layout()


def _norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _source(item: Path) -> str:
    """What an item is, for "is this output mine": its real path (a DICOM file: its series)."""
    real = os.path.realpath(item)
    return os.path.dirname(real) if item_suffix(real) == DICOM_SUFFIX else real


def finished_run(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``folder/run.json`` when it marks a finished run with this fingerprint, else None."""
    return _finished(FOLDER.run_json(folder.parent, folder.name), fingerprint)


def _finished(run_json: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    run = read_json(run_json)
    if run and run.get("status") == "done" and _norm(run.get("fingerprint")) == _norm(fingerprint):
        return run
    return None


def _same_source(run: dict[str, Any], item: Path) -> bool:
    recorded = run.get("source")
    return recorded is None or recorded == _source(item)  # older records lack it


def _patches(info: dict[str, Any]) -> int | None:
    for key in ("patches", "n_patches", "num_patches"):
        value = info.get(key)
        if isinstance(value, int):
            return value
    return None


def _check_existing(out: Path, stem: str, layout: Layout, item: Path, overwrite: bool) -> None:
    """Refuse to replace an output that is not a previous result of this same item."""
    target = layout.output(out, stem)
    run = read_json(layout.run_json(out, stem))
    if run is not None and not _same_source(run, item):
        other = run.get("slide") or run.get("source")
        if not overwrite:
            raise OutputConflictError(
                f"output name {stem!r} already holds the results of {other}",
                hint="use another output folder, or --overwrite to replace them",
                subject=str(item))
    elif run is None and (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputConflictError(
            f"{target} exists and is not a histotile result",
            hint="move it away, use another output folder, or --overwrite to replace it",
            subject=str(item))


def _clean_leftovers(out_dir: Path, stem: str) -> None:
    """Remove ``.tmp-<stem>-*`` / ``.old-<stem>-*`` left by a killed run (lock held)."""
    pattern = re.compile(_TMP_RE.format(stem=re.escape(stem)))
    for entry in out_dir.iterdir():
        if entry.is_dir() and pattern.fullmatch(entry.name):
            log.info("removing leftover %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
    remove_stale_parts(out_dir, stem)


def _commit_folder(tmp: Path, out: Path, stem: str) -> None:
    """Rename ``tmp`` to ``out/stem``; an existing one is moved aside first, then deleted."""
    final = out / stem
    old = None
    if final.exists() or final.is_symlink():
        old = out / f".old-{stem}-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _commit_files(tmp: Path, out: Path, stem: str, layout: Layout) -> None:
    """Move ``tmp/item.<suffix>`` to ``out/<stem>.<suffix>``, the run record last; files of the
    previous result of this item that the new one lacks are removed."""
    run_json = layout.run_json(out, stem)
    previous = read_json(run_json) or {}
    with contextlib.suppress(FileNotFoundError):
        run_json.unlink()  # from here on the item reads as unfinished until the new record
    names = [p.name for p in sorted(tmp.iterdir()) if p.name != RUN_JSON]
    for name in names:
        if not name.startswith(ITEM_PREFIX + "."):
            raise InvalidArgumentError(f"process wrote {name!r}",
                                       hint=f"files-layout processes write {ITEM_PREFIX}.<suffix>")
        os.replace(tmp / name, out / (stem + name[len(ITEM_PREFIX):]))
    kept = {stem + n[len(ITEM_PREFIX):] for n in names}
    for old in previous.get("files") or []:
        if isinstance(old, str) and old not in kept and Path(old).name == old \
                and old.startswith(stem + "."):
            with contextlib.suppress(FileNotFoundError):
                (out / old).unlink()
    os.replace(tmp / RUN_JSON, run_json)
    tmp.rmdir()


def _write_run_json(tmp: Path, item: Path, out: Path, stem: str, layout: Layout,
                    info: dict[str, Any], fingerprint: dict[str, Any], started: str,
                    seconds: float) -> None:
    from histotile import __version__

    run = {**info, "slide": str(item), "source": _source(item),
           "output": str(layout.output(out, stem)), "fingerprint": fingerprint,
           "status": "done", "started": started, "finished": now(),
           "seconds": round(seconds, 3), "host": socket.gethostname(),
           "histotile_version": __version__}
    if layout.kind == "files":
        run["files"] = sorted(stem + p.name[len(ITEM_PREFIX):] for p in tmp.iterdir()
                              if p.name != RUN_JSON)
    atomic_write_text(tmp / RUN_JSON, json.dumps(run, indent=2, default=str))


def _state(out: Path, stem: str, item: Path, status: str, reason: str = "",
           new_attempt: bool = False) -> None:
    try:
        write_state(out, stem, str(item), status, reason, new_attempt=new_attempt)
    except OSError as exc:  # the state record is informational; run.json is the truth
        log.debug("could not write the state record of %s: %s", stem, exc)


def is_finished(item: Path, stem: str, out: Path, fingerprint: dict[str, Any],
                layout: Layout = FOLDER) -> dict[str, Any] | None:
    """The run record of ``item``'s finished result in ``out`` with this fingerprint, else None."""
    run = _finished(layout.run_json(out, stem), fingerprint)
    return run if run and _same_source(run, item) else None


def check_stem(item: Path, stem: str) -> None:
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem:
        raise InvalidArgumentError(f"output name {stem!r} for {item}",
                                   hint="name items by their file or folder name")


class ItemClaim:
    """One item being worked on: its lock, temporary folder and timing (see the module
    docstring). ``begin`` returns the item's result when there is nothing to do (finished,
    busy), else None and the item is claimed until ``release``."""

    def __init__(self, item: Path, stem: str, out: Path, fingerprint: dict[str, Any], *,
                 overwrite: bool = False, lock_timeout: float = LOCK_TIMEOUT_S,
                 layout: Layout = FOLDER) -> None:
        self.item, self.stem, self.out, self.layout = Path(item), stem, Path(out), layout
        self.fingerprint, self.overwrite, self.lock_timeout = fingerprint, overwrite, lock_timeout
        self.output = str(layout.output(self.out, stem))
        self.lock = ItemLock(self.out, stem, timeout=lock_timeout)
        self.held = False
        self.tmp: Path | None = None
        self.started = ""
        self.t0 = time.perf_counter()

    def skipped(self) -> ItemResult | None:
        """The result of a finished item (clearing a killed run's lock and leftovers), or None."""
        if self.overwrite or not (run := is_finished(self.item, self.stem, self.out,
                                                      self.fingerprint, self.layout)):
            return None
        lock = self.lock
        if lock.path.exists() and lock_is_stale(lock.path, self.lock_timeout) and lock.acquire():
            try:  # killed after its rename: clear its lock and any leftovers
                _clean_leftovers(self.out, self.stem)
            finally:
                lock.release()
        return ItemResult(str(self.item), "skipped", patches=_patches(run), output=self.output)

    def begin(self) -> ItemResult | None:
        """Lock, clear leftovers, check; then the temporary folder. Raises for a failing item
        (call :meth:`fail`)."""
        self.t0 = time.perf_counter()
        self.held = self.lock.acquire()
        if not self.held:
            return ItemResult(str(self.item), "busy", error=self.lock.describe_holder(),
                              output=self.output)
        out, stem, item = self.out, self.stem, self.item
        _clean_leftovers(out, stem)
        run = _finished(self.layout.run_json(out, stem), self.fingerprint)
        if not self.overwrite and run and _same_source(run, item):  # done while we waited
            return ItemResult(str(item), "skipped", patches=_patches(run), output=self.output)
        _check_existing(out, stem, self.layout, item, self.overwrite)
        if not item.exists():
            raise InputNotFoundError(
                "the pattern matches no slide" if has_glob(str(item)) else "no such file or folder",
                hint="check the path", subject=str(item))
        _state(out, stem, item, "running", new_attempt=True)
        self.started = now()
        self.tmp = out / f".tmp-{stem}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        return None

    def complete(self, info: dict[str, Any] | None) -> ItemResult:
        """Write the run record last and move the results into place."""
        assert self.tmp is not None
        info = dict(info or {})
        seconds = time.perf_counter() - self.t0
        out, stem = self.out, self.stem
        _write_run_json(self.tmp, self.item, out, stem, self.layout, info, self.fingerprint,
                        self.started, seconds)
        if self.layout.kind == "folder":
            _commit_folder(self.tmp, out, stem)
        else:
            _commit_files(self.tmp, out, stem, self.layout)
        self.tmp = None
        _state(out, stem, self.item, "done")
        return ItemResult(str(self.item), "done", patches=_patches(info), seconds=seconds,
                          output=self.output)

    def fail(self, exc: BaseException) -> ItemResult:
        """The failed result (the temporary folder removed, the state record updated)."""
        self.drop_tmp()
        if self.held:
            _state(self.out, self.stem, self.item, "failed", error_line(exc))
        log.debug("item %s failed", self.item, exc_info=exc)
        return ItemResult(str(self.item), "failed", error=error_line(exc),
                          seconds=time.perf_counter() - self.t0)

    def drop_tmp(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def release(self) -> None:
        """Release the lock (an uncommitted temporary folder is removed first)."""
        self.drop_tmp()
        if self.held:
            self.held = False
            self.lock.release()


def process_item(item: Path, stem: str, out_dir: Path, process: ProcessFn,
                 fingerprint: dict[str, Any], overwrite: bool = False,
                 lock_timeout: float = LOCK_TIMEOUT_S, raise_errors: bool = False,
                 layout: Layout = FOLDER) -> ItemResult:
    """Run one item: skip if finished, lock, process into a temp folder, run record, move.

    Never raises for a failing item (unless ``raise_errors``): the error is in the result.
    """
    check_stem(Path(item), stem)
    claim = ItemClaim(Path(item), stem, Path(out_dir), fingerprint, overwrite=overwrite,
                      lock_timeout=lock_timeout, layout=layout)
    if (result := claim.skipped()) is not None:
        return result
    try:
        if (result := claim.begin()) is not None:
            return result
        assert claim.tmp is not None
        return claim.complete(process(claim.item, claim.tmp))
    except Exception as exc:
        result = claim.fail(exc)
        if raise_errors:
            raise
        return result
    finally:
        claim.release()


def settle_busy(result: ItemResult, out: Path, stem: str, fingerprint: dict[str, Any],
                layout: Layout = FOLDER) -> ItemResult:
    """An item another process held: report it as finished if it is by now."""
    if result.status == "busy":
        run = _finished(layout.run_json(out, stem), fingerprint)
        if run and _same_source(run, Path(result.slide)):
            return ItemResult(result.slide, "skipped", patches=_patches(run), output=result.output)
    return result
