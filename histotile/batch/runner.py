"""The per-item runner every multi-item command goes through (``predict``, ``tile``).

A command hands :func:`run_batch` a ``process(item, tmp_dir) -> info`` callable that writes its
files into ``tmp_dir``. For each item the runner skips finished work (a run record with the same
fingerprint, from the same source), takes the item's lock, calls ``process``, writes the run
record last and moves the results into place, so a run killed at any moment (SIGKILL included)
resumes without recomputing finished items, and two processes on one output folder never work
on the same item. Failures are recorded per item and the rest continue; ``manifest.csv`` lists
every item at the end.

Two layouts (:class:`Layout`):

* ``folder`` (predict): ``OUT/<stem>/`` holds what ``process`` wrote plus ``run.json``; the
  temporary folder ``OUT/.tmp-<stem>-<hex>`` is renamed into place.
* ``files`` (tile): ``process`` writes ``item.<suffix>`` files; they land as
  ``OUT/<stem>.<suffix>`` (e.g. ``<stem>.h5``, ``<stem>.tissue.png``) and the run record as
  ``OUT/<stem>.run.json``, renamed last.

The runner never moves or deletes anything but the item's own temporary folder and the item's
own previous results; an existing output that belongs to another source (or to no histotile
run) is refused, not replaced, unless ``overwrite``.
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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histotile.batch.inputs import has_glob
from histotile.batch.locks import LOCK_TIMEOUT_S, ItemLock, lock_is_stale, remove_stale_parts
from histotile.batch.shards import shard_items
from histotile.batch.state import (
    BatchSummary,
    ItemResult,
    atomic_write_text,
    error_line,
    manifest_name,
    now,
    read_json,
    write_manifest,
    write_state,
)
from histotile.errors import HistotileError, InputNotFoundError, InvalidArgumentError
from histotile.items import DICOM_SUFFIX, item_stems, item_suffix
from histotile.slide import open_slide

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


def process_item(item: Path, stem: str, out_dir: Path, process: ProcessFn,
                 fingerprint: dict[str, Any], overwrite: bool = False,
                 lock_timeout: float = LOCK_TIMEOUT_S, raise_errors: bool = False,
                 layout: Layout = FOLDER) -> ItemResult:
    """Run one item: skip if finished, lock, process into a temp folder, run record, move.

    Never raises for a failing item (unless ``raise_errors``): the error is in the result.
    """
    out, item, slide = Path(out_dir), Path(item), str(item)
    if not stem or stem in (".", "..") or "/" in stem or os.sep in stem:
        raise InvalidArgumentError(f"output name {stem!r} for {slide}",
                                   hint="name items by their file or folder name")
    output = str(layout.output(out, stem))
    run_json = layout.run_json(out, stem)
    lock = ItemLock(out, stem, timeout=lock_timeout)
    if not overwrite and (run := _finished(run_json, fingerprint)) and _same_source(run, item):
        if lock.path.exists() and lock_is_stale(lock.path, lock_timeout) and lock.acquire():
            try:  # killed after its rename: clear its lock and any leftovers
                _clean_leftovers(out, stem)
            finally:
                lock.release()
        return ItemResult(slide, "skipped", patches=_patches(run), output=output)
    t0 = time.perf_counter()
    tmp: Path | None = None
    held = False
    try:
        held = lock.acquire()
        if not held:
            return ItemResult(slide, "busy", error=lock.describe_holder(), output=output)
        _clean_leftovers(out, stem)
        run = _finished(run_json, fingerprint)
        if not overwrite and run and _same_source(run, item):  # done while we waited
            return ItemResult(slide, "skipped", patches=_patches(run), output=output)
        _check_existing(out, stem, layout, item, overwrite)
        if not item.exists():
            raise InputNotFoundError(
                "the pattern matches no slide" if has_glob(slide) else "no such file or folder",
                hint="check the path", subject=slide)
        _state(out, stem, item, "running", new_attempt=True)
        started = now()
        tmp = out / f".tmp-{stem}-{secrets.token_hex(4)}"
        tmp.mkdir()
        info = dict(process(item, tmp) or {})
        seconds = time.perf_counter() - t0
        _write_run_json(tmp, item, out, stem, layout, info, fingerprint, started, seconds)
        if layout.kind == "folder":
            _commit_folder(tmp, out, stem)
        else:
            _commit_files(tmp, out, stem, layout)
        tmp = None
        _state(out, stem, item, "done")
        return ItemResult(slide, "done", patches=_patches(info), seconds=seconds, output=output)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if held:
            _state(out, stem, item, "failed", error_line(exc))
        if raise_errors:
            raise
        log.debug("item %s failed", slide, exc_info=True)
        return ItemResult(slide, "failed", error=error_line(exc),
                          seconds=time.perf_counter() - t0)
    finally:
        if held:
            lock.release()


# --------------------------------------------------------------------------- batch

def settle_busy(result: ItemResult, out: Path, stem: str, fingerprint: dict[str, Any],
                layout: Layout = FOLDER) -> ItemResult:
    """An item another process held: report it as finished if it is by now."""
    if result.status == "busy":
        run = _finished(layout.run_json(out, stem), fingerprint)
        if run and _same_source(run, Path(result.slide)):
            return ItemResult(result.slide, "skipped", patches=_patches(run), output=result.output)
    return result


def error_policy(on_error: ErrorPolicy) -> tuple[bool, Callable[[Path, ItemResult], None] | None]:
    if on_error == "raise":
        return True, None
    if on_error == "report":
        return False, lambda item, r: log.warning(
            "%s", r.error if r.error.startswith(str(item)) else f"{item}: {r.error}")
    if callable(on_error):
        return False, on_error
    raise InvalidArgumentError(f"on_error={on_error!r}", hint="use 'report', 'raise' or a callable")


def plan_items(items: Sequence[str | os.PathLike[str]], shard: tuple[int, int] | None,
               stems: Sequence[str] | None = None) -> list[tuple[Path, str]]:
    """``(item, stem)`` pairs of this shard; stems are decided on the full list first."""
    paths = [Path(i) for i in items]
    names = list(stems) if stems is not None else item_stems(paths)
    if len(names) != len(paths):
        raise InvalidArgumentError(f"{len(names)} output names for {len(paths)} items",
                                   hint="give one stem per item")
    pairs = list(zip(paths, names, strict=True))
    return shard_items(pairs, *shard) if shard is not None else pairs


def finish_summary(summary: BatchSummary, out: Path, stems: Sequence[str],
                   fingerprint: dict[str, Any], layout: Layout,
                   print_summary: bool, reported: bool = False) -> BatchSummary:
    """Settle busy items (``stems``: one per result), write the manifest, print the table
    (``reported``: each failure was said as it happened, so the table names the failed items
    without their messages)."""
    summary.results = [settle_busy(r, out, s, fingerprint, layout)
                       for r, s in zip(summary.results, stems, strict=True)]
    try:
        summary.manifest = write_manifest(out / manifest_name(summary.shard), summary.results)
    except OSError as exc:  # e.g. a full disk: the results above still stand
        log.error("could not write the manifest: %s", error_line(exc))
    if print_summary:
        print(summary.table(messages=not reported), file=sys.stderr)
    return summary


def run_batch(items: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              process: ProcessFn, fingerprint: dict[str, Any], *, overwrite: bool = False,
              shard: tuple[int, int] | None = None, progress: bool = True,
              on_error: ErrorPolicy = "report", lock_timeout: float = LOCK_TIMEOUT_S,
              print_summary: bool | None = None, manifest_every_s: float = 10.0,
              layout: Layout = FOLDER, stems: Sequence[str] | None = None) -> BatchSummary:
    """Run ``process(item, tmp_dir) -> info`` over ``items`` with resume, locks and a manifest.

    ``items`` is the full, deterministic list (output names are decided on it, or given as
    ``stems``, then the shard is taken). ``on_error``: ``"report"`` (log one line, continue),
    ``"raise"`` (re-raise, e.g. for --debug) or a callable ``(item, result)``. The manifest
    (``manifest.csv``, or ``manifest-I-of-N.csv`` for a shard) is rewritten every
    ``manifest_every_s`` and at the end. Items another run holds end as ``busy`` (exit code 75
    when nothing failed) unless that run has finished them by the end of this one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = plan_items(items, shard, stems)
    raise_errors, report = error_policy(on_error)
    summary = BatchSummary(shard=shard)
    manifest = out / manifest_name(shard)
    last_write = time.monotonic()
    bar = _progress(len(pairs), progress, shard)
    try:
        for item, stem in pairs:
            if bar is not None:
                bar.set_postfix_str(item.name[-40:], refresh=False)
            result = process_item(item, stem, out, process, fingerprint, overwrite=overwrite,
                                  lock_timeout=lock_timeout, raise_errors=raise_errors,
                                  layout=layout)
            summary.results.append(result)
            if result.status == "failed" and report is not None:
                with above_bar(bar):  # the error line on its own line, not glued to the bar
                    report(item, result)
            if bar is not None:
                bar.update()
            if time.monotonic() - last_write > manifest_every_s:
                try:
                    write_manifest(manifest, summary.results)
                except OSError as exc:  # e.g. a full disk: keep going, the items decide
                    log.warning("could not update the manifest: %s", error_line(exc))
                last_write = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
        with contextlib.suppress(OSError):
            write_manifest(manifest, summary.results)  # also when interrupted
    return finish_summary(summary, out, [s for _, s in pairs[:len(summary.results)]],
                          fingerprint, layout,
                          print_summary if print_summary is not None else progress,
                          reported=report is not None)


def above_bar(bar: Any) -> contextlib.AbstractContextManager[Any]:
    return bar.external_write_mode(file=sys.stderr) if bar is not None else contextlib.nullcontext()


def _progress(total: int, enabled: bool, shard: tuple[int, int] | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = "slides" if shard is None else f"shard {shard[0]}/{shard[1]}"
    return tqdm(total=total, desc=desc, unit="slide", file=sys.stderr)


# --------------------------------------------------------------------------- probe job

def probe_slide(item: Path, tmp_dir: Path) -> dict[str, Any]:
    """A minimal real per-slide job (open, thumbnail, info): for tests and executor checks."""
    from PIL import Image

    with open_slide(item) as slide:
        thumb = slide.thumbnail(256)
        info = slide.info()
    Image.fromarray(thumb).save(tmp_dir / "thumbnail.png")
    (tmp_dir / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return {"patches": 0, "width": info.get("width"), "height": info.get("height")}


def make_probe_process() -> ProcessFn:
    """Process factory for :func:`probe_slide` (picklable, for the dask executors)."""
    return probe_slide
