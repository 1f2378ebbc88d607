"""``histotile info SLIDE [--json]``."""

from __future__ import annotations

import json

import click

from histotile.cli.common import backend_option, slide_mpp_option


def format_info(info: dict) -> str:
    """Human-readable lines for :meth:`histotile.slide.Slide.info`."""
    mpp = (f"{info['mpp_x']:.4f} x {info['mpp_y']:.4f} um/px (source: {info['mpp_source']})"
           if info["mpp_x"] is not None else "unknown (pass --slide-mpp)")
    if info.get("mpp_rejected"):
        rej = info["mpp_rejected"]
        mpp += f"; {rej['source']} value set aside: {rej['rule']}"
    lines = [
        f"slide:      {info['path']}",
        f"backend:    {info['backend']}",
        f"vendor:     {info['vendor'] or '-'}",
        f"level 0:    {info['width']} x {info['height']} px",
        f"mpp:        {mpp}",
        f"objective:  {info['objective_power'] or '-'}",
        f"associated: {', '.join(info['associated_images']) or '-'}",
        "levels:",
    ]
    for lv in info["levels"]:
        m = f"{lv['mpp']:.4f} um/px" if lv["mpp"] is not None else "-"
        lines.append(f"  {lv['level']:>2}  {lv['width']:>7} x {lv['height']:<7} "
                     f"downsample {lv['downsample']:.4f}  {m}")
    return "\n".join(lines)


@click.command("info")
@click.argument("slide", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@backend_option
@slide_mpp_option
def info(slide: str, as_json: bool, backend: str, slide_mpp: float | None) -> None:
    """Describe SLIDE: backend, vendor, levels, mpp and where it came from."""
    from histotile.slide import open_slide

    with open_slide(slide, backend=backend, slide_mpp=slide_mpp) as s:
        data = s.info()
    click.echo(json.dumps(data) if as_json else format_info(data))
