"""A slide's level-0 pixel size (mpp) from its metadata, with its source and the rule that
set a value aside.

Sources, in order: an override (``--slide-mpp``); the vendor's own value as the slide library
reports it (``openslide``; ``vendor-metadata`` when slideio read it, see
:mod:`histotile.slide_formats`); the TIFF resolution tags (``tiff-tags``); the reader's value for a
generic TIFF (``openslide``, from the same tags); an estimate from the objective power
(``objective-estimate``). Generic TIFF resolution tags are often not a pixel size at all: image
libraries write 72 or 96 dpi (a screen default) or no unit. Such values are set aside and
recorded (``rejected``: source, value and rule), so the slide has no mpp and the user is asked
for ``--slide-mpp`` instead of getting results at a made-up scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Level-0 microns per pixel a slide scanner can produce: 0.02 (oil immersion, 100x and more)
#: to 20 (a 1x scan). Metadata outside it is not a microscope pixel size: 72/96/300 dpi are
#: screen and print defaults (352.8, 264.6, 84.7 um/px) that image libraries write.
MPP_PLAUSIBLE = (0.02, 20.0)
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, "millimeter": 1000.0,
                "micrometer": 1.0, "3": 10000.0, "2": 25400.0}
_GENERIC_VENDORS = (None, "generic-tiff")


@dataclass(frozen=True)
class FoundMpp:
    """``mpp`` (x, y) or None, its ``source``, and what was set aside (``rejected``)."""

    mpp: tuple[float, float] | None
    source: str | None
    rejected: dict[str, Any] | None = None


def positive_float(value: Any) -> float | None:
    """``value`` as a finite positive float, else None (metadata strings, numbers)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def implausible_mpp(mpp: float) -> str | None:
    """Why ``mpp`` (um/px) from metadata is not a slide scanner's pixel size, or None."""
    lo, hi = MPP_PLAUSIBLE
    if lo <= mpp <= hi:
        return None
    dpi = 25400.0 / mpp
    return (f"{mpp:.4g} um/px ({dpi:.4g} dpi) is outside what slide scanners produce "
            f"({lo:g}-{hi:g} um/px): a screen or print default, not a pixel size")


def mpp_from_tiff_tags(props: dict[str, Any]
                       ) -> tuple[tuple[float, float] | None, str | None]:
    """(mpp from the TIFF resolution tags, None) or (None, why they give no pixel size);
    (None, None) without tags."""
    xr = positive_float(props.get("tiff.XResolution"))
    yr = positive_float(props.get("tiff.YResolution"))
    if xr is None:
        return None, None
    unit = str(props.get("tiff.ResolutionUnit", "") or "").strip().lower()
    um = _UM_PER_UNIT.get(unit)
    if um is None:
        return None, (f"TIFF resolution tags with no physical unit "
                      f"(ResolutionUnit {unit or 'missing'}) give no pixel size")
    return (um / xr, um / (yr or xr)), None


def find_mpp(props: dict[str, Any], backend: str, vendor: str | None,
             objective_power: float | None, override: float | None = None) -> FoundMpp:
    """The slide's mpp from its library ``props`` (see the module docstring)."""
    if override is not None:
        return FoundMpp((float(override), float(override)), "override")
    mx = positive_float(props.get(f"{backend}.mpp-x"))
    my = positive_float(props.get(f"{backend}.mpp-y"))
    generic = vendor in _GENERIC_VENDORS
    tags, why_not = mpp_from_tiff_tags(props)
    rejected: dict[str, Any] | None = None
    candidates: list[tuple[tuple[float, float], str]] = []
    if mx and not generic:
        candidates.append(((mx, my or mx), "openslide"))
    if tags:
        candidates.append((tags, "tiff-tags"))
    elif why_not and generic:  # the reader's own value comes from the same tags
        rejected = {"source": "tiff-tags", "value_um_per_px": mx, "rule": why_not}
    if mx and generic and why_not is None:
        candidates.append(((mx, my or mx), "openslide"))
    for value, source in candidates:
        reason = implausible_mpp(value[0])
        if reason is None:
            return FoundMpp(value, source, rejected)
        if rejected is None:
            rejected = {"source": source, "value_um_per_px": value[0], "rule": reason}
    if objective_power:
        est = 10.0 / objective_power  # 20x ~ 0.5 um/px, 40x ~ 0.25 um/px
        return FoundMpp((est, est), "objective-estimate", rejected)
    return FoundMpp(None, None, rejected)
