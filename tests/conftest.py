"""Shared fixtures. Test data comes from tests/data and tests/generate.py (see tests/helpers.py);
``../shared/data`` is an optional extra, never needed. Slow tests (``@pytest.mark.slow``) run only
with ``-m slow`` or ``-m ""`` (pyproject's addopts deselect them by default)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CMU, ROOT, SHARED_DATA, real_data  # noqa: F401 - re-exported for test files


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """CMU-1-Small-Region.svs (Aperio, CC0): the main sample slide."""
    return real_data(CMU)
