"""Olympus/Evident VSI and Zeiss CZI through slideio (the optional ``[formats]`` extra).

:func:`histotile.slide.open_slide` opens ``.vsi`` and ``.czi`` files with backend ``slideio``
(also selectable for any file slideio reads, e.g. to compare pixels with OpenSlide). This module
wraps a slideio scene in the handle interface :class:`histotile.slide.Slide` expects from
OpenSlide and tiffslide: ``properties``, ``dimensions``, ``level_count``, ``level_dimensions``,
``level_downsamples``, ``associated_images``, ``read_region(..., as_array=True)``, ``close()``.

- The slide is the scene with the most pixels (a VSI's overview and a CZI's label/preview are
  separate scenes or auxiliary images); other scenes are named in the log, never merged.
- Levels are slideio's zoom levels (the file's own pyramid); downsample = level-0 width / level
  width. Regions are read from the named level only (``read_block_from_level``).
- Pixel size: the scene's resolution (metres per pixel, from the vendor metadata) as
  ``slideio.mpp-x``/``-y``; magnification as ``slideio.objective-power``.
- Pixels come back RGB uint8: CZI stores colour as BGR (libCZI ``Bgr24``) and slideio returns
  it as stored, so the channels are reversed here; more than 8 bits are scaled by the
  channel's significant bits (one scale for the whole slide, never per region); a grey or
  multi-channel (fluorescence) scene shows its first channel as grey, and its channel names
  go to ``slideio.fluorescence`` (so ``predict`` treats it as dark-field).
- A z-stack is read at its middle focal plane (``slideio.z-slice``).
- A VSI is read from its ``_<stem>_/stack*/frame*.ets`` pixel files only: when slideio finds no
  image there (folder missing, files damaged) it offers the .vsi's own overview picture as a
  scene; histotile drops any scene the size of a picture stored in the .vsi and refuses the
  file with where its pixels should be.
- A CZI compressed with a codec slideio does not decode (zstd, written by newer ZEN versions)
  is refused when opened, not at the first read.

Nothing here imports :mod:`histotile.slide`; slideio is imported only when a file is opened.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import UnsupportedFormatError

log = logging.getLogger(__name__)

#: suffix -> slideio driver; these files are opened with backend ``slideio``.
SLIDEIO_DRIVERS = {".vsi": "VSI", ".czi": "CZI"}
VENDORS = {"VSI": "olympus", "CZI": "zeiss"}
EXTRA_HINT = "pip install 'histotile[formats]' (installs slideio), then run again"
_EPS = 1e-6  # the same tolerance as histotile.slide's level <-> level-0 mapping


def slideio_installed() -> bool:
    """Whether the optional reader is importable (no import of it)."""
    return importlib.util.find_spec("slideio") is not None


def slideio_suffix(path: str | Path) -> bool:
    """True for the files ``auto`` opens with slideio (``.vsi``, ``.czi``)."""
    return Path(path).suffix.lower() in SLIDEIO_DRIVERS


def require_slideio(path: str | Path) -> None:
    """Refuse a VSI/CZI in one line naming the extra when slideio is not installed."""
    if slideio_installed():
        return
    kind = "an Olympus VSI" if Path(path).suffix.lower() == ".vsi" else "a Zeiss CZI"
    raise UnsupportedFormatError(f"is {kind} slide: reading it needs the optional slideio "
                                 "reader, which is not installed", EXTRA_HINT, subject=str(path))


def _vsi_refusal(path: Path) -> UnsupportedFormatError:
    """A VSI whose pixels slideio did not find in ``_<stem>_/stack*/frame*.ets``."""
    pattern = path.parent / f"_{path.stem}_" / "stack*" / "frame*.ets"
    frames = sorted(path.parent.glob(f"_{path.stem}_/stack*/frame*.ets"))
    if not frames:
        return UnsupportedFormatError(
            f"is an Olympus VSI: this file holds only an overview picture; its pixels should be "
            f"in {pattern}, which is missing", "copy that folder together with the .vsi",
            subject=str(path))
    return UnsupportedFormatError(
        f"is an Olympus VSI whose pixel files ({pattern}, {len(frames)} found) hold no image "
        "slideio can read; only the .vsi's own overview picture was found",
        "the .ets files may be incomplete or damaged: copy the .vsi and its folder again",
        subject=str(path))


def _embedded_sizes(path: Path) -> set[tuple[int, int]]:
    """(width, height) of the pictures stored in a .vsi's own TIFF (overview, label)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            shapes = [page.shape for page in tf.pages]
        return {(int(sh[1]), int(sh[0])) for sh in shapes if len(sh) >= 2}
    except Exception:  # noqa: BLE001 - not a TIFF: nothing embedded to mistake for the slide
        return set()


def _unit_scale(dtype: np.dtype, bits: int) -> float | None:
    """Divisor that maps a channel's values to 0-255 (None: already uint8)."""
    if dtype == np.uint8:
        return None
    if np.issubdtype(dtype, np.integer):
        top = np.iinfo(dtype).max
        if 8 < bits < np.iinfo(dtype).bits:
            top = 2 ** bits - 1
        return top / 255.0
    return 1.0 / 255.0  # floating point: 0-1


