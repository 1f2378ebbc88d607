"""Patch labels from annotated regions (``histotile tile --labels``).

The rule, stated once (help and docs repeat it): a tissue patch is labelled with a class when at
least ``min_fraction`` of its area lies inside that class's annotations (the union of the class's
objects); a patch reaching ``min_fraction`` in two or more classes is dropped (overlapping
annotations never give a patch two labels); a patch reaching it in none (unannotated tissue, or
too little of any class) is left out. Unclassified objects label nothing. Fractions are exact
polygon areas (shapely), not rasterised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histotile.annotations import Annotations

log = logging.getLogger(__name__)

MAX_CLASSES = 255  # y is uint8, as PatchCamelyon's


@dataclass
class PatchLabels:
    """Which grid patches are labelled (``keep``, indices into the grid) and with what."""

    keep: np.ndarray  # (n,) int64 indices of the labelled patches
    y: np.ndarray  # (n,) uint8 index into class_names
    class_names: list[str]
    dropped_overlap: int
    unlabelled: int


def class_fractions(annotations: Annotations, coords: np.ndarray, size_level0: float
                    ) -> tuple[list[str], np.ndarray]:
    """(class names, (N, C) fraction of each patch box inside each class's annotations)."""
    import shapely

    names = sorted(k for k in annotations.by_class if k is not None)
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros((len(coords), len(names)), np.float64)
    if not len(coords) or not names:
        return names, out
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size_level0,
                        coords[:, 1] + size_level0)
    tree = shapely.STRtree(boxes)
    area = float(size_level0) ** 2
    for k, name in enumerate(names):
        geom = annotations.by_class[name]
        shapely.prepare(geom)
        hit = tree.query(geom, predicate="intersects")
        if len(hit):
            out[hit, k] = shapely.area(shapely.intersection(boxes[hit], geom)) / area
    return names, out


def label_patches(annotations: Annotations, coords: np.ndarray, size_level0: float,
                  min_fraction: float = 0.5) -> PatchLabels:
    """Apply the module's rule to the patches at ``coords`` (level-0 top-left corners)."""
    if None in annotations.by_class:
        log.warning("%s: unclassified annotations label nothing (give them a class in QuPath)",
                    annotations.source.name)
    names, frac = class_fractions(annotations, coords, size_level0)
    if len(names) > MAX_CLASSES:
        from histotile.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{len(names)} classes in {annotations.source.name}",
                                   f"use at most {MAX_CLASSES}", subject=str(annotations.source))
    # a tiny tolerance: a patch exactly on the min_fraction line is not lost to rounding
    reach = frac >= min_fraction - 1e-9
    hits = reach.sum(axis=1)
    keep = np.flatnonzero(hits == 1)
    y = reach[keep].argmax(axis=1).astype(np.uint8)
    return PatchLabels(keep.astype(np.int64), y, names, int((hits > 1).sum()),
                       int((hits == 0).sum()))


def label_attrs(labels: PatchLabels, slide_name: str, source: str | Path, sha256: str,
                min_fraction: float) -> dict[str, Any]:
    """The archive attributes recording the labels' origin and rule."""
    import json

    counts = np.bincount(labels.y, minlength=len(labels.class_names)).tolist()
    return {"class_names": json.dumps(labels.class_names), "slide_name": slide_name,
            "labels_source": str(source), "labels_sha256": sha256,
            "label_min_fraction": float(min_fraction),
            "label_counts": json.dumps(dict(zip(labels.class_names, counts, strict=True))),
            "labels_dropped_overlap": labels.dropped_overlap,
            "labels_unlabelled_tissue": labels.unlabelled}
