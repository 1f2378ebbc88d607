"""``overlay.png``: the thumbnail with each patch's argmax colour, how sure the model was, the
tissue outline, a scale bar, and a panel naming the slide, the model and the classes.

Confidence is drawn twice over: a patch's opacity grows with its top probability (from
``alpha_range[0]`` at chance, ``1 / classes``, to ``alpha_range[1]`` at 1), and a patch whose top
probability is under ``uncertain_below`` is hatched (stripes of its colour over the tissue) and
counted as uncertain in the legend. The thumbnail keeps its coordinates: overlay pixel (x, y) is
thumbnail pixel (x, y); the panel is on the right. ``tissue.png`` is drawn by
:mod:`histotile.export.tissue_picture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histotile.confidence import UNCERTAIN_BELOW
from histotile.export.drawing import (
    BLACK,
    WARN_RED,
    Panel,
    draw_scale_bar,
    outline,
    save_png,
)

ALPHA_RANGE = (0.15, 0.75)  # patch opacity at chance and at top probability 1
HATCH_PERIOD, HATCH_STROKE, HATCH_ALPHA = 10, 2, 0.85  # output px; stripes of uncertain patches
_PANEL_HE = (226, 178, 206)  # the pink the legend's opacity ramp is drawn on


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """A boolean mask as a black/white 8-bit PNG (255 = tissue)."""
    from PIL import Image

    return save_png(Image.fromarray(np.where(np.asarray(mask), 255, 0).astype(np.uint8)), path)


def patch_index_image(shape: tuple[int, int], thumb_downsample: float, coords: np.ndarray,
                      patch_size_level0: float | Sequence[float]) -> np.ndarray:
    """(h, w) int32 array at thumbnail scale: the index of the patch covering each pixel, -1
    where no patch. Later patches win where patches overlap."""
    out = np.full(shape, -1, np.int32)
    pw, ph = np.broadcast_to(np.asarray(patch_size_level0, np.float64), (2,)).tolist()
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.floor(coords[:, 0] / thumb_downsample).astype(int)
    y0 = np.floor(coords[:, 1] / thumb_downsample).astype(int)
    x1 = np.maximum(np.ceil((coords[:, 0] + pw) / thumb_downsample).astype(int), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + ph) / thumb_downsample).astype(int), y0 + 1)
    for k, (a, b, c, d) in enumerate(zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(),
                                         strict=True)):
        out[max(b, 0):d, max(a, 0):c] = k
    return out


def label_image(shape: tuple[int, int], thumb_downsample: float, coords: np.ndarray,
                patch_size_level0: float | Sequence[float], labels: np.ndarray) -> np.ndarray:
    """(h, w) int16 array at thumbnail scale: the class index of the patch covering each
    pixel, -1 where no patch. Later patches win where patches overlap."""
    index = patch_index_image(shape, thumb_downsample, coords, patch_size_level0)
    labels = np.asarray(labels, np.int16)
    return np.where(index >= 0, labels[np.maximum(index, 0)] if len(labels) else -1,
                    -1).astype(np.int16)


def patch_opacity(top: np.ndarray, n_classes: int,
                  alpha_range: tuple[float, float] = ALPHA_RANGE) -> np.ndarray:
    """Opacity per patch from its top probability: ``alpha_range[0]`` at chance (1 / classes)
    or below, ``alpha_range[1]`` at 1, linear in between."""
    chance = 1.0 / max(n_classes, 1)
    t = np.clip((np.asarray(top, np.float64) - chance) / max(1.0 - chance, 1e-9), 0.0, 1.0)
    return alpha_range[0] + (alpha_range[1] - alpha_range[0]) * t


def hatch(rows: slice, width: int) -> np.ndarray:
    """Diagonal stripes for the rows ``rows`` of a picture ``width`` wide (True on a stripe)."""
    yy = np.arange(rows.start, rows.stop)[:, None]
    return (yy + np.arange(width)[None, :]) % HATCH_PERIOD < HATCH_STROKE


def write_overlay(path: str | Path, thumbnail: np.ndarray, thumb_downsample: float,
                  coords: np.ndarray, patch_size_level0: float | Sequence[float],
                  labels: np.ndarray, class_names: Sequence[str],
                  class_colors: Sequence[Sequence[int]], tissue_mask: np.ndarray | None = None,
                  alpha: float = 0.45, outline_color: Sequence[int] = BLACK,
                  min_side: int = 800, *, top_probability: np.ndarray | None = None,
                  uncertain_below: float = UNCERTAIN_BELOW, slide_mpp: float | None = None,
                  title: str | None = None, model: str | None = None,
                  notes: Sequence[str] = (), warning: str | None = None) -> Path:
    """Write ``overlay.png`` (see the module docstring).

    ``thumb_downsample`` is level-0 px per thumbnail px; ``tissue_mask`` may have another size
    (it is resized to the thumbnail). Without ``top_probability`` every patch is blended at
    ``alpha`` and nothing is hatched. ``slide_mpp`` (µm per level-0 px) adds a scale bar;
    ``title`` (the slide), ``model``, ``notes`` and ``warning`` (drawn red) head the panel. A
    thumbnail whose longest side is under ``min_side`` is enlarged (bilinear) so that patches
    and text stay legible."""
    from PIL import Image

    thumb = np.asarray(thumbnail, dtype=np.uint8)[..., :3]
    h, w = thumb.shape[:2]
    if max(h, w) < min_side:
        factor = min_side / max(h, w)
        h, w = round(h * factor), round(w * factor)
        thumb = np.asarray(Image.fromarray(thumb).resize((w, h), Image.Resampling.BILINEAR))
        thumb_downsample = thumb_downsample * np.asarray(thumbnail).shape[1] / w
    labels = np.asarray(labels, np.int64)
    if top_probability is None:
        opacity, uncertain = np.full(len(labels), float(alpha)), np.zeros(len(labels), bool)
    else:
        top = np.asarray(top_probability, np.float64)
        opacity, uncertain = patch_opacity(top, len(class_names)), top < uncertain_below
    out = _blend(thumb, patch_index_image((h, w), thumb_downsample, coords, patch_size_level0),
                 labels, np.asarray([list(c)[:3] for c in class_colors], np.float32),
                 opacity, uncertain)
    if tissue_mask is not None:
        mask = np.asarray(tissue_mask, bool)
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (w, h), Image.Resampling.NEAREST)) > 0
        out[outline(mask, max(1, round(min(h, w) / 300)), min_fraction=5e-4)] = outline_color
    image = Image.fromarray(out)
    if slide_mpp:
        draw_scale_bar(image, thumb_downsample * slide_mpp)
    panel = _panel(labels, uncertain, class_names, class_colors, top_probability is not None,
                   uncertain_below, title, model, notes, warning)
    return save_png(panel.beside(image), path)


def _blend(thumb: np.ndarray, index: np.ndarray, labels: np.ndarray, palette: np.ndarray,
           opacity: np.ndarray, uncertain: np.ndarray) -> np.ndarray:
    """Each covered pixel moved toward its patch's class colour by the patch's opacity; the
    stripes of uncertain patches by :data:`HATCH_ALPHA`. Only covered pixels are computed (in
    float32), in row blocks of ~1 Mpx; the stripes only where a patch is uncertain."""
    h, w = thumb.shape[:2]
    out = np.array(thumb[..., :3], dtype=np.uint8, copy=True)
    rows = max(1, (1 << 20) // max(w, 1))
    for y in range(0, h, rows):
        sl = slice(y, min(y + rows, h))
        hit = index[sl] >= 0
        if not hit.any():
            continue
        k = index[sl][hit]
        a = opacity[k].astype(np.float32)
        unsure = uncertain[k]
        if unsure.any():
            ys, xs = np.nonzero(hit)  # the order of boolean indexing: row-major
            stripe = (ys + y + xs) % HATCH_PERIOD < HATCH_STROKE  # as hatch(sl, w)[hit]
            a = np.where(unsure & stripe, np.float32(HATCH_ALPHA), a)
        a = a[:, None]
        block = out[sl]
        block[hit] = np.rint((1 - a) * block[hit].astype(np.float32) + a * palette[labels[k]])
    return out


def _panel(labels: np.ndarray, uncertain: np.ndarray, class_names: Sequence[str],
           class_colors: Sequence[Sequence[int]], confidence: bool, uncertain_below: float,
           title: str | None, model: str | None, notes: Sequence[str],
           warning: str | None) -> Panel:
    panel = Panel()
    if title:
        panel.text(title, size=16, bold=True)
    if model:
        panel.text(model)
    for note in notes:
        panel.text(note, fill=(70, 70, 70))
    if warning:
        panel.gap(4)
        panel.text(warning, fill=WARN_RED)
    panel.gap(10)
    panel.text("class: patches" + (" (uncertain)" if confidence else ""), bold=True)
    counts = np.bincount(labels, minlength=len(class_names))
    unsure = np.bincount(labels[uncertain], minlength=len(class_names))
    for k, (name, color) in enumerate(zip(class_names, class_colors, strict=True)):
        fill = tuple(int(v) for v in list(color)[:3])
        text = f"{name}  {counts[k]}" + (f" ({unsure[k]})" if confidence and counts[k] else "")
        panel.swatch(text, lambda _c, d, box, fill=fill: d.rectangle(box, fill=fill))
    if confidence:
        panel.gap(10)
        panel.swatch(f"hatched: uncertain, top probability < {uncertain_below:.2f}",
                     _hatched_swatch)
        panel.swatch("opacity: top probability, chance -> 1", _ramp_swatch)
    panel.swatch("tissue outline", lambda _c, d, box: d.rectangle(box, fill=(255, 255, 255),
                                                                  outline=BLACK, width=2))
    return panel


def _hatched_swatch(canvas: Any, draw: Any, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=_PANEL_HE)
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            if (x + y) % HATCH_PERIOD < HATCH_STROKE:
                canvas.putpixel((x, y), (90, 90, 90))


def _ramp_swatch(canvas: Any, draw: Any, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    for x in range(x0, x1 + 1):
        a = ALPHA_RANGE[0] + (ALPHA_RANGE[1] - ALPHA_RANGE[0]) * (x - x0) / max(1, x1 - x0)
        draw.line([(x, y0), (x, y1)], fill=tuple(round((1 - a) * c + a * 60) for c in _PANEL_HE))
