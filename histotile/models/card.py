"""Model cards: the ``model.json`` every histotile model folder carries.

The card is the contract between ``train`` (which writes it) and ``predict`` (which reads it):
architecture and its arguments, classes with colours, patch size and mpp, input normalisation,
stain normalisation and its reference, the weights file with its sha256, and provenance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from histotile.errors import ModelError

CARD_FILE = "model.json"


@lru_cache(maxsize=1)
def card_schema() -> dict[str, Any]:
    """The JSON schema shipped in the package."""
    text = resources.files("histotile.models").joinpath("model_card.schema.json").read_text()
    return json.loads(text)


@dataclass
class ClassInfo:
    name: str
    color: tuple[int, int, int]
    description: str = ""


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: dict[str, Any]
    classes: list[ClassInfo]
    patch_size: int
    mpp: float
    input: dict[str, list[float]]
    weights: dict[str, str]
    stain: dict[str, Any] = field(default_factory=lambda: {"method": "none", "reference": None})
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    license: str = ""
    notes: str = ""
    description: str = ""
    task: str = "patch-classification"
    schema_version: int = 1

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return [tuple(c.color) for c in self.classes]  # type: ignore[misc]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = [
            {k: (list(v) if k == "color" else v) for k, v in c.items() if k != "description" or v}
            for c in d["classes"]
        ]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model card") -> ModelCard:
        validate_card(data, source)
        data = dict(data)
        data["classes"] = [
            ClassInfo(name=c["name"], color=tuple(c["color"]), description=c.get("description", ""))
            for c in data["classes"]
        ]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | Path) -> Path:
        """Write ``model.json`` atomically into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        validate_card(data, str(folder / CARD_FILE))
        tmp = folder / (CARD_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(folder / CARD_FILE)
        return folder / CARD_FILE


def validate_card(data: dict[str, Any], source: str = "model card") -> None:
    """Raise :class:`ModelError` naming the first schema violation."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(card_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.path) or "(top level)"
        raise ModelError(
            f"invalid model card: {where}: {err.message}",
            "check model.json against histotile/models/model_card.schema.json",
            subject=source,
        )


def load_card(folder: str | Path) -> ModelCard:
    """Read and validate ``folder/model.json``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise ModelError(
            "no model.json in this folder",
            "a model is a folder with model.json and its weights; see 'histotile models list'",
            subject=str(folder),
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.json is not valid JSON ({exc})", "re-export the model",
                         subject=str(path)) from None
    return ModelCard.from_dict(data, source=str(path))
