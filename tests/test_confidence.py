"""Confidence summary and the out-of-domain warning (issue 15: honest about the domain)."""

from __future__ import annotations

import numpy as np
import pytest

from histotile.confidence import (
    UNCERTAIN_BELOW,
    ConfidenceTracker,
    domain_warning,
    normalised_entropy,
    summarise,
    top_probability,
)
from histotile.errors import ModelError
from histotile.models.card import ModelCard, load_card

DOMAIN = {"tissue": "colorectal", "min_median_confidence": 0.6}


def test_entropy_is_zero_when_certain_and_one_when_uniform() -> None:
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(normalised_entropy(probs), [0.0, 1.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(top_probability(probs), [1.0, 0.25, 0.5])


def test_summary_of_a_slide_filled_batch_by_batch() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(9) * 0.5, size=101)  # GENERATED probabilities
    tracker = ConfidenceTracker(len(probs))
    for start in range(0, 101, 32):  # batches in any order
        idx = np.arange(start, min(start + 32, 101))[::-1]
        tracker.add(idx, probs[idx])
    s = tracker.summary()
    top = probs.max(axis=1)
    assert s.patches == 101
    assert s.median_top_probability == pytest.approx(np.median(top), abs=1e-6)
    assert s.fraction_uncertain == pytest.approx((top < UNCERTAIN_BELOW).mean())
    ent = -(probs * np.log(probs)).sum(axis=1) / np.log(9)
    assert s.mean_normalised_entropy == pytest.approx(ent.mean(), abs=1e-6)
    d = s.to_dict()
    assert d["uncertain_below"] == UNCERTAIN_BELOW and d["patches"] == 101


def test_summary_without_patches_is_empty_not_nan() -> None:
    s = summarise(np.full(3, np.nan), np.full(3, np.nan))
    assert s.patches == 0 and s.median_top_probability is None
    assert domain_warning(s, DOMAIN, "m") is None


def test_issue15_low_median_confidence_warns_out_of_domain() -> None:
    unsure = summarise(np.array([0.3, 0.36, 0.4, 0.9]), np.zeros(4))
    sure = summarise(np.array([0.7, 0.9, 0.95]), np.zeros(3))
    line = domain_warning(unsure, DOMAIN, "pathmnist-smallcnn")
    assert line is not None and "0.38" in line and "0.60" in line and "colorectal" in line
    assert "\n" not in line
    assert domain_warning(sure, DOMAIN, "m") is None
    assert domain_warning(unsure, {}, "m") is None  # the card sets no threshold: no guess


def test_card_domain_field_is_optional_and_checked(tmp_path) -> None:
    card = load_card(_bundled())
    assert card.domain.to_dict() == DOMAIN
    data = card.to_dict()
    again = ModelCard.from_dict(data)
    assert again.domain.to_dict() == DOMAIN and again.domain.tissue == "colorectal"
    del data["domain"]
    assert ModelCard.from_dict(data).domain.to_dict() == {}
    data["domain"] = {"min_median_confidence": 1.5}
    with pytest.raises(ModelError, match="domain"):
        ModelCard.from_dict(data)


def _bundled():
    from pathlib import Path

    import histotile

    return Path(histotile.__file__).parent / "models/zoo/pathmnist-smallcnn"


def test_issue15_predict_records_confidence_and_warns_out_of_domain(cmu_small, tmp_path,
                                                                     capsys):
    """The bundled colorectal model on the (skin) sample slide: run.json has the summary, the
    run's last lines warn and say where the results are and what to open first."""
    import json

    from histotile.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["predict", str(cmu_small), "-o", str(tmp_path)])
        raise SystemExit(0)
    assert done.value.code in (0, None)
    out, err = capsys.readouterr()
    folder = tmp_path / "CMU-1-Small-Region"
    conf = json.loads((folder / "run.json").read_text())["confidence"]
    assert conf["patches"] == 42 and conf["median_top_probability"] < 0.6
    assert 0 < conf["fraction_uncertain"] <= 1 and 0 < conf["mean_normalised_entropy"] < 1
    assert conf["domain"] == DOMAIN and "colorectal" in conf["warning"]
    assert f"warning: CMU-1-Small-Region.svs: {conf['warning']}" in err
    assert out.strip().splitlines()[-1] == f"results: {folder}/ (open overlay.png first)"
    # tissue.png is the picture `tile` draws (thumbnail, mask, kept grid), the mask beside it
    from PIL import Image

    from histotile.export.tissue_picture import GRID_BLUE

    picture = np.asarray(Image.open(folder / "tissue.png").convert("RGB"))
    mask = np.asarray(Image.open(folder / "tissue_mask.png"))
    assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}
    assert max(picture.shape[:2]) >= 1024 and (picture == GRID_BLUE).all(axis=2).sum() > 1000
