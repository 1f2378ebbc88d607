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
        self.box_level0 = tuple(int(v) for v in box_level0)

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
