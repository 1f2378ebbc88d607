"""``histotile predict``: a thin click layer over :func:`histotile.predict.predict`.

Nothing heavy is imported here: torch loads when the run starts and the weights when the first
batch of the first slide is ready.
"""

from __future__ import annotations

import sys

import click

from histotile.cli.batch_options import batch_options, print_failure, quiet_dask
from histotile.cli.common import (
    backend_option,
    debug_flag,
    invoked_command,
    quiet_flag,
    slide_mpp_option,
)


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out-dir", default="histotile-out", show_default=True,
              type=click.Path(file_okay=False), help="Output folder (one sub-folder per slide).")
@click.option("--model", "model", default=None, metavar="NAME|PATH|URL",
              help="Bundled model name, model folder, URL or hf://org/repo "
                   "[default: pathmnist-smallcnn].")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the model runs.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Patches per model batch.")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="Reader processes [default: 0 on CPU (a reader thread), up to 8 on CUDA].")
@slide_mpp_option
@click.option("--stain-norm", default="auto", show_default=True,
              type=click.Choice(["auto", "none", "macenko"]),
              help="auto: what the model card asks for.")
@click.option("--min-tissue", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Keep patches with at least this tissue fraction.")
@click.option("--overlap", default=0.0, show_default=True, type=click.FloatRange(0, 1,
              max_open=True), help="Patch overlap fraction (0.5 = half-patch steps).")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "val", "test"]), help="Split of MedMNIST .npz inputs.")
@backend_option
@click.option("--gradcam", is_flag=True,
              help="Also stitch Grad-CAM maps: a 'gradcam' image in heatmap.ome.zarr, "
                   "gradcam_overlay.png and a gradcam_mean per tile (eager models only).")
@click.option("--cam-class", default="predicted", show_default=True, metavar="predicted|CLASS",
              help="Class whose Grad-CAM is drawn: each patch's argmax, or one class name.")
@click.option("--cam-layer", default=None, metavar="NAME",
              help="Module path of the layer to hook [default: the architecture's last conv "
                   "block].")
@click.option("--cam-resolution", default=None, type=click.FloatRange(min=0, min_open=True),
              metavar="PX", help="Level-0 px per Grad-CAM pixel [default: patch size in level-0 "
                                 "px / 8, i.e. 8 x 8 CAM pixels per patch].")
@click.option("--attention", is_flag=True,
              help="Also stitch a ViT's CLS attention (last block, head mean): an 'attention' "
                   "image in heatmap.ome.zarr and attention_overlay.png (--arch vit models; "
                   "not with --gradcam; --cam-resolution applies).")
@click.option("--geojson-plain", is_flag=True,
              help="Write tiles.geojson (uncompressed) instead of tiles.geojson.gz.")
@click.option("--qupath-object-type", default="tile", show_default=True,
              type=click.Choice(["tile", "detection"]), help="QuPath object type of the tiles.")
@click.option("--qupath-min-prob", default=None, type=click.FloatRange(0, 1), metavar="F",
              help="Leave out of the GeoJSON tiles whose top probability is below F.")
@click.option("--qupath-merge", is_flag=True,
              help="Also write classes.geojson.gz: one dissolved annotation per class.")
@click.option("--ome-tiff", is_flag=True,
              help="Also write heatmap.ome.tif (pyramidal OME-TIFF, argmax colours).")
@batch_options
@click.pass_context
def predict(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, model: str | None,
            device: str, batch_size: int, workers: int | None, slide_mpp: float | None,
            stain_norm: str, min_tissue: float, overlap: float, split: str, backend: str,
            gradcam: bool, cam_class: str, cam_layer: str | None, cam_resolution: float | None,
            attention: bool, geojson_plain: bool, qupath_object_type: str,
            qupath_min_prob: float | None, qupath_merge: bool, ome_tiff: bool,
            **batch: object) -> None:
    """Run a patch classifier over slides, folders of slides or patch archives.

    Per slide OUT_DIR/<stem>/ gets heatmap.ome.zarr, predictions.csv, tiles.geojson.gz,
    overlay.png, tissue.png and run.json (written last; finished slides are skipped);
    --gradcam adds gradcam_overlay.png, --attention (ViT) attention_overlay.png,
    --qupath-merge classes.geojson.gz, --ome-tiff heatmap.ome.tif. Changing any of these
    options recomputes finished slides.
    PCam .h5 and MedMNIST .npz archives get predictions.csv and, with labels, the accuracy.
    """
    from histotile.cli.batch_options import pop_batch_options
    from histotile.predict import accuracy_lines
    from histotile.predict import predict as run_predict

    quiet, debug = quiet_flag(ctx), debug_flag(ctx)
    batch_opts = pop_batch_options(batch)
    if quiet:
        quiet_dask(batch_opts["executor"])
    summary = run_predict(
        list(inputs), out_dir=out_dir, model=model, device=device, batch_size=batch_size,
        workers=workers, slide_mpp=slide_mpp, stain_norm=stain_norm, min_tissue=min_tissue,
        overlap=overlap, split=split, backend=backend, **batch_opts,
        progress=not quiet, on_error="raise" if debug else print_failure,
        command=invoked_command(ctx),
        gradcam=gradcam, cam_class=cam_class, cam_layer=cam_layer, cam_resolution=cam_resolution,
        attention=attention, geojson_plain=geojson_plain, qupath_object_type=qupath_object_type,
        qupath_min_prob=qupath_min_prob, qupath_merge=qupath_merge, ome_tiff=ome_tiff,
    )
    for line in accuracy_lines(summary):
        click.echo(line)
    if summary.exit_code:  # 1: an item failed; 75: items left busy in another run
        sys.exit(summary.exit_code)  # (ctx.exit's code is lost under standalone_mode=False)
