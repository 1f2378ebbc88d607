"""Class colours stay apart for colour-blind readers and on H&E (issue 15: overlay palette).

Colour-vision deficiency is simulated with the Machado, Oliveira & Fernandes (2009) matrices at
severity 1, applied in linear sRGB (as colorspacious' ``sRGB1+CVD`` does); distances are
CIEDE2000 (``skimage.color.deltaE_ciede2000``).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from histotile.palette import HE_COLOURS, PATHMNIST_COLOURS, PCAM_COLOURS

MACHADO_2009 = {  # severity 1.0 (Machado et al. 2009, table of simulation matrices)
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968],
                              [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868],
                            [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
}
VISIONS = ("normal", "deuteranopia", "protanopia")
MIN_PAIR = 15.0  # CIEDE2000 between two classes, every vision
MIN_HE = {"normal": 20.0, "deuteranopia": 10.0, "protanopia": 10.0}  # class vs H&E colours
OLD_PATHMNIST = [(255, 213, 79), (224, 224, 224), (141, 110, 99), (57, 73, 171),
                 (129, 212, 250), (233, 30, 99), (67, 160, 71), (255, 152, 0), (211, 47, 47)]


def simulate(rgb: np.ndarray, vision: str) -> np.ndarray:
    """sRGB uint8 (N, 3) as seen with ``vision``, as sRGB floats in 0..1."""
    c = np.asarray(rgb, np.float64) / 255.0
    if vision == "normal":
        return c
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    lin = np.clip(lin @ MACHADO_2009[vision].T, 0.0, 1.0)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def delta_e(a: np.ndarray, b: np.ndarray, vision: str) -> np.ndarray:
    """CIEDE2000 between every colour of ``a`` and every colour of ``b`` (len(a), len(b))."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    la, lb = rgb2lab(simulate(a, vision)[None])[0], rgb2lab(simulate(b, vision)[None])[0]
    return deltaE_ciede2000(la[:, None, :], lb[None, :, :])


def min_pair(colours: list, vision: str) -> float:
    d = delta_e(np.array(colours), np.array(colours), vision)
    return float(min(d[i, j] for i, j in combinations(range(len(colours)), 2)))


def test_simulation_matches_colorspacious_reference() -> None:
    # colorspacious 1.1.2: cspace_convert([200, 30, 40] / 255, sRGB1+CVD deuteranomaly 100,
    # "sRGB1") * 255 = [128.72, 115.02, 31.79]; grey stays grey for every vision
    np.testing.assert_allclose(simulate([[200, 30, 40]], "deuteranopia")[0] * 255,
                               [128.72, 115.02, 31.79], atol=0.05)
    for vision in VISIONS:
        np.testing.assert_allclose(simulate([[128, 128, 128]], vision)[0], 128 / 255, atol=2e-3)


@pytest.mark.parametrize("vision", VISIONS)
@pytest.mark.parametrize("palette", [PATHMNIST_COLOURS, PCAM_COLOURS], ids=["pathmnist", "pcam"])
def test_issue15_palette_classes_apart_for_every_reader(palette: dict, vision: str) -> None:
    assert min_pair(list(palette.values()), vision) >= MIN_PAIR


@pytest.mark.parametrize("vision", VISIONS)
@pytest.mark.parametrize("palette", [PATHMNIST_COLOURS, PCAM_COLOURS], ids=["pathmnist", "pcam"])
def test_issue15_palette_stands_out_from_he(palette: dict, vision: str) -> None:
    d = delta_e(np.array(list(palette.values())), np.array(HE_COLOURS), vision)
    assert d.min() >= MIN_HE[vision]


def test_issue15_old_palette_fails_the_same_check() -> None:
    """The check has teeth: the previous PathMNIST colours fail it (4.7 under deuteranopia,
    debris 4.3 from H&E)."""
    assert min_pair(OLD_PATHMNIST, "deuteranopia") < 5
    assert delta_e(np.array(OLD_PATHMNIST), np.array(HE_COLOURS), "normal").min() < 5


def test_bundled_card_and_datasets_use_the_palette() -> None:
    import histotile
    from histotile.training.datasets import PATHMNIST_CLASSES, PCAM_CLASSES

    card = Path(histotile.__file__).parent / "models/zoo/pathmnist-smallcnn/model.json"
    classes = json.loads(card.read_text())["classes"]
    assert {c["name"]: tuple(c["color"]) for c in classes} == PATHMNIST_COLOURS
    assert dict(PATHMNIST_CLASSES) == PATHMNIST_COLOURS
    assert dict(PCAM_CLASSES) == PCAM_COLOURS
