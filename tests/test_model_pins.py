"""A ``#sha256=`` pin on a model URL holds on every use, cached or not (issue 17, item 8).

A local HTTP server on 127.0.0.1 stands in for the model host and counts the requests.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
from helpers import make_untrained_model

from histotile.errors import ChecksumError
from histotile.models.loading import resolve_model


@pytest.fixture()
def host(tmp_path: Path, monkeypatch):
    """(www folder, base URL, list of requested paths)."""
    monkeypatch.setenv("HISTOTILE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # http.server's name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def _publish(root: Path, tmp_path: Path, name: str, seed: int) -> str:
    """Zip a generated model folder as ``root/model.zip``; returns its sha256."""
    folder = make_untrained_model(tmp_path / f"generated-{name}-{seed}", seed=seed)
    with zipfile.ZipFile(root / "model.zip", "w") as zf:
        for p in folder.iterdir():
            zf.write(p, f"m/{p.name}")
    return hashlib.sha256((root / "model.zip").read_bytes()).hexdigest()


def test_issue17_wrong_pin_fails_even_when_the_url_is_cached(host, tmp_path):
    root, base, requests = host
    sha = _publish(root, tmp_path, "a", seed=0)
    assert (resolve_model(f"{base}/model.zip#sha256={sha}") / "model.json").is_file()
    with pytest.raises(ChecksumError):
        resolve_model(f"{base}/model.zip#sha256={'1' * 64}")


def test_issue17_new_pin_for_a_replaced_file_fetches_the_new_file(host, tmp_path):
    root, base, requests = host
    old = _publish(root, tmp_path, "a", seed=0)
    first = resolve_model(f"{base}/model.zip#sha256={old}")
    old_weights = (first / "weights.safetensors").read_bytes()
    n = len(requests)
    assert resolve_model(f"{base}/model.zip#sha256={old}") == first
    assert len(requests) == n  # same pin, verified cache: no request
    new = _publish(root, tmp_path, "b", seed=1)  # the host replaces the file
    assert new != old
    second = resolve_model(f"{base}/model.zip#sha256={new}")
    assert len(requests) == n + 1 and second != first
    assert (second / "weights.safetensors").read_bytes() != old_weights


def test_issue17_tampered_cached_archive_is_fetched_again(host, tmp_path):
    root, base, requests = host
    sha = _publish(root, tmp_path, "a", seed=0)
    folder = resolve_model(f"{base}/model.zip#sha256={sha}")
    cached = next((tmp_path / "cache" / "models").glob("sha256-*/model.zip"))
    cached.write_bytes(b"not the pinned archive")
    n = len(requests)
    assert resolve_model(f"{base}/model.zip#sha256={sha}") == folder
    assert len(requests) == n + 1
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha


def test_issue17_unpinned_url_warns_that_nothing_verifies_it(host, tmp_path, caplog):
    root, base, _ = host
    _publish(root, tmp_path, "a", seed=0)
    with caplog.at_level(logging.WARNING, logger="histotile.models.loading"):
        resolve_model(f"{base}/model.zip")
    assert any("nothing verifies" in r.getMessage() for r in caplog.records)


def test_malformed_pin_is_refused(host, tmp_path):
    root, base, requests = host
    _publish(root, tmp_path, "a", seed=0)
    from histotile.errors import ModelError

    with pytest.raises(ModelError, match="64 hex digits"):
        resolve_model(f"{base}/model.zip#sha256=abc")
    assert requests == []
