"""Model cards: the ``model.json`` every histotile model folder carries.

The card is the contract between ``train`` (which writes it) and ``predict`` (which reads it):
architecture and its arguments, classes with colours, patch size and mpp, input normalisation,
stain normalisation (method, reference, and whether training saw normalised patches), the
weights file with its sha256 and format, training provenance and metrics. Each part is a typed
dataclass; dicts given to the constructor (or assigned later) are converted, so
``ModelCard(architecture={"name": "smallcnn"}, ...)`` works as ``Architecture("smallcnn")``.
How a card turns into the model's input is :mod:`histotile.models.preprocess`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from histotile.errors import ModelError

CARD_FILE = "model.json"
WeightsFormat = Literal["safetensors", "torchscript"]
StainMethod = Literal["none", "macenko"]


@lru_cache(maxsize=1)
def card_schema() -> dict[str, Any]:
    """The JSON schema shipped in the package."""
    text = resources.files("histotile.models").joinpath("model_card.schema.json").read_text()
    return json.loads(text)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class _Part:
    """A card part: ``from_dict`` keeps unknown keys in ``extra`` (when the part has one),
    ``to_dict`` writes them back and leaves out ``None`` values."""

    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = {k: v for k, v in data.items() if k in names and k != "extra"}
        if "extra" in names:
            known["extra"] = {k: v for k, v in data.items() if k not in names}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
            elif value is not None or f.name not in self.OPTIONAL_KEYS:
                out[f.name] = value
        return out


@dataclass
class ClassInfo:
    name: str
    color: tuple[int, int, int]
    description: str = ""


@dataclass
class Architecture(_Part):
    """``build_model(name, num_classes, patch_size, **kwargs)``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Weights(_Part):
    """The weights file (relative to the model folder), its sha256 and format."""

    file: str
    sha256: str
    format: WeightsFormat | None = None
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"format"})

    @property
    def resolved_format(self) -> str:
        """``format``, else from the file name (``.safetensors``, else TorchScript)."""
        if self.format:
            return self.format
        return "safetensors" if self.file.endswith(".safetensors") else "torchscript"


@dataclass
class StainSpec(_Part):
    """``method`` and its ``reference`` (``stain_matrix``, ``max_concentrations``, ``source``;
    ``None``: the standard one); ``in_training``: whether the training patches were normalised
    to it (``False``: trained on patches as they are)."""

    method: StainMethod = "none"
    reference: dict[str, Any] | None = None
    in_training: bool = True


@dataclass
class InputNorm(_Part):
    """Per-channel (RGB) mean and std on the 0-1 scale."""

    mean: list[float]
    std: list[float]


@dataclass
class Training(_Part):
    """Provenance: data, its md5, the command, the seed and the held-out split."""

    data: str = ""
    data_md5: str | None = None
    command: str = ""
    seed: int | None = None
    val_split: str | None = None
    val_fraction: float | None = None
    recipe: str | None = None
    n_train: int | None = None
    n_val: int | None = None
    pretrained: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"seed", "val_split", "val_fraction", "recipe", "n_train", "n_val", "pretrained"})


@dataclass
class Metrics(_Part):
    """Headline metrics per split (``accuracy``, ``balanced_accuracy``, ``auc``, ``n``,
    ``ci95``, ``split``) and the best epoch."""

    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    cross_validation: dict[str, Any] | None = None
    best_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"validation", "test", "cross_validation", "best_epoch"})

    def __bool__(self) -> bool:
        return bool(self.to_dict())


@dataclass
class Domain(_Part):
    """What the model was made for: ``tissue`` (e.g. colorectal) and the least median top
    probability a slide of it should give (``min_median_confidence``); predict warns under it
    (:mod:`histotile.confidence`)."""

    tissue: str | None = None
    min_median_confidence: float | None = None
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"tissue", "min_median_confidence"})


_PARTS: dict[str, Any] = {"architecture": Architecture, "weights": Weights, "stain": StainSpec,
                          "input": InputNorm, "training": Training, "metrics": Metrics,
                          "domain": Domain}


@dataclass
class ModelCard:
    name: str
    version: str
    architecture: Architecture
    classes: list[ClassInfo]
    patch_size: int
    mpp: float
    input: InputNorm
    weights: Weights
    stain: StainSpec = field(default_factory=StainSpec)
    training: Training = field(default_factory=Training)
    metrics: Metrics = field(default_factory=Metrics)
    domain: Domain = field(default_factory=Domain)
    license: str = ""
    notes: str = ""
    description: str = ""
    task: str = "patch-classification"
    schema_version: int = 1

    def __setattr__(self, name: str, value: Any) -> None:
        part = _PARTS.get(name)
        if part is not None and isinstance(value, dict):
            value = part.from_dict(value)
        object.__setattr__(self, name, value)

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
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "classes":
                value = [{"name": c.name, "color": list(c.color),
                          **({"description": c.description} if c.description else {})}
                         for c in value]
            elif isinstance(value, _Part):
                value = json.loads(json.dumps(value.to_dict()))  # a deep, JSON-typed copy
            d[f.name] = value
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
