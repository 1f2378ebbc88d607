"""``predict`` on one slide: tissue, grid, the slide's stain fit, inference streamed into the
heatmap (OME-Zarr), predictions.csv, QuPath GeoJSON and the pictures; optional Grad-CAM or ViT
attention maps stitched beside the heatmap, merged QuPath classes and an OME-TIFF.

Grad-CAM (``gradcam``): one forward + backward per batch (:class:`histotile.gradcam.GradCAM`
at the architecture's last conv block or ``cam_layer``) gives the probabilities and the raw map
of ``cam_class`` (the argmax, or a named class); maps are stitched by
:class:`histotile.stitch.CamStitcher` at ``cam_resolution`` level-0 px per CAM pixel, default
``patch_size_level0 / 8``, overlapping patches averaged. ``gradcam_mean`` is the mean of a
patch's raw map at the layer's grid (not normalised, comparable between patches of one run).
ViT attention (``attention``): the head-averaged raw CLS-row attention of the last block
(:func:`histotile.attention.cls_attention`) stitched the same way into an ``attention`` image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.attention import cls_attention
from histotile.confidence import ConfidenceTracker, domain_warning, run_record
from histotile.errors import (
    CorruptSlideError,
    HistotileError,
    InvalidArgumentError,
    NoTissueError,
)
from histotile.export.csv import PredictionsCSVWriter
from histotile.export.figures import write_gradcam_overlay_from_store
from histotile.export.ome_tiff import export_ome_tiff
from histotile.export.qupath import TILES_GZ, TILES_PLAIN, GeoJSONTileWriter, write_merged
from histotile.export.slide_pictures import write_slide_pictures
from histotile.export.tissue_geojson import write_tissue_geojson
from histotile.gradcam import GradCAM, cam_target, resolve_layer
from histotile.grid import PatchGrid, make_grid
from histotile.inference.context import PredictContext
from histotile.inference.provenance import StageTimer, progress_bar
from histotile.models.preprocess import STAIN_SAMPLE, STAIN_SEED
from histotile.patches import Region, plan_regions, sample_patches, unreadable_record
from histotile.slide import Slide, open_slide
from histotile.stitch import CamStitcher, HeatmapWriter
from histotile.tissue import TissueMask, require_brightfield
from histotile.tissue_source import tissue_for_slide, tissue_info
from histotile.units import Level0Px, Level0Side

if TYPE_CHECKING:  # the engine and models import torch
    from histotile.engine import EngineStats, StainStep
    from histotile.models.loading import LoadedModel

log = logging.getLogger(__name__)
CAM_PIXELS_PER_PATCH = 8  # default --cam-resolution = patch_size_level0 / this
DARKFIELD_HINT = ("the model is for brightfield slides; pass --allow-darkfield to run it "
                  "anyway")


def _slide_stain_sample(slide: Slide, grid: PatchGrid) -> np.ndarray:
    """The seeded sample the slide's stain fit is made on; patches that cannot be decoded are
    left out (the engine records them when it meets them again)."""
    return sample_patches(slide, grid, n=STAIN_SAMPLE, seed=STAIN_SEED, unreadable=[])


def _grid(slide: Slide, tissue: TissueMask, ctx: PredictContext, item: Path) -> PatchGrid:
    """The model's patch grid on ``slide``; a grid that cannot be laid gets a hint in predict's
    own options (the grid's own hints name ``tile``'s ``--mpp``/``--level``/``--patch-size``)."""
    card = ctx.model.card
    try:
        return make_grid(slide, card.patch_size, target_mpp=card.mpp,
                         overlap=ctx.options.overlap, tissue=tissue,
                         min_tissue=ctx.options.min_tissue)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            exc.message, f"model {card.name!r} reads {card.patch_size} px patches at "
            f"{card.mpp:g} um/px; check the slide's pixel size (--slide-mpp) or use a model "
            "made for this resolution", subject=str(item)) from exc


def unreadable_info(grid: PatchGrid, rows: list[int], tissue: TissueMask, max_fraction: float,
                    subject: str) -> dict[str, Any]:
    """run.json's ``unreadable`` record; :class:`TooMuchUnreadableError` above ``max_fraction``
    (:func:`histotile.patches.unreadable_record`, the rule ``tile`` shares)."""
    return unreadable_record(grid, rows, tissue, max_fraction, subject,
                             "recorded as unreadable in predictions.csv, the heatmap coverage "
                             "and run.json")


@dataclass
class PreparedSlide:
    """A slide opened, its tissue detected, its grid planned and its stain fitted: what
    :func:`run_slide` needs (the slide stays open until :func:`finish_slide` or ``close``)."""

    item: Path
    slide: Slide
    tissue: TissueMask
    grid: PatchGrid
    regions: list[Region]
    stain: StainStep | None
    stain_info: dict[str, Any]
    timer: StageTimer

    def close(self) -> None:
        self.slide.close()


@dataclass
class RunningSlide:
    """A slide streamed through the model: the open writers :func:`finish_slide` closes."""

    prepared: PreparedSlide
    tmp_dir: Path
    heat: HeatmapWriter
    table: PredictionsCSVWriter
    geo: GeoJSONTileWriter
    stitcher: CamStitcher | None
    stats: EngineStats
    labels: np.ndarray
    confidence: ConfidenceTracker
    environment: dict[str, Any]

    def abort(self) -> None:
        """Drop the writers' partial output and close the slide."""
        for w in (self.heat, self.table, self.geo):
            with contextlib.suppress(Exception):
                w.abort()
        _drop_cam_scratch(self.stitcher)
        self.prepared.close()