class SlideioHandle:
    """One slideio scene with the OpenSlide-like interface of :class:`histotile.slide.Slide`."""

    def __init__(self, path: Path) -> None:
        import slideio  # type: ignore[import-untyped]

        driver = SLIDEIO_DRIVERS.get(path.suffix.lower(), "AUTO")
        self._slide = slideio.open_slide(str(path), driver)
        scenes = [self._slide.get_scene(i) for i in range(self._slide.num_scenes)]
        if path.suffix.lower() == ".vsi":  # never the overview picture as the slide
            embedded = _embedded_sizes(path)
            scenes = [s for s in scenes if (s.rect[2], s.rect[3]) not in embedded]
            if not scenes:
                raise _vsi_refusal(path)
        if not scenes:
            raise UnsupportedFormatError("holds no image slideio can read",
                                         "check the file (is it complete?)", subject=str(path))
        scene = max(scenes, key=lambda s: s.rect[2] * s.rect[3])
        others = [f"{s.name} ({s.rect[2]}x{s.rect[3]})" for s in scenes if s is not scene]
        if others:
            log.warning("%s: reading scene %r; the file has other scenes: %s", path,
                        scene.name, ", ".join(others))
        if "unknown" in str(scene.compression).lower():
            raise UnsupportedFormatError(
                "its pixels are compressed with a codec slideio cannot decode (e.g. zstd)",
                "re-save it in ZEN with JPEG XR or no compression, or convert it to OME-TIFF",
                subject=str(path))
        self._scene = scene
        self._z = int(scene.num_z_slices) // 2  # the middle focal plane of a z-stack
        self.dimensions = (int(scene.rect[2]), int(scene.rect[3]))
        zooms = [scene.get_zoom_level_info(z) for z in range(scene.num_zoom_levels)] or []
        sizes = [(int(z.size.width), int(z.size.height)) for z in zooms] or [self.dimensions]
        self.level_dimensions = sizes
        self.level_count = len(sizes)
        self.level_downsamples = [self.dimensions[0] / w for w, _ in sizes]
        self._channels = int(scene.num_channels)
        self._dtype = np.dtype(scene.get_channel_data_type(0))
        bits = int(scene.get_channel_significant_bits(0) or 0)
        self._scale = _unit_scale(self._dtype, bits)
        self._bgr = path.suffix.lower() == ".czi" and self._channels == 3
        self.properties = self._properties(path, scene, zooms)
        self.associated_images = {name: None for name in self._slide.get_aux_image_names()}

    def _properties(self, path: Path, scene: Any, zooms: list[Any]) -> dict[str, Any]:
        res = scene.resolution
        props: dict[str, Any] = {
            "slideio.driver": SLIDEIO_DRIVERS.get(path.suffix.lower(), "AUTO"),
            "slideio.vendor": VENDORS.get(SLIDEIO_DRIVERS.get(path.suffix.lower(), "")),
            "slideio.scene": scene.name, "slideio.channels": self._channels,
            "slideio.data-type": str(self._dtype), "slideio.compression": str(scene.compression),
            "slideio.z-slices": int(scene.num_z_slices), "slideio.z-slice": self._z,
        }
        if self._channels != 3:  # not one colour picture: fluorescence or multiplex channels
            names = [scene.get_channel_name(c) or f"channel {c}" for c in range(self._channels)]
            props["slideio.fluorescence"] = ", ".join(names)
        if res and res[0] and res[0] > 0:
            props["slideio.mpp-x"] = res[0] * 1e6
            props["slideio.mpp-y"] = (res[1] or res[0]) * 1e6
        if scene.magnification and scene.magnification > 0:
            props["slideio.objective-power"] = scene.magnification
        for i, z in enumerate(zooms):
            props[f"slideio.level[{i}].tile-width"] = int(z.tile_size.width)
            props[f"slideio.level[{i}].tile-height"] = int(z.tile_size.height)
        return {k: v for k, v in props.items() if v is not None}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    as_array: bool = True) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` pixels of ``level`` from level-0 ``location``
        (the caller keeps the region inside the level)."""
        ds = self.level_downsamples[level]
        x = int(math.floor(location[0] / ds + _EPS))  # inverse of slide.level_to_level0
        y = int(math.floor(location[1] / ds + _EPS))
        rect = (x, y, int(size[0]), int(size[1]))
        arr = np.asarray(self._scene.read_block_from_level(level, rect,
                                                           slices=(self._z, self._z + 1)))
        return self._to_rgb8(arr)

    def _to_rgb8(self, arr: np.ndarray) -> np.ndarray:
        if arr.ndim == 2:
            arr = arr[..., None]
        if self._scale is not None:
            arr = np.clip(np.rint(arr / self._scale), 0, 255).astype(np.uint8)
        if arr.shape[2] == 3:
            return np.ascontiguousarray(arr[..., ::-1] if self._bgr else arr)
        return np.repeat(arr[..., :1], 3, axis=2)

    def close(self) -> None:
        for obj in (self._scene, self._slide):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - closing twice or after a failure
                pass
