"""Downloads with resume, checksum verification and a cache folder.

Every file fetched from the network is written to ``<dest>.part``, resumed with an HTTP
``Range`` request when a partial file exists, verified against its sha256 (or md5, for
datasets that only publish md5) and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from histotile.errors import ChecksumError, DownloadError

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """histotile's cache folder (``HISTOTILE_CACHE`` overrides the platform default)."""
    root = os.environ.get("HISTOTILE_CACHE")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("histotile")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | Path, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise :class:`ChecksumError` when the file does not match the given digest(s)."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual.lower() != expected.lower():
                raise ChecksumError(
                    f"{algorithm} mismatch: expected {expected}, got {actual}",
                    "the file is corrupt or not the expected release; delete it and download again",
                    subject=str(path),
                )


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    md5: str | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Fetch ``url`` to ``dest`` (resuming a ``.part`` file) and verify it before renaming.

    An existing ``dest`` that matches the checksum is reused without any network access.
    """
    dest = Path(dest)
    if dest.exists():
        verify(dest, sha256, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            _fetch(url, part, resume=resume, progress=progress, timeout=timeout)
            break
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = exc
            log.info("download of %s interrupted (%s), attempt %d/%d", url, exc, attempt, retries)
    else:
        raise DownloadError(
            f"could not download {url}: {last_error}",
            "check the network, or put the file there by hand",
            subject=str(dest),
        )
    try:
        verify(part, sha256, md5)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return dest


def _fetch(url: str, part: Path, *, resume: bool, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if (resume and part.exists()) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "histotile"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part file is already complete
            return
        raise
    with response:
        if offset and response.status != 206:  # server ignored Range: start again
            offset = 0
        total = response.headers.get("Content-Length")
        total_bytes = int(total) + offset if total is not None else None
        from tqdm import tqdm

        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total_bytes, initial=offset, unit="B", unit_scale=True,
            desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
        ) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
        if total_bytes is not None and part.stat().st_size < total_bytes:
            raise OSError(f"connection closed after {part.stat().st_size} of {total_bytes} bytes")