def predict_slide(item: Path, tmp_dir: Path, ctx: PredictContext) -> dict[str, Any]:
    """Predict one slide into ``tmp_dir`` (every output but run.json); returns run info."""
    return finish_slide(run_slide(prepare_slide(item, ctx), tmp_dir, ctx), ctx)


def prepare_slide(item: Path, ctx: PredictContext) -> PreparedSlide:
    """Open ``item``, detect its tissue, plan its grid and fit its stain (reads only)."""
    timer = StageTimer()
    with timer("open"):
        try:
            slide = open_slide(item, backend=ctx.options.backend, slide_mpp=ctx.options.slide_mpp)
        except HistotileError:
            raise
        except Exception as exc:  # a reader crash on a damaged file
            raise CorruptSlideError(
                f"cannot be read as a slide ({type(exc).__name__}: {exc})",
                "the file may be truncated or corrupt; re-copy it", subject=str(item)) from exc
    try:
        slide.require_mpp()
        with timer("tissue"):
            tissue = tissue_for_slide(slide, ctx.options)  # detected, or --tissue-mask
            if not ctx.options.allow_darkfield:
                require_brightfield(tissue, str(item), DARKFIELD_HINT)
            grid = _grid(slide, tissue, ctx, item)
        if len(grid) == 0:
            raise NoTissueError(
                f"no patch has at least {ctx.options.min_tissue:.0%} tissue",
                "lower --min-tissue, or check the slide (blank? wrong --slide-mpp?)",
                subject=str(item))
        regions = plan_regions(grid, slide, ctx.options.region_size)
        with timer("stain"):
            sample = (None if ctx.preprocessing.stain.method == "none"
                      else _slide_stain_sample(slide, grid))  # --stain-norm none: no reads
            stain, stain_info = ctx.slide_stain_step(sample, str(item))
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(Path(item), slide, tissue, grid, regions, stain, stain_info, timer)


