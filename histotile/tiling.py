"""``histotile tile``: tissue patches at a target mpp into a PatchCamelyon-layout HDF5 archive.

:func:`tile` runs every slide through the batch runner (:func:`histotile.hpc.run_items`: resume,
per-slide locks, ``manifest.csv``, failure isolation, shards, dask executors), like
``predict``; :func:`tile_slide` is the work on one slide. Options live in :class:`TileOptions`
(defaults and validation in one place; the resume fingerprint is derived from it).

Per slide it writes ``<out>/<stem>.h5`` (dataset ``x`` (N, P, P, 3) uint8 chunked per patch,
``coords`` (N, 2) int64 level-0 top-left x, y, and the grid/slide metadata as attributes) and
``<out>/<stem>.tissue.png`` (thumbnail, tissue mask and the kept patch grid). Both are written
under a temporary name and renamed when complete; patches are streamed batch by batch. A patch
that cannot be decoded (a damaged tile) is left out (``x``, ``coords`` and ``tissue_fraction``
hold the readable ones, blank in the picture) and recorded: attributes ``unreadable_patches``,
``unreadable_fraction``, ``unreadable_boxes_level0`` (x, y, w, h), and ``unreadable`` in
run.json; above ``max_unreadable`` of the grid the slide fails. Through
:func:`tile`, ``<out>/<stem>.run.json`` (written last) records the options and marks the slide
done, so a rerun with the same options skips it. Stems are those of ``predict``
(:func:`histotile.items.item_stems`). ``out`` ending in ``.h5`` names the archive of a single
slide.

With ``stain_norm="macenko"`` the slide's stains are fitted once on a seeded sample of its
tissue patches (:func:`histotile.patches.sample_patches`, as ``predict`` does) and every patch
is normalised to the reference with that fit; the method, reference and fit go into the
archive's attributes (``stain_method``, ``stain_reference``, ``stain_fit`` as JSON).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histotile import __version__
from histotile.annotations import folder_identity, match_file, read_annotations
from histotile.batch import (
    ITEM_PREFIX,
    BatchSummary,
    ErrorPolicy,
    Layout,
    ProcessFn,
    expand_inputs,
    resolve_shard,
)
from histotile.errors import InvalidArgumentError, NoTissueError
from histotile.export.tissue_geojson import write_tissue_geojson
from histotile.export.tissue_picture import tissue_picture
from histotile.grid import PatchGrid, make_grid
from histotile.hpc import run_items
from histotile.items import ItemKind, item_kind, item_stem, item_suffix
from histotile.labels import label_attrs, label_patches
from histotile.options import DEFAULT_MAX_UNREADABLE, DEFAULT_TILE_MPP, TileOptions
from histotile.patches import (
    iter_patch_batches,
    plan_regions,
    sample_patches,
    unreadable_record,
)
from histotile.slide import Slide, open_slide
from histotile.stain import MacenkoNormalizer, make_normalizer
from histotile.tissue_source import tissue_for_slide, tissue_info

log = logging.getLogger(__name__)
DEFAULT_MPP = DEFAULT_TILE_MPP  # PatchCamelyon: 96 px at 10x (defined in histotile.options)
STAIN_SAMPLE = 64  # tissue patches the per-slide stain fit is made on
STAIN_SEED = 0
BatchTransform = Callable[[np.ndarray], np.ndarray]


@dataclass
class TileResult:
    """What ``tile_slide`` wrote."""

    slide: str
    archive: Path
    tissue_png: Path
    n_patches: int
    attrs: dict[str, Any]
    unreadable: dict[str, Any] = dataclasses.field(default_factory=dict)


def _h5_attr(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return value


def tile_slide(
    slide_path: str | Path, out_dir: str | Path, patch_size: int = 96,
    mpp: float | None = None, level: int | None = None, slide_mpp: float | None = None,
    overlap: float = 0.0, min_tissue: float = 0.5, limit: int | None = None,
    backend: str = "auto", tissue_method: str = "otsu", batch_size: int = 256,
    transform: BatchTransform | None = None, progress: bool = False,
    extra_attrs: dict[str, Any] | None = None, stain_norm: str = "none",
    stain_target: str | Path | None = None, name: str | None = None,
    max_unreadable: float = DEFAULT_MAX_UNREADABLE,
    tissue_mask: str | Path | None = None, labels: str | Path | None = None,
    label_min_fraction: float = 0.5,
) -> TileResult:
    """Tile one slide (see the module docstring). ``transform`` maps uint8 (B, P, P, 3) batches
    before they are written (after the stain normalisation ``stain_norm`` "none"|"macenko",
    to the reference fitted on ``stain_target`` or the default); ``limit`` keeps the first N.
    ``name``: the files' stem (default :func:`histotile.items.item_stem` of the slide).
    ``max_unreadable``: the share of the grid that may be undecodable before
    :class:`~histotile.errors.TooMuchUnreadableError` (nothing is written then).
    ``tissue_mask``: a GeoJSON (file or folder) replacing detection
    (:func:`histotile.tissue_source.tissue_for_slide`); ``labels``: annotations (file or folder)
    that keep and label patches (:mod:`histotile.labels`), written as ``y``."""
    if limit is not None and limit < 0:
        raise InvalidArgumentError(f"--limit {limit} is negative", "use 0 or more")
    if mpp is None and level is None:
        mpp = DEFAULT_MPP
    normalizer = make_normalizer(stain_norm, target_image=stain_target, channels_last=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name if name is not None else item_stem(slide_path)
    with open_slide(slide_path, backend=backend, slide_mpp=slide_mpp) as slide:
        if mpp is not None:
            slide.require_mpp()
        where = TileOptions(tissue_method=tissue_method,  # type: ignore[arg-type]
                            tissue_mask=None if tissue_mask is None else str(tissue_mask))
        tissue = tissue_for_slide(slide, where)
        grid = make_grid(slide, patch_size, target_mpp=mpp, level=level, overlap=overlap,
                         tissue=tissue, min_tissue=min_tissue)
        y, label_info = None, {}
        if labels is not None:
            annotations = read_annotations(match_file(labels, slide_path))
            found = label_patches(annotations, grid.coords, float(grid.patch_size_level0),
                                  label_min_fraction)
            grid, y = grid.subset(found.keep), found.y
            label_info = label_attrs(found, item_stem(slide_path), annotations.source.name,
                                     annotations.sha256, label_min_fraction)
        if limit is not None:
            grid = grid.subset(slice(0, limit))
            y = None if y is None else y[:limit]
        order = _region_order(grid, slide)  # contiguous writes, one read per region
        grid = grid.subset(order)
        y = None if y is None else y[order]
        if len(grid) == 0:
            log.warning("%s: no patch has tissue >= %.2f; writing an empty archive",
                        slide_path, min_tissue)
        stain, stain_attrs = _stain_step(slide, grid, normalizer, stain_target)
        attrs = {
            "source_path": str(Path(slide_path).resolve()), "backend": slide.backend,
            "vendor": slide.vendor or "", "slide_mpp_x": slide.mpp[0] if slide.mpp else None,
            "slide_mpp_y": slide.mpp[1] if slide.mpp else None,
            "level0_width": slide.dimensions[0], "level0_height": slide.dimensions[1],
            **grid.to_attrs(), "tissue_threshold": tissue.threshold,
            "tissue_mask_mpp": tissue.mpp, "tissue_fraction_slide": tissue.fraction,
            "histotile_version": __version__, "layout": "PatchCamelyon x (N,P,P,3) uint8",
            **stain_attrs, **tissue_info(tissue), **label_info, **(extra_attrs or {}),
        }
        attrs = {k: v for k, v in attrs.items() if v is not None}
        archive = out_dir / f"{stem}.h5"

        def record(rows: list[int]) -> dict[str, Any]:
            return unreadable_record(grid, rows, tissue, max_unreadable, str(slide_path),
                                     "left out of the archive, recorded in its attributes "
                                     "and run.json")

        kept, unreadable = _write_archive(archive, slide, grid, attrs, batch_size,
                                          _chain(stain, transform), progress, record, y)
        png = out_dir / f"{stem}.tissue.png"
        _write_png(png, tissue_picture(tissue, grid.subset(kept)))  # unreadable patches stay blank
        write_tissue_geojson(out_dir / f"{stem}.tissue.geojson", tissue.mask, tissue.downsample,
                             id_seed=Path(slide_path).name)
    return TileResult(str(slide_path), archive, png, len(kept), attrs, unreadable)


def _stain_step(slide: Slide, grid: PatchGrid, normalizer: MacenkoNormalizer | None,
                target: str | Path | None
                ) -> tuple[BatchTransform | None, dict[str, Any]]:
    """Fit ``normalizer`` once on a sample of the slide's patches: (batch transform, attrs)."""
    if normalizer is None:
        return None, {"stain_method": "none"}
    attrs: dict[str, Any] = {
        "stain_method": "macenko",
        "stain_reference": json.dumps(normalizer.reference.to_dict()),
        "stain_target": str(Path(target).resolve()) if target is not None else None,
    }
    # undecodable patches are left out of the sample (the archive step records them)
    sample = sample_patches(slide, grid, n=STAIN_SAMPLE, seed=STAIN_SEED, unreadable=[])
    try:
        if len(sample) == 0:
            raise NoTissueError("no tissue patch to fit the stains on", "")
        fit = normalizer.fit(sample)
    except NoTissueError as exc:
        if len(grid):
            log.warning("%s: stain fit failed (%s); patches are not stain-normalised",
                        slide.path, exc.message)
        return None, {**attrs, "stain_method": "none", "stain_requested": "macenko",
                      "stain_fit_error": exc.message}
    attrs["stain_fit"] = json.dumps({
        "stain_matrix": fit.stain_matrix.double().cpu().tolist(),
        "max_concentrations": fit.max_concentrations.double().cpu().tolist(),
        "n_pixels": int(fit.n_pixels), "sample_patches": int(len(sample)), "seed": STAIN_SEED})
    return (lambda batch: normalizer.normalize(batch, fit)), attrs


