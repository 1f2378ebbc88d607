"""``histotile tile SLIDE... -o OUT``: PCam-layout HDF5 patch archives of tissue."""

from __future__ import annotations

import sys

import click

from histotile.cli.batch_options import batch_options
from histotile.cli.common import (
    backend_option,
    debug_flag,
    field_option,
    quiet_flag,
    slide_mpp_option,
)
from histotile.options import TileOptions


@click.command("tile")
@click.argument("slides", nargs=-1, required=True, metavar="SLIDE...")
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Output folder (per slide <stem>.h5, <stem>.tissue.png, <stem>.run.json), "
                   "or an .h5 file for a single slide.")
@click.option("--patch-size", default=96, show_default=True, type=click.IntRange(min=1),
              help="Patch side in pixels.")
@click.option("--mpp", type=float, default=None,
              help="Target microns per pixel [default: 0.972 unless --level is given].")
@click.option("--level", type=click.IntRange(min=0), default=None,
              help="Read this pyramid level (at its own mpp unless --mpp is given).")
@slide_mpp_option
@click.option("--overlap", default=0.0, show_default=True, type=click.FloatRange(0, 1,
              max_open=True), help="Fraction of a patch shared with its neighbour.")
@click.option("--min-tissue", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Keep patches whose tissue fraction is at least this.")
@click.option("--tissue-method", type=click.Choice(["otsu", "otsu-gray"]), default="otsu",
              show_default=True, help="Otsu on HSV saturation, or on grey level.")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Keep at most N patches per slide (the first N of the grid).")
@click.option("--stain-norm", type=click.Choice(["none", "macenko"]), default="none",
              show_default=True,
              help="Macenko-normalise the patches (fitted once per slide on 64 of its patches).")
@click.option("--stain-target", type=click.Path(dir_okay=False), default=None,
              help="Image whose stains are the reference [default: the standard H&E one].")
@click.option("--tissue-mask", type=click.Path(exists=True), default=None,
              metavar="FILE|FOLDER",
              help="QuPath GeoJSON tissue replacing detection (a folder: one per slide, "
                   "<stem>.geojson, <name>.geojson or <stem>.tissue.geojson).")
@click.option("--labels", type=click.Path(exists=True), default=None, metavar="FILE|FOLDER",
              help="QuPath GeoJSON annotations (a folder: one per slide): keep only patches "
                   "with at least --label-min-fraction of their area in one class, labelled "
                   "with it (y); a patch reaching it in two classes is dropped; unannotated "
                   "tissue is left out.")
@click.option("--label-min-fraction", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="Share of a patch that must lie inside one class to be labelled.")
@backend_option
@field_option(TileOptions, "max_unreadable", metavar="FRACTION",
              help="Fail a slide when more than this share of its patches cannot be decoded "
                   "(damaged tiles); below it they are left out of the archive and recorded.")
@batch_options
@click.pass_context
def tile(ctx: click.Context, slides: tuple[str, ...], out: str, patch_size: int,
         mpp: float | None, level: int | None, slide_mpp: float | None, overlap: float,
         min_tissue: float, tissue_method: str, limit: int | None, stain_norm: str,
         stain_target: str | None, backend: str, max_unreadable: float,
         tissue_mask: str | None, labels: str | None, label_min_fraction: float,
         **batch: object) -> None:
    """Cut tissue patches of SLIDES at a target mpp into PatchCamelyon-layout HDF5 archives.

    SLIDE: files, folders, globs or .txt/.csv lists, as for predict. Slides finished with the
    same options are skipped (--overwrite recomputes them); OUT/manifest.csv lists every slide.
    Each slide also gets <stem>.tissue.geojson, the mask used (edit it in QuPath, pass it back
    with --tissue-mask). With --labels the archives hold y, class_names and slide_name:
    'histotile train OUT' trains on them, split by slide.
    """
    from histotile.cli.batch_options import pop_batch_options, print_failure, quiet_dask
    from histotile.tiling import tile as run_tile

    debug, quiet = debug_flag(ctx), quiet_flag(ctx)
    batch_opts = pop_batch_options(batch)
    if quiet:
        quiet_dask(batch_opts.executor)
    options = TileOptions(
        patch_size=patch_size, mpp=mpp, level=level, slide_mpp=slide_mpp, overlap=overlap,
        min_tissue=min_tissue, tissue_method=tissue_method, limit=limit,  # type: ignore[arg-type]
        stain_norm=stain_norm, stain_target=stain_target, backend=backend,  # type: ignore[arg-type]
        max_unreadable=max_unreadable, tissue_mask=tissue_mask, labels=labels,
        label_min_fraction=label_min_fraction)
    summary = run_tile(list(slides), out, options, progress=not quiet,
                       on_error="raise" if debug else print_failure,
                       **batch_opts.run_items_kwargs())
    if not quiet:
        for r in summary.results:
            if r.status in ("done", "skipped"):
                again = " (finished before, same options)" if r.status == "skipped" else ""
                click.echo(f"{r.slide}: {r.patches} patches -> {r.output}{again}")
    if summary.failed:
        click.echo(f"{len(summary.failed)} of {len(summary.results)} slides failed "
                   f"(see {summary.manifest})", err=True)
    if busy := summary.busy_line():
        click.echo(busy, err=True)
    if summary.exit_code:
        sys.exit(summary.exit_code)
