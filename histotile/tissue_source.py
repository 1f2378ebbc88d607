"""Where a slide's tissue comes from: automatic detection, or a tissue mask drawn in QuPath.

:func:`tissue_for_slide` is what ``predict`` and ``tile`` call. Without ``tissue_mask`` it runs
:func:`histotile.tissue.detect_tissue`. With ``tissue_mask`` (a GeoJSON file, or a folder of them
matched by slide, see :func:`histotile.annotations.match_file`; histotile's own
``<stem>.tissue.geojson`` and ``<stem>/tissue.geojson`` match too) the file's areas replace the
detection for that slide: objects classified "Tissue" or unclassified are tissue, objects of any
other class are ignored (a warning names them). The areas are drawn on the grid detection would
have used (same thumbnail, same downsample), so a mask written by histotile and read back gives
the same patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotile.annotations import folder_identity, match_file, rasterize, read_annotations
from histotile.tissue import (
    MASK_MPP,
    TissueMask,
    classify_illumination,
    detect_tissue,
    read_mask_thumbnail,
)

if TYPE_CHECKING:
    from histotile.options import PredictOptions, TileOptions
    from histotile.slide import Slide

log = logging.getLogger(__name__)

TISSUE_CLASSES = ("Tissue", None)
#: Extra names a folder of tissue masks is searched for (what predict and tile write).
TISSUE_PATTERNS = ("{stem}.tissue", "{stem}/tissue")


@dataclass
class GeoJSONTissueMask(TissueMask):
    """A tissue mask read from a GeoJSON file: ``method`` is ``"geojson"`` and ``threshold`` 0.5
    (a mask pixel is tissue when its centre, coverage 1 of 0..1, is inside the areas)."""

    source: str = ""
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        return {"mask_file": self.source, "mask_sha256": self.sha256}


def mask_file_for(tissue_mask: str | Path, slide_path: str | Path) -> Path:
    """The tissue-mask file of ``slide_path`` (``tissue_mask`` a file or a folder)."""
    return match_file(tissue_mask, slide_path, TISSUE_PATTERNS, what="tissue mask",
                      option="--tissue-mask")


def mask_identity(tissue_mask: str | Path | None) -> dict[str, str] | None:
    """What the resume fingerprint records of ``tissue_mask``: its files by content."""
    if tissue_mask is None:
        return None
    return folder_identity(tissue_mask, extra_dirs=True)


def read_tissue_mask(slide: Slide, path: str | Path, mask_mpp: float = MASK_MPP) -> TissueMask:
    """The areas of ``path`` drawn on ``slide``'s detection thumbnail grid."""
    path = Path(path)
    annotations = read_annotations(path)
    others = sorted(str(k) for k in annotations.by_class if k not in TISSUE_CLASSES)
    if others:
        log.warning("%s: objects classified %s are not tissue and are ignored", path.name,
                    ", ".join(others))
    unreadable: list[tuple[int, int, int, int]] = []  # recorded; the drawn mask decides
    thumb, ds, mpp = read_mask_thumbnail(slide, mask_mpp, unreadable)
    mask = rasterize(annotations.union(TISSUE_CLASSES), thumb.shape[:2], ds)
    if not mask.any():
        log.warning("%s: the tissue mask %s covers no tissue", slide.path, path.name)
    light = classify_illumination(thumb, getattr(slide, "fluorescence_channel", None))
    return GeoJSONTissueMask(mask=mask, downsample=ds, mpp=mpp, thumbnail=thumb,
                             method="geojson", threshold=0.5, illumination=light,
                             unreadable=unreadable, source=str(path.resolve()),
                             sha256=annotations.sha256)


def tissue_for_slide(slide: Slide, options: PredictOptions | TileOptions) -> TissueMask:
    """The tissue mask of ``slide`` under ``options`` (:class:`~histotile.options.PredictOptions`
    or :class:`~histotile.options.TileOptions`): the ``tissue_mask`` file matched to the slide,
    else detection with ``options.tissue_method`` (``otsu`` when the options have none)."""
    source = getattr(options, "tissue_mask", None)
    if source is not None:
        return read_tissue_mask(slide, mask_file_for(source, slide.path))
    return detect_tissue(slide, method=getattr(options, "tissue_method", "otsu"))


def tissue_info(tissue: TissueMask) -> dict[str, Any]:
    """Where the mask came from, for run.json (empty for a detected mask)."""
    return tissue.describe() if isinstance(tissue, GeoJSONTissueMask) else {}
