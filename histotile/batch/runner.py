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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from histotile.batch.item import (
    FOLDER,
    ITEM_PREFIX,
    RUN_JSON,
    ErrorPolicy,
    Layout,
    OutputConflictError,
    ProcessFn,
    finished_run,
    process_item,
    settle_busy,
)
from histotile.batch.locks import LOCK_TIMEOUT_S
from histotile.batch.pipeline import is_staged, run_staged
from histotile.batch.shards import shard_items
from histotile.batch.state import (
    BatchSummary,
    ItemResult,
    error_line,
    manifest_name,
    write_manifest,
)
from histotile.errors import InvalidArgumentError
from histotile.items import item_stems
from histotile.slide import open_slide

log = logging.getLogger(__name__)


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

    A ``process`` with stages (:class:`histotile.batch.pipeline.StagedProcess`) has its items
    overlapped: the next prepared and the previous finished while one runs (not with
    ``on_error="raise"``, which runs one item at a time).

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

    def started(item: Path) -> None:
        if bar is not None:
            bar.set_postfix_str(item.name[-40:], refresh=False)

    def emit(item: Path, result: ItemResult) -> None:
        nonlocal last_write
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

    try:
        if is_staged(process) and not raise_errors:  # --debug: one item at a time
            run_staged(pairs, out, process, fingerprint, emit, started=started,
                       overwrite=overwrite, lock_timeout=lock_timeout, layout=layout)
        else:
            for item, stem in pairs:
                started(item)
                emit(item, process_item(item, stem, out, process, fingerprint,
                                        overwrite=overwrite, lock_timeout=lock_timeout,
                                        raise_errors=raise_errors, layout=layout))
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


__all__ = [  # the item-level names are defined in histotile.batch.item
    "FOLDER", "ITEM_PREFIX", "RUN_JSON", "ErrorPolicy", "Layout", "OutputConflictError",
    "ProcessFn", "above_bar", "error_policy", "finish_summary", "finished_run",
    "make_probe_process", "plan_items", "probe_slide", "process_item", "run_batch",
    "settle_busy",
]
