"""The bundled model zoo: model folders shipped inside the package (``histotile/models/zoo/``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from histotile.errors import ModelError

DEFAULT_MODEL = "pathmnist-smallcnn"


def zoo_dir() -> Path:
    """Folder holding one sub-folder per bundled model."""
    return Path(str(resources.files("histotile.models"))) / "zoo"


def list_models() -> list[str]:
    """Names of the bundled models (folders with a ``model.json``), sorted."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "model.json").is_file())


def model_path(name: str) -> Path:
    """Folder of the bundled model ``name`` (ModelError when there is none)."""
    path = zoo_dir() / name
    if not (path / "model.json").is_file():
        available = ", ".join(list_models()) or "none installed"
        raise ModelError(f"no bundled model named {name!r}",
                         f"bundled models: {available}; or pass a model folder or URL",
                         subject=name)
    return path
