"""Per-item lock files: ``OUT/.locks/<stem>.lock`` holding host, pid and time.

A lock's contents are written to a unique temporary file first and then hard-linked to the lock
name, which fails when the lock exists: so a lock is created exclusively *and* never visible
half-written, even when the disk is full (then nothing is created and the temporary file is
removed). Where the file system has no hard links, an ``O_EXCL`` create-and-write is used.

A lock is stale (taken over) when its holder is a dead process on this host, when it was not
refreshed for ``timeout`` seconds (holders refresh it every ``heartbeat`` seconds, so a holder
on another node that died is recognised by age), or when it is empty or unreadable (a crash
between create and write, or a full disk, under an older writer) and older than a moment.
Take-overs happen under a short-lived ``.break`` lock so two processes never both take over
the same stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from histotile.batch.state import read_json

log = logging.getLogger(__name__)

LOCK_DIR = ".locks"
LOCK_TIMEOUT_S = 600.0  # a lock not refreshed for this long is stale (holders refresh it)
HEARTBEAT_S = 30.0
UNREADABLE_GRACE_S = 2.0  # an empty/unreadable lock younger than this may be mid-write
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _payload() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _fallback_create(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return True


def create_exclusive(path: Path, payload: dict[str, Any]) -> bool:
    """Create ``path`` holding ``payload`` as JSON, complete or not at all; False if it exists."""
    text = json.dumps(payload)
    part = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        fd = os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(part, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _fallback_create(path, text)
        return True
    finally:
        with contextlib.suppress(OSError):
            part.unlink()


def lock_is_stale(path: Path, timeout: float = LOCK_TIMEOUT_S) -> bool:
    """True when the lock's holder is gone (see the module docstring)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    holder = read_json(path)
    if holder is None or not isinstance(holder.get("pid"), int):
        return age > UNREADABLE_GRACE_S
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"]):
        return True
    return age > timeout


class ItemLock:
    """``out_dir/.locks/<stem>.lock`` (see the module docstring); a heartbeat thread refreshes
    its mtime while held."""

    def __init__(self, out_dir: Path, stem: str, timeout: float = LOCK_TIMEOUT_S,
                 heartbeat: float = HEARTBEAT_S) -> None:
        self.path = Path(out_dir) / LOCK_DIR / f"{stem}.lock"
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        return read_json(self.path)

    def describe_holder(self) -> str:
        h = self.holder() or {}
        return (f"in progress elsewhere (host {h.get('host', '?')}, pid {h.get('pid', '?')}, "
                f"lock {self.path})")

    def acquire(self) -> bool:
        """Take the lock (taking over a stale one); False when a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not create_exclusive(self.path, _payload()):
            if not lock_is_stale(self.path, self.timeout) or not self._break_stale():
                return False
            if not create_exclusive(self.path, _payload()):
                return False
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _break_stale(self) -> bool:
        brk = self.path.with_suffix(".break")
        if not create_exclusive(brk, _payload()):
            if not lock_is_stale(brk, timeout=min(self.timeout, 60.0)):
                return False
            with contextlib.suppress(FileNotFoundError):
                brk.unlink()
            if not create_exclusive(brk, _payload()):
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


def remove_stale_parts(out_dir: Path, stem: str, older_than: float = 60.0) -> None:
    """Remove lock ``.part`` files of ``stem`` left by a process killed mid-create."""
    locks = Path(out_dir) / LOCK_DIR
    if not locks.is_dir():
        return
    cutoff = time.time() - older_than
    for part in locks.glob(f".{glob.escape(stem)}.lock.*.part"):
        with contextlib.suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()