def run_slide(prepared: PreparedSlide, tmp_dir: Path, ctx: PredictContext) -> RunningSlide:
    """Stream the prepared slide through the model into the writers (left open for
    :func:`finish_slide`); on failure everything is dropped and the slide closed."""
    from histotile.engine import EngineStats, run_inference  # engine imports torch

    slide, grid, timer = prepared.slide, prepared.grid, prepared.timer
    try:
        card = ctx.model.card
        names, colors = card.class_names, card.class_colors
        seed = Path(str(slide.path)).name
        attrs = {**grid.to_attrs(), "model": card.name, "slide": str(slide.path)}
        heat = HeatmapWriter(tmp_dir / "heatmap.ome.zarr", grid.grid_shape, grid.indices, names,
                             colors, attrs)
    except BaseException:
        prepared.close()
        raise
    extra_cols = ["gradcam_mean"] if ctx.options.gradcam else []
    table = geo = stitcher = bar = None
    try:
        table = PredictionsCSVWriter(tmp_dir / "predictions.csv", names, grid.patch_size_level0,
                                     extra_columns=extra_cols, status_column=True)
        geo = GeoJSONTileWriter(tmp_dir / (TILES_PLAIN if ctx.options.geojson_plain
                                           else TILES_GZ),
                                names, colors, object_type=ctx.options.qupath_object_type,
                                min_prob=ctx.options.qupath_min_prob,
                                gzip=not ctx.options.geojson_plain, id_seed=seed)
        stitcher, explain = (_gradcam_parts(heat, grid, ctx) if ctx.options.gradcam else
                             _attention_parts(heat, grid, ctx) if ctx.options.attention else
                             (None, None))
        running = RunningSlide(prepared, tmp_dir, heat, table, geo, stitcher, EngineStats(),
                               np.full(len(grid), -1, np.int32),  # argmax, for the overlay
                               ConfidenceTracker(len(grid)),  # unreadable patches stay NaN
                               ctx.environment())  # torch's thread count, in this thread
        bar = progress_bar(len(grid), ctx.options.progress, seed)
        for idx, coords, probs, *maps in run_inference(
                slide.spec, grid, prepared.regions, ctx.model, ctx.model.device,
                batch_size=ctx.options.batch_size, workers=ctx.options.workers,
                stain=prepared.stain, stats=running.stats,
                on_batch=bar.update if bar is not None else None, explain=explain,
                plan=ctx.compute):
            timer.first_batch()
            running.labels[idx] = probs.argmax(axis=1)
            running.confidence.add(idx, probs)
            extra = ({"gradcam_mean": maps[0].mean(axis=(1, 2))} if maps and ctx.options.gradcam
                     else None)
            with timer("stitch"):
                heat.write(grid.indices[idx], probs)
                if stitcher is not None:
                    stitcher.add(grid.indices[idx], maps[0])
            with timer("export"):
                table.write(coords, probs, extra=extra)
                geo.write(coords, probs, grid.patch_size_level0, extra=extra)
    except BaseException:
        for w in (heat, table, geo):
            with contextlib.suppress(Exception):
                if w is not None:
                    w.abort()
        _drop_cam_scratch(stitcher)
        prepared.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    return running


