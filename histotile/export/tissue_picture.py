"""``tissue.png``: the thumbnail with the tissue mask tinted green, its outline, and the kept patch
grid in blue (``histotile tile`` and ``histotile predict`` draw the same picture)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histotile.export.drawing import Panel, draw_scale_bar, outline, save_png

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.tissue import TissueMask

MASK_GREEN, EDGE_GREEN, GRID_BLUE = (0, 200, 0), (0, 120, 0), (30, 60, 220)


def tissue_picture(tissue: TissueMask, grid: PatchGrid | None = None,
                   min_side: int = 1024) -> np.ndarray:
    """Thumbnail with the mask tinted green, its outline, and the kept patch grid in blue,
    enlarged by a whole factor (nearest) until its longest side reaches ``min_side``."""
    from PIL import Image, ImageDraw

    thumb, mask = tissue.thumbnail, tissue.mask
    scale = max(1, int(np.ceil(min_side / max(thumb.shape[:2]))))
    tinted = thumb.copy()
    green = 0.35 * np.array(MASK_GREEN, np.float32)
    for y in range(0, tinted.shape[0], 256):  # row blocks: no float copy of the thumbnail
        rows, inside = tinted[y:y + 256], mask[y:y + 256]
        rows[inside] = np.rint(0.65 * rows[inside].astype(np.float32) + green)
    img = Image.fromarray(tinted)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    edge = outline(mask)
    if scale > 1:
        edge = np.kron(edge, np.ones((scale, scale), bool))
    pixels = np.asarray(img).copy()
    pixels[edge] = EDGE_GREEN
    img = Image.fromarray(pixels)
    if grid is not None and len(grid):
        draw = ImageDraw.Draw(img)
        f = scale / tissue.downsample
        size = float(grid.patch_size_level0) * f
        for x, y in grid.coords:
            x0, y0 = x * f, y * f
            draw.rectangle([x0, y0, x0 + size - 1, y0 + size - 1], outline=GRID_BLUE)
    return np.asarray(img)


def write_tissue_png(path: str | Path, tissue: TissueMask, grid: PatchGrid | None = None, *,
                     slide_mpp: float | None = None, title: str | None = None,
                     notes: Sequence[str] = (), min_side: int = 1024) -> Path:
    """:func:`tissue_picture` with a scale bar (``slide_mpp``: µm per level-0 px) and a panel:
    ``title``, ``notes`` and a key to the colours."""
    from PIL import Image

    pixels = tissue_picture(tissue, grid, min_side)
    image = Image.fromarray(pixels)
    if slide_mpp:
        um_per_px = tissue.downsample * slide_mpp * tissue.thumbnail.shape[1] / pixels.shape[1]
        draw_scale_bar(image, um_per_px)
    panel = Panel(width=300)
    if title:
        panel.text(title, size=16, bold=True)
    for note in notes:
        panel.text(note, fill=(70, 70, 70))
    panel.gap(10)
    tint = tuple(round(0.65 * 235 + 0.35 * c) for c in MASK_GREEN)
    panel.swatch(f"tissue ({tissue.method}, {tissue.fraction:.0%} of the thumbnail)",
                 lambda _c, d, box: d.rectangle(box, fill=tint, outline=EDGE_GREEN, width=2))
    if grid is not None:
        panel.swatch(f"patch kept ({len(grid)})",
                     lambda _c, d, box: d.rectangle(box, fill=(255, 255, 255),
                                                    outline=GRID_BLUE, width=2))
    return save_png(panel.beside(image), path)
