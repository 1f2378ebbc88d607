"""histotile.fileio: the one atomic-write helper, JSON-safe values, the recorded command line."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from histotile import fileio


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_issue17_item16_files_written_through_temp_files_follow_the_umask(tmp_path, umask, mask):
    # train/report.py wrote metrics.json, history.csv and the plots through mkstemp: mode 0600
    # whatever the umask, while model.json (a plain write) was 0644.
    from histotile.training.report import write_history_csv, write_json

    umask(mask)
    assert fileio.current_umask() == mask
    files = [write_json(tmp_path / "metrics.json", {"a": 1}),
             write_history_csv(tmp_path / "history.csv", [{"epoch": 1, "train_loss": 0.5}]),
             fileio.write_bytes(tmp_path / "w.bin", b"x"),
             fileio.write_json(tmp_path / "j.json", {"b": 2})]
    with fileio.atomic_path(tmp_path / "store.zarr") as tmp:
        tmp.mkdir()
        (tmp / "0").write_text("chunk")
    for f in files:
        assert _mode(f) == 0o666 & ~mask, f.name
    assert _mode(tmp_path / "store.zarr") == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["history.csv", "j.json", "metrics.json", "store.zarr", "w.bin"]


def test_atomic_path_leaves_old_file_on_failure_and_unique_temps(tmp_path):
    target = fileio.write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    a, b = fileio.temp_path(target), fileio.temp_path(target)
    assert a != b and a.parent == target.parent and a.suffix == ".txt"
    assert f".{os.getpid()}-" in a.name


def test_atomic_path_replaces_a_folder(tmp_path):
    for text in ("one", "two"):
        with fileio.atomic_path(tmp_path / "store") as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (tmp_path / "store" / "f").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_json_safe_converts_numpy_paths_and_non_finite():
    value = {1: np.float32(0.5), "a": np.arange(3), "b": (np.int64(2), Path("x/y")),
             "c": float("nan"), "d": np.float64("inf"), "e": np.bool_(True)}
    out = fileio.json_safe(value)
    assert out == {"1": 0.5, "a": [0, 1, 2], "b": [2, "x/y"], "c": None, "d": None, "e": True}
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_command_line_records_cli_or_python_call(monkeypatch):
    assert fileio.command_line(["predict", "a b.svs"]) == "histotile predict 'a b.svs'"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/histotile", "train", "pathmnist"])
    assert fileio.command_line(call="ignored") == "histotile train pathmnist"
    monkeypatch.setattr(sys, "argv", ["script.py"])
    call = fileio.python_call("train", "pathmnist", epochs=3)
    assert fileio.command_line(call=call) == "histotile.train('pathmnist', epochs=3)"
