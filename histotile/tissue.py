"""Tissue detection: Otsu on a thumbnail at ~8 um/px, morphology sized in um (not pixels).

``otsu`` thresholds the HSV saturation (stained tissue is coloured, glass is grey/white) after a
median blur; ``otsu-gray`` thresholds darkness instead (for unstained or fluorescence-like
pictures). Thresholds are clamped so a blank slide gives an empty mask rather than noise.
The thumbnail comes from the pyramid level closest to (not coarser than) ``MASK_MPP``
(:meth:`histotile.slide.Slide.read_downsampled`): on a pyramid, never decoded from level 0.

Every step is vectorised in uint8 (OpenCV where it has the operation): the channel through a
lookup table in row blocks, the median blur, Otsu on the 256-bin histogram, the closing
(dilate, erode) and the small-component filters (connected components and their sizes);
memory is a few bytes per mask pixel (labels in uint16 when they fit). The masks are those of
the earlier scipy/scikit-image steps, pixel for pixel (tests/test_tissue_reference.py).

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
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.uint8)
    h, w = rgb.shape[:2]
    gray = _channel_u8(rgb, "otsu-gray") if rgb.size else np.zeros((0, 0), np.uint8)
    f = max(1, int(round(FRAME * min(h, w)))) if h and w else 0
    frame = np.concatenate([gray[:f].ravel(), gray[h - f:].ravel(), gray[:, :f].ravel(),
                            gray[:, w - f:].ravel()]) if f else gray.ravel()
    border = float(np.median(frame)) if frame.size else 255.0
    bright = np.count_nonzero(gray > GLASS_GRAY) / gray.size if gray.size else 1.0
    means = _channel_means(rgb)
    rule = (f"dark-field when the outer frame's median grey < {DARK_BORDER:g} and < "
            f"{MIN_GLASS:.0%} of pixels are brighter than {GLASS_GRAY:g}, or the metadata "
            "names a fluorescence channel")
    dark = (border < DARK_BORDER and bright < MIN_GLASS) or vendor is not None
    return Illumination("darkfield" if dark else "brightfield", border, bright,
                        means, vendor, rule)


def _channel_means(rgb: np.ndarray) -> tuple[float, float, float]:
    """Mean R, G, B of a uint8 picture (exact integer sums; 0 for an empty picture)."""
    if not rgb.size:
        return (0.0, 0.0, 0.0)
    if rgb.dtype == np.uint8:
        import cv2

        sums = cv2.sumElems(np.ascontiguousarray(rgb))  # integers: exact below 2**53
        n = rgb.shape[0] * rgb.shape[1]
        return float(sums[0]) / n, float(sums[1]) / n, float(sums[2]) / n
    r, g, b = (float(v) for v in rgb.reshape(-1, 3).mean(axis=0))
    return r, g, b


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
        return np.count_nonzero(self.mask) / self.mask.size if self.mask.size else 0.0


def _lut(method: str) -> np.ndarray:
    """The channel's lookup table: indexed by ``max << 8 | min`` (``otsu``, HSV saturation
    ``(max - min) / max`` scaled to 0..255) or by ``R + G + B`` (``otsu-gray``, their mean),
    rounded to the nearest integer as float32 arithmetic rounds it."""
    table = _LUTS.get(method)
    if table is None:
        if method == "otsu":
            hi, lo = np.divmod(np.arange(1 << 16, dtype=np.int64), 256)
            value = np.where(lo <= hi, hi - lo, 0).astype(np.float32) * np.float32(255.0)
            value /= np.maximum(hi, 1).astype(np.float32)
        else:
            value = np.arange(3 * 255 + 1).astype(np.float32) / np.float32(3.0)
        table = _LUTS[method] = np.rint(value).astype(np.uint8)
    return table


_LUTS: dict[str, np.ndarray] = {}


def _channel_u8(rgb: np.ndarray, method: str, rows: int = 256) -> np.ndarray:
    """The thresholded channel as uint8 (see :func:`_lut`), in blocks of ``rows`` (bounded
    temporaries): ``otsu`` saturation, else (``otsu-gray``, ``otsu-bright``) the mean of R, G, B."""
    table = _lut("otsu" if method == "otsu" else "otsu-gray")
    out = np.empty(rgb.shape[:2], np.uint8)
    for y in range(0, rgb.shape[0], rows):
        r, g, b = (rgb[y:y + rows, :, c] for c in range(3))
        if method == "otsu":
            index = np.maximum(np.maximum(r, g), b).astype(np.uint16)
            index <<= 8
            index |= np.minimum(np.minimum(r, g), b)
        else:
            index = np.add(r, g, dtype=np.uint16)
            index += b
        np.take(table, index, out=out[y:y + rows])
    return out


def _median(channel: np.ndarray, size: int) -> np.ndarray:
    """``size`` x ``size`` median, edges repeated (OpenCV for odd sizes, else scipy)."""
    if size <= 1:
        return channel
    if size % 2:
        import cv2

        return cv2.medianBlur(np.ascontiguousarray(channel), size)
    from scipy.ndimage import median_filter

    return median_filter(channel, size=size, mode="nearest")


def _histogram_u8(values: np.ndarray) -> np.ndarray:
    """256-bin int64 histogram of a uint8 picture (OpenCV's float32 counts are exact below
    2**24 pixels; past that bincount, which casts to int64: in chunks)."""
    if values.size < 1 << 24:
        import cv2

        hist = cv2.calcHist([np.ascontiguousarray(values)], [0], None, [256], [0, 256])
        return hist.ravel().astype(np.int64)
    flat = values.ravel()
    counts = np.zeros(256, np.int64)
    for start in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[start:start + (1 << 20)], minlength=256)
    return counts


def _otsu_u8(values: np.ndarray) -> float:
    """Otsu threshold of a uint8 picture from its 256-bin histogram (no float copy of it).

    Half-way between the classes (``upper bin + 0.5``); a constant picture gives its value.
    The arithmetic is scikit-image's ``threshold_otsu(hist=...)`` (same threshold, checked in
    tests/test_tissue_reference.py), on the occupied bin range: importing
    ``skimage.filters`` pulls in ``scipy.ndimage``, which costs more than the whole detection.
    """
    counts = _histogram_u8(values)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return 0.0
    lo, hi = int(present[0]), int(present[-1])
    if lo == hi:
        return float(hi)
    hist = counts[lo:hi + 1].astype(np.float64)
    centers = np.arange(lo, hi + 1)
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    mean1 = np.cumsum(hist * centers) / weight1
    mean2 = (np.cumsum((hist * centers)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.argmax(variance12))]) + 0.5


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


def morphology_sizes(mpp: float | None, closing_um: float = CLOSING_UM,
                     min_object_um2: float = MIN_OBJECT_UM2,
                     min_hole_um2: float = MIN_HOLE_UM2) -> tuple[int, int, int]:
    """(closing radius, largest object dropped, largest hole filled) in mask pixels."""
    if mpp:
        return (int(round(closing_um / mpp)), int(round(min_object_um2 / mpp**2)),
                int(round(min_hole_um2 / mpp**2)))
    return _DEFAULT_PX["closing"], _DEFAULT_PX["object"], _DEFAULT_PX["hole"]


def threshold_rgb(rgb: np.ndarray, method: str, median_size: int = 5
                  ) -> tuple[np.ndarray, float]:
    """The thresholded mask of an RGB picture before morphology, and its threshold."""
    if method not in _ALL_METHODS:
        raise InvalidArgumentError(f"unknown tissue method {method!r}",
                                   f"use one of {', '.join(METHODS)}")
    rgb = np.asarray(rgb)[..., :3]
    if rgb.dtype != np.uint8:
        rgb = rgb.astype(np.uint8)
    return _threshold(rgb, method, median_size)


def clean_mask(mask: np.ndarray, radius: int, min_obj: int, min_hole: int) -> np.ndarray:
    """Closing with a disk of ``radius`` (edges repeated), then objects of at most ``min_obj``
    pixels dropped and holes of at most ``min_hole`` pixels filled (8-connected); in place
    where it can (``mask`` bool)."""
    if radius > 0:
        mask = _closing(mask, radius)
    mask = _drop_small(mask, min_obj)
    np.logical_not(mask, out=mask)
    mask = _drop_small(mask, min_hole)  # holes are the small components of the background
    return np.logical_not(mask, out=mask)


def _mask(rgb: np.ndarray, mpp: float | None, method: str, median_size: int, closing_um: float,
          min_object_um2: float, min_hole_um2: float) -> tuple[np.ndarray, float]:
    mask, thr = threshold_rgb(rgb, method, median_size)
    sizes = morphology_sizes(mpp, closing_um, min_object_um2, min_hole_um2)
    return clean_mask(mask, *sizes), float(thr)


def _disk(radius: int) -> np.ndarray:
    """uint8 disk ``x^2 + y^2 <= radius^2`` (scikit-image's ``morphology.disk``)."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (xx * xx + yy * yy <= radius * radius).astype(np.uint8)


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing by a disk on the mask padded by its edge pixels (so the slide's border
    does not erode tissue that touches it)."""
    import cv2

    kernel = _disk(radius)
    padded = cv2.copyMakeBorder(mask.view(np.uint8), radius, radius, radius, radius,
                                cv2.BORDER_REPLICATE)
    # beyond the padded picture is background for both steps (as scipy's binary_closing)
    closed = cv2.dilate(padded, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    closed = cv2.erode(closed, kernel, dst=padded, borderType=cv2.BORDER_CONSTANT,
                       borderValue=0)
    return closed[radius:-radius, radius:-radius].astype(bool)


def _drop_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without 8-connected components of at most ``max_size`` pixels."""
    if max_size < 1 or not mask.any():
        return mask
    labels, sizes = _components(mask.view(np.uint8))
    keep = sizes > max_size
    keep[0] = False  # the background
    if keep[1:].all():
        return mask
    return np.take(keep, labels)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected labels of a 0/1 uint8 picture (uint16 unless there are more than 65534
    components, then int32) and the size of each label (int64, label 0 the background)."""
    import cv2

    try:
        count, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:  # too many components for uint16
        count, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
    if labels.dtype == np.uint16 and labels.size < 1 << 24:  # float32 counts: exact
        hist = cv2.calcHist([labels], [0], None, [count], [0, count])
        return labels, hist.ravel().astype(np.int64)
    sizes = np.zeros(count, np.int64)
    flat = labels.ravel()
    for start in range(0, flat.size, 1 << 20):  # bincount casts to int64: do it in chunks
        sizes += np.bincount(flat[start:start + (1 << 20)], minlength=count)
    return labels, sizes


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
