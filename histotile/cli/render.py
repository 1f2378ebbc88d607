"""``histotile render RESULT_DIR...``: redraw pictures and exports of finished slides, no model.

``export`` stays as the narrower sibling: it rebuilds the QuPath/OME-TIFF files from the CSV and
zarr alone (no slide needed, e.g. on a machine without the slides); ``render`` redraws the
pictures (it reads a thumbnail of the slide) and can also redo those exports.
"""

from __future__ import annotations

from pathlib import Path

import click

from histotile.cli.export import _result_dirs, _run_each


@click.command("render")
@click.argument("result_dirs", nargs=-1, required=True, metavar="RESULT_DIR...",
                type=click.Path(path_type=Path))
@click.option("--class", "class_name", default=None, metavar="NAME",
              help="Draw this class: overlay.png shows its patches at >= --threshold and "
                   "prob_<NAME>.png its probability in --cmap [default: the argmax].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Minimum probability drawn (of --class, else the top one); with --qupath "
                   "the tiles' minimum top probability.")
@click.option("--opacity", type=click.FloatRange(0, 1), default=0.45, show_default=True,
              help="Opacity of the colours over the thumbnail.")
@click.option("--cmap", default="viridis", show_default=True,
              help="Matplotlib colour map of prob_<class>.png.")
@click.option("--size", type=click.IntRange(min=64), default=1024, show_default=True,
              help="Longest side of the pictures in pixels.")
@click.option("--slide", type=click.Path(exists=True, path_type=Path), default=None,
              help="The slide, when it is no longer where run.json says (one RESULT_DIR).")
@click.option("--qupath", is_flag=True, help="Also rewrite tiles.geojson.gz.")
@click.option("--ome-tiff", is_flag=True, help="Also rewrite heatmap.ome.tif.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None,
              help="Write the pictures here [default: each result folder; --qupath and "
                   "--ome-tiff always rewrite the result folder's files].")
@click.pass_context
def render(ctx: click.Context, result_dirs: tuple[Path, ...], out_dir: Path | None,
           slide: Path | None, **values: object) -> None:
    """Redraw overlay.png, prob_<class>.png, gradcam/attention_overlay.png (and with --qupath,
    --ome-tiff the exports) of predict result folders (a slide's folder or a whole OUT_DIR)
    from predictions.csv and heatmap.ome.zarr, in seconds, without the model."""
    from histotile.render import RenderOptions
    from histotile.render import render as run_render

    dirs = _result_dirs(result_dirs, "predictions.csv")
    if slide is not None and len(dirs) > 1:
        from histotile.errors import InvalidArgumentError

        raise InvalidArgumentError("--slide names one slide but several result folders were "
                                   "given", "render one folder at a time with --slide",
                                   subject="--slide")
    options = RenderOptions(slide=None if slide is None else str(slide), **values)  # type: ignore[arg-type]

    def job(folder: Path) -> list[Path]:
        target = None if out_dir is None else (out_dir if len(dirs) == 1 else out_dir / folder.name)
        return run_render(folder, options, target)

    _run_each(ctx, dirs, job)
