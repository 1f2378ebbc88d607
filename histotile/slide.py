"""Open whole-slide images with OpenSlide or tiffslide; levels, mpp and its source, region reads.

Coordinates are level-0 pixels, top-left origin, (x, y). A level pixel ``l`` maps to level-0
``ceil(l * downsample)`` and back with ``floor(x0 / downsample)``, so integer level positions
survive the round trip on every level (also where the downsample is not an integer).

``backend="auto"`` opens ``.vsi`` and ``.czi`` with slideio (the optional ``[formats]`` extra,
:mod:`histotile.slide_formats`), other slides with OpenSlide when it knows the vendor format,
with tiffslide for TIFF flavours OpenSlide reads badly (OME, QPTIFF) or not at all. Where
OpenSlide opened an Aperio SVS or a generic tiled TIFF, the pixels are decoded tile by tile
with tifffile (:mod:`histotile.tiff_tiles`), 3-4x faster on these files and the same pixels;
metadata stays OpenSlide's. An explicit ``backend`` uses that library for everything.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import (
    CorruptSlideError,
    HistotileError,
    InputNotFoundError,
    InvalidArgumentError,
    MissingMppError,
    UnreadableRegionError,
    UnsupportedFormatError,
)
from histotile.items import item_kind
from histotile.mpp import find_mpp, positive_float
from histotile.resample import block_mean
from histotile.slide_formats import (
    SlideioHandle,
    require_slideio,
    slideio_installed,
    slideio_suffix,
)
from histotile.units import Level0Px, LevelPx, MicronsPerPixel
from histotile.vendor import (
    dicom_jpeg_labelled_rgb,
    dicom_problem,
    embedded_picture,
    fluorescence_metadata,
    refuse_olympus_vsi,
    ycbcr_to_rgb,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openslide", "tiffslide", "slideio")
#: the mpp source name of a library's own vendor value, where it is not OpenSlide's
_VENDOR_MPP_SOURCE = {"slideio": "vendor-metadata"}
_EPS = 1e-6
_MPP_HINT = "pass --slide-mpp <microns per pixel> (slide_mpp=...) to set it"


def level_to_level0(value: LevelPx, downsample: float) -> Level0Px:
    """Level-0 coordinate of level pixel ``value`` (inverse of :func:`level0_to_level`)."""
    return Level0Px(int(math.ceil(value * downsample - _EPS)))


def level0_to_level(value: Level0Px, downsample: float) -> LevelPx:
    """Level pixel that contains level-0 coordinate ``value``."""
    return LevelPx(int(math.floor(value / downsample + _EPS)))


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError("no such file or folder", "check the path", subject=str(path))
    if p.is_dir():
        dcm = sorted(p.glob("*.dcm"))
        if dcm:  # a DICOM WSI folder: OpenSlide opens the series from any one of its files
            return dcm[0]
        raise UnsupportedFormatError(
            "is a folder, not a slide",
            "pass slide files (a folder works only for a DICOM series)", subject=str(path),
        )
    return p


def _tiff_needs_tiffslide(path: Path) -> bool:
    """True for TIFF flavours OpenSlide reads badly or not at all (OME SubIFDs, QPTIFF)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            return bool(tf.is_ome or tf.is_qpi or page.subifds)
    except Exception:  # noqa: BLE001 - not readable by tifffile: leave it to OpenSlide
        return False


def pick_backend(path: Path) -> str:
    """The backend ``auto`` chooses for ``path`` (see the module docstring)."""
    if slideio_suffix(path):  # VSI, CZI: the optional slideio reader (histotile.slide_formats)
        return "slideio"
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        fmt = None
    if fmt and fmt != "generic-tiff":
        return "openslide"
    if fmt == "generic-tiff":
        return "tiffslide" if _tiff_needs_tiffslide(path) else "openslide"
    return "tiffslide"


FAST_READ_VENDORS = ("aperio", "generic-tiff")


def _fast_pixel_reader(path: Path, slide: Slide) -> Any:
    """A direct tile reader (:mod:`histotile.tiff_tiles`) for this OpenSlide-opened slide, or
    None: Aperio SVS and generic tiled TIFF only, where it decodes the same pixels 3-4x faster.
    Metadata (vendor, mpp and its source) stays OpenSlide's."""
    if slide.vendor not in FAST_READ_VENDORS or slide.ycbcr_fix:
        return None
    from histotile.tiff_tiles import open_tile_reader

    return open_tile_reader(path, [(int(d[0]), int(d[1])) for d in slide.level_dimensions])