def _chain(first: BatchTransform | None, second: BatchTransform | None
           ) -> BatchTransform | None:
    if first is None or second is None:
        return first or second
    return lambda batch: second(first(batch))


def _region_order(grid: PatchGrid, slide: Slide) -> np.ndarray:
    regions = plan_regions(grid, slide)
    return np.concatenate([r.idx for r in regions]) if regions else np.zeros(0, np.int64)


def _write_archive(path: Path, slide: Slide, grid: PatchGrid, attrs: dict[str, Any],
                   batch_size: int,
                   transform: BatchTransform | None, progress: bool,
                   record: Callable[[list[int]], dict[str, Any]],
                   y: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """Stream the readable patches into ``path``: (kept grid rows in archive order, the
    ``record`` of the unreadable rows, which may raise before anything is renamed)."""
    import h5py
    from tqdm import tqdm

    size, n = grid.patch_size, len(grid)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    kept: list[np.ndarray] = []
    unreadable: list[int] = []
    try:
        with h5py.File(tmp, "w") as h5:
            x = h5.create_dataset("x", shape=(n, size, size, 3), maxshape=(None, size, size, 3),
                                  dtype=np.uint8, chunks=(1, size, size, 3),
                                  compression="gzip", compression_opts=1)
            for key, value in attrs.items():
                h5.attrs[key] = _h5_attr(value)
            written = 0
            with tqdm(total=n, unit="patch", desc=Path(slide.path).name[-30:], disable=not progress,
                      leave=False) as bar:
                for idx, batch in iter_patch_batches(slide, grid, batch_size,
                                                     unreadable=unreadable):
                    if transform is not None:
                        batch = transform(batch)
                    x[written:written + len(idx)] = batch
                    written += len(idx)
                    kept.append(idx)
                    bar.update(len(idx))
            rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
            info = record(sorted(set(unreadable)))
            x.resize(written, axis=0)
            h5.create_dataset("coords", data=grid.coords[rows].astype(np.int64))
            h5.create_dataset("tissue_fraction", data=grid.tissue_fraction[rows].astype(np.float32))
            if y is not None:  # PatchCamelyon's y: (N, 1, 1, 1) uint8, rows as written
                h5.create_dataset("y", data=np.asarray(y, np.uint8)[rows].reshape(-1, 1, 1, 1))
            h5.attrs["unreadable_patches"] = info["patches"]
            h5.attrs["unreadable_fraction"] = info["fraction"]
            h5.attrs["unreadable_boxes_level0"] = np.asarray(info["boxes_level0"],
                                                             np.int64).reshape(-1, 4)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, info


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp.png")
    try:
        Image.fromarray(rgb).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)




