"""``histotile predict``: a thin click layer over :func:`histotile.predict.predict`.

Nothing heavy is imported here: torch loads when the run starts and the weights when the first
batch of the first slide is ready.
"""

from __future__ import annotations

import shlex
import sys

import click

from histotile.cli.batch_options import batch_options
from histotile.cli.common import backend_option, debug_flag, quiet_flag, slide_mpp_option


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
@batch_options
@click.pass_context
def predict(ctx: click.Context, inputs: tuple[str, ...], out_dir: str, model: str | None,
            device: str, batch_size: int, workers: int | None, slide_mpp: float | None,
            stain_norm: str, min_tissue: float, overlap: float, split: str, backend: str,
            **batch: object) -> None:
    """Run a patch classifier over slides, folders of slides or patch archives.

    Per slide OUT_DIR/<stem>/ gets heatmap.ome.zarr, predictions.csv, tiles.geojson.gz,
    overlay.png, tissue.png and run.json (written last; finished slides are skipped).
    PCam .h5 and MedMNIST .npz archives get predictions.csv and, with labels, the accuracy.
    """
    from histotile.cli.batch_options import pop_batch_options
    from histotile.predict import accuracy_lines
    from histotile.predict import predict as run_predict

    quiet, debug = quiet_flag(ctx), debug_flag(ctx)
    summary = run_predict(
        list(inputs), out_dir=out_dir, model=model, device=device, batch_size=batch_size,
        workers=workers, slide_mpp=slide_mpp, stain_norm=stain_norm, min_tissue=min_tissue,
        overlap=overlap, split=split, backend=backend, **pop_batch_options(batch),
        progress=not quiet, on_error="raise" if debug else _print_failure,
        command=" ".join(shlex.quote(a) for a in ["histotile", *sys.argv[1:]]),
    )
    for line in accuracy_lines(summary):
        click.echo(line)
    if summary.failed:
        sys.exit(1)  # (ctx.exit's code is lost under standalone_mode=False)


def _print_failure(item, result) -> None:  # noqa: ANN001 - (Path, ItemResult)
    text = result.error
    if result.slide not in text:
        text = f"{result.slide}: {text}"
    click.echo(f"error: {text}", err=True)
