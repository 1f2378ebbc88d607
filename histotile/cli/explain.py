"""``histotile explain``: Grad-CAM grids and the PCam centre-region statistic for archives."""

from __future__ import annotations

import json

import click

# Listed here (not imported from histotile.explain) so --help needs no torch; a new method is
# added to histotile.explain.METHODS and to this tuple.
METHOD_CHOICES = ("gradcam", "attention", "attention-rollout")


@click.command("explain")
@click.argument("model")
@click.argument("archive", type=click.Path(exists=True))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for <method>_grid.png and centre_region.json.")
@click.option("-n", "n", type=click.IntRange(1), default=32, show_default=True,
              help="Explain the first N patches.")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="gradcam", show_default=True)
@click.option("--cam-class", default="predicted", show_default=True,
              help="Class whose map is shown: predicted, a class name or index.")
@click.option("--cam-layer", default=None,
              help="Module path to hook [default: the architecture's last conv block].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test",
              show_default=True, help="MedMNIST .npz split.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def explain(model: str, archive: str, out_dir: str, n: int, method: str, cam_class: str,
            cam_layer: str | None, split: str, batch_size: int, device: str) -> None:
    """Explain MODEL's calls on the first patches of ARCHIVE (PCam-layout .h5, MedMNIST .npz or
    a Kaggle folder): a grid of patches with CAM overlays, predicted/true labels and confidence;
    for 96 px (PCam-style) models also the share of CAM mass in the central 32x32 px."""
    from histotile.explain import explain as run

    report = run(model, archive, out_dir, n=n, method=method, cam_class=cam_class,
                 cam_layer=cam_layer, split=split, batch_size=batch_size, device=device)
    click.echo(f"wrote {report['files']['grid']}")
    centre = report.get("centre_region")
    if centre is not None:
        click.echo(f"wrote {report['files']['centre_region']}: mean CAM mass in the central "
                   f"{centre['size_px']}x{centre['size_px']} px = "
                   f"{json.dumps(centre['mean_centre_mass'])} (area share "
                   f"{centre['area_share']:.3f})")
