"""The options of each command: one frozen dataclass per command, defined here once.

Each options object holds its defaults, its choices (``Literal`` types, read back with
:func:`choices`) and its validation (``__post_init__``: a bad value raises
:class:`~histotile.errors.InvalidArgumentError` naming the option, before any slide is opened).
The click layer builds the object (option defaults and choices are read from the fields here,
see :func:`field_default`), the Python API takes it (``histotile.predict(inputs, out, options,
**overrides)``), run.json records it (:meth:`PredictOptions.to_dict`) and the resume
fingerprint is derived from it (:mod:`histotile.inference.fingerprint`).

Nothing heavy is imported: the CLI imports this module for ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from histotile.errors import InvalidArgumentError

StainNorm = Literal["auto", "none", "macenko"]
TileStainNorm = Literal["none", "macenko"]
Backend = Literal["auto", "openslide", "tiffslide", "slideio"]
ArchiveSplit = Literal["train", "val", "test"]
QupathObjectType = Literal["tile", "detection"]
TissueMethod = Literal["otsu", "otsu-gray"]
Executor = Literal["serial", "local", "dask-jobqueue"]
Cluster = Literal["slurm", "pbs", "sge", "lsf", "htcondor"]

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEFAULT_TILE_MPP = 0.972  # PatchCamelyon's 96 px patches at 10x
#: Share of a slide's patches that may be undecodable (damaged tiles) before it fails
#: (``predict`` and ``tile``).
DEFAULT_MAX_UNREADABLE = 0.05

T = TypeVar("T")


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type (the CLI's ``click.Choice``)."""
    return tuple(get_args(literal))


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of options class ``cls`` (the CLI reads defaults here)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")


def field_type(cls: type, name: str) -> tuple[Any, bool]:
    """(the field's type without ``None``, whether ``None`` is allowed)."""
    hint = get_type_hints(cls)[name]
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(get_args(hint))
    return hint, False


def option_name(name: str) -> str:
    """``slide_mpp`` -> ``--slide-mpp`` (how errors name the option)."""
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------- rules
def _positive_finite(name: str, value: float | None, example: str) -> None:
    if value is None:
        return
    try:
        ok = math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidArgumentError(f"{option_name(name)} {value} is not a finite positive number",
                                   f"use e.g. {option_name(name)} {example}",
                                   subject=option_name(name))


def _int_at_least(name: str, value: int | None, low: int, example: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{option_name(name)} {value} is not an integer >= {low}",
                                   f"use e.g. {option_name(name)} {example}",
                                   subject=option_name(name))


def _in_range(name: str, value: float | None, low: float, high: float, high_open: bool,
              example: str) -> None:
    if value is None:
        return
    try:
        v = float(value)
        ok = math.isfinite(v) and low <= v and (v < high if high_open else v <= high)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bracket = ")" if high_open else "]"
        raise InvalidArgumentError(f"{option_name(name)} {value} is outside [{low:g}, {high:g}"
                                   f"{bracket}", f"use e.g. {option_name(name)} {example}",
                                   subject=option_name(name))


def _choice(name: str, value: Any, literal: Any) -> None:
    allowed = choices(literal)
    if value not in allowed:
        raise InvalidArgumentError(f"unknown {option_name(name)} {value!r}",
                                   f"use one of {', '.join(allowed)}", subject=option_name(name))


def _existing_path(obj: Any, name: str, example: str) -> None:
    """An input file or folder option: it must exist; stored absolute (the same for every worker
    and rerun)."""
    value = getattr(obj, name)
    if value is None:
        return
    if not os.path.exists(value):
        raise InvalidArgumentError(f"{option_name(name)} {value} does not exist",
                                   f"use e.g. {option_name(name)} {example}",
                                   subject=option_name(name))
    object.__setattr__(obj, name, os.path.abspath(value))


def _device(value: str) -> None:
    if not DEVICE_PATTERN.match(str(value)):
        raise InvalidArgumentError(f"unknown device {value!r}",
                                   "use auto, cpu, cuda, cuda:N or mps",
                                   subject="--device")


def _replace(obj: T, overrides: Mapping[str, Any]) -> T:
    known = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown option {unknown[0]!r} for {type(obj).__name__}",
                                   f"known options: {', '.join(sorted(known))}",
                                   subject=unknown[0])
    return dataclasses.replace(obj, **overrides)  # type: ignore[type-var]


