"""``histotile tile SLIDE... -o OUT``: PCam-layout HDF5 patch archives of tissue."""

from __future__ import annotations

import sys

import click

from histotile.cli.common import (
    backend_option,
    debug_flag,
    quiet_flag,
    report_failure,
    slide_mpp_option,
)
from histotile.options import TileOptions


@click.command("tile")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (one <stem>.h5 and <stem>.tissue.png per slide).")
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
@backend_option
@click.pass_context
def tile(ctx: click.Context, slides: tuple[str, ...], out_dir: str, patch_size: int,
         mpp: float | None, level: int | None, slide_mpp: float | None, overlap: float,
         min_tissue: float, tissue_method: str, limit: int | None, stain_norm: str,
         stain_target: str | None, backend: str) -> None:
    """Cut tissue patches of SLIDES at a target mpp into PatchCamelyon-layout HDF5 archives."""
    from histotile.tile import tile_slide

    TileOptions(patch_size=patch_size, mpp=mpp, level=level, slide_mpp=slide_mpp,
                overlap=overlap, min_tissue=min_tissue, tissue_method=tissue_method, limit=limit,
                stain_norm=stain_norm, stain_target=stain_target, backend=backend)  # validates
    debug, quiet = debug_flag(ctx), quiet_flag(ctx)
    failed = 0
    for path in slides:
        try:
            result = tile_slide(
                path, out_dir, patch_size=patch_size, mpp=mpp, level=level,
                slide_mpp=slide_mpp, overlap=overlap, min_tissue=min_tissue, limit=limit,
                backend=backend, tissue_method=tissue_method, progress=not quiet,
                stain_norm=stain_norm, stain_target=stain_target,
            )
        except Exception as exc:  # noqa: BLE001 - one slide failing must not stop the others
            if len(slides) == 1 and not debug:
                report_failure(path, exc, debug)
                sys.exit(getattr(exc, "exit_code", 1))
            report_failure(path, exc, debug)
            failed += 1
            continue
        if not quiet:
            click.echo(f"{path}: {result.n_patches} patches at "
                       f"{result.attrs.get('effective_mpp', float('nan')):.4f} um/px -> "
                       f"{result.archive}")
    if failed:
        click.echo(f"{failed} of {len(slides)} slides failed", err=True)
        sys.exit(1)
