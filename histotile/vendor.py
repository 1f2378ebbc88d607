"""What vendor files say beyond the slide libraries' view: layouts to refuse, pictures that are
not the slide, fluorescence metadata, DICOM header faults and colour-space labels.

:mod:`histotile.slide` asks these questions while opening a slide; nothing here opens a slide.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from histotile.errors import CorruptSlideError, UnsupportedFormatError

log = logging.getLogger(__name__)

#: Olympus VSI: a small TIFF (an overview picture) beside ``_<stem>_/stack*/frame*.ets``.
VSI_SUFFIX, ETS_SUFFIX = ".vsi", ".ets"
#: Names of pictures embedded beside a slide (tifffile series names, description words).
EMBEDDED_NAMES = ("label", "macro", "overview", "thumbnail", "preview", "barcode")


def _vsi_pixel_folder(path: Path) -> Path:
    return path.parent / f"_{path.stem}_"


def refuse_olympus_vsi(path: Path) -> None:
    """Refuse an Olympus VSI (or one of its ``.ets`` files) with where its pixels are.

    A ``.vsi`` is a small TIFF holding an overview picture; opened as a TIFF it would pass the
    overview off as the slide (with a screen resolution as its pixel size). A TIFF of another
    name with a ``_<stem>_/stack*/frame*.ets`` folder beside it is a renamed VSI.
    """
    suffix = path.suffix.lower()
    hint = ("install histotile's VSI reader: pip install 'histotile[formats]' and pass the "
            ".vsi with its folder (or convert the slide to OME-TIFF, e.g. with QuPath)")
    if suffix == ETS_SUFFIX:
        raise UnsupportedFormatError(
            "is an Olympus .ets pixel file, part of a VSI slide", hint, subject=str(path))
    folder = _vsi_pixel_folder(path)
    if suffix != VSI_SUFFIX and not any(folder.glob("stack*/frame*.ets")):
        return
    frames = sorted(folder.glob("stack*/frame*.ets"))
    pattern = folder / "stack*" / "frame*.ets"
    if frames:
        where = (f"its pixels are in {pattern} ({len(frames)} file"
                 f"{'s' if len(frames) > 1 else ''})")
    else:
        where = (f"its pixels should be in {pattern}, which is missing (copy that folder "
                 "together with the .vsi)")
    raise UnsupportedFormatError(
        f"is an Olympus VSI: this file holds only an overview picture; {where}", hint,
        subject=str(path))


def embedded_picture(path: Path) -> str | None:
    """The kind of picture (label, macro, overview...) a TIFF's first image is, when it is
    one of the pictures scanners embed beside the slide rather than the slide itself."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            name = str(tf.series[0].name or "").strip().lower().split() if tf.series else []
            page = tf.pages.first
            words = str(page.description or "").strip().lower().split()
    except Exception:  # noqa: BLE001 - not tifffile-readable: nothing to say
        return None
    for candidate in (name[0] if name else "", words[0] if words else ""):
        candidate = candidate.strip(" :;,.|")
        if candidate in EMBEDDED_NAMES:
            return candidate
    return None


NDPI_FLUORESCENCE_TAG = 65434  # Hamamatsu: the fluorescence filter set, e.g. "DAPI 2 (387)"


def fluorescence_metadata(path: Path) -> str | None:
    """What a TIFF-based slide's metadata says about fluorescence (None: nothing)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            if tf.is_ndpi:
                value = page.tags.valueof(NDPI_FLUORESCENCE_TAG)
                return str(value).strip() or None if value else None
            if tf.is_ome:
                xml = tf.ome_metadata or ""
                if re.search(r'(IlluminationType|ContrastMethod)="(Epi)?[Ff]luorescence"', xml):
                    names = re.findall(r'<Channel[^>]*\bName="([^"]*)"', xml)
                    return ", ".join(names) or "fluorescence"
    except Exception:  # noqa: BLE001 - no readable metadata: nothing to say
        return None
    return None


def _dicom_image_type(path: Path, limit: int = 1 << 16) -> str | None:
    """The ImageType (0008,0008) of a DICOM file (explicit VR little endian), "" when empty
    or absent, None when ``path`` is no DICOM file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    except OSError:
        return None
    if data[128:132] != b"DICM":
        return None
    at = data.find(b"\x08\x00\x08\x00CS")
    if at < 0:
        return ""
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[at + 8:at + 8 + length].decode("ascii", "replace").strip(" \0")


def dicom_problem(path: Path, exc: Exception) -> CorruptSlideError | None:
    """A precise error for a DICOM file OpenSlide refused, when the header says why."""
    named = re.search(r"Reading (.+?\.dcm):", str(exc))
    culprit = Path(named.group(1)) if named else path
    image_type = _dicom_image_type(culprit)
    if image_type is None or image_type.replace("\\", ""):
        return None
    where = "" if culprit == path else f" ({culprit.name} of its series)"
    return CorruptSlideError(
        f"the DICOM file{where} has an empty ImageType (0008,0008), so a reader cannot tell "
        "whether it holds the slide's pixels, a label or an overview",
        "the converter that wrote it left out a required attribute: set ImageType (e.g. "
        "ORIGINAL\\PRIMARY\\VOLUME\\NONE) or convert the slide again", subject=str(path))


