"""The pictures of one predicted slide: ``overlay.png`` (classes, confidence, names, scale bar),
``tissue.png`` (mask, outline, kept grid: the picture ``histotile tile`` draws) and
``tissue_mask.png`` (the mask itself, 255 = tissue, at the size ``run.json`` records)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histotile.confidence import ConfidenceSummary
from histotile.export.overlay import write_mask_png, write_overlay
from histotile.export.tissue_picture import write_tissue_png

if TYPE_CHECKING:
    from histotile.grid import PatchGrid
    from histotile.models.card import ModelCard
    from histotile.tissue import TissueMask

FILES = ("overlay.png", "tissue.png", "tissue_mask.png")


def write_slide_pictures(folder: Path, slide_name: str, tissue: TissueMask, grid: PatchGrid,
                         labels: np.ndarray, top_probability: np.ndarray, card: ModelCard,
                         summary: ConfidenceSummary, warning: str | None) -> list[str]:
    """Write the three pictures into ``folder``; returns their names. A patch whose label is
    negative (unreadable) is left blank in the overlay and kept in tissue.png's grid."""
    slide_mpp = grid.slide_mpp
    done = np.asarray(labels) >= 0
    domain = card.domain.tissue
    model = f"model {card.name} {card.version}".rstrip() + (f" ({domain} tissue)" if domain
                                                           else "")
    effective = f"{grid.effective_mpp:.2f}" if grid.effective_mpp else "?"
    notes = [f"{len(grid)} patches of {card.patch_size} px at {effective} µm/px"]
    if summary.median_top_probability is not None:
        notes.append(f"median top probability {summary.median_top_probability:.2f}; "
                     f"{summary.fraction_uncertain:.0%} of patches uncertain")
    if not done.all():
        notes.append(f"{int((~done).sum())} unreadable patches left blank")
    write_overlay(folder / "overlay.png", tissue.thumbnail, tissue.downsample, grid.coords[done],
                  grid.patch_size_level0, np.asarray(labels)[done], card.class_names,
                  card.class_colors, tissue_mask=tissue.mask,
                  top_probability=np.asarray(top_probability)[done],
                  uncertain_below=summary.uncertain_below, slide_mpp=slide_mpp,
                  title=slide_name, model=model, notes=notes, warning=warning)
    tissue_notes = [f"{tissue.method} threshold {tissue.threshold:.3f} on a "
                    f"{_um(tissue.mpp)} thumbnail", f"kept: patches with at least "
                    f"{grid.min_tissue:.0%} tissue, {card.patch_size} px at {effective} µm/px"]
    write_tissue_png(folder / "tissue.png", tissue, grid, slide_mpp=slide_mpp,
                     title=slide_name, notes=tissue_notes)
    write_mask_png(folder / "tissue_mask.png", tissue.mask)
    return list(FILES)


def _um(mpp: float | None) -> str:
    return f"{mpp:.1f} µm/px" if mpp else "1/16"

