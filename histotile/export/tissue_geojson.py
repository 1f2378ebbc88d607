"""The tissue mask a run used, as editable QuPath annotations (``tissue.geojson``).

Each connected piece of the mask becomes one annotation (a Polygon with its holes), classified
"Tissue" (name and colour: QuPath refuses a classification without both), in level-0 pixels.
The outline follows the mask's pixel centres (marching squares at 0.5, so a mask pixel is inside
exactly when it was set) and simplified by :data:`SIMPLIFY_PX` of a mask pixel (1.6 um at the
8 um/px detection mask: the points of straight runs go, the shape stays), and only when the
simplified outline still gives back every mask pixel: reading the file back with
:func:`histotile.tissue_source.tissue_for_slide` gives the same mask, hence the same patches.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np

from histotile.annotations import rasterize
from histotile.export.qupath import write_feature_collection

TISSUE_CLASS = "Tissue"
TISSUE_COLOR = (80, 160, 80)
#: Simplification tolerance in mask pixels (a pixel centre is 0.35 px or more from the
#: marching-squares outline); the result is checked, see :func:`mask_polygons`.
SIMPLIFY_PX = 0.2


def _xor_all(polys: list[Any]) -> Any:
    """Even-odd union of nested, non-crossing rings (a hole is a ring inside a ring)."""
    import shapely

    while len(polys) > 1:
        pairs = [shapely.symmetric_difference(polys[i], polys[i + 1])
                 for i in range(0, len(polys) - 1, 2)]
        polys = pairs + ([polys[-1]] if len(polys) % 2 else [])
    return polys[0] if polys else shapely.Polygon()


def mask_polygons(mask: np.ndarray, downsample: float, simplify_px: float = SIMPLIFY_PX
                  ) -> list[Any]:
    """The pieces of bool ``mask`` (pixel ``c`` covers level-0 ``[c, c + 1) * downsample``) as
    shapely Polygons with holes, in level-0 pixels, largest first. The outline is simplified by
    ``simplify_px`` mask pixels unless that would change a pixel of the mask."""
    import shapely
    from shapely import affinity
    from skimage.measure import find_contours

    if not mask.any():
        return []
    padded = np.pad(np.asarray(mask, np.float32), 1)  # closed contours at the borders
    rings = [shapely.Polygon(c[:, ::-1] - 1.0) for c in
             find_contours(padded, 0.5, fully_connected="high") if len(c) >= 4]
    region = _xor_all([r for r in rings if r.is_valid and r.area > 0])
    if simplify_px > 0:
        simpler = region.simplify(simplify_px, preserve_topology=True)
        # in mask coordinates the pixel centres are integers: downsample 1, shifted by half
        shifted = affinity.translate(simpler, 0.5, 0.5)
        if np.array_equal(rasterize(shifted, mask.shape, 1.0), mask):
            region = simpler
    # mask pixel centres (integers) -> level-0: x0 = (col + 0.5) * downsample
    region = affinity.affine_transform(region, [downsample, 0, 0, downsample,
                                                0.5 * downsample, 0.5 * downsample])
    polys = [p for p in getattr(region, "geoms", [region]) if p.geom_type == "Polygon"
             and not p.is_empty]
    return sorted(polys, key=lambda p: -p.area)


def _round(coords: Any) -> Any:
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        return [round(float(v), 2) for v in coords]
    return [_round(c) for c in coords]


def tissue_features(mask: np.ndarray, downsample: float, id_seed: str = "") -> list[dict]:
    """QuPath annotation features of the mask's pieces (deterministic ids)."""
    from shapely.geometry import mapping

    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"histotile-tissue:{id_seed}")
    features = []
    for i, poly in enumerate(mask_polygons(mask, downsample)):
        geometry = mapping(poly)
        geometry = {"type": "Polygon", "coordinates": _round(geometry["coordinates"])}
        features.append({
            "type": "Feature", "id": str(uuid.uuid5(ns, str(i))), "geometry": geometry,
            "properties": {"objectType": "annotation", "name": f"{TISSUE_CLASS} {i + 1}",
                           "classification": {"name": TISSUE_CLASS,
                                              "color": list(TISSUE_COLOR)},
                           "isLocked": False}})
    return features


def write_tissue_geojson(path: str | Path, mask: np.ndarray, downsample: float,
                         id_seed: str = "") -> Path:
    """Write ``tissue.geojson`` (plain, so it opens in any editor; written atomically)."""
    return write_feature_collection(path, tissue_features(mask, downsample, id_seed), gzip=False)