def _not_a_slide(path: Path, exc: Exception) -> Exception:
    dicom = dicom_problem(path, exc)
    if dicom is not None:
        return dicom
    if item_kind(path) == "slide":
        return CorruptSlideError(
            f"cannot be read as a slide ({type(exc).__name__}: {exc})".replace("\n", " "),
            "the file may be truncated or corrupt; re-copy or re-download it", subject=str(path),
        )
    return UnsupportedFormatError(
        "not a slide format histotile can read",
        "supported: SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM, (OME-)TIFF, QPTIFF; VSI and "
        "CZI with the [formats] extra",
        subject=str(path),
    )


def _open_backend(path: Path, backend: str) -> Any:
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.ERROR)  # its warnings on broken files duplicate our error line
    try:
        if backend == "slideio":
            require_slideio(path)
            return SlideioHandle(path)
        if backend == "openslide":
            import openslide

            return openslide.OpenSlide(str(path))
        import tiffslide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tiffslide.TiffSlide(str(path))
    except Exception as exc:  # every reader failure becomes one typed error
        if isinstance(exc, HistotileError):
            raise
        if backend == "tiffslide" and pick_backend(path) == "openslide":
            raise UnsupportedFormatError(
                "tiffslide cannot read this format", "use --backend openslide (or auto)",
                subject=str(path)) from exc
        raise _not_a_slide(path, exc) from exc
    finally:
        tiff_log.setLevel(level)


