"""``histotile export``: re-export finished predict results (QuPath GeoJSON, OME-TIFF).

The narrower sibling of ``histotile render`` (:mod:`histotile.cli.render`): it needs only the
result folder (CSV and zarr), not the slide, and draws no pictures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import click

from histotile.cli.common import debug_flag, report_failure
from histotile.errors import HistotileError


def _result_dirs(paths: tuple[Path, ...], marker: str) -> list[Path]:
    """Each path if it holds ``marker``, else its sub-folders that do (a whole OUT_DIR)."""
    dirs: list[Path] = []
    for path in paths:
        if (path / marker).exists() or not path.is_dir():
            dirs.append(path)
        else:
            found = sorted(p.parent for p in path.glob(f"*/{marker}"))
            dirs.extend(found or [path])
    return dirs


def _run_each(ctx: click.Context, dirs: list[Path],
              job: Callable[[Path], Iterable[Path]]) -> None:
    if len(dirs) == 1:  # one folder: its error is the command's error
        for out in job(dirs[0]):
            click.echo(str(out))
        return
    failed = 0
    for folder in dirs:
        try:
            for out in job(folder):
                click.echo(str(out))
        except Exception as exc:  # noqa: BLE001 - one line per failed folder, others go on
            failed += 1
            report_failure(str(folder), exc, debug_flag(ctx))
    if failed:
        raise HistotileError(f"{failed} of {len(dirs)} result folders failed",
                             "see the errors above")


@click.group("export")
def export() -> None:
    """Re-export finished results (QuPath GeoJSON, OME-TIFF); pictures: histotile render."""


@export.command("qupath")
@click.argument("result_dirs", nargs=-1, required=True, metavar="RESULT_DIR...",
                type=click.Path(path_type=Path))
@click.option("--geojson-plain", is_flag=True, help="Write tiles.geojson instead of .geojson.gz.")
@click.option("--object-type", type=click.Choice(["tile", "detection"]), default="tile",
              show_default=True, help="QuPath object type of each patch.")
@click.option("--min-prob", "--qupath-min-prob", type=click.FloatRange(0, 1), default=None,
              help="Drop tiles whose top probability is below this.")
@click.option("--merge", "--qupath-merge", is_flag=True,
              help="Also write classes.geojson.gz: one annotation (MultiPolygon) per class.")
@click.option("--no-tiles", is_flag=True, help="With --merge: skip the per-tile file.")
@click.pass_context
def qupath(ctx: click.Context, result_dirs: tuple[Path, ...], geojson_plain: bool,
           object_type: str, min_prob: float | None, merge: bool, no_tiles: bool) -> None:
    """Write QuPath GeoJSON from predict result folders (a slide's folder or a whole OUT_DIR).

    Drag the tiles.geojson.gz onto the slide in QuPath, then Measure > Show measurement maps.
    """
    from histotile.export.qupath import export_qupath

    def job(folder: Path) -> list[Path]:
        return export_qupath(folder, gzip=not geojson_plain, object_type=object_type,
                             min_prob=min_prob, merge=merge, tiles=not (merge and no_tiles))

    _run_each(ctx, _result_dirs(result_dirs, "predictions.csv"), job)


@export.command("ome-tiff")
@click.argument("result_dirs", nargs=-1, required=True, metavar="RESULT_DIR...",
                type=click.Path(path_type=Path))
@click.pass_context
def ome_tiff(ctx: click.Context, result_dirs: tuple[Path, ...]) -> None:
    """Write heatmap.ome.tif (pyramidal, argmax colours, slide pixel size) beside the zarr."""
    from histotile.export.ome_tiff import export_ome_tiff

    _run_each(ctx, _result_dirs(result_dirs, "heatmap.ome.zarr"),
              lambda folder: [export_ome_tiff(folder)])
