"""``overlay.png`` (thumbnail + argmax colours + tissue outline + legend) and ``tissue.png``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _save_png(image: Any, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    """A boolean mask as a black/white 8-bit PNG (255 = tissue)."""
    from PIL import Image

    return _save_png(Image.fromarray(np.where(np.asarray(mask), 255, 0).astype(np.uint8)), path)


def label_image(shape: tuple[int, int], thumb_downsample: float, coords: np.ndarray,
                patch_size_level0: float | Sequence[float], labels: np.ndarray) -> np.ndarray:
    """(h, w) int16 array at thumbnail scale: the class index of the patch covering each
    pixel, -1 where no patch. Later patches win where patches overlap."""
    out = np.full(shape, -1, np.int16)
    pw, ph = (patch_size_level0 if np.ndim(patch_size_level0) else (patch_size_level0,) * 2)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.floor(coords[:, 0] / thumb_downsample).astype(int)
    y0 = np.floor(coords[:, 1] / thumb_downsample).astype(int)
    x1 = np.maximum(np.ceil((coords[:, 0] + pw) / thumb_downsample).astype(int), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + ph) / thumb_downsample).astype(int), y0 + 1)
    for a, b, c, d, lab in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(),
                               np.asarray(labels).tolist(), strict=True):
        out[max(b, 0):d, max(a, 0):c] = lab
    return out


def _outline(mask: np.ndarray, width: int, min_fraction: float = 5e-4) -> np.ndarray:
    """Inner boundary pixels of ``mask`` (holes filled, specks under ``min_fraction`` of the
    image dropped, so the outline stays readable), ``width`` px thick."""
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(np.asarray(mask, bool))
    lab, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= max(1, min_fraction * mask.size)
        keep[0] = False
        mask = keep[lab]
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width), border_value=0)


def _legend(image: Any, class_names: Sequence[str], class_colors: Sequence[Sequence[int]],
            counts: Sequence[int]) -> Any:
    """The image with a legend panel on its right: a swatch, the class and its patch count."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    row = max(14, int(font.getbbox("Ag")[3] * 1.6))
    lines = [f"{n} ({c})" for n, c in zip(class_names, counts, strict=True)]
    text_w = max(int(font.getlength(t)) for t in lines + ["argmax (patches)"])
    panel_w = text_w + row + 24
    height = max(image.height, row * (len(lines) + 2))
    canvas = Image.new("RGB", (image.width + panel_w, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = image.width + 8
    draw.text((x, 6), "argmax (patches)", fill=(0, 0, 0), font=font)
    for i, (text, color) in enumerate(zip(lines, class_colors, strict=True)):
        y = 6 + row * (i + 1)
        draw.rectangle([x, y, x + row - 4, y + row - 4], fill=tuple(int(v) for v in color),
                       outline=(0, 0, 0))
        draw.text((x + row + 2, y + 1), text, fill=(0, 0, 0), font=font)
    return canvas


def write_overlay(path: str | Path, thumbnail: np.ndarray, thumb_downsample: float,
                  coords: np.ndarray, patch_size_level0: float | Sequence[float],
                  labels: np.ndarray, class_names: Sequence[str],
                  class_colors: Sequence[Sequence[int]], tissue_mask: np.ndarray | None = None,
                  alpha: float = 0.45, outline_color: Sequence[int] = (0, 0, 0),
                  min_side: int = 800) -> Path:
    """The thumbnail with each patch's argmax colour blended in (``alpha``), the tissue mask's
    outline, and a legend. ``thumb_downsample`` is level-0 px per thumbnail px; ``tissue_mask``
    may have another size (it is resized to the thumbnail). A thumbnail whose longest side is
    under ``min_side`` is enlarged (bilinear) so that patches and legend stay legible."""
    from PIL import Image

    thumb = np.asarray(thumbnail, dtype=np.uint8)[..., :3]
    h, w = thumb.shape[:2]
    if max(h, w) < min_side:
        factor = min_side / max(h, w)
        h, w = round(h * factor), round(w * factor)
        thumb = np.asarray(Image.fromarray(thumb).resize((w, h), Image.Resampling.BILINEAR))
        thumb_downsample = thumb_downsample * np.asarray(thumbnail).shape[1] / w
    lab = label_image((h, w), thumb_downsample, coords, patch_size_level0, labels)
    palette = np.asarray([list(c)[:3] for c in class_colors], dtype=np.float32)
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, (1 << 20) // max(w, 1))  # blend ~1 Mpx at a time: float copies stay small
    for y in range(0, h, rows):
        block, blab = thumb[y:y + rows].astype(np.float32), lab[y:y + rows]
        hit = blab >= 0
        block[hit] = (1 - alpha) * block[hit] + alpha * palette[blab[hit]]
        out[y:y + rows] = np.rint(block)
    del lab
    if tissue_mask is not None:
        mask = np.asarray(tissue_mask, bool)
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (w, h), Image.Resampling.NEAREST)) > 0
        out[_outline(mask, max(1, round(min(h, w) / 300)))] = outline_color
    counts = np.bincount(np.asarray(labels, int), minlength=len(class_names))
    image = _legend(Image.fromarray(out), class_names, class_colors, counts.tolist())
    return _save_png(image, path)