def finish_slide(running: RunningSlide, ctx: PredictContext) -> dict[str, Any]:
    """Close the writers (pyramids), write the other outputs and the pictures, close the slide;
    returns run info. On failure everything is dropped."""
    prepared, stats, tmp_dir = running.prepared, running.stats, running.tmp_dir
    slide, grid, tissue, timer = prepared.slide, prepared.grid, prepared.tissue, prepared.timer
    heat, table, geo, stitcher = running.heat, running.table, running.geo, running.stitcher
    seed = Path(str(slide.path)).name
    try:
        bad = sorted(set(stats.unreadable))
        extra_info = {"unreadable": unreadable_info(grid, bad, tissue,
                                                    ctx.options.max_unreadable, str(slide.path))}
        with timer("stitch"):
            heat.mark_unreadable(grid.indices[bad])
            if stitcher is not None:
                stitcher.close()  # before the writer builds the pyramids
            heat.close()
        with timer("export"):
            table.write_unreadable(grid.coords[bad])
            table.close()
            geo.close()
            extra_info.update(_extra_outputs(tmp_dir, tissue, ctx, seed, stitcher, geo))
            extra_info.update(_pictures(tmp_dir, seed, tissue, grid, running.labels,
                                        running.confidence, ctx))
        write_tissue_geojson(tmp_dir / "tissue.geojson", tissue.mask, tissue.downsample,
                             id_seed=prepared.item.name)  # editable in QuPath, --tissue-mask
        slide_info = slide.info()
    except BaseException:
        running.abort()
        raise
    prepared.close()
    timer.add("read", stats.read_s)
    timer.add("stain", stats.stain_s)
    timer.add("model", stats.model_s)
    return {
        **running.environment,
        "kind": "slide", "patches": len(grid), "regions": len(prepared.regions),
        "model": ctx.model.describe(),
        "mpp": {"slide_mpp": grid.slide_mpp, "source": grid.mpp_source,
                "target_mpp": grid.target_mpp, "effective_mpp": grid.effective_mpp,
                "level": grid.level},
        "grid": grid.to_attrs(),
        "tissue": {"method": tissue.method, "threshold": float(tissue.threshold),
                   "fraction": round(tissue.fraction, 4), "downsample": tissue.downsample,
                   "mask_mpp": tissue.mpp, "mask_shape": list(tissue.mask.shape),
                   "illumination": tissue.illumination.to_dict()
                   if tissue.illumination is not None else None, **tissue_info(tissue)},
        "stain": prepared.stain_info,
        "settings": {"batch_size": ctx.options.batch_size, "workers": ctx.effective_workers(),
                     "min_tissue": ctx.options.min_tissue, "overlap": ctx.options.overlap,
                     "backend": slide_info.get("backend"),
                     "pixel_reader": slide_info.get("pixel_reader"),
                     "compute": ctx.compute_info(),
                     "allow_darkfield": ctx.options.allow_darkfield,
                     "max_unreadable": ctx.options.max_unreadable},
        **ctx.settings_info(),
        "slide_info": slide_info,
        "engine": stats.to_dict(),
        "timings": timer.rounded(),
        **extra_info,
        "files": sorted([p.name for p in tmp_dir.iterdir()] + ["run.json"]),
    }


def default_cam_resolution(patch_size_level0: Level0Side) -> Level0Px:
    """Level-0 px per CAM pixel when ``--cam-resolution`` is not given: the patch's level-0 side
    over :data:`CAM_PIXELS_PER_PATCH` (8 CAM pixels per patch side), rounded, at least 1."""
    side = float(np.max(np.asarray(patch_size_level0, dtype=np.float64)))
    return Level0Px(float(max(1, round(side / CAM_PIXELS_PER_PATCH))))


def _gradcam_parts(heat: HeatmapWriter, grid: PatchGrid, ctx: PredictContext
                   ) -> tuple[CamStitcher, Callable[[LoadedModel], Callable[..., Any]]]:
    """The CAM stitcher on the heatmap store and the engine's ``explain`` factory."""
    card = ctx.model.card
    target = cam_target(ctx.options.cam_class, card.class_names)
    resolution = ctx.options.cam_resolution or default_cam_resolution(grid.patch_size_level0)
    label = "predicted class" if target == "predicted" else card.class_names[int(target)]
    stitcher = CamStitcher.from_grid(
        heat, grid, resolution, class_name=f"Grad-CAM ({label})",
        attrs={"cam_class": ctx.options.cam_class, "cam_layer": ctx.options.cam_layer or "default"})
    return stitcher, functools.partial(_make_cam, ctx=ctx, target=target)


def _attention_parts(heat: HeatmapWriter, grid: PatchGrid, ctx: PredictContext
                     ) -> tuple[CamStitcher, Callable[[LoadedModel], Callable[..., Any]]]:
    """The ``attention`` image's stitcher and the engine's ``explain`` factory (ViT only)."""
    resolution = ctx.options.cam_resolution or default_cam_resolution(grid.patch_size_level0)
    stitcher = CamStitcher.from_grid(
        heat, grid, resolution, name="attention",
        class_name="CLS attention (last block, head mean)",
        attrs={"method": "attention", "block_attention": "last", "heads": "mean"})
    return stitcher, _make_attention


