"""Class colours of the bundled datasets, chosen to stay apart on H&E and for colour-blind readers.

A class colour is drawn over H&E tissue (``overlay.png``, the QuPath GeoJSON, the OME-TIFF
heatmap), so it has to differ from the other classes *and* from the stain. The colours below
keep, in CIEDE2000 (``tests/test_palette.py`` holds these figures):

* every pair of classes >= 15 apart with normal vision and under simulated deuteranopia and
  protanopia (Machado et al. 2009, severity 1);
* every class >= 20 from the typical H&E colours of :data:`HE_COLOURS` with normal vision and
  >= 10 under both simulations.

The previous PathMNIST colours had pairs 4.7 apart under deuteranopia (smooth muscle and normal
mucosa) and "debris" 4.3 from eosin-stained tissue; PCam's green/red pair is the classic
deuteranopia confusion.
"""

from __future__ import annotations

RGB = tuple[int, int, int]

# NCT-CRC-HE-100K / PathMNIST classes, in the dataset's label order
PATHMNIST_COLOURS: dict[str, RGB] = {
    "adipose": (255, 235, 0),  # yellow
    "background": (20, 20, 20),  # near black (glass is near white)
    "debris": (120, 120, 48),  # olive
    "lymphocytes": (48, 64, 232),  # blue
    "mucus": (16, 192, 240),  # cyan
    "smooth_muscle": (72, 160, 128),  # teal
    "normal_colon_mucosa": (152, 232, 168),  # mint
    "cancer_associated_stroma": (216, 160, 32),  # ochre
    "colorectal_adenocarcinoma_epithelium": (112, 40, 24),  # dark red
}

# PatchCamelyon: blue / orange, apart for every reader (green / red is not)
PCAM_COLOURS: dict[str, RGB] = {"normal": (16, 160, 240), "tumor": (230, 120, 0)}

# Typical H&E colours a class colour must stand out from: k-means centres (k = 6) of the
# tissue pixels of the CMU-1-Small-Region sample slide at 8 um/px, and its glass.
HE_COLOURS: tuple[RGB, ...] = (
    (149, 100, 140), (200, 149, 179), (117, 73, 117), (81, 43, 84), (225, 206, 218),
    (188, 116, 153), (245, 243, 243),
)
