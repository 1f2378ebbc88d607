"""Shared fixtures. Test data comes from tests/data and tests/generate.py (see tests/helpers.py);
``../shared/data`` is an optional extra, never needed. Slow tests (``@pytest.mark.slow``) run only
with ``-m slow`` or ``-m ""`` (pyproject's addopts deselect them by default). GPU tests
(``@pytest.mark.gpu``) are skipped when torch sees no CUDA device; ``pytest -m gpu`` runs only
them (the command line's ``-m`` replaces addopts' ``-m 'not slow'``: slow GPU tests run too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CMU, ROOT, SHARED_DATA, real_data  # noqa: F401 - re-exported for test files


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, with the reason, when there is no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def cmu_small() -> Path:
    """CMU-1-Small-Region.svs (Aperio, CC0): the main sample slide."""
    return real_data(CMU)