def jsonable(obj: Any) -> Any:
    """Options (nested dataclasses, tuples, paths) as JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- batch
@dataclass(frozen=True)
class BatchOptions:
    """How a multi-item command runs its items (none of it changes an item's outputs).

    ``shard``: ``(i, n)``, an ``"i/n"`` string, or ``None`` (from the SLURM array environment,
    else all items); ``executor``: ``serial`` (this process), ``local`` (a dask LocalCluster of
    ``jobs`` processes) or ``dask-jobqueue`` (``jobs`` batch jobs on ``cluster``, with
    ``cluster_kwargs``); ``overwrite``: recompute finished items.
    """

    shard: tuple[int, int] | str | None = None
    executor: Executor = "serial"
    jobs: int = 2
    cluster: Cluster = "slurm"
    cluster_kwargs: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False

    def __post_init__(self) -> None:
        _choice("executor", self.executor, Executor)
        _choice("cluster", self.cluster, Cluster)
        _int_at_least("jobs", self.jobs, 1, "2")
        if isinstance(self.shard, list):
            object.__setattr__(self, "shard", tuple(self.shard))

    def run_items_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`histotile.batch.run_items`."""
        return {"shard": self.shard, "executor": self.executor, "jobs": self.jobs,
                "cluster": self.cluster, "cluster_kwargs": dict(self.cluster_kwargs),
                "overwrite": self.overwrite}


BATCH_FIELDS = frozenset(f.name for f in dataclasses.fields(BatchOptions))


def _max_unreadable(value: float) -> None:
    _in_range("max_unreadable", value, 0.0, 1.0, False, f"{DEFAULT_MAX_UNREADABLE:g}")


# --------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class PredictOptions:
    """Everything ``histotile predict`` takes besides its inputs and output folder.

    ``model``: a bundled name (``None``: the default model), a model folder, a URL or
    ``hf://org/repo``. ``stain_norm``: ``auto`` applies what the model's card says its training
    saw (its method and reference when ``stain.in_training`` is true, else nothing);
    ``macenko`` normalises to the card's reference (the standard one when the card has none);
    ``none`` never normalises. ``workers=None``: the engine's default. ``split``: the split of
    MedMNIST ``.npz`` archives. ``gradcam``/``cam_*``, ``attention``: maps stitched per slide;
    ``geojson_plain``, ``qupath_*``, ``ome_tiff``: export choices. ``allow_darkfield``: run a
    fluorescence / dark-field slide through the (brightfield) model instead of refusing it.
    ``max_unreadable``: the share of a slide's patches that may be undecodable (a damaged tile)
    before the slide fails; the rest is predicted and the unreadable ones recorded.
    ``tissue_mask``: a QuPath GeoJSON (or a folder of them, matched by slide) replacing tissue
    detection. ``command``: the command line recorded in run.json (``None``: the Python call).
    """

    model: str | None = None
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    slide_mpp: float | None = None
    stain_norm: StainNorm = "auto"
    min_tissue: float = 0.5
    overlap: float = 0.0
    split: ArchiveSplit = "test"
    backend: Backend = "auto"
    region_size: int = 2048
    gradcam: bool = False
    cam_class: str = "predicted"
    cam_layer: str | None = None
    cam_resolution: float | None = None
    attention: bool = False
    geojson_plain: bool = False
    qupath_object_type: QupathObjectType = "tile"
    qupath_min_prob: float | None = None
    qupath_merge: bool = False
    ome_tiff: bool = False
    allow_darkfield: bool = False
    max_unreadable: float = DEFAULT_MAX_UNREADABLE
    tissue_mask: str | None = None
    progress: bool = True
    command: str | None = None
    batch: BatchOptions = field(default_factory=BatchOptions)

    def __post_init__(self) -> None:
        if isinstance(self.model, Path):
            object.__setattr__(self, "model", str(self.model))
        _device(self.device)
        _int_at_least("batch_size", self.batch_size, 1, "256")
        _int_at_least("workers", self.workers, 0, "4")
        _positive_finite("slide_mpp", self.slide_mpp, "0.25")
        _choice("stain_norm", self.stain_norm, StainNorm)
        _in_range("min_tissue", self.min_tissue, 0.0, 1.0, False, "0.5")
        _in_range("overlap", self.overlap, 0.0, 1.0, True, "0.5")
        _choice("split", self.split, ArchiveSplit)
        _choice("backend", self.backend, Backend)
        _int_at_least("region_size", self.region_size, 1, "2048")
        _positive_finite("cam_resolution", self.cam_resolution, "16")
        _choice("qupath_object_type", self.qupath_object_type, QupathObjectType)
        _in_range("qupath_min_prob", self.qupath_min_prob, 0.0, 1.0, False, "0.5")
        _max_unreadable(self.max_unreadable)
        _existing_path(self, "tissue_mask", "tissue.geojson")
        if self.attention and self.gradcam:
            raise InvalidArgumentError("--attention and --gradcam cannot be used together",
                                       "pick one map per run", subject="--attention")
        if isinstance(self.batch, Mapping):
            object.__setattr__(self, "batch", BatchOptions(**self.batch))

    def replace(self, **overrides: Any) -> PredictOptions:
        """A copy with ``overrides``; batch keywords (``executor``, ``shard``, ...) go to
        :attr:`batch`. An unknown name is refused."""
        batch = {k: overrides.pop(k) for k in list(overrides) if k in BATCH_FIELDS}
        if batch:
            overrides["batch"] = _replace(self.batch, batch)
        return _replace(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for run.json."""
        return jsonable(self)


# --------------------------------------------------------------------------- tile
@dataclass(frozen=True)
class TileOptions:
    """Everything ``histotile tile`` takes besides its slides and output folder.

    ``mpp=None`` with ``level=None`` means :data:`DEFAULT_TILE_MPP`; ``level`` alone reads that
    pyramid level at its own resolution. ``stain_target``: the image whose stains are the
    reference (``None``: the standard one). ``limit``: keep the first N patches.
    ``max_unreadable``: as :class:`PredictOptions` (undecodable patches are left out of the
    archive and recorded; above this share the slide fails).
    ``tissue_mask``: a QuPath GeoJSON (or a folder of them, matched by slide) replacing tissue
    detection. ``labels``: QuPath GeoJSON annotations (file or folder, matched by slide): only
    patches with at least ``label_min_fraction`` of their area inside one class are kept, labelled
    with it (a patch reaching it in two classes is dropped; unannotated tissue is left out).
    """

    patch_size: int = 96
    mpp: float | None = None
    level: int | None = None
    slide_mpp: float | None = None
    overlap: float = 0.0
    min_tissue: float = 0.5
    tissue_method: TissueMethod = "otsu"
    limit: int | None = None
    stain_norm: TileStainNorm = "none"
    stain_target: str | None = None
    backend: Backend = "auto"
    max_unreadable: float = DEFAULT_MAX_UNREADABLE
    batch_size: int = 256
    progress: bool = False
    tissue_mask: str | None = None
    labels: str | None = None
    label_min_fraction: float = 0.5

    def __post_init__(self) -> None:
        _existing_path(self, "tissue_mask", "tissue.geojson")
        _existing_path(self, "labels", "annotations/")
        _in_range("label_min_fraction", self.label_min_fraction, 0.0, 1.0, False, "0.5")
        if self.label_min_fraction == 0:
            raise InvalidArgumentError("--label-min-fraction 0 would label every patch",
                                       "use e.g. --label-min-fraction 0.5",
                                       subject="--label-min-fraction")
        _int_at_least("patch_size", self.patch_size, 1, "96")
        _positive_finite("mpp", self.mpp, "0.5")
        _int_at_least("level", self.level, 0, "0")
        _positive_finite("slide_mpp", self.slide_mpp, "0.25")
        _in_range("overlap", self.overlap, 0.0, 1.0, True, "0.5")
        _in_range("min_tissue", self.min_tissue, 0.0, 1.0, False, "0.5")
        _choice("tissue_method", self.tissue_method, TissueMethod)
        _int_at_least("limit", self.limit, 0, "1000")
        _choice("stain_norm", self.stain_norm, TileStainNorm)
        _choice("backend", self.backend, Backend)
        _max_unreadable(self.max_unreadable)
        _int_at_least("batch_size", self.batch_size, 1, "256")
        if self.stain_target is not None:  # absolute: the same file for every worker and rerun
            object.__setattr__(self, "stain_target", os.path.abspath(self.stain_target))

    @property
    def target_mpp(self) -> float | None:
        """The mpp patches are cut at (``None``: the level's own)."""
        return DEFAULT_TILE_MPP if self.mpp is None and self.level is None else self.mpp

    def replace(self, **overrides: Any) -> TileOptions:
        return _replace(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


# --------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class EvaluateOptions:
    """Everything ``histotile evaluate`` takes besides the model and the dataset.

    ``split``: ``val`` is the model's held-out split; with ``val_fraction``/``seed`` left
    ``None`` it is the split recorded in the model card (``training.val_fraction`` and
    ``training.seed``), so it never overlaps the images the model was trained on.
    ``compare``: a second model for a paired test. ``labels``: a labels file for folder
    datasets.
    """

    split: ArchiveSplit = "test"
    out_dir: str | None = None
    compare: str | None = None
    data_dir: str | None = None
    download: bool = False
    batch_size: int = 256
    device: str = "auto"
    workers: int = 0
    labels: str | None = None
    val_fraction: float | None = None
    seed: int | None = None
    progress: bool = True
    n_boot: int = 1000
    plots: bool = True

    def __post_init__(self) -> None:
        for name in ("out_dir", "compare", "data_dir", "labels"):
            if isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, str(getattr(self, name)))
        _choice("split", self.split, ArchiveSplit)
        _int_at_least("batch_size", self.batch_size, 1, "256")
        _device(self.device)
        _int_at_least("workers", self.workers, 0, "4")
        _in_range("val_fraction", self.val_fraction, 0.0, 1.0, True, "0.1")
        _int_at_least("seed", self.seed, 0, "0")
        _int_at_least("n_boot", self.n_boot, 0, "1000")

    def replace(self, **overrides: Any) -> EvaluateOptions:
        return _replace(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


__all__ = ["BatchOptions", "EvaluateOptions", "PredictOptions", "TileOptions", "choices",
           "field_default"]
