"""Files written whole or not at all, JSON-safe values and the recorded command line.

Every output histotile writes goes through :func:`atomic_path` (or a helper built on it):

* the data go to a temporary name beside the target, unique per process and call
  (``.<name>.<pid>-<random>.tmp<suffix>``, the suffix kept so libraries that pick a format from
  the extension still do), so two processes writing the same output never share a temporary;
* a file is flushed to disk (``fsync``) before it is renamed over the target, and the folder is
  synced after the rename, so a crash leaves the old output or the new one, never a truncated one;
* the final mode follows the user's umask (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for
  folders), as a plain ``open()`` would, whatever the temporary was created with.

:func:`json_safe` turns numpy values, paths and non-finite floats into plain JSON, and
:func:`command_line` is the command recorded in model cards and run metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

_UMASK_LOCK = threading.Lock()
_Writer = TypeVar("_Writer", bound="AtomicTextWriter")


# --------------------------------------------------------------------------- modes
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / folder under the umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


# --------------------------------------------------------------------------- atomic writes
def temp_path(path: str | Path) -> Path:
    """A temporary name beside ``path``, unique per process and call, keeping its suffix."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every OS opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(tmp: str | Path, path: str | Path) -> Path:
    """Give ``tmp`` the umask's mode, sync it and rename it to ``path`` (replacing a file, or
    an existing folder when ``tmp`` is a folder)."""
    tmp, path = Path(tmp), Path(path)
    is_dir = tmp.is_dir()
    os.chmod(tmp, default_mode(is_dir))
    if is_dir:
        if path.exists():
            _remove(path)
    else:
        _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(out) as tmp: write(tmp)``: ``out`` appears complete on success; on an
    exception the temporary (file or folder) is removed and ``out`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2,
               sort_keys: bool = False) -> Path:
    """Atomically write :func:`json_safe` ``obj`` as JSON (non-finite floats become null)."""
    text = json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
    return write_text(path, text + "\n")


class AtomicTextWriter:
    """Base of the streaming text writers: subclasses open ``self._fh`` on ``self.tmp`` and write.

    ``close()`` writes ``footer``, closes and commits; ``abort()`` (or leaving a ``with`` block
    on an exception) removes the partial file, so a crash never leaves a truncated output.
    """

    footer = ""
    _fh: IO[str]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = temp_path(self.path)

    def close(self) -> Path:
        if not self._fh.closed:
            if self.footer:
                self._fh.write(self.footer)
            self._fh.close()
            commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- JSON
def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays to Python, paths to strings, tuples to lists,
    keys to strings, NaN and infinities to ``None``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes, int)):
        return json_safe(value.tolist())  # numpy arrays and scalars, tensors
    return value


# --------------------------------------------------------------------------- command line
def running_as_cli() -> bool:
    """True when this process is the ``histotile`` command (console script or ``-m``)."""
    argv0 = Path(sys.argv[0]) if sys.argv else Path()
    return argv0.name == "histotile" or argv0.parts[-2:] == ("histotile", "__main__.py")


def command_line(argv: Sequence[str] | None = None, call: str | None = None) -> str:
    """The command to record: ``histotile ARGV`` when ``argv`` (the CLI's arguments) is given or
    this process is the ``histotile`` CLI; else ``call`` (a Python call, see :func:`python_call`);
    else the interpreter's own command line."""
    if argv is not None:
        return shlex.join(["histotile", *map(str, argv)])
    if running_as_cli():
        return shlex.join(["histotile", *sys.argv[1:]])
    if call is not None:
        return call
    return shlex.join([sys.executable, *sys.argv])


def python_call(function: str, *args: Any, **kwargs: Any) -> str:
    """``histotile.<function>(args, key=value)`` as recorded for a library call."""
    words = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"histotile.{function}({', '.join(words)})"
