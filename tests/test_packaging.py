"""Packaging and dependency bounds: the newest allowed click, the wheel's contents."""

from __future__ import annotations

import sys

from histotile.cli.train import _command_line, train


def test_click85_flag_default_does_not_crash(monkeypatch) -> None:
    """click 8.5 gives a plain flag (``--download``, ``--resume``) a sentinel default: rebuilding
    the command line of an in-process ``train`` called max() on an empty list."""
    monkeypatch.setattr(sys, "argv", ["pytest"])  # in-process: the line is rebuilt
    args = ["pathmnist", "--epochs", "2", "--no-augment", "--resume", "--lr", "0.001"]
    with train.make_context("train", list(args)) as ctx:
        line = _command_line(ctx)
    # given options come back as typed (even --lr at its default value), defaults stay out
    assert line == "histotile train pathmnist --epochs 2 --lr 0.001 --no-augment --resume"
    with train.make_context("train", ["pcam"]) as ctx:
        assert _command_line(ctx) == "histotile train pcam"


def test_tests_data_is_listed_checked_and_small() -> None:
    """Every file kept in tests/data is in MD5SUMS with its md5 and named in the README (source,
    licence); the folder stays under its 12 MB hard limit."""
    from helpers import DATA

    from histotile.download import file_digest

    listed = dict(reversed(line.split(maxsplit=1))
                  for line in (DATA / "MD5SUMS").read_text().splitlines())
    kept = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file()}
    assert kept - set(listed) == {"MD5SUMS", "README.md", "LICENSES/torchstain-MIT.txt",
                                  "LICENSES/tiatoolbox-BSD-3-Clause.txt"}
    assert set(listed) <= kept
    assert {rel: file_digest(DATA / rel, "md5") for rel in listed} == listed
    readme = (DATA / "README.md").read_text()
    for rel in listed:  # each file, or its folder, has a row
        assert rel in readme or rel.rsplit("/", 1)[0] + "/" in readme, rel
    assert sum((DATA / rel).stat().st_size for rel in kept) < 12_000_000