def _make_attention(loaded: LoadedModel) -> Callable[..., Any]:
    """``x -> (head-mean CLS attention (B, g, g), probs)`` for a loaded ViT."""
    def fn(x: Any) -> Any:
        per_head, probs = cls_attention(loaded.module, x)
        return per_head.mean(dim=1), probs

    return fn


def _make_cam(loaded: LoadedModel, ctx: PredictContext, target: str | int
              ) -> Callable[..., Any]:
    """``x -> (raw maps at the layer's grid, probs)`` for a loaded model (a GradCAM pass)."""
    layer = resolve_layer(loaded.module, ctx.options.cam_layer,
                          loaded.card.architecture.name)
    cam = GradCAM(loaded.module, layer)
    return functools.partial(cam, target=target, normalise="none", size=0)


def _drop_cam_scratch(stitcher: CamStitcher | None) -> None:
    if stitcher is not None:
        stitcher.discard()


def _extra_outputs(tmp_dir: Path, tissue: TissueMask, ctx: PredictContext, seed: str,
                   stitcher: CamStitcher | None, geo: GeoJSONTileWriter) -> dict[str, Any]:
    """Files made from the closed store/CSV (Grad-CAM overlay, merged classes, OME-TIFF) and
    their run.json info."""
    card = ctx.model.card
    info: dict[str, Any] = {"qupath": {
        "tiles": geo.path.name, "object_type": ctx.options.qupath_object_type,
        "min_prob": ctx.options.qupath_min_prob, "tiles_written": geo.count,
        "tiles_dropped": geo.dropped, "merged": ctx.options.qupath_merge}}
    if stitcher is not None and ctx.options.attention:
        write_gradcam_overlay_from_store(tmp_dir / "attention_overlay.png",
                                         tmp_dir / "heatmap.ome.zarr", tissue.thumbnail,
                                         tissue.downsample, name="attention",
                                         title="ViT CLS attention (last block, head mean)")
        info["attention"] = {
            "method": "attention", "block": "last", "heads": "mean",
            "cam_resolution_asked": ctx.options.cam_resolution,
            "cam_resolution_level0": stitcher.resolution, "pixels_per_cell": stitcher.block,
            "cam_scale": stitcher.cam_scale, "raw_max": stitcher.max_value,
            "image": "heatmap.ome.zarr/attention"}
    elif stitcher is not None:
        write_gradcam_overlay_from_store(tmp_dir / "gradcam_overlay.png",
                                         tmp_dir / "heatmap.ome.zarr", tissue.thumbnail,
                                         tissue.downsample)
        info["gradcam"] = {
            "method": "gradcam", "cam_class": ctx.options.cam_class,
            "layer": ctx.options.cam_layer or "default", "cam_resolution_asked":
            ctx.options.cam_resolution, "cam_resolution_level0": stitcher.resolution,
            "block": stitcher.block, "cam_scale": stitcher.cam_scale,
            "raw_max": stitcher.max_value, "image": "heatmap.ome.zarr/gradcam"}
    if ctx.options.qupath_merge:
        write_merged(tmp_dir, card.class_names, [list(c) for c in card.class_colors],
                     gzip=not ctx.options.geojson_plain, id_seed=seed)
    if ctx.options.ome_tiff:
        export_ome_tiff(tmp_dir)
    return info


def _pictures(tmp_dir: Path, name: str, tissue: TissueMask, grid: PatchGrid, labels: np.ndarray,
              confidence: ConfidenceTracker, ctx: PredictContext) -> dict[str, Any]:
    """overlay.png, tissue.png, tissue_mask.png; returns run.json's ``confidence``."""
    card = ctx.model.card
    summary = confidence.summary()
    domain = card.domain.to_dict()
    warning = domain_warning(summary, domain, card.name)
    write_slide_pictures(tmp_dir, name, tissue, grid, labels, confidence.top, card, summary,
                         warning)
    return {"confidence": run_record(summary, domain, warning)}
