"""Tissue detection: Otsu on a thumbnail at ~8 um/px, morphology sized in um (not pixels).

``otsu`` thresholds the HSV saturation (stained tissue is coloured, glass is grey/white) after a
median blur; ``otsu-gray`` thresholds darkness instead (for unstained or fluorescence-like
pictures). Thresholds are clamped so a blank slide gives an empty mask rather than noise.
Memory is a few bytes per mask pixel: the channel is computed in uint8 row blocks, blurred and
thresholded in uint8 (Otsu on its 256-bin histogram), morphology works on bool and labels
in uint16.

Before the mask, the thumbnail is classified as brightfield or dark-field
(:func:`classify_illumination`): fluorescence and other dark-field slides have a dark
background, and a saturation threshold calls all of it tissue. A dark-field slide's mask is
taken on brightness instead (``otsu-bright``: tissue is bright on black); brightfield (H&E)
models refuse such slides (:func:`require_brightfield`).

Thumbnail pieces that cannot be decoded (a damaged tile) are white in the picture and counted
as tissue in the mask, so the patches there are still tried at full resolution; their level-0
boxes are kept in ``TissueMask.unreadable``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histotile.errors import InvalidArgumentError, NotBrightfieldError

if TYPE_CHECKING:
    from histotile.slide import Slide

log = logging.getLogger(__name__)

METHODS = ("otsu", "otsu-gray")  # what a user may ask for; "otsu-bright" is for dark-field
_ALL_METHODS = (*METHODS, "otsu-bright")
MASK_MPP = 8.0  # um/px of the thumbnail the mask is computed on
MIN_SATURATION = 0.08  # saturation below this is never tissue (white/grey glass, JPEG noise)
MAX_GRAY = 220.0  # for otsu-gray: brighter than this is never tissue
CLOSING_UM = 16.0
MIN_OBJECT_UM2 = 10_000.0  # 0.01 mm^2
MIN_HOLE_UM2 = 10_000.0
READ_BLOCK = 1024  # thumbnail read in blocks of this many level pixels (bounded memory)
_DEFAULT_PX = {"closing": 2, "object": 64, "hole": 64}  # when the picture has no mpp
MIN_BRIGHT = 12.0  # for otsu-bright: darker than this is never tissue (camera noise)
# dark-field rule (see classify_illumination): a dark frame and (almost) no bright glass
DARK_BORDER = 60.0  # median grey level of the thumbnail's outer frame below this: dark
GLASS_GRAY = 200.0  # grey level of bright, empty glass in brightfield
MIN_GLASS = 0.05  # brightfield pictures have at least this share of glass-bright pixels...
FRAME = 0.05  # ...and the frame is this share of the picture's side on each edge


@dataclass
class Illumination:
    """Brightfield or dark-field, with the figures that decided it (all recorded in run.json)."""

    kind: str  # "brightfield" or "darkfield"
    border_gray: float  # median grey level of the outer frame (0-255)
    bright_fraction: float  # share of pixels brighter than GLASS_GRAY
    channel_means: tuple[float, float, float]
    vendor: str | None = None  # what the slide's metadata says (e.g. a fluorescence filter)
    rule: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "border_gray": round(self.border_gray, 2),
                "bright_fraction": round(self.bright_fraction, 4),
                "channel_means": [round(v, 2) for v in self.channel_means],
                "vendor": self.vendor, "rule": self.rule}


def classify_illumination(rgb: np.ndarray, vendor: str | None = None) -> Illumination:
    """Dark-field (fluorescence...) or brightfield, from a thumbnail and the slide's metadata.

    Dark-field: the metadata names a fluorescence channel (``vendor``), or the outer frame of
    the picture is dark (median grey < ``DARK_BORDER``) while less than ``MIN_GLASS`` of it is
    glass-bright (> ``GLASS_GRAY``). A brightfield slide with black padding still shows bright
    glass; one fully covered by tissue has a bright, coloured frame.
    """
    rgb = np.asarray(rgb)[..., :3]
    h, w = rgb.shape[:2]
    gray = _channel_u8(rgb, "otsu-gray") if rgb.size else np.zeros((0, 0), np.uint8)
    f = max(1, int(round(FRAME * min(h, w)))) if h and w else 0
    frame = np.concatenate([gray[:f].ravel(), gray[h - f:].ravel(), gray[:, :f].ravel(),
                            gray[:, w - f:].ravel()]) if f else gray.ravel()
    border = float(np.median(frame)) if frame.size else 255.0
    bright = float((gray > GLASS_GRAY).mean()) if gray.size else 1.0
    means = tuple(float(v) for v in rgb.reshape(-1, 3).mean(axis=0)) if rgb.size else (
        0.0, 0.0, 0.0)
    rule = (f"dark-field when the outer frame's median grey < {DARK_BORDER:g} and < "
            f"{MIN_GLASS:.0%} of pixels are brighter than {GLASS_GRAY:g}, or the metadata "
            "names a fluorescence channel")
    dark = (border < DARK_BORDER and bright < MIN_GLASS) or vendor is not None
    return Illumination("darkfield" if dark else "brightfield", border, bright,
                        means, vendor, rule)  # type: ignore[arg-type]


def require_brightfield(tissue: TissueMask, subject: str, hint: str) -> None:
    """Raise :class:`NotBrightfieldError` when ``tissue`` was found on a dark-field slide."""
    light = tissue.illumination
    if light is None or light.kind == "brightfield":
        return
    why = (f"metadata: fluorescence channel {light.vendor!r}" if light.vendor else
           f"dark background: median grey {light.border_gray:.0f}/255 at the edges, "
           f"{light.bright_fraction:.1%} bright pixels")
    raise NotBrightfieldError(
        f"looks like a fluorescence or dark-field slide ({why}); the model is for "
        "brightfield (H&E) slides and its results would be meaningless", hint, subject=subject)


@dataclass
class TissueMask:
    """Boolean tissue mask of a slide thumbnail (see docs/CONTRACTS.md)."""

    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 px per mask px
    mpp: float | None  # um per mask px
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    method: str
    threshold: float
    illumination: Illumination | None = None
    unreadable: list[tuple[int, int, int, int]] | None = None  # level-0 boxes (x, y, w, h)

    @property
    def fraction(self) -> float:
        """Share of the thumbnail covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _channel_u8(rgb: np.ndarray, method: str, rows: int = 256) -> np.ndarray:
    """The thresholded channel as uint8, computed in blocks of ``rows`` (bounded temporaries).

    ``otsu``: HSV saturation ``(max - min) / max`` scaled to 0..255; ``otsu-gray``: the mean
    of R, G, B. Both rounded to the nearest integer.
    """
    out = np.empty(rgb.shape[:2], np.uint8)
    for y in range(0, rgb.shape[0], rows):
        block = rgb[y:y + rows]
        if method == "otsu":
            hi, lo = block.max(axis=2), block.min(axis=2)
            value = (hi - lo).astype(np.float32) * np.float32(255.0)
            value /= np.maximum(hi, 1).astype(np.float32)
        else:
            value = block.sum(axis=2, dtype=np.uint16).astype(np.float32) / np.float32(3.0)
        np.rint(value, out=value)
        out[y:y + rows] = value
    return out


