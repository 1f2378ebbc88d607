"""Typed errors with a one-line user-facing message and a hint on what to do.

The CLI prints ``error: <subject>: <message> (<hint>)`` and exits non-zero; ``--debug``
re-raises with the traceback. Library users catch :class:`HistotileError`.
"""

from __future__ import annotations


class HistotileError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "", subject: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.subject = subject  # usually the slide or file the error is about

    def one_line(self) -> str:
        """The single line the CLI prints (without the ``error:`` prefix)."""
        text = f"{self.subject}: {self.message}" if self.subject else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class InputNotFoundError(HistotileError):
    """A named file or folder does not exist."""


class UnsupportedFormatError(HistotileError):
    """No backend can read this file."""


class CorruptSlideError(HistotileError):
    """The file looks like a slide but reading it failed."""


class UnreadableRegionError(CorruptSlideError):
    """Pixels of one region could not be decoded (a damaged tile); the rest may be fine.

    ``level`` and ``box_level0`` (x, y, width, height in level-0 pixels) say where.
    """

    def __init__(self, message: str, hint: str = "", subject: str | None = None,
                 level: int = 0, box_level0: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        super().__init__(message, hint, subject)
        self.level = level
        x, y, w, h = (int(v) for v in box_level0)
        self.box_level0 = (x, y, w, h)

    def __reduce__(self):  # picklable across DataLoader workers with its extra fields
        return (type(self), (self.message, self.hint, self.subject, self.level,
                             self.box_level0))


class MissingMppError(HistotileError):
    """The slide carries no pixel size and none was given."""


class NotBrightfieldError(HistotileError):
    """A fluorescence / dark-field slide given to a brightfield (H&E) model."""


class TooMuchUnreadableError(CorruptSlideError):
    """More of the slide's patches could not be decoded than allowed."""


class InvalidArgumentError(HistotileError):
    """An option value that cannot work (patch size larger than the slide, bad overlap...)."""


class NoTissueError(HistotileError):
    """Tissue detection found nothing where something was required."""


class ModelError(HistotileError):
    """A model folder, card or weights file that cannot be used."""


class ChecksumError(HistotileError):
    """A file's sha256/md5 differs from the expected one."""


class DownloadError(HistotileError):
    """A download failed (offline, HTTP error, interrupted beyond retry)."""


class DatasetError(HistotileError):
    """Training or evaluation data missing, truncated or in the wrong layout."""


class OutputError(HistotileError):
    """An output that cannot be written: a read-only place, a path under a file, a full disk."""


def os_error(exc: OSError, subject: str | None = None) -> HistotileError:
    """One typed error line, with what to do, for an ``OSError`` met while writing outputs."""
    import errno

    path = exc.filename if exc.filename is not None else subject
    where = f" ({path})" if path is not None else ""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return OutputError(
            f"the disk is full: no space left while writing{where}",
            "free some space or choose another output folder, then run the same command "
            "again: finished slides are kept and skipped", subject=subject)
    if code == errno.ENOTDIR:
        return OutputError(
            f"cannot write{where}: a part of that path is a file, not a folder",
            "choose an output folder whose parents are all folders", subject=subject)
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(f"permission denied{where}",
                           "choose an output folder you can write to (or fix the file's "
                           "permissions)", subject=subject)
    if code == errno.EROFS:
        return OutputError(f"cannot write{where}: the file system is read-only",
                           "choose an output folder on a writable disk", subject=subject)
    if code == errno.EEXIST:
        return OutputError(f"cannot create{where}: a file of that name is in the way",
                           "remove it or choose another output folder", subject=subject)
    return OutputError(f"cannot write{where}: {exc.strerror or exc}",
                       "check the output folder and its disk", subject=subject)
