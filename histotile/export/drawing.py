"""Small drawing helpers shared by the pictures (``overlay.png``, ``tissue.png``): saving, a
font, an outline, a scale bar in µm and a text panel beside the picture."""

from __future__ import annotations

import functools
import importlib.util
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histotile.fileio import atomic_path

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
WARN_RED = (180, 0, 0)
GREY = (110, 110, 110)
# zlib level of the pictures: 1 writes overlay.png/tissue.png 2-3x faster than Pillow's default
# (6) for files about a fifth larger (same pixels); they are written once per slide and looked at
PNG_COMPRESS_LEVEL = 1


def save_png(image: Any, path: str | Path) -> Path:
    """Write a PIL image as PNG through a temporary file (no half-written picture)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return Path(path)


def font(size: int = 13, bold: bool = False) -> Any:
    """DejaVu Sans (shipped with matplotlib; found without importing it) at ``size`` px: it has
    the µ sign. Else Pillow's bundled font (µ drawn as a box), else its bitmap font."""
    from PIL import ImageFont

    path = _dejavu(bold)
    if path is not None:
        return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


@functools.lru_cache(maxsize=2)
def _dejavu(bold: bool) -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "mpl-data/fonts/ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf"
        if path.is_file():
            return path
    return None


def outline(mask: np.ndarray, width: int = 1, min_fraction: float = 0.0) -> np.ndarray:
    """Inner boundary pixels of ``mask``, ``width`` px thick. ``min_fraction`` > 0 fills holes and
    drops specks under that share of the picture first, so the outline stays readable.

    4-connected pieces and holes, a 3 x 3 cross erosion with nothing beyond the edge (what
    ``scipy.ndimage`` does by default), in OpenCV: importing ``scipy.ndimage`` costs ~1 s."""
    import cv2

    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.size == 0:
        return mask.copy()
    if min_fraction > 0:
        mask = _fill_holes(mask)
        count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4,
                                                ltype=cv2.CV_32S)
        if count > 1:
            keep = np.bincount(labels.ravel(), minlength=count) >= max(1, min_fraction *
                                                                      mask.size)
            keep[0] = False
            mask = keep[labels]
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    inner = cv2.erode(mask.view(np.uint8), cross, iterations=max(1, width),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return mask & ~inner.view(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with the 4-connected pieces of background that do not touch the edge filled."""
    import cv2

    count, labels = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4,
                                            ltype=cv2.CV_32S)
    hole = np.ones(count, bool)
    hole[0] = False  # the mask itself
    hole[labels[0]] = hole[labels[-1]] = hole[labels[:, 0]] = hole[labels[:, -1]] = False
    return mask | hole[labels]


def nice_length(max_um: float) -> tuple[float, str]:
    """The longest 1, 2 or 5 x 10^k µm not over ``max_um``, and its label (``500 µm``, ``2 mm``)."""
    if not math.isfinite(max_um) or max_um <= 0:
        raise ValueError(f"scale bar length must be positive, got {max_um}")
    exp = math.floor(math.log10(max_um))
    value = max(m * 10.0 ** exp for m in (1, 2, 5) if m * 10.0 ** exp <= max_um)
    label = f"{value / 1000:g} mm" if value >= 1000 else f"{value:g} µm"
    return value, label


def draw_scale_bar(image: Any, um_per_px: float, fraction: float = 0.2, margin: int = 12) -> None:
    """A black bar with its length in µm/mm on a white box, bottom left of ``image`` (in place),
    about ``fraction`` of the picture's width long."""
    from PIL import ImageDraw

    value, label = nice_length(fraction * image.width * um_per_px)
    length = max(1, round(value / um_per_px))
    f = font(13)
    text_w = int(f.getlength(label))
    box_w, box_h = max(length, text_w) + 12, 34
    x0, y0 = margin, image.height - margin - box_h
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=WHITE, outline=GREY)
    draw.rectangle([x0 + 6, y0 + 22, x0 + 6 + length - 1, y0 + 27], fill=BLACK)
    draw.text((x0 + 6 + (length - text_w) / 2, y0 + 4), label, fill=BLACK, font=f)


class Panel:
    """Lines of text and swatches stacked top-down; :meth:`beside` puts it right of a picture."""

    def __init__(self, width: int = 330, pad: int = 10) -> None:
        self.width, self.pad = width, pad
        self.items: list[tuple[str, Any]] = []
        self.height = pad

    def text(self, text: str, size: int = 13, fill: Sequence[int] = BLACK,
             wrap: bool = True, bold: bool = False) -> None:
        f = font(size, bold)
        per_line = max(8, int((self.width - 2 * self.pad) / max(1.0, f.getlength("n"))))
        for line in (textwrap.wrap(text, per_line) if wrap else [text]) or [""]:
            self.items.append(("text", (self.height, line, f, tuple(fill))))
            self.height += int(size * 1.35)

    def gap(self, px: int = 8) -> None:
        self.height += px

    def swatch(self, label: str, paint: Any, size: int = 13) -> None:
        """A square drawn by ``paint(draw, box)`` and ``label`` beside it."""
        f = font(size)
        side = int(size * 1.3)
        self.items.append(("swatch", (self.height, side, label, f, paint)))
        self.height += side + 5

    def beside(self, picture: Any) -> Any:
        """A new RGB image: ``picture`` at (0, 0) and this panel on its right, on white."""
        from PIL import Image, ImageDraw

        height = max(picture.height, self.height + self.pad)
        canvas = Image.new("RGB", (picture.width + self.width, height), WHITE)
        canvas.paste(picture, (0, 0))
        draw = ImageDraw.Draw(canvas)
        x = picture.width + self.pad
        for kind, item in self.items:
            if kind == "text":
                y, line, f, fill = item
                draw.text((x, y), line, fill=fill, font=f)
            else:
                y, side, label, f, paint = item
                paint(canvas, draw, (x, y, x + side - 1, y + side - 1))
                draw.rectangle((x, y, x + side - 1, y + side - 1), outline=BLACK)
                draw.text((x + side + 6, y + (side - getattr(f, "size", 11)) / 2 - 1), label,
                          fill=BLACK, font=f)
        return canvas