def _median(channel: np.ndarray, size: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(channel, size=size, mode="nearest") if size > 1 else channel


def _otsu_u8(values: np.ndarray) -> float:
    """Otsu threshold of a uint8 picture from its 256-bin histogram (no float copy of it).

    Half-way between the classes (``upper bin + 0.5``); a constant picture gives its value.
    """
    from skimage.filters import threshold_otsu

    flat = values.ravel()
    counts = np.zeros(256, np.int64)
    for start in range(0, flat.size, 1 << 18):  # bincount casts to int64: do it in chunks
        counts += np.bincount(flat[start:start + (1 << 18)], minlength=256)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return 0.0
    lo, hi = int(present[0]), int(present[-1])
    if lo == hi:
        return float(hi)
    return float(threshold_otsu(hist=(counts[lo:hi + 1], np.arange(lo, hi + 1)))) + 0.5


def _threshold(rgb: np.ndarray, method: str, median_size: int) -> tuple[np.ndarray, float]:
    """Mask and threshold (saturation in 0..1, or grey level in 0..255)."""
    value = _median(_channel_u8(rgb, method), median_size)
    thr = _otsu_u8(value)
    if method == "otsu":
        thr = max(thr, MIN_SATURATION * 255.0)
        return value > thr, thr / 255.0
    if method == "otsu-bright":  # dark-field: tissue is brighter than the black background
        thr = max(thr, MIN_BRIGHT)
        return value > thr, thr
    thr = min(thr, MAX_GRAY)
    return value < thr, thr


def tissue_mask_rgb(rgb: np.ndarray, mpp: float | None = None, method: str = "otsu",
                    median_size: int = 5, closing_um: float = CLOSING_UM,
                    min_object_um2: float = MIN_OBJECT_UM2,
                    min_hole_um2: float = MIN_HOLE_UM2) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 picture (``mpp`` sizes the morphology; else pixels)."""
    return _mask(rgb, mpp, method, median_size, closing_um, min_object_um2, min_hole_um2)[0]


def _mask(rgb: np.ndarray, mpp: float | None, method: str, median_size: int, closing_um: float,
          min_object_um2: float, min_hole_um2: float) -> tuple[np.ndarray, float]:
    from skimage import morphology

    if method not in _ALL_METHODS:
        raise InvalidArgumentError(f"unknown tissue method {method!r}",
                                   f"use one of {', '.join(METHODS)}")
    rgb = np.asarray(rgb)[..., :3]
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.uint8)
    mask, thr = _threshold(rgb, method, median_size)
    if mpp:
        radius = int(round(closing_um / mpp))
        min_obj = int(round(min_object_um2 / mpp**2))
        min_hole = int(round(min_hole_um2 / mpp**2))
    else:
        radius, min_obj, min_hole = (_DEFAULT_PX[k] for k in ("closing", "object", "hole"))
    if radius > 0:
        from scipy.ndimage import binary_closing

        padded = np.pad(mask, radius, mode="edge")
        del mask
        closed = binary_closing(padded, morphology.disk(radius).astype(bool))
        del padded
        mask = closed[radius:-radius, radius:-radius].copy()
        del closed
    mask = _drop_small(mask, min_obj)
    np.invert(mask, out=mask)
    mask = _drop_small(mask, min_hole)  # holes are the small components of the background
    return np.invert(mask, out=mask), float(thr)


def _drop_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without 8-connected components of at most ``max_size`` pixels."""
    if max_size < 1 or not mask.any():
        return mask
    labels, count = _label(mask)
    sizes = np.zeros(count + 1, np.int64)
    flat = labels.ravel()
    for start in range(0, flat.size, 1 << 18):  # bincount casts to int64: do it in chunks
        sizes += np.bincount(flat[start:start + (1 << 18)], minlength=count + 1)
    keep = sizes > max_size
    keep[0] = False
    return keep[labels]


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels, in uint16 (2 bytes/px) unless there are more than 65535 components."""
    from scipy.ndimage import label

    structure = np.ones((3, 3), bool)
    try:
        labels = np.empty(mask.shape, np.uint16)
        return labels, int(label(mask, structure, output=labels))
    except RuntimeError:  # too many components for uint16
        labels = np.empty(mask.shape, np.int32)
        return labels, int(label(mask, structure, output=labels))


def read_mask_thumbnail(slide: Slide, mask_mpp: float,
                        unreadable: list[tuple[int, int, int, int]]
                        ) -> tuple[np.ndarray, float, float | None]:
    """The thumbnail a tissue mask is made on: ``(rgb, downsample, mpp)`` at about ``mask_mpp``
    (1/16 of level 0 and mpp None without a slide mpp), read in bounded blocks; damaged pieces
    are appended to ``unreadable``."""
    if slide.mpp is not None:
        slide_mpp = slide.require_mpp()
        thumb, ds = slide.read_downsampled(mask_mpp / slide_mpp, block=READ_BLOCK,
                                           unreadable=unreadable)
        return thumb, ds, ds * slide_mpp
    thumb, ds = slide.read_downsampled(16.0, block=READ_BLOCK, unreadable=unreadable)
    return thumb, ds, None


def detect_tissue(slide: Slide, method: str = "otsu", mask_mpp: float = MASK_MPP,
                  median_size: int = 5, closing_um: float = CLOSING_UM,
                  min_object_um2: float = MIN_OBJECT_UM2,
                  min_hole_um2: float = MIN_HOLE_UM2) -> TissueMask:
    """Tissue mask of ``slide`` computed on a thumbnail at about ``mask_mpp`` um/px.

    Without a slide mpp the thumbnail is 1/16 of level 0 and morphology is sized in pixels.
    A dark-field slide (see :func:`classify_illumination`) is masked with ``otsu-bright``;
    unreadable thumbnail pieces count as tissue (module docstring).
    """
    unreadable: list[tuple[int, int, int, int]] = []
    thumb, ds, mpp = read_mask_thumbnail(slide, mask_mpp, unreadable)
    light = classify_illumination(thumb, getattr(slide, "fluorescence_channel", None))
    if light.kind == "darkfield":
        log.warning("%s: dark-field / fluorescence slide (%s); tissue is taken as bright on dark",
                    slide.path, light.vendor or f"edge grey {light.border_gray:.0f}/255")
        method = "otsu-bright"
    mask, thr = _mask(thumb, mpp, method, median_size, closing_um, min_object_um2, min_hole_um2)
    if unreadable:
        log.warning("%s: %d piece(s) of the thumbnail could not be decoded; their patches are "
                    "tried at full resolution", slide.path, len(unreadable))
        for x, y, w, h in unreadable:
            mask[int(y // ds):int(-(-(y + h) // ds)), int(x // ds):int(-(-(x + w) // ds))] = True
    if not mask.any():
        log.warning("%s: no tissue found (%s threshold %.3f)", slide.path, method, thr)
    return TissueMask(mask=mask, downsample=ds, mpp=mpp, thumbnail=thumb, method=method,
                      threshold=thr, illumination=light, unreadable=unreadable)
