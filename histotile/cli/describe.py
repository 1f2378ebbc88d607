"""``histotile describe``: class balance, t-SNE, sample grid and summary of a training source."""

from __future__ import annotations

from pathlib import Path

import click

from histotile.cli.common import quiet_flag


@click.command("describe")
@click.argument("data")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder to write [default: ./describe-DATA].")
@click.option("-n", "--n", "n", type=click.IntRange(min=3), default=5000, show_default=True,
              help="Patches in the seeded subsample (t-SNE, samples, channel statistics).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model", default=None,
              help="t-SNE of this model's embeddings (zoo name, folder, URL) instead of pixels.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels CSV for a 'histotile tile' archive.")
@click.option("--size", type=int, default=None, help="Resize patches to this size (px).")
@click.option("--perplexity", type=float, default=30.0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="For --model.")
@click.pass_context
def describe(ctx: click.Context, data: str, out_dir: Path | None, **kw: object) -> None:
    """Dataset views of DATA (MedMNIST .npz, PCam HDF5, Kaggle folder, image folder):
    balance.png, tsne.png, samples.png and summary.json."""
    from histotile.describe import describe as run_describe

    out = out_dir or Path(f"describe-{Path(data).stem}")
    s = run_describe(data, out, progress=not quiet_flag(ctx), **kw)  # type: ignore[arg-type]
    click.echo(f"wrote {out}: {s['total']:,} patches in {len(s['classes'])} classes, "
               f"{s['image_size'][0]} px; t-SNE of {s['subsample']['n']:,} "
               f"({s['tsne']['features']})")