class Slide:
    """An open slide: metadata, mpp with its source and RGB region reads (see docs/CONTRACTS.md)."""

    def __init__(self, path: Path, backend: str, handle: Any, slide_mpp: float | None = None,
                 source_path: str | Path | None = None, requested_backend: str | None = None,
                 ) -> None:
        self.path = Path(source_path) if source_path is not None else path
        self.file = path
        self.backend = backend
        self._h = handle
        self._override = slide_mpp
        with warnings.catch_warnings():  # tiffslide warns on partially parsed vendor metadata
            warnings.simplefilter("ignore")
            props = {str(k): v for k, v in dict(handle.properties).items()}
        self.properties = props
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)  # type: ignore
        self.level_count: int = int(handle.level_count)
        self.level_dimensions = [tuple(int(v) for v in d) for d in handle.level_dimensions]
        self.level_downsamples = [float(d) for d in handle.level_downsamples]
        self.vendor = props.get(f"{backend}.vendor") or None
        self.objective_power = positive_float(props.get(f"{backend}.objective-power"))
        self.mpp, self.mpp_source = self._find_mpp(slide_mpp)
        if self.mpp_source == "openslide":
            self.mpp_source = _VENDOR_MPP_SOURCE.get(backend, "openslide")
        self.ycbcr_fix = backend == "openslide" and dicom_jpeg_labelled_rgb(path, props)
        self.requested_backend = requested_backend or backend
        # the fast path for the same pixels (module docstring); only when ``auto`` chose OpenSlide
        self._pixels: Any = (_fast_pixel_reader(path, self)
                             if self.requested_backend == "auto" and backend == "openslide"
                             else None)
        if self.ycbcr_fix:
            log.info("%s: DICOM JPEG frames hold YCbCr but are labelled RGB; converting",
                     self.path)

    # --- metadata -------------------------------------------------------------------------
    def _find_mpp(self, override: float | None) -> tuple[tuple[float, float] | None, str | None]:
        """(mpp x, y) and its source (:func:`histotile.mpp.find_mpp`); metadata that is no
        microscope pixel size is set aside in ``mpp_rejected`` with the rule that did it."""
        if override is not None and not positive_float(override):
            raise InvalidArgumentError(f"--slide-mpp {override} is not a positive number",
                                       "give microns per pixel, e.g. 0.25", str(self.path))
        found = find_mpp(self.properties, self.backend, self.vendor, self.objective_power,
                         override)
        self.mpp_rejected: dict[str, Any] | None = found.rejected
        return found.mpp, found.source

    @property
    def fluorescence_channel(self) -> str | None:
        """The fluorescence channel or filter the file's metadata names, when it names one:
        Hamamatsu NDPI's fluorescence tag (65434), an OME-XML channel with fluorescence
        illumination or contrast; a VSI/CZI scene whose channels are not one colour picture
        (``slideio.fluorescence``, :mod:`histotile.slide_formats`)."""
        if not hasattr(self, "_fluorescence"):
            self._fluorescence = (self.properties.get(f"{self.backend}.fluorescence")
                                  or fluorescence_metadata(self.file))
        return self._fluorescence

    @property
    def associated_images(self) -> list[str]:
        return sorted(self._h.associated_images.keys())

    @property
    def spec(self) -> dict[str, Any]:
        """Picklable arguments that reopen this slide: ``open_slide(**slide.spec)``."""
        return {"path": str(self.path), "backend": self.requested_backend,
                "slide_mpp": self._override}

    @property
    def pixel_reader(self) -> str:
        """What decodes the pixels: the backend, or "tifffile-tiles" (the fast path)."""
        return "tifffile-tiles" if self._pixels is not None else self.backend

    def require_mpp(self) -> MicronsPerPixel:
        """Level-0 microns per pixel (mean of x and y); :class:`MissingMppError` when unknown."""
        if self.mpp is None:
            message = "the slide has no pixel size (mpp) in its metadata"
            if self.mpp_rejected:
                message = (f"the slide has no usable pixel size: its "
                           f"{self.mpp_rejected['source']} value was set aside "
                           f"({self.mpp_rejected['rule']})")
            raise MissingMppError(message, _MPP_HINT, subject=str(self.path))
        return MicronsPerPixel((self.mpp[0] + self.mpp[1]) / 2.0)

    def level_mpp(self, level: int) -> MicronsPerPixel:
        """Microns per pixel at ``level``."""
        self.check_level(level)
        return MicronsPerPixel(self.require_mpp() * self.level_downsamples[level])

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose mpp is still at most the target (never upsample needlessly).

        Level 0 when even level 0 is coarser than the target.
        """
        ok = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= target_mpp * (1 + 1e-3)]
        return max(ok, key=self.level_mpp) if ok else 0

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise InvalidArgumentError(
                f"level {level} does not exist (the slide has {self.level_count})",
                f"use a level between 0 and {self.level_count - 1}", subject=str(self.path))

    def info(self) -> dict[str, Any]:
        """JSON-able description: backend, vendor, levels, mpp and its source..."""
        levels = []
        pairs = zip(self.level_dimensions, self.level_downsamples, strict=True)
        for i, (dims, ds) in enumerate(pairs):
            mpp = self.mpp[0] * ds if self.mpp else None
            levels.append({"level": i, "width": dims[0], "height": dims[1], "downsample": ds,
                           "mpp": mpp})
        return {
            "path": str(self.path), "backend": self.backend, "pixel_reader": self.pixel_reader,
            "vendor": self.vendor,
            "width": self.dimensions[0], "height": self.dimensions[1],
            "level_count": self.level_count, "levels": levels,
            "mpp_x": self.mpp[0] if self.mpp else None,
            "mpp_y": self.mpp[1] if self.mpp else None,
            "mpp_source": self.mpp_source, "mpp_rejected": self.mpp_rejected,
            "objective_power": self.objective_power,
            "associated_images": self.associated_images,
        }

    # --- pixels ---------------------------------------------------------------------------
    def read_region(self, location: tuple[Level0Px, Level0Px], level: int,
                    size: tuple[LevelPx, LevelPx]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` level pixels from level-0 ``location``.

        Areas outside the slide (and transparent pixels) are white.
        """
        self.check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise InvalidArgumentError(f"region size {size} is empty", "use a positive size",
                                       subject=str(self.path))
        try:
            if self.backend == "openslide" and self._pixels is None:
                return self._read_openslide(location, level, (w, h))
            return self._read_clipped(location, level, (w, h))
        except Exception as exc:
            if isinstance(exc, InvalidArgumentError):
                raise
            self._recover_after_error()
            ds = self.level_downsamples[level]
            box = (int(location[0]), int(location[1]), int(level_to_level0(LevelPx(w), ds)),
                   int(level_to_level0(LevelPx(h), ds)))
            raise UnreadableRegionError(
                f"reading level {level} at {tuple(location)} failed ({type(exc).__name__}: "
                f"{exc})".replace("\n", " "),
                "the file may be truncated or corrupt", subject=str(self.path),
                level=level, box_level0=box) from exc

    def _recover_after_error(self) -> None:
        """An OpenSlide handle stays in its error state after a failed read: reopen it, so
        the rest of the slide can still be read."""
        if self.backend != "openslide" or self._pixels is not None:
            return
        try:
            import openslide

            old, self._h = self._h, openslide.OpenSlide(str(self.file))
            old.close()
        except Exception:  # noqa: BLE001 - the next read reports what is wrong
            log.debug("%s: could not reopen after a failed read", self.path)

    def tile_size(self, level: int) -> int:
        """The file's tile width at ``level`` (1 when untiled or unknown)."""
        value = self.properties.get(f"{self.backend}.level[{level}].tile-width")
        try:
            return max(1, int(value)) if value is not None else 1
        except (TypeError, ValueError):
            return 1

    def _read_openslide(self, loc: tuple[Level0Px, Level0Px], level: int,
                        size: tuple[int, int]):
        img = self._h.read_region((int(loc[0]), int(loc[1])), level, size)
        if self.ycbcr_fix:
            img = ycbcr_to_rgb(img)
        if img.getextrema()[3][0] == 255:  # opaque everywhere: drop alpha in C
            return np.asarray(img.convert("RGB"))
        return _composite_white(np.asarray(img))

    def _read_clipped(self, loc: tuple[Level0Px, Level0Px], level: int,
                      size: tuple[int, int]):
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = level0_to_level(loc[0], ds), level0_to_level(loc[1], ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + size[0], lw), min(ly + size[1], lh)
        inside = (x0, y0, x1, y1) == (lx, ly, lx + size[0], ly + size[1])
        # a region inside the level is overwritten whole by the read: no white fill needed
        out = (np.empty((size[1], size[0], 3), np.uint8) if inside
               else np.full((size[1], size[0], 3), 255, np.uint8))
        if x1 <= x0 or y1 <= y0:
            return out
        if self._pixels is not None:
            self._pixels.read(level, x0, y0, x1, y1, out=out[y0 - ly:y1 - ly, x0 - lx:x1 - lx])
            return out
        arr = self._h.read_region((level_to_level0(LevelPx(x0), ds),
                                   level_to_level0(LevelPx(y0), ds)), level,
                                  (x1 - x0, y1 - y0), as_array=True)
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr)
        if arr.shape[2] == 4:
            arr = _composite_white(arr)
        elif arr.shape[2] != 3:
            arr = np.repeat(arr[..., :1], 3, axis=2)
        out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = arr[..., :3]
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB uint8 picture of the whole slide whose longer side is at most ``max_size``."""
        w, h = self.dimensions
        ds = max(w, h) / float(max_size)
        img, _ = self.read_downsampled(max(ds, 1.0))
        if max(img.shape[:2]) > max_size:
            from PIL import Image

            scale = max_size / max(img.shape[:2])
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
        return img

    def read_downsampled(self, downsample: float, block: int = 2048,
                         unreadable: list[tuple[int, int, int, int]] | None = None,
                         ) -> tuple[np.ndarray, float]:
        """The whole slide reduced by about ``downsample`` (level-0 px per output px).

        Reads the coarsest level not coarser than asked, block by block, and averages
        ``f x f`` areas (``f`` integer), so memory stays bounded by ``block``; blocks start on
        the file's tiles where that fits (each tile decoded once). Returns the image and its
        exact downsample. Edge pixels average in white beyond the slide.

        ``unreadable``: a block that cannot be decoded is read again tile by tile; pieces that
        still fail are white and their level-0 boxes (x, y, w, h) are appended to this list
        (without it the first failure raises :class:`UnreadableRegionError`).
        """
        dss = self.level_downsamples
        ok = [lv for lv, d in enumerate(dss) if d <= downsample * (1 + 1e-3)]
        level = max(ok, key=lambda lv: dss[lv]) if ok else 0
        ds = dss[level]
        f = max(1, int(math.floor(downsample / ds + 1e-6)))
        lw, lh = self.level_dimensions[level]
        step = _block_step(block, f, self.tile_size(level))
        ow, oh = math.ceil(lw / f), math.ceil(lh / f)
        out = np.empty((oh, ow, 3), np.uint8)
        for y in range(0, lh, step):
            for x in range(0, lw, step):
                bw, bh = min(step, lw - x), min(step, lh - y)
                pw, ph = math.ceil(bw / f) * f, math.ceil(bh / f) * f
                tile = self._read_level_block(level, x, y, pw, ph, f, unreadable)
                out[y // f:y // f + ph // f, x // f:x // f + pw // f] = block_mean(tile, f)
        return out, f * ds

    def _read_level_block(self, level: int, x: int, y: int, w: int, h: int, f: int,
                          unreadable: list[tuple[int, int, int, int]] | None) -> np.ndarray:
        """Level pixels ``[x, x+w) x [y, y+h)``; on a decoding failure (with ``unreadable``)
        piece by piece (tile-sized, multiples of ``f``), white where a piece fails."""
        ds = self.level_downsamples[level]
        try:
            return self.read_region((level_to_level0(LevelPx(x), ds),
                                     level_to_level0(LevelPx(y), ds)), level,
                                    (LevelPx(w), LevelPx(h)))
        except UnreadableRegionError as exc:
            if unreadable is None:
                raise
            first = exc
        piece = max(f, (max(self.tile_size(level), 64) // f) * f)
        if piece >= max(w, h):  # already one piece: it is the unreadable one
            unreadable.append(first.box_level0)
            return np.full((h, w, 3), 255, np.uint8)
        out = np.empty((h, w, 3), np.uint8)
        for py in range(0, h, piece):
            for px in range(0, w, piece):
                sw, sh = min(piece, w - px), min(piece, h - py)
                loc = (level_to_level0(LevelPx(x + px), ds), level_to_level0(LevelPx(y + py), ds))
                try:
                    out[py:py + sh, px:px + sw] = self.read_region(
                        loc, level, (LevelPx(sw), LevelPx(sh)))
                except UnreadableRegionError as exc:
                    unreadable.append(exc.box_level0)
                    out[py:py + sh, px:px + sw] = 255
        return out

    def read_at_mpp(self, target_mpp: float) -> tuple[np.ndarray, MicronsPerPixel]:
        """The whole slide at about ``target_mpp`` (not coarser); returns (image, actual mpp)."""
        mpp = self.require_mpp()
        img, ds = self.read_downsampled(target_mpp / mpp)
        return img, MicronsPerPixel(ds * mpp)

    # --- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        for handle in (self._h, self._pixels):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001
                pass
        self._pixels = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, dims={self.dimensions}, "
                f"mpp={self.mpp}, mpp_source={self.mpp_source!r})")


def _block_step(block: int, f: int, tile: int) -> int:
    """Side of the blocks ``read_downsampled`` reads: a multiple of ``f`` (whole output
    pixels) of at most ``block`` (or ``f``), and of the file's ``tile`` when a multiple of both
    fits in ``block`` (no tile decoded twice)."""
    unit = f * tile // math.gcd(f, tile)
    if unit <= block:
        return (block // unit) * unit
    return max(f, (block // f) * f)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    top = float(arr.max()) or 1.0
    return np.clip(arr.astype(np.float64) * 255.0 / top, 0, 255).astype(np.uint8)


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha) over a white background -> RGB uint8."""
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def open_slide(path: str | Path, backend: str = "auto",
               slide_mpp: float | None = None) -> Slide:
    """Open ``path`` with ``backend`` ("auto" picks OpenSlide or tiffslide; see module doc)."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}",
                                   f"use one of {', '.join(BACKENDS)}", subject=str(path))
    file = _resolve_path(path)
    if not (slideio_suffix(file) and slideio_installed()):  # else slideio reads the .ets
        refuse_olympus_vsi(file)
    chosen = pick_backend(file) if backend == "auto" else backend
    handle = _open_backend(file, chosen)
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.ERROR)
    try:
        slide = Slide(file, chosen, handle, slide_mpp=slide_mpp, source_path=path,
                      requested_backend=backend)
    except Exception as exc:
        handle.close()
        if isinstance(exc, HistotileError):
            raise
        raise _not_a_slide(file, exc) from exc
    finally:
        tiff_log.setLevel(level)
    picture = embedded_picture(file) if slide.vendor in (None, "generic-tiff") else None
    if picture is not None:
        slide.close()
        raise UnsupportedFormatError(
            f"its first image is a {picture} picture, not the slide's pixels",
            "pass the slide file itself (its scanner's format, or an OME-TIFF of the full "
            "resolution image)", subject=str(path))
    if slide.mpp_source == "objective-estimate":
        log.warning("%s: no mpp in the metadata; estimated %.3f um/px from the %gx objective",
                    path, slide.mpp[0], slide.objective_power)  # type: ignore[index]
    return slide