# --- DICOM whose JPEG frames are YCbCr but labelled RGB -----------------------------------
# Some converters (wsi2dcm, bfconvert) store ordinary YCbCr JPEG frames (JFIF, chroma
# subsampled) with PhotometricInterpretation RGB. OpenSlide 4.0 follows the DICOM label and
# returns the stored YCbCr samples as if they were RGB. The JPEG stream itself says what it
# holds (libjpeg's rule: a JFIF marker or component ids 1, 2, 3 mean YCbCr; an Adobe marker's
# transform flag decides; ids 'R', 'G', 'B' mean RGB), so a contradiction is detectable.
_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}  # JPEG baseline/extended
_OPENSLIDE_FOLLOWS_LABEL = ("4.0.",)  # library versions checked to return the stored YCbCr


def dicom_jpeg_labelled_rgb(path: Path, props: dict[str, Any]) -> bool:
    """True when ``path`` is a DICOM whose JPEG frames are YCbCr but labelled RGB, read by an
    OpenSlide version that follows the label."""
    if props.get("openslide.vendor") != "dicom":
        return False
    if props.get("dicom.PhotometricInterpretation") != "RGB":
        return False
    if props.get("dicom.TransferSyntaxUID") not in _JPEG_SYNTAXES:
        return False
    import openslide

    version = str(getattr(openslide, "__library_version__", ""))
    if not version.startswith(_OPENSLIDE_FOLLOWS_LABEL):
        log.debug("OpenSlide %s: DICOM colour-space handling not verified", version)
        return False
    header = _first_dicom_jpeg_header(path)
    return header is not None and jpeg_header_is_ycbcr(header) is True


def _first_dicom_jpeg_header(path: Path, limit: int = 1 << 24) -> bytes | None:
    """The bytes of the first encapsulated frame (from its SOI) of a DICOM file, or None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    except OSError:
        return None
    at = data.rfind(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")  # PixelData, encapsulated
    if at < 0:
        return None
    pos, items = at + 12, 0
    while pos + 8 <= len(data) and items < 2:  # item 0: offset table; item 1: frame 1
        if data[pos:pos + 4] != b"\xfe\xff\x00\xe0":
            return None
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if items == 1:
            return data[pos + 8:pos + 8 + length]
        pos += 8 + length
        items += 1
    return None


def jpeg_header_is_ycbcr(stream: bytes) -> bool | None:
    """Whether a 3-component JPEG stream holds YCbCr, by libjpeg's rule (None: not decidable)."""
    if stream[:2] != b"\xff\xd8":
        return None
    pos, jfif, adobe, ids = 2, False, None, None
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if marker == 0xDA:  # start of scan: the header is over
            break
        length = int.from_bytes(stream[pos + 2:pos + 4], "big")
        seg = stream[pos + 4:pos + 2 + length]
        if marker == 0xE0 and seg[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker in (0xC0, 0xC1, 0xC2) and len(seg) >= 6:
            ids = tuple(seg[6 + 3 * c] for c in range(seg[5]) if 6 + 3 * c < len(seg))
        pos += 2 + length
    if ids is None or len(ids) != 3:
        return None
    if jfif:
        return True
    if adobe is not None:
        return adobe != 0
    return ids != (82, 71, 66)  # 'R', 'G', 'B'


def ycbcr_to_rgb(img: Any) -> Any:
    """An RGBA PIL image whose colour bands hold YCbCr, converted to RGBA (JFIF equations)."""
    from PIL import Image

    *bands, alpha = img.split()
    rgb = Image.merge("YCbCr", bands).convert("RGB")
    rgb.putalpha(alpha)
    return rgb


# --- patches passed as slides ----------------------------------------------------------------
PATCH_MAX_SIDE = 1024  # a single image no larger than this a side is a patch, not a slide
_PATCH_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_PATCH_MAX_BYTES = 8 << 20  # larger files are not looked into (slides are large)


def patch_image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) when ``path`` is a single-level image no larger than
    :data:`PATCH_MAX_SIDE` px a side (a patch, e.g. a PCam tile); None otherwise."""
    p = Path(path)
    if p.suffix.lower() not in _PATCH_SUFFIXES:
        return None
    try:
        if not p.is_file() or p.stat().st_size > _PATCH_MAX_BYTES:
            return None
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(p) as tf:
                if len(tf.pages) != 1:
                    return None
                page = tf.pages.first
                size = (int(page.imagewidth), int(page.imagelength))
        else:
            from PIL import Image

            with Image.open(p) as img:
                size = img.size
    except Exception:  # noqa: BLE001 - unreadable here: the slide reader will say why
        return None
    return size if max(size) <= PATCH_MAX_SIDE else None


def refuse_patches_as_slides(paths: list[Path]) -> None:
    """One error for all inputs that are patches (small single images), not slides.

    Run one by one, each would fail on its own ("no pixel size") with a hint that cannot help;
    what helps is to run them as a patch dataset.
    """
    found = [(p, s) for p in paths if (s := patch_image_size(p)) is not None]
    if not found:
        return
    sizes = sorted({s for _, s in found})
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    what = "is a small single image" if len(found) == 1 else (
        f"{len(found)} of {len(paths)} inputs are small single images")
    raise UnsupportedFormatError(
        f"{what} ({shown} px): patches, not slides",
        "to predict, pack them into a PCam-layout HDF5 (dataset x, uint8 (N, P, P, 3)) or a "
        "MedMNIST .npz and pass that file; with labels, 'histotile evaluate MODEL FOLDER' reads "
        "a folder of them (Kaggle layout, or one sub-folder per class)",
        subject=str(found[0][0]) if len(found) == 1 else str(found[0][0].parent))
