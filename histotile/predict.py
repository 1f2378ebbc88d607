"""``histotile.predict``: slides and patch archives → per-patch class probabilities.

Per slide ``OUT/<stem>/`` holds ``heatmap.ome.zarr``, ``predictions.csv``, ``tiles.geojson.gz``
(QuPath), ``overlay.png``, ``tissue.png`` and ``run.json`` (written last by
:func:`histotile.batch.run_batch`; it marks the slide done and a second run skips it). Options
add: ``gradcam`` (a ``gradcam`` image in the zarr, ``gradcam_overlay.png``, a ``gradcam_mean``
per tile in the CSV and GeoJSON), ``classes.geojson.gz`` (``qupath_merge``), ``heatmap.ome.tif``
(``ome_tiff``); every output option is part of the run fingerprint. A patch
archive (PCam HDF5, MedMNIST npz) gives ``predictions.csv`` (``index[,x,y],prob_<class>...,
label[,true_label]``) and ``run.json`` with the accuracy when the archive has labels.

The model card decides the patch size and mpp; ``stain_norm="auto"`` uses the card's stain
method and reference: Macenko fitted once per slide on a seeded sample of ≤ 64 tissue patches
(applied in the readers), or per patch for archives (their patches come from many slides; this
is what ``histotile train``/``evaluate`` do).
Loading is lazy: the card (JSON) is read up front, torch and the weights only when the first
batch of the first slide is ready, and a folder run loads the model once.

Grad-CAM (``gradcam=True``): one forward + backward per batch (:class:`histotile.explain.GradCAM`
at the architecture's last conv block or ``cam_layer``) gives the probabilities and the raw map
of ``cam_class`` (the argmax, or a named class); maps are stitched by
:class:`histotile.explain.CamStitcher` at ``cam_resolution`` level-0 px per CAM pixel, default
``patch_size_level0 / 8`` (8 x 8 CAM pixels per patch, about the 7 x 7 grid of smallcnn's last
block at 28 px), overlapping patches averaged. ``gradcam_mean`` is the mean of a patch's raw map
at the layer's grid (not normalised, comparable between patches of one run).

ViT attention (``attention=True``, architecture ``vit`` only, not with ``gradcam``): the
head-averaged raw CLS-row attention of the last block (:func:`histotile.attention.cls_attention`)
stitched the same way into an ``attention`` image and ``attention_overlay.png`` (no CSV column:
a CLS row sums to 1, so its mean is the same for every patch).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile import __version__
from histotile._callable import make_module_callable
from histotile.errors import (
    CorruptSlideError,
    HistotileError,
    InvalidArgumentError,
    ModelError,
    NoTissueError,
)

if TYPE_CHECKING:
    from histotile.batch import BatchSummary
    from histotile.models.card import ModelCard
    from histotile.models.loading import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256
STAIN_SAMPLE = 64  # tissue patches the per-slide stain fit is made on
STAIN_SEED = 0
OUTPUT_FILES = ("heatmap.ome.zarr", "predictions.csv", "tiles.geojson.gz", "overlay.png",
                "tissue.png", "run.json")
STAIN_METHODS = ("auto", "none", "macenko")
QUPATH_OBJECT_TYPES = ("tile", "detection")
CAM_PIXELS_PER_PATCH = 8  # default --cam-resolution = patch_size_level0 / this


# --------------------------------------------------------------------------- model, lazily
class LazyModel:
    """The card now (cheap JSON), the weights on first call; a failure is remembered."""

    def __init__(self, spec: str | Path | None, device: str = "auto") -> None:
        from histotile.models.card import load_card
        from histotile.models.loading import resolve_model

        self.spec = spec
        self.device_spec = device
        self.folder = resolve_model(spec)
        self.card: ModelCard = load_card(self.folder)
        self._loaded: LoadedModel | None = None
        self._error: BaseException | None = None
        self._device: Any = None
        self.load_s = 0.0

    @property
    def device(self) -> Any:
        """The torch device (imports torch)."""
        if self._device is None:
            from histotile.models.loading import resolve_device

            self._device = resolve_device(self.device_spec)
        return self._device

    def __call__(self) -> LoadedModel:
        if self._loaded is None:
            if self._error is not None:
                raise self._error
            from histotile.models.loading import load_model

            t0 = time.perf_counter()
            try:
                self._loaded = load_model(self.folder, self.device)
            except BaseException as exc:
                self._error = exc
                raise
            self.load_s = time.perf_counter() - t0
            log.info("loaded model %s on %s in %.2f s", self.card.name, self.device, self.load_s)
        return self._loaded

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def describe(self) -> dict[str, Any]:
        """Model info for run.json (weights sha256 as verified when loaded, else the card's)."""
        sha = self._loaded.weights_sha256 if self._loaded else self.card.weights["sha256"]
        return {"name": self.card.name, "version": self.card.version,
                "folder": str(self.folder), "weights_sha256": sha,
                "card": self.card.to_dict()}


# --------------------------------------------------------------------------- settings
@dataclass
class PredictSettings:
    """Everything one predict run needs besides the inputs (see :func:`predict`)."""

    model: LazyModel
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    slide_mpp: float | None = None
    stain_norm: str = "auto"
    min_tissue: float = 0.5
    overlap: float = 0.0
    split: str = "test"
    backend: str = "auto"
    progress: bool = True
    command: str = ""
    region_size: int = 2048
    gradcam: bool = False
    cam_class: str = "predicted"
    cam_layer: str | None = None
    cam_resolution: float | None = None
    attention: bool = False
    geojson_plain: bool = False
    qupath_object_type: str = "tile"
    qupath_min_prob: float | None = None
    qupath_merge: bool = False
    ome_tiff: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    compute: Any = None  # engine.ComputePlan, set once per process before the first item

    @property
    def stain_method(self) -> str:
        if self.stain_norm == "auto":
            return str((self.model.card.stain or {}).get("method") or "none")
        return self.stain_norm

    def fingerprint(self) -> dict[str, Any]:
        """What decides the outputs: a finished slide with the same fingerprint is skipped."""
        card = self.model.card
        return {"job": "predict", "model": card.name, "model_version": card.version,
                "weights_sha256": card.weights["sha256"], "patch_size": card.patch_size,
                "mpp": card.mpp, "stain_norm": self.stain_method, "min_tissue": self.min_tissue,
                "overlap": self.overlap, "slide_mpp": self.slide_mpp, "backend": self.backend,
                "split": self.split,
                "gradcam": {"class": self.cam_class, "layer": self.cam_layer,
                            "resolution": self.cam_resolution} if self.gradcam else None,
                "attention": {"resolution": self.cam_resolution} if self.attention else None,
                "qupath": {"plain": self.geojson_plain, "object_type": self.qupath_object_type,
                           "min_prob": self.qupath_min_prob, "merge": self.qupath_merge},
                "ome_tiff": self.ome_tiff}


class StageTimer:
    """Seconds per named stage (``with timer("tissue"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def git_commit() -> str | None:
    """The commit of the histotile checkout, when it is one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _environment(settings: PredictSettings) -> dict[str, Any]:
    import torch

    dev = settings.model.device
    info: dict[str, Any] = {"histotile_version": __version__, "git_commit": git_commit(),
                            "command": settings.command, "torch_version": torch.__version__,
                            "device": str(dev), "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


# --------------------------------------------------------------------------- stain
def make_stain_step(settings: PredictSettings, sample: np.ndarray | None, subject: str
                    ) -> tuple[Any, dict[str, Any]]:
    """The stain step (or None) and its run.json info.

    With a ``sample`` uint8 (k,P,P,3) the normaliser is fitted once on it (per slide);
    with ``None`` every patch is fitted on its own (per patch, as ``histotile train`` does).
    """
    method = settings.stain_method
    if method == "none":
        return None, {"method": "none"}
    from histotile.engine import StainStep
    from histotile.stain import make_normalizer

    card = settings.model.card
    reference = (card.stain or {}).get("reference") if settings.stain_norm == "auto" else None
    normalizer = make_normalizer(method, reference=reference, channels_last=True)
    info: dict[str, Any] = {"method": method,
                            "reference": "model card" if reference else "default"}
    if sample is None:
        return StainStep(normalizer, None), {**info, "mode": "per patch"}
    try:
        fit = normalizer.fit(sample)
    except NoTissueError as exc:
        log.warning("%s: stain fit failed (%s); predicting without stain normalisation",
                    subject, exc.message)
        return None, {"method": "none", "requested": method, "fit_error": exc.message}
    return StainStep(normalizer, fit), {
        **info, "mode": "per slide", "sample_patches": int(len(sample)), "seed": STAIN_SEED,
        "fit": {"stain_matrix": fit.stain_matrix.double().cpu().tolist(),
                "max_concentrations": fit.max_concentrations.double().cpu().tolist(),
                "n_pixels": int(fit.n_pixels)}}


def _slide_stain_sample(slide: Any, grid: Any) -> np.ndarray:
    from histotile.patches import sample_patches

    return sample_patches(slide, grid, n=STAIN_SAMPLE, seed=STAIN_SEED)


# --------------------------------------------------------------------------- slides
def predict_slide(item: Path, tmp_dir: Path, settings: PredictSettings) -> dict[str, Any]:
    """Predict one slide into ``tmp_dir`` (every output but run.json); returns run info."""
    from histotile.grid import make_grid
    from histotile.patches import plan_regions
    from histotile.slide import open_slide
    from histotile.tissue import detect_tissue

    timer = StageTimer()
    card = settings.model.card
    with timer("open"):
        try:
            slide = open_slide(item, backend=settings.backend, slide_mpp=settings.slide_mpp)
        except HistotileError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader crash on a damaged file
            raise CorruptSlideError(
                f"cannot be read as a slide ({type(exc).__name__}: {exc})",
                "the file may be truncated or corrupt; re-copy it", subject=str(item)) from exc
    with slide:
        slide.require_mpp()
        with timer("tissue"):
            tissue = detect_tissue(slide)
            grid = make_grid(slide, card.patch_size, target_mpp=card.mpp,
                             overlap=settings.overlap, tissue=tissue,
                             min_tissue=settings.min_tissue)
        if len(grid) == 0:
            raise NoTissueError(
                f"no patch has at least {settings.min_tissue:.0%} tissue",
                "lower --min-tissue, or check the slide (blank? wrong --slide-mpp?)",
                subject=str(item))
        regions = plan_regions(grid, slide, settings.region_size)
        with timer("stain"):
            stain, stain_info = make_stain_step(settings, _slide_stain_sample(slide, grid),
                                                str(item))
        stats, extra_info = _run_slide(slide, grid, regions, tissue, stain, tmp_dir, settings,
                                       timer)
        slide_info = slide.info()
    timer.add("read", stats.read_s)
    timer.add("stain", stats.stain_s)
    timer.add("model", stats.model_s)
    return {
        **_environment(settings),
        "kind": "slide", "patches": len(grid), "regions": len(regions),
        "model": settings.model.describe(),
        "mpp": {"slide_mpp": grid.slide_mpp, "source": grid.mpp_source,
                "target_mpp": grid.target_mpp, "effective_mpp": grid.effective_mpp,
                "level": grid.level},
        "grid": grid.to_attrs(),
        "tissue": {"method": tissue.method, "threshold": float(tissue.threshold),
                   "fraction": round(tissue.fraction, 4), "downsample": tissue.downsample,
                   "mask_mpp": tissue.mpp, "mask_shape": list(tissue.mask.shape)},
        "stain": stain_info,
        "settings": {"batch_size": settings.batch_size, "workers": effective_workers(settings),
                     "min_tissue": settings.min_tissue, "overlap": settings.overlap,
                     "backend": slide_info.get("backend"),
                     "pixel_reader": slide_info.get("pixel_reader"),
                     "compute": _compute_info(settings)},
        "slide_info": slide_info,
        "engine": stats.to_dict(),
        "timings": timer.rounded(),
        **extra_info,
        "files": sorted([p.name for p in tmp_dir.iterdir()] + ["run.json"]),
    }


def _compute_info(settings: PredictSettings) -> dict[str, int] | None:
    plan = settings.compute
    return None if plan is None else {"streams": plan.streams, "torch_threads": plan.threads}


def effective_workers(settings: PredictSettings) -> int:
    from histotile.engine import default_workers

    if settings.workers is not None:
        return settings.workers
    return default_workers(settings.model.device)


def _run_slide(slide: Any, grid: Any, regions: list[Any], tissue: Any, stain: Any,
               tmp_dir: Path, settings: PredictSettings, timer: StageTimer
               ) -> tuple[Any, dict[str, Any]]:
    """Stream the slide through the model into the writers; returns (engine stats, run info)."""
    from histotile.engine import EngineStats, run_inference
    from histotile.export.csv import PredictionsCSVWriter
    from histotile.export.qupath import TILES_GZ, TILES_PLAIN, GeoJSONTileWriter
    from histotile.stitch import HeatmapWriter

    card = settings.model.card
    names, colors = card.class_names, card.class_colors
    seed = Path(str(slide.path)).name
    attrs = {**grid.to_attrs(), "model": card.name, "slide": str(slide.path)}
    stats = EngineStats()
    heat = HeatmapWriter(tmp_dir / "heatmap.ome.zarr", grid.grid_shape, grid.indices, names,
                         colors, attrs)
    extra_cols = ["gradcam_mean"] if settings.gradcam else []
    table = PredictionsCSVWriter(tmp_dir / "predictions.csv", names, grid.patch_size_level0,
                                 extra_columns=extra_cols)
    geo = GeoJSONTileWriter(tmp_dir / (TILES_PLAIN if settings.geojson_plain else TILES_GZ),
                            names, colors, object_type=settings.qupath_object_type,
                            min_prob=settings.qupath_min_prob, gzip=not settings.geojson_plain,
                            id_seed=seed)
    writers: list[Any] = [heat, table, geo]
    stitcher, explain = (_gradcam_parts(heat, grid, settings) if settings.gradcam else
                         _attention_parts(heat, grid, settings) if settings.attention else
                         (None, None))
    labels = np.zeros(len(grid), np.int32)  # argmax per patch, for the overlay
    bar = _bar(len(grid), settings.progress, seed)
    try:
        for idx, coords, probs, *maps in run_inference(
                slide.spec, grid, regions, settings.model, settings.model.device,
                batch_size=settings.batch_size, workers=settings.workers, stain=stain,
                stats=stats, on_batch=bar.update if bar is not None else None,
                explain=explain, plan=settings.compute):
            labels[idx] = probs.argmax(axis=1)
            extra = ({"gradcam_mean": maps[0].mean(axis=(1, 2))} if maps and settings.gradcam
                     else None)
            with timer("stitch"):
                heat.write(grid.indices[idx], probs)
                if stitcher is not None:
                    stitcher.add(grid.indices[idx], maps[0])
            with timer("export"):
                table.write(coords, probs, extra=extra)
                geo.write(coords, probs, grid.patch_size_level0, extra=extra)
        with timer("stitch"):
            if stitcher is not None:
                stitcher.close()  # before the writer builds the pyramids
            heat.close()
        with timer("export"):
            table.close()
            geo.close()
            _pictures(tmp_dir, tissue, grid, labels, settings)
            info = _extra_outputs(tmp_dir, tissue, settings, seed, stitcher, geo)
    except BaseException:
        for w in writers:
            with contextlib.suppress(Exception):
                w.abort()
        _drop_cam_scratch(stitcher)
        raise
    finally:
        if bar is not None:
            bar.close()
    return stats, info


def default_cam_resolution(patch_size_level0: Any) -> float:
    """Level-0 px per CAM pixel when ``--cam-resolution`` is not given: the patch's level-0 side
    over :data:`CAM_PIXELS_PER_PATCH` (8 CAM pixels per patch side), rounded, at least 1."""
    side = float(np.max(np.asarray(patch_size_level0, dtype=np.float64)))
    return float(max(1, round(side / CAM_PIXELS_PER_PATCH)))


def _gradcam_parts(heat: Any, grid: Any, settings: PredictSettings) -> tuple[Any, Any]:
    """The CAM stitcher on the heatmap store and the engine's ``explain`` factory."""
    from histotile.explain import CamStitcher, _cam_target

    card = settings.model.card
    target = _cam_target(settings.cam_class, card.class_names)
    resolution = settings.cam_resolution or default_cam_resolution(grid.patch_size_level0)
    label = "predicted class" if target == "predicted" else card.class_names[int(target)]
    stitcher = CamStitcher.from_grid(
        heat, grid, resolution, class_name=f"Grad-CAM ({label})",
        attrs={"cam_class": settings.cam_class, "cam_layer": settings.cam_layer or "default"})
    return stitcher, functools.partial(_make_cam, settings=settings, target=target)


def _attention_parts(heat: Any, grid: Any, settings: PredictSettings) -> tuple[Any, Any]:
    """The ``attention`` image's stitcher and the engine's ``explain`` factory (ViT only)."""
    from histotile.explain import CamStitcher

    resolution = settings.cam_resolution or default_cam_resolution(grid.patch_size_level0)
    stitcher = CamStitcher.from_grid(
        heat, grid, resolution, name="attention",
        class_name="CLS attention (last block, head mean)",
        attrs={"method": "attention", "block_attention": "last", "heads": "mean"})
    return stitcher, _make_attention


def _make_attention(loaded: Any) -> Any:
    """``x -> (head-mean CLS attention (B, g, g), probs)`` for a loaded ViT."""
    from histotile.attention import cls_attention

    def fn(x: Any) -> Any:
        per_head, probs = cls_attention(loaded.module, x)
        return per_head.mean(dim=1), probs

    return fn


def _make_cam(loaded: Any, settings: PredictSettings, target: str | int) -> Any:
    """``x -> (raw maps at the layer's grid, probs)`` for a loaded model (a GradCAM pass)."""
    from histotile.explain import GradCAM, resolve_layer

    layer = resolve_layer(loaded.module, settings.cam_layer,
                          loaded.card.architecture["name"])
    cam = GradCAM(loaded.module, layer)
    return functools.partial(cam, target=target, normalise="none", size=0)


def _drop_cam_scratch(stitcher: Any) -> None:
    scratch = getattr(stitcher, "_scratch", None)
    if scratch is not None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def _extra_outputs(tmp_dir: Path, tissue: Any, settings: PredictSettings, seed: str,
                   stitcher: Any, geo: Any) -> dict[str, Any]:
    """Files made from the closed store/CSV (Grad-CAM overlay, merged classes, OME-TIFF) and
    their run.json info."""
    card = settings.model.card
    info: dict[str, Any] = {"qupath": {
        "tiles": geo.path.name, "object_type": settings.qupath_object_type,
        "min_prob": settings.qupath_min_prob, "tiles_written": geo.count,
        "tiles_dropped": geo.dropped, "merged": settings.qupath_merge}}
    if stitcher is not None and settings.attention:
        from histotile.explain import write_gradcam_overlay_from_store

        write_gradcam_overlay_from_store(tmp_dir / "attention_overlay.png",
                                         tmp_dir / "heatmap.ome.zarr", tissue.thumbnail,
                                         tissue.downsample, name="attention",
                                         title="ViT CLS attention (last block, head mean)")
        info["attention"] = {
            "method": "attention", "block": "last", "heads": "mean",
            "cam_resolution_asked": settings.cam_resolution,
            "cam_resolution_level0": stitcher.resolution, "pixels_per_cell": stitcher.block,
            "cam_scale": stitcher.cam_scale, "raw_max": stitcher.max_value,
            "image": "heatmap.ome.zarr/attention"}
    elif stitcher is not None:
        from histotile.explain import write_gradcam_overlay_from_store

        write_gradcam_overlay_from_store(tmp_dir / "gradcam_overlay.png",
                                         tmp_dir / "heatmap.ome.zarr", tissue.thumbnail,
                                         tissue.downsample)
        info["gradcam"] = {
            "method": "gradcam", "cam_class": settings.cam_class,
            "layer": settings.cam_layer or "default", "cam_resolution_asked":
            settings.cam_resolution, "cam_resolution_level0": stitcher.resolution,
            "block": stitcher.block, "cam_scale": stitcher.cam_scale,
            "raw_max": stitcher.max_value, "image": "heatmap.ome.zarr/gradcam"}
    if settings.qupath_merge:
        from histotile.export.qupath import write_merged

        write_merged(tmp_dir, card.class_names, [list(c) for c in card.class_colors],
                     gzip=not settings.geojson_plain, id_seed=seed)
    if settings.ome_tiff:
        from histotile.export.ome_tiff import export_ome_tiff

        export_ome_tiff(tmp_dir)
    return info


def _pictures(tmp_dir: Path, tissue: Any, grid: Any, labels: np.ndarray,
              settings: PredictSettings) -> None:
    from histotile.export.overlay import write_mask_png, write_overlay

    card = settings.model.card
    write_mask_png(tmp_dir / "tissue.png", tissue.mask)
    write_overlay(tmp_dir / "overlay.png", tissue.thumbnail, tissue.downsample, grid.coords,
                  grid.patch_size_level0, labels, card.class_names, card.class_colors,
                  tissue_mask=tissue.mask)


def _bar(total: int, enabled: bool, name: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name[-30:], unit="patch", leave=False, file=sys.stderr)


# --------------------------------------------------------------------------- archives
def predict_archive(item: Path, tmp_dir: Path, settings: PredictSettings) -> dict[str, Any]:
    """Per-patch predictions for a PCam HDF5 / MedMNIST npz into ``tmp_dir/predictions.csv``."""
    from histotile.archives import open_archive
    from histotile.engine import EngineStats, classify

    timer = StageTimer()
    card = settings.model.card
    if settings.gradcam or settings.attention:
        log.warning("%s: --gradcam/--attention make slide-level maps only; for patch archives "
                    "use histotile explain", item.name)
    with open_archive(item, split=settings.split) as archive:
        if archive.patch_size != card.patch_size:
            raise ModelError(
                f"patches are {archive.patch_size} px but model {card.name!r} expects "
                f"{card.patch_size} px", "use a model made for this patch size",
                subject=str(item))
        with timer("stain"):
            stain, stain_info = make_stain_step(settings, _archive_stain_sample(archive, card),
                                                str(item))
        stats = EngineStats()
        pred = np.empty(len(archive), np.int64)
        bar = _bar(len(archive), settings.progress, item.name)
        path = tmp_dir / "predictions.csv"
        try:
            with open(path, "w", newline="") as fh:
                fh.write(_archive_header(card.class_names, archive) + "\n")
                batches = _archive_batches(archive, settings.batch_size, stain, stats)
                for idx, probs in classify(batches, settings.model, settings.model.device,
                                           stats=stats, plan=settings.compute,
                                           on_batch=bar.update if bar is not None else None):
                    with timer("export"):
                        pred[idx] = probs.argmax(axis=1)
                        fh.write(_archive_rows(idx, probs, card.class_names, archive))
        finally:
            if bar is not None:
                bar.close()
        timer.add("read", stats.read_s)
        timer.add("stain", stats.stain_s)
        timer.add("model", stats.model_s)
        info: dict[str, Any] = {
            **_environment(settings), "kind": archive.kind, "patches": len(archive),
            "split": archive.split if archive.kind == "medmnist-npz" else None,
            "model": settings.model.describe(), "stain": stain_info,
            "settings": {"batch_size": settings.batch_size, "compute": _compute_info(settings)},
            "engine": stats.to_dict(), "timings": timer.rounded(),
            "files": ["predictions.csv", "run.json"],
        }
        if archive.labels is not None:
            info["labels"] = {"source": archive.labels_source}
            info.update(_accuracy(archive.labels, pred, card.num_classes, str(item)))
    return info


def _archive_stain_sample(archive: Any, card: Any) -> np.ndarray | None:
    """Patches for one per-archive stain fit (like per slide) when the model was trained on
    patches as they are (card ``stain.in_training`` false); ``None``: per patch, as trained."""
    if (card.stain or {}).get("in_training", True):
        return None
    first = next(archive.iter_batches(4 * STAIN_SAMPLE), None)
    return None if first is None else first[1]


def _archive_batches(archive: Any, batch_size: int, stain: Any,
                     stats: Any) -> Iterator[tuple[np.ndarray, Any]]:
    import torch

    it = archive.iter_batches(batch_size)
    while True:
        t0 = time.perf_counter()
        nxt = next(it, None)
        t1 = time.perf_counter()
        if nxt is None:
            return
        idx, patches = nxt
        if stain is not None:
            patches = stain(patches)
        stats.read_s += t1 - t0
        stats.stain_s += time.perf_counter() - t1
        yield idx, torch.from_numpy(patches)


def _archive_header(names: Sequence[str], archive: Any) -> str:
    cols = ["index"] + (["x", "y"] if archive.coords is not None else [])
    cols += [f"prob_{n}" for n in names] + ["label"]
    if archive.labels is not None:
        cols.append("true_label")
    return ",".join(cols)


def _archive_rows(idx: np.ndarray, probs: np.ndarray, names: Sequence[str], archive: Any) -> str:
    arg = probs.argmax(axis=1)
    lines = []
    for k, i in enumerate(idx.tolist()):
        parts = [str(i)]
        if archive.coords is not None:
            parts += [str(int(v)) for v in archive.coords[i]]
        parts += [f"{v:.6g}" for v in probs[k].tolist()]
        parts.append(names[arg[k]])
        if archive.labels is not None:
            t = int(archive.labels[i])
            parts.append(names[t] if 0 <= t < len(names) else str(t))
        lines.append(",".join(parts))
    return "\n".join(lines) + "\n"


def _accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int,
              subject: str) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if labels.min() < 0 or labels.max() >= num_classes:
        log.warning("%s: labels %d..%d do not fit the model's %d classes; no accuracy",
                    subject, labels.min(), labels.max(), num_classes)
        return {"accuracy": None}
    return {"accuracy": round(float(accuracy_score(labels, pred)), 6),
            "balanced_accuracy": round(float(balanced_accuracy_score(labels, pred)), 6),
            "correct": int((labels == pred).sum())}


# --------------------------------------------------------------------------- entry point
def make_predict_process(options: dict[str, Any]) -> Any:
    """``process(item, tmp_dir) -> info`` for :func:`histotile.batch.run_items`.

    ``options`` are plain :class:`PredictSettings` keywords with ``model`` as a spec, so
    ``functools.partial(make_predict_process, options)`` pickles to dask workers; each process
    builds its own lazily loaded model once and reuses it for every item.
    """
    from histotile.archives import is_archive

    opts = dict(options)
    settings = PredictSettings(model=LazyModel(opts.pop("model"), opts.get("device", "auto")),
                               **opts)
    configured: list[bool] = []

    def process(item: Path, tmp_dir: Path) -> dict[str, Any]:
        settings.model.raise_if_failed()  # a model that failed to load fails the rest fast
        t0 = time.perf_counter()
        if not configured:  # torch is imported only once there is work to do
            from histotile.engine import configure_threads

            settings.compute = configure_threads(
                settings.model.device, effective_workers(settings),
                explain=settings.gradcam or settings.attention)
            configured.append(True)
        setup = time.perf_counter() - t0
        if is_archive(item):
            info = predict_archive(Path(item), Path(tmp_dir), settings)
        else:
            info = predict_slide(Path(item), Path(tmp_dir), settings)
        info["timings"]["setup"] = round(setup, 3)  # torch import (first item), threads
        return info

    return process


def _validate(batch_size: int, workers: int | None, min_tissue: float, overlap: float,
              stain_norm: str, qupath_object_type: str = "tile",
              qupath_min_prob: float | None = None, cam_resolution: float | None = None
              ) -> None:
    if batch_size < 1:
        raise InvalidArgumentError(f"batch size {batch_size} is not positive",
                                   "use e.g. --batch-size 256", subject="--batch-size")
    if workers is not None and workers < 0:
        raise InvalidArgumentError(f"{workers} workers", "use 0 or more", subject="--workers")
    if not 0.0 <= min_tissue <= 1.0:
        raise InvalidArgumentError(f"min tissue {min_tissue} is outside [0, 1]",
                                   "use e.g. --min-tissue 0.5", subject="--min-tissue")
    if not 0.0 <= overlap < 1.0:
        raise InvalidArgumentError(f"overlap {overlap} is outside [0, 1)",
                                   "use e.g. --overlap 0.5", subject="--overlap")
    if stain_norm not in STAIN_METHODS:
        raise InvalidArgumentError(f"unknown stain normalisation {stain_norm!r}",
                                   f"use one of {', '.join(STAIN_METHODS)}",
                                   subject="--stain-norm")
    if qupath_object_type not in QUPATH_OBJECT_TYPES:
        raise InvalidArgumentError(f"unknown QuPath object type {qupath_object_type!r}",
                                   f"use one of {', '.join(QUPATH_OBJECT_TYPES)}",
                                   subject="--qupath-object-type")
    if qupath_min_prob is not None and not 0.0 <= qupath_min_prob <= 1.0:
        raise InvalidArgumentError(f"minimum probability {qupath_min_prob} is outside [0, 1]",
                                   "use e.g. --qupath-min-prob 0.5", subject="--qupath-min-prob")
    if cam_resolution is not None and not cam_resolution > 0:
        raise InvalidArgumentError(f"CAM resolution {cam_resolution} is not positive",
                                   "use level-0 px per CAM pixel, e.g. --cam-resolution 16",
                                   subject="--cam-resolution")


def _check_gradcam(model: LazyModel, cam_class: str) -> None:
    """Up front, from the card: a known class and an eager (not TorchScript) model."""
    from histotile.explain import _cam_target

    card = model.card
    try:
        _cam_target(cam_class, card.class_names)
    except InvalidArgumentError as exc:
        exc.subject = exc.subject or "--cam-class"
        raise
    fmt = card.weights.get("format") or (
        "safetensors" if str(card.weights.get("file", "")).endswith(".safetensors")
        else "torchscript")
    if fmt == "torchscript":
        raise ModelError("Grad-CAM needs an eager PyTorch model, not TorchScript",
                         "use a model folder with safetensors weights, or drop --gradcam",
                         subject=card.name)


def _check_attention(model: LazyModel, gradcam: bool) -> None:
    """Up front, from the card: a ViT, and not together with Grad-CAM."""
    if gradcam:
        raise InvalidArgumentError("--attention and --gradcam cannot be used together",
                                   "pick one map per run", subject="--attention")
    arch = str(model.card.architecture.get("name"))
    if arch != "vit":
        raise ModelError(f"--attention needs a Vision Transformer, not architecture {arch!r}",
                         "use a model trained with --arch vit, or --gradcam",
                         subject=model.card.name)


def predict(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path = "histotile-out",
    model: str | Path | None = None,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    slide_mpp: float | None = None,
    stain_norm: str = "auto",
    min_tissue: float = 0.5,
    overlap: float = 0.0,
    overwrite: bool = False,
    split: str = "test",
    backend: str = "auto",
    shard: tuple[int, int] | str | None = None,
    executor: str = "serial",
    jobs: int = 2,
    cluster: str = "slurm",
    cluster_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    on_error: Any = "report",
    command: str | None = None,
    gradcam: bool = False,
    cam_class: str = "predicted",
    cam_layer: str | None = None,
    cam_resolution: float | None = None,
    attention: bool = False,
    geojson_plain: bool = False,
    qupath_object_type: str = "tile",
    qupath_min_prob: float | None = None,
    qupath_merge: bool = False,
    ome_tiff: bool = False,
) -> BatchSummary:
    """Predict every slide/archive in ``inputs`` into ``out_dir/<stem>/``.

    ``inputs``: files, folders (sorted, recursive), globs or list files. ``model``: a bundled
    name (default ``pathmnist-smallcnn``), a model folder, a URL or ``hf://org/repo``.
    ``workers=None`` picks the engine default (see :mod:`histotile.engine`). Finished items
    with the same settings are skipped unless ``overwrite``. One failing item does not stop
    the others: see the returned summary (``.failed``, ``.exit_code``, ``.manifest``).
    ``executor``: ``serial`` (this process), ``local`` or ``dask-jobqueue`` (``jobs`` workers).
    ``gradcam``/``cam_*``: Grad-CAM maps of ``cam_class`` (``predicted`` or a class name) at
    ``cam_layer`` (default: the architecture's last conv block), ``cam_resolution`` level-0 px
    per CAM pixel (default ``patch_size_level0 / 8``). ``attention``: stitch a ViT's
    head-mean CLS attention instead (image ``attention``, ``attention_overlay.png``; uses
    ``cam_resolution`` too). ``geojson_plain``,
    ``qupath_object_type`` (tile|detection), ``qupath_min_prob``, ``qupath_merge``: the QuPath
    export; ``ome_tiff``: also ``heatmap.ome.tif``.
    """
    from histotile.batch import expand_inputs, resolve_shard
    from histotile.hpc import run_items

    _validate(batch_size, workers, min_tissue, overlap, stain_norm, qupath_object_type,
              qupath_min_prob, cam_resolution)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items = expand_inputs(inputs)
    if str(device) != "auto" and str(device) != "cpu":  # fail once, up front (imports torch)
        from histotile.models.loading import resolve_device

        resolve_device(device)
    options = {
        "model": None if model is None else str(model), "device": device,
        "batch_size": batch_size, "workers": workers, "slide_mpp": slide_mpp,
        "stain_norm": stain_norm, "min_tissue": min_tissue, "overlap": overlap,
        "split": split, "backend": backend, "progress": progress,
        "command": command if command is not None else _library_command(inputs, out_dir, model),
        "gradcam": gradcam, "cam_class": cam_class, "cam_layer": cam_layer,
        "cam_resolution": cam_resolution, "attention": attention,
        "geojson_plain": geojson_plain,
        "qupath_object_type": qupath_object_type, "qupath_min_prob": qupath_min_prob,
        "qupath_merge": qupath_merge, "ome_tiff": ome_tiff,
    }
    lazy = LazyModel(model, device)
    if attention:
        _check_attention(lazy, gradcam)
    if gradcam:
        _check_gradcam(lazy, cam_class)
    fingerprint = PredictSettings(model=lazy, **{k: v for k, v in options.items()
                                                 if k != "model"}).fingerprint()
    if isinstance(shard, str) or shard is None:
        shard = resolve_shard(shard)
    return run_items(items, out_dir, functools.partial(make_predict_process, options),
                     fingerprint, executor=executor, jobs=jobs, cluster=cluster, shard=shard,
                     overwrite=overwrite, progress=progress, on_error=on_error,
                     cluster_kwargs=cluster_kwargs)


def _library_command(inputs: Any, out_dir: Any, model: Any) -> str:
    argv = " ".join(shlex.quote(a) for a in sys.argv)
    return f"{argv} :: histotile.predict({list(map(str, inputs))!r}, out_dir={str(out_dir)!r}, " \
           f"model={model!r}) [pid {os.getpid()}]"


def accuracy_lines(summary: BatchSummary) -> list[str]:
    """``<name>: accuracy 0.912 (912/1000)`` for each finished archive with labels."""
    import json

    lines = []
    for r in summary.results:
        if r.status not in ("done", "skipped") or not r.output:
            continue
        try:
            run = json.loads((Path(r.output) / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if run.get("accuracy") is not None:
            lines.append(f"{Path(r.slide).name}: accuracy {run['accuracy']:.4f} "
                         f"({run['correct']}/{run['patches']}), balanced accuracy "
                         f"{run['balanced_accuracy']:.4f}")
    return lines


__all__ = ["LazyModel", "PredictSettings", "accuracy_lines", "predict", "predict_archive",
           "predict_slide", "HistotileError"]


make_module_callable(__name__, "predict")
