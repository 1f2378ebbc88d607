"""Unit types: pixel coordinates and sizes in level-0 or level pixels, and microns per pixel.

``typing.NewType`` makes each unit a distinct type for the type checker (``python3 -m mypy
histotile``) and the identity at run time, so a level-pixel value passed where a level-0 value
is expected is a type error, not a silently misplaced patch. Crossing units goes through the
conversion functions whose signatures say so (``slide.level_to_level0``,
``slide.level0_to_level``). Values are wrapped where they are made: ``Level0Px(x)``.

This module imports nothing from histotile: every layer may use it.
"""

from __future__ import annotations

from typing import NewType, TypeAlias

#: pixels in the coordinates of the slide's full-resolution level 0 (int or float at run time)
Level0Px = NewType("Level0Px", float)
#: pixels at one pyramid level (level ``k`` is level 0 shrunk by ``level_downsamples[k]``)
LevelPx = NewType("LevelPx", float)
#: a physical pixel size in micrometres per pixel
MicronsPerPixel = NewType("MicronsPerPixel", float)
#: a level-0 side or step: one value for both axes, or (x, y)
Level0Side: TypeAlias = "Level0Px | tuple[Level0Px, Level0Px]"

__all__ = ["Level0Px", "Level0Side", "LevelPx", "MicronsPerPixel"]