# --------------------------------------------------------------------------- many slides
SLIDES_ONLY: tuple[ItemKind, ...] = ("slide",)
#: Options that do not change an archive's contents (left out of the resume fingerprint).
NEUTRAL_FIELDS = frozenset({"batch_size", "progress"})


def tile_fingerprint(options: TileOptions) -> dict[str, Any]:
    """The resolved options that decide the archive (a finished slide with an equal fingerprint
    is skipped): every field of :class:`~histotile.options.TileOptions` but
    :data:`NEUTRAL_FIELDS`, the default mpp made explicit, the stain reference image, the tissue
    mask and the label annotations by content."""
    fp = {k: v for k, v in dataclasses.asdict(options).items() if k not in NEUTRAL_FIELDS}
    fp["mpp"] = options.target_mpp
    if options.stain_norm == "macenko" and options.stain_target is not None:
        try:
            data = Path(options.stain_target).read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the stain target ({exc.strerror})",
                                       "check the path", subject=options.stain_target) from None
        fp["stain_target_sha256"] = hashlib.sha256(data).hexdigest()
    for name in ("tissue_mask", "labels"):  # by content: an edited export reruns its slides
        fp[name] = folder_identity(fp[name], extra_dirs=name == "tissue_mask") if fp[name] \
            else None
    fp["command"] = "tile"
    return fp


