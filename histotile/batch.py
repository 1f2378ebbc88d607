"""Batch runs over many slides: inputs, shards, per-item locks, atomic outputs, the manifest.

A generic per-item runner: ``predict`` and ``tile`` hand :func:`run_batch` a
``process(item, tmp_dir) -> info`` callable that writes its files into ``tmp_dir``. For each item
the runner skips finished work (``run.json`` with the same fingerprint), takes a lock file,
calls ``process``, writes ``run.json`` last and renames the temporary folder into place, so a
run killed at any moment (SIGKILL included) resumes without recomputing finished items, and
two processes on one output folder never work on the same item. Failures are recorded per item
and the rest continue; ``manifest.csv`` lists every item at the end.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from histotile.errors import HistotileError, InputNotFoundError, InvalidArgumentError

log = logging.getLogger(__name__)

#: Extensions of single-file slides (openslide / tiffslide) and patch archives.
SLIDE_EXTENSIONS = (
    ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".tif", ".tiff", ".vms", ".vmu", ".svslide",
    ".dcm",
)
ARCHIVE_EXTENSIONS = (".h5", ".hdf5", ".npz")
ITEM_EXTENSIONS = SLIDE_EXTENSIONS + ARCHIVE_EXTENSIONS
LIST_EXTENSIONS = (".txt", ".csv", ".lst")
LIST_COLUMNS = ("path", "slide", "filename", "file")

RUN_JSON = "run.json"
LOCK_DIR = ".locks"
MANIFEST_FIELDS = ("slide", "status", "error", "patches", "seconds", "output")
STATUSES = ("done", "skipped", "failed")
LOCK_TIMEOUT_S = 600.0  # a lock not refreshed for this long is stale (holders refresh it)
HEARTBEAT_S = 30.0
_TMP_RE = r"\.(?:tmp|old)-{stem}-[0-9a-f]{{8}}"

ProcessFn = Callable[[Path, Path], "dict[str, Any] | None"]


# --------------------------------------------------------------------------- inputs

def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_item(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and path.suffix.lower() in extensions


def _scan_folder(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Items inside ``folder`` (recursive, sorted): one per file, one per DICOM folder.

    Hidden entries, MIRAX data folders (``x/`` beside ``x.mrxs``) and histotile output folders
    (holding a ``run.json``) are not entered.
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        names = set(files)
        mrxs = {Path(n).stem for n in files if n.lower().endswith(".mrxs")}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in mrxs
                         and not (here / d / RUN_JSON).exists())
        dcm = sorted(n for n in names if n.lower().endswith(".dcm"))
        if dcm and ".dcm" in extensions:
            found.append(here / dcm[0])  # a DICOM WSI is a folder: any one file opens it
        for name in sorted(names):
            if name.startswith(".") or name.lower().endswith(".dcm"):
                continue
            if Path(name).suffix.lower() in extensions:
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_list_file(path: Path) -> list[Path]:
    """Paths listed in a .txt (one per line, ``#`` comments) or .csv (a path/slide column).

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


def _expand_one(text: str, extensions: Sequence[str]) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_dir():
        return _scan_folder(path, extensions)
    if path.is_file():
        if path.suffix.lower() in LIST_EXTENSIONS:
            return read_list_file(path)
        return [path]
    if _has_glob(text):
        out: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
            m = Path(match)
            if m.is_dir():
                out.extend(_scan_folder(m, extensions))
            elif _is_item(m, extensions):
                out.append(m)
        if out:
            return out
        raise InputNotFoundError("the pattern matches no slide", hint="check the glob and the "
                                 "extensions", subject=text)
    raise InputNotFoundError("no such file or folder", hint="check the path", subject=text)


def expand_inputs(inputs: Iterable[str | os.PathLike[str]],
                  extensions: Sequence[str] = ITEM_EXTENSIONS) -> list[Path]:
    """Expand files, folders, globs and list files (.txt/.csv) into a deterministic item list.

    Folders and globs expand sorted; list files keep their order; inputs keep theirs; the
    first occurrence of a duplicate wins. Listed files that do not exist are kept (the run
    records them as failed). Raises :class:`InputNotFoundError` when nothing is found.
    """
    items: list[Path] = []
    seen: set[str] = set()
    inputs = [os.fspath(i) for i in inputs]
    for text in inputs:
        if not text.strip():  # e.g. "$(cmd)" that printed nothing: never expand to the cwd
            raise InputNotFoundError("empty input path", hint="name a slide, folder, glob or "
                                     "list file", subject="''")
        for item in _expand_one(text, extensions):
            key = os.path.normpath(os.path.abspath(item))
            if key not in seen:
                seen.add(key)
                items.append(item)
    if not items:
        raise InputNotFoundError("no slide found", hint="known extensions: "
                                 + " ".join(extensions), subject=" ".join(inputs) or "inputs")
    return items


def item_stem(item: Path) -> str:
    """Output name of an item: its file name without extension (a DICOM item: its folder)."""
    if item.suffix.lower() == ".dcm":
        return item.parent.name
    name = item.name
    for ext in (".ome.tiff", ".ome.tif", *ITEM_EXTENSIONS):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return item.stem or name


def item_stems(items: Sequence[Path]) -> list[str]:
    """One output name per item; equal stems get ``-<8 hex of the absolute path>`` appended."""
    stems = [item_stem(i) for i in items]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    out = []
    for item, stem in zip(items, stems, strict=True):
        if counts[stem.lower()] > 1:
            digest = hashlib.sha1(os.path.abspath(item).encode()).hexdigest()[:8]
            stem = f"{stem}-{digest}"
        out.append(stem)
    return out


# --------------------------------------------------------------------------- shards

def shard_items(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The ``index``-th (0-based) of ``count`` round-robin shards: ``items[index::count]``."""
    if count < 1 or not 0 <= index < count:
        raise InvalidArgumentError(f"shard {index}/{count} is out of range",
                                   hint="use I/N with 0 <= I < N", subject="--shard")
    return list(items[index::count])


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, 0-based, validated."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise InvalidArgumentError(f"{text!r} is not I/N", hint="e.g. --shard 0/4 (0-based)",
                                   subject="--shard")
    index, count = int(m.group(1)), int(m.group(2))
    shard_items([], index, count)  # validates
    return index, count


def resolve_shard(opt: str | None, env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """The shard to run: ``--shard I/N`` if given, else from a SLURM array task, else None.

    From SLURM: index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP,
    count = SLURM_ARRAY_TASK_COUNT, so arrays starting at 0 or 1 (or stepped) both work.
    """
    if opt:
        return parse_shard(opt)
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    except ValueError as exc:
        raise InvalidArgumentError(f"unreadable SLURM array variables: {exc}",
                                   hint="pass --shard I/N explicitly",
                                   subject="SLURM_ARRAY_TASK_ID") from None
    index, rem = divmod(task - first, step)
    if rem or not 0 <= index < count:
        raise InvalidArgumentError(
            f"array task {task} (min {first}, step {step}) is not one of {count} tasks",
            hint="use a contiguous --array=0-(N-1) or pass --shard I/N",
            subject="SLURM_ARRAY_TASK_ID")
    return index, count


# --------------------------------------------------------------------------- locks

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create_exclusive(path: Path, payload: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh)
    return True


def lock_is_stale(path: Path, timeout: float = LOCK_TIMEOUT_S) -> bool:
    """A lock is stale when its holder is dead (same host) or it was not refreshed in time."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    holder = _read_json(path)
    if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return True
    return age > timeout


class ItemLock:
    """``out_dir/.locks/<stem>.lock``: created with O_EXCL, holds host + pid + time.

    While held, a heartbeat thread refreshes its mtime so other hosts can tell a live holder
    from a dead one by age. Stale locks are taken over under a short-lived ``.break`` lock so
    two processes never both take over the same stale lock.
    """

    def __init__(self, out_dir: Path, stem: str, timeout: float = LOCK_TIMEOUT_S,
                 heartbeat: float = HEARTBEAT_S) -> None:
        self.path = out_dir / LOCK_DIR / f"{stem}.lock"
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}

    def holder(self) -> dict[str, Any] | None:
        return _read_json(self.path)

    def acquire(self) -> bool:
        """Take the lock (taking over a stale one); False when a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not _create_exclusive(self.path, self._payload()):
            if not lock_is_stale(self.path, self.timeout) or not self._break_stale():
                return False
            if not _create_exclusive(self.path, self._payload()):
                return False
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _break_stale(self) -> bool:
        brk = self.path.with_suffix(".break")
        if not _create_exclusive(brk, self._payload()):
            if not lock_is_stale(brk, timeout=min(self.timeout, 60.0)):
                return False
            with contextlib.suppress(FileNotFoundError):
                brk.unlink()
            if not _create_exclusive(brk, self._payload()):
                return False
        try:
            if not lock_is_stale(self.path, self.timeout):  # re-check under the break lock
                return False
            log.info("taking over stale lock %s (%s)", self.path, self.holder())
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                brk.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        mine = {"host": socket.gethostname(), "pid": os.getpid()}
        if holder and all(holder.get(k) == v for k, v in mine.items()):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# --------------------------------------------------------------------------- per item

@dataclass
class ItemResult:
    """One manifest row."""

    slide: str
    status: str  # done | skipped | failed
    error: str = ""
    patches: int | None = None
    seconds: float = 0.0
    output: str = ""

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = f"{self.seconds:.2f}"
        d["patches"] = "" if self.patches is None else self.patches
        return d


def _norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def finished_run(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``folder/run.json`` when it marks a finished run with this fingerprint, else None."""
    run = _read_json(folder / RUN_JSON)
    if run and run.get("status") == "done" and _norm(run.get("fingerprint")) == _norm(fingerprint):
        return run
    return None


def error_line(exc: BaseException) -> str:
    """One line for the manifest: HistotileError.one_line(), else ``Type: message``."""
    text = exc.one_line() if isinstance(exc, HistotileError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _patches(info: dict[str, Any]) -> int | None:
    for key in ("patches", "n_patches", "num_patches"):
        value = info.get(key)
        if isinstance(value, int):
            return value
    return None


def _clean_leftovers(out_dir: Path, stem: str) -> None:
    """Remove ``.tmp-<stem>-*`` / ``.old-<stem>-*`` left by a killed run (lock held)."""
    pattern = re.compile(_TMP_RE.format(stem=re.escape(stem)))
    for entry in out_dir.iterdir():
        if entry.is_dir() and pattern.fullmatch(entry.name):
            log.info("removing leftover %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _commit(tmp: Path, final: Path, stem: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.parent / f".old-{stem}-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_run_json(tmp: Path, item: Path, final: Path, info: dict[str, Any],
                    fingerprint: dict[str, Any], started: str, seconds: float) -> None:
    from histotile import __version__

    run = {**info, "slide": str(item), "output": str(final), "fingerprint": fingerprint,
           "status": "done", "started": started, "finished": _now(),
           "seconds": round(seconds, 3), "host": socket.gethostname(),
           "histotile_version": __version__}
    part = tmp / (RUN_JSON + ".part")
    with open(part, "w") as fh:
        json.dump(run, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(part, tmp / RUN_JSON)


def process_item(item: Path, stem: str, out_dir: Path, process: ProcessFn,
                 fingerprint: dict[str, Any], overwrite: bool = False,
                 lock_timeout: float = LOCK_TIMEOUT_S, raise_errors: bool = False) -> ItemResult:
    """Run one item: skip if finished, lock, process into a temp folder, run.json, rename.

    Never raises for a failing item (unless ``raise_errors``): the error is in the result.
    """
    out_dir = Path(out_dir)
    final = out_dir / stem
    slide = str(item)
    lock = ItemLock(out_dir, stem, timeout=lock_timeout)
    if not overwrite and (run := finished_run(final, fingerprint)):
        if lock.path.exists() and lock_is_stale(lock.path, lock_timeout) and lock.acquire():
            try:  # killed after its rename: clear its lock and any leftovers
                _clean_leftovers(out_dir, stem)
            finally:
                lock.release()
        return ItemResult(slide, "skipped", patches=_patches(run), output=str(final))
    if not lock.acquire():
        h = lock.holder() or {}
        return ItemResult(slide, "skipped", output=str(final), error=(
            f"in progress elsewhere (host {h.get('host', '?')}, pid {h.get('pid', '?')})"))
    t0 = time.perf_counter()
    tmp = out_dir / f".tmp-{stem}-{secrets.token_hex(4)}"
    try:
        _clean_leftovers(out_dir, stem)
        if not overwrite and (run := finished_run(final, fingerprint)):  # done while we waited
            return ItemResult(slide, "skipped", patches=_patches(run), output=str(final))
        if not item.exists():
            raise InputNotFoundError("no such file", hint="check the input list", subject=slide)
        started = _now()
        tmp.mkdir()
        info = dict(process(item, tmp) or {})
        seconds = time.perf_counter() - t0
        _write_run_json(tmp, item, final, info, fingerprint, started, seconds)
        _commit(tmp, final, stem)
        return ItemResult(slide, "done", patches=_patches(info), seconds=seconds,
                          output=str(final))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if raise_errors:
            raise
        log.debug("item %s failed", slide, exc_info=True)
        return ItemResult(slide, "failed", error=error_line(exc),
                          seconds=time.perf_counter() - t0)
    finally:
        lock.release()


# --------------------------------------------------------------------------- batch

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
    def failed(self) -> list[ItemResult]:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        """0 when no item failed, else 1."""
        return 1 if self.failed else 0

    def table(self) -> str:
        return summary_table(self.results)


def summary_table(results: Sequence[ItemResult], max_failed: int = 20) -> str:
    """A short plain-text summary: counts, then one line per failed item."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    total_s = sum(r.seconds for r in results)
    patches = sum(r.patches or 0 for r in results if r.status == "done")
    lines = [f"{'status':<8} {'items':>6}"]
    lines += [f"{s:<8} {counts[s]:>6}" for s in STATUSES]
    lines.append(f"{'total':<8} {len(results):>6}   {total_s:.1f} s, {patches} patches computed")
    failed = [r for r in results if r.status == "failed"]
    for r in failed[:max_failed]:
        lines.append(f"failed: {Path(r.slide).name}: {r.error}")
    if len(failed) > max_failed:
        lines.append(f"... and {len(failed) - max_failed} more failed (see the manifest)")
    return "\n".join(lines)


def manifest_name(shard: tuple[int, int] | None) -> str:
    return "manifest.csv" if shard is None else f"manifest-{shard[0]}-of-{shard[1]}.csv"


def write_manifest(path: Path, results: Iterable[ItemResult]) -> Path:
    """Write the manifest CSV atomically (temp name, then rename)."""
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    with open(part, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.row())
    os.replace(part, path)
    return path


def settle_busy(result: ItemResult, fingerprint: dict[str, Any]) -> ItemResult:
    """An item another process held: report it as finished if it is by now."""
    if result.status == "skipped" and result.error and result.output:
        run = finished_run(Path(result.output), fingerprint)
        if run:
            return ItemResult(result.slide, "skipped", patches=_patches(run), output=result.output)
    return result


def error_policy(on_error: str | Callable[[Path, ItemResult], None]
                  ) -> tuple[bool, Callable[[Path, ItemResult], None] | None]:
    if on_error == "raise":
        return True, None
    if on_error == "report":
        return False, lambda item, r: log.warning(
            "%s", r.error if r.error.startswith(str(item)) else f"{item}: {r.error}")
    if callable(on_error):
        return False, on_error
    raise InvalidArgumentError(f"on_error={on_error!r}", hint="use 'report', 'raise' or a callable")


def run_batch(items: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              process: ProcessFn, fingerprint: dict[str, Any], *, overwrite: bool = False,
              shard: tuple[int, int] | None = None, progress: bool = True,
              on_error: str | Callable[[Path, ItemResult], None] = "report",
              lock_timeout: float = LOCK_TIMEOUT_S, print_summary: bool | None = None,
              manifest_every_s: float = 10.0) -> BatchSummary:
    """Run ``process(item, tmp_dir) -> info`` over ``items`` with resume, locks and a manifest.

    ``items`` is the full, deterministic list (output names are decided on it, then the shard
    is taken). Per item the output folder is ``out_dir/<stem>/`` holding what ``process`` wrote
    plus ``run.json`` (info + fingerprint + status + timings). ``on_error``: ``"report"``
    (log one line, continue), ``"raise"`` (re-raise, e.g. for --debug) or a callable
    ``(item, result)``. The manifest (``manifest.csv``, or ``manifest-I-of-N.csv`` for a shard)
    is rewritten every ``manifest_every_s`` and at the end.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(i) for i in items]
    pairs = list(zip(paths, item_stems(paths), strict=True))
    if shard is not None:
        pairs = shard_items(pairs, *shard)
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
                                  lock_timeout=lock_timeout, raise_errors=raise_errors)
            summary.results.append(result)
            if result.status == "failed" and report is not None:
                report(item, result)
            if bar is not None:
                bar.update()
            if time.monotonic() - last_write > manifest_every_s:
                write_manifest(manifest, summary.results)
                last_write = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
        write_manifest(manifest, summary.results)  # also when interrupted
    summary.results = [settle_busy(r, fingerprint) for r in summary.results]
    summary.manifest = write_manifest(manifest, summary.results)
    if print_summary if print_summary is not None else progress:
        print(summary.table(), file=sys.stderr)
    return summary


def _progress(total: int, enabled: bool, shard: tuple[int, int] | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = "slides" if shard is None else f"shard {shard[0]}/{shard[1]}"
    return tqdm(total=total, desc=desc, unit="slide", file=sys.stderr)


EXECUTORS = ("serial", "local", "dask-jobqueue")


def run_items(items: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
              process_factory: Callable[[], ProcessFn], fingerprint: dict[str, Any], *,
              executor: str = "serial", jobs: int = 2, cluster: str = "slurm",
              shard: tuple[int, int] | None = None, overwrite: bool = False,
              progress: bool = True, on_error: str | Callable[[Path, ItemResult], None] = "report",
              cluster_kwargs: dict[str, Any] | None = None) -> BatchSummary:
    """One entry for every executor: ``serial`` (:func:`run_batch` in this process) or
    ``local`` / ``dask-jobqueue`` (:func:`histotile.hpc.run_with_dask`)."""
    if executor == "serial":
        return run_batch(items, out_dir, process_factory(), fingerprint, overwrite=overwrite,
                         shard=shard, progress=progress, on_error=on_error)
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"unknown executor {executor!r}",
                                   hint=f"use one of {', '.join(EXECUTORS)}",
                                   subject="--executor")
    from histotile.hpc import run_with_dask

    return run_with_dask(items, out_dir, process_factory, fingerprint, executor=executor,
                         cluster=cluster, jobs=jobs, overwrite=overwrite, progress=progress,
                         shard=shard, on_error=on_error, **(cluster_kwargs or {}))


# --------------------------------------------------------------------------- hidden entry

def probe_slide(item: Path, tmp_dir: Path) -> dict[str, Any]:
    """A minimal real per-slide job (open, thumbnail, info): for tests and SLURM smoke runs."""
    from histotile.slide import open_slide

    with open_slide(item) as slide:
        thumb = slide.thumbnail(256)
        info = slide.info()
    from PIL import Image

    Image.fromarray(thumb).save(tmp_dir / "thumbnail.png")
    (tmp_dir / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return {"patches": 0, "width": info.get("width"), "height": info.get("height")}


def make_probe_process() -> ProcessFn:
    """Process factory for :func:`probe_slide` (picklable, for the dask executors)."""
    return probe_slide


def _main(argv: list[str] | None = None) -> int:
    """``python -m histotile.batch probe INPUT... -o OUT [--shard I/N] [--workers N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m histotile.batch")
    parser.add_argument("job", choices=["probe"])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--shard", default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        items = expand_inputs(args.inputs)
        summary = run_batch(items, args.output, probe_slide, {"job": "probe"},
                            overwrite=args.overwrite, shard=resolve_shard(args.shard),
                            progress=False, print_summary=True)
    except HistotileError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(_main())
