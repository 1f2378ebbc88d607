"""``histotile predict``: a thin click layer that builds :class:`histotile.options.PredictOptions`
and calls :func:`histotile.predict`.

Defaults, choices and validation live on the options object (read here with ``field_option``);
nothing heavy is imported: torch loads when the run starts and the weights when the first batch
of the first slide is ready.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from histotile.cli import echo_err
from histotile.cli.batch_options import (
    FailureReporter,
    batch_options,
    pop_batch_options,
    quiet_dask,
)
from histotile.cli.common import (
    backend_option,
    debug_flag,
    field_option,
    invoked_command,
    quiet_flag,
    slide_mpp_option,
)
from histotile.options import PredictOptions

P = PredictOptions


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out-dir", default="histotile-out", show_default=True,
              type=click.Path(file_okay=False), help="Output folder (one sub-folder per slide).")
@field_option(P, "model", metavar="NAME|PATH|URL",
              help="Bundled model name, model folder, URL or hf://org/repo "
                   "[default: pathmnist-smallcnn].")
@field_option(P, "device", metavar="auto|cpu|cuda|cuda:N", help="Where the model runs.")
@field_option(P, "batch_size", help="Patches per model batch.")
@field_option(P, "workers",
              help="Reader processes [default: 0 on CPU (a reader thread), up to 8 on CUDA].")
@slide_mpp_option
@field_option(P, "stain_norm",
              help="auto: what the model's training saw (the card's stain method and reference "
                   "when training used normalised patches, else none); macenko: normalise to "
                   "the card's reference (the standard one if it has none).")
@field_option(P, "min_tissue", help="Keep patches with at least this tissue fraction (0-1).")
@field_option(P, "overlap", help="Patch overlap fraction in [0, 1) (0.5 = half-patch steps).")
@field_option(P, "split", help="Split of MedMNIST .npz inputs.")
@backend_option
@field_option(P, "gradcam",
              help="Also stitch Grad-CAM maps: a 'gradcam' image in heatmap.ome.zarr, "
                   "gradcam_overlay.png and a gradcam_mean per tile (eager models only).")
@field_option(P, "cam_class", metavar="predicted|CLASS",
              help="Class whose Grad-CAM is drawn: each patch's argmax, or one class name.")
@field_option(P, "cam_layer", metavar="NAME",
              help="Module path of the layer to hook [default: the architecture's last conv "
                   "block].")
@field_option(P, "cam_resolution", metavar="PX",
              help="Level-0 px per Grad-CAM pixel [default: patch size in level-0 px / 8, i.e. "
                   "8 x 8 CAM pixels per patch].")
@field_option(P, "attention",
              help="Also stitch a ViT's CLS attention (last block, head mean): an 'attention' "
                   "image in heatmap.ome.zarr and attention_overlay.png (--arch vit models; "
                   "not with --gradcam; --cam-resolution applies).")
@field_option(P, "geojson_plain",
              help="Write tiles.geojson (uncompressed) instead of tiles.geojson.gz.")
@field_option(P, "qupath_object_type", help="QuPath object type of the tiles.")
@field_option(P, "qupath_min_prob", metavar="F",
              help="Leave out of the GeoJSON tiles whose top probability is below F.")
@field_option(P, "qupath_merge",
              help="Also write classes.geojson.gz: one dissolved annotation per class.")
@field_option(P, "ome_tiff", help="Also write heatmap.ome.tif (pyramidal OME-TIFF, argmax "
                                  "colours).")
@field_option(P, "allow_darkfield",
              help="Run fluorescence / dark-field slides through the model anyway (they are "
                   "refused by default: the models are for brightfield H&E).")
@field_option(P, "max_unreadable", metavar="FRACTION",
              help="Fail a slide when more than this share of its patches cannot be decoded "
                   "(damaged tiles); below it they are recorded as unreadable.")
@field_option(P, "tissue_mask", metavar="FILE|FOLDER",
              help="QuPath GeoJSON tissue (objects classified Tissue or unclassified) replacing "
                   "tissue detection; a folder holds one per slide (<stem>.geojson, "
                   "<name>.geojson, or a previous run's <stem>/tissue.geojson).")
@batch_options
@click.pass_context
def predict(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, **values: Any) -> None:
    """Run a patch classifier over slides, folders of slides or patch archives.

    Per slide OUT_DIR/<stem>/ gets heatmap.ome.zarr, predictions.csv, tiles.geojson.gz,
    overlay.png, tissue.png, tissue.geojson (the mask used, editable in QuPath) and run.json
    (written last; finished slides are skipped);
    --gradcam adds gradcam_overlay.png, --attention (ViT) attention_overlay.png,
    --qupath-merge classes.geojson.gz, --ome-tiff heatmap.ome.tif. Changing any of these
    options recomputes finished slides.
    PCam .h5 and MedMNIST .npz archives get predictions.csv and, with labels, the accuracy.
    """
    from histotile.inference import accuracy_lines, closing_lines
    from histotile.inference import predict as run_predict

    quiet, debug = quiet_flag(ctx), debug_flag(ctx)
    batch = pop_batch_options(values)
    options = PredictOptions(**values, batch=batch, progress=not quiet,
                             command=invoked_command(ctx))  # validated here, before any slide
    if quiet:
        quiet_dask(batch.executor)
    reporter = FailureReporter()
    summary = run_predict(list(inputs), out_dir, options,
                          on_error="raise" if debug else reporter)
    reporter.close()
    for line in accuracy_lines(summary):
        click.echo(line)
    warnings, where = closing_lines(summary, out_dir)
    for line in warnings:
        echo_err(f"warning: {line}")
    if where and not quiet:
        click.echo(where)
    if busy := summary.busy_line():
        click.echo(busy, err=True)
    if summary.exit_code:  # 1: an item failed; 75: items left busy in another run
        sys.exit(summary.exit_code)  # (ctx.exit's code is lost under standalone_mode=False)
