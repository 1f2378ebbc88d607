"""Shared fixtures: real data from ../shared/data, else the project's sample-data cache."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def real_data(relpath: str) -> Path:
    """Path of a real data file: ``../shared/data/<relpath>`` or histotile's sample-data cache.

    Skips the test with the reason when the file can be had neither way.
    """
    local = SHARED_DATA / relpath
    if local.exists():
        return local
    try:
        from histotile.sample_data import fetch_by_path

        return fetch_by_path(relpath)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot be had here"
        pytest.skip(f"real data {relpath!r} not in ../shared/data and not obtainable: {exc}")


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """CMU-1-Small-Region.svs (Aperio, CC0): the main sample slide."""
    return real_data("slides/CMU-1-Small-Region.svs")
