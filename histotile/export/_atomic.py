"""A text file written as ``<path>.tmp`` and renamed into place only when complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any


class AtomicTextWriter:
    """Base of the streaming writers: subclasses open ``self._fh`` on ``self.tmp`` and write.

    ``close()`` writes ``footer``, closes and renames; ``abort()`` (or leaving a ``with`` block on
    an exception) removes the partial file, so a crash never leaves a truncated output behind.
    """

    footer = ""
    _fh: IO[str]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def close(self) -> Path:
        if not self._fh.closed:
            if self.footer:
                self._fh.write(self.footer)
            self._fh.close()
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close() if exc_type is None else self.abort()
