"""``histotile sample-data [NAME]``: list the samples, or fetch one and print its path."""

from __future__ import annotations

import click


@click.command("sample-data")
@click.argument("name", required=False)
def sample_data(name: str | None) -> None:
    """Without NAME, list the samples (* = in the cache, md5 checked; a folder: every file of
    it); with NAME, fetch it and print its path."""
    from histotile import sample_data as sd

    if name is None:
        for key in sd.names():
            rel = sd.ALIASES.get(key, key)
            mark = "*" if sd.is_cached(key) else " "
            note = sd.SAMPLES[rel].note if rel in sd.SAMPLES else f"-> {rel}"
            click.echo(f"{mark} {key}  {note}")
        return
    click.echo(str(sd.fetch(name, progress=True)))