def make_tile_process(options: TileOptions, progress: bool = False,
                      suffix: str = ".h5") -> ProcessFn:
    """``process(slide, tmp_dir) -> info`` for the batch runner (picklable through
    ``functools.partial``): ``tmp_dir/item<suffix>`` and ``tmp_dir/item.tissue.png``."""
    kwargs = {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"}

    def process(item: Path, tmp_dir: Path) -> dict[str, Any]:
        result = tile_slide(item, tmp_dir, name=ITEM_PREFIX, progress=progress, **kwargs)
        if suffix != ".h5":
            result.archive.rename(tmp_dir / f"{ITEM_PREFIX}{suffix}")
        return {"patches": result.n_patches, "kind": "tile",
                "effective_mpp": result.attrs.get("effective_mpp"),
                "patch_size": options.patch_size, "level": result.attrs.get("level"),
                "unreadable": result.unreadable}

    return process


def _target(out: Path, n_items: int) -> tuple[Path, str | None, str]:
    """``(folder, stem or None, archive suffix)`` for ``out``: a folder, or one ``.h5`` file."""
    if item_kind(out) != "archive":
        return out, None, ".h5"
    suffix = item_suffix(out)
    if suffix == ".npz":
        raise InvalidArgumentError("tile writes HDF5 archives, not .npz",
                                   "name an .h5 file or an output folder", subject=str(out))
    if n_items != 1:
        raise InvalidArgumentError(f"-o names one archive but {n_items} slides were given",
                                   "name an output folder for several slides", subject=str(out))
    return out.parent, out.name[: -len(suffix)], suffix


def tile(slides: str | Path | Sequence[str | Path], out: str | Path,
         options: TileOptions | None = None, *, overwrite: bool = False,
         shard: tuple[int, int] | str | None = None, executor: str = "serial", jobs: int = 2,
         cluster: str = "slurm", cluster_kwargs: dict[str, Any] | None = None,
         progress: bool = True, on_error: ErrorPolicy = "report",
         **overrides: Any) -> BatchSummary:
    """Tile slides (files, folders, globs, list files) into ``out`` through the batch runner.

    ``out``: a folder (``<stem>.h5``, ``<stem>.tissue.png``, ``<stem>.run.json`` per slide,
    ``manifest.csv``), or an ``.h5`` path for a single slide. ``options`` (or keyword
    ``overrides`` of its fields, e.g. ``patch_size=28``) as :class:`TileOptions`. Finished
    slides with the same options are skipped unless ``overwrite``; a failing slide does not stop
    the others: see the returned summary (``.failed``, ``.exit_code``, ``.manifest``).
    ``shard``, ``executor``, ``jobs``, ``cluster``, ``cluster_kwargs``: as ``predict``.
    """
    try:
        opts = dataclasses.replace(options or TileOptions(), **overrides)
    except TypeError as exc:
        raise InvalidArgumentError(str(exc), "see histotile.options.TileOptions for the fields",
                                   subject="tile") from None
    paths = [slides] if isinstance(slides, (str, Path)) else list(slides)
    items = expand_inputs(paths, kinds=SLIDES_ONLY)
    folder, stem, suffix = _target(Path(out), len(items))
    fingerprint = tile_fingerprint(opts)
    make_normalizer(opts.stain_norm, target_image=opts.stain_target, channels_last=True)
    return run_items(items, folder,
                     functools.partial(make_tile_process, opts, progress, suffix),
                     fingerprint, executor=executor, jobs=jobs, cluster=cluster,
                     shard=resolve_shard(shard), overwrite=overwrite, progress=progress,
                     on_error=on_error, cluster_kwargs=cluster_kwargs,
                     layout=Layout("files", primary=suffix),
                     stems=None if stem is None else [stem])
