"""How sure the model was on a slide, and whether the slide looks like the model's domain.

Per patch: the top probability (the argmax's) and the entropy of the class probabilities,
normalised by ``log(classes)`` (0: one class certain, 1: all classes equally likely). Per slide
(:class:`ConfidenceSummary`, recorded in ``run.json``): the median top probability, the mean
normalised entropy and the share of patches whose top probability is under
:data:`UNCERTAIN_BELOW` (drawn hatched in ``overlay.png``).

A model card may say what it was made for: ``domain`` ``{"tissue": "colorectal",
"min_median_confidence": 0.6}``. A slide whose median top probability is under that threshold
gets :func:`domain_warning` (the run's last line and ``run.json``): a classifier always answers
with one of its classes, also on tissue it has never seen, and a low median is the sign of it.
For scale: the bundled PathMNIST model has a median top probability of 0.92 on its own 1,000
PathMNIST images (800 of them seen in training) and 0.42 on the (skin) CMU-1-Small-Region sample
slide.

Pure numpy; the per-patch arrays grow with the patch count like the labels the overlay needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

UNCERTAIN_BELOW = 0.5  # top probability under this: "uncertain" (hatched in overlay.png)


def top_probability(probs: np.ndarray) -> np.ndarray:
    """The argmax's probability per row of ``probs`` (N, C)."""
    return np.asarray(probs, np.float64).max(axis=1)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy per row of ``probs`` (N, C) over ``log(C)``: 0 certain .. 1 uniform."""
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    n_classes = p.shape[1]
    if n_classes < 2:
        return np.zeros(len(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return np.clip(-terms.sum(axis=1) / np.log(n_classes), 0.0, 1.0)


@dataclass(frozen=True)
class ConfidenceSummary:
    """One slide's (or archive's) confidence figures, as written to ``run.json``."""

    patches: int
    median_top_probability: float | None
    mean_normalised_entropy: float | None
    fraction_uncertain: float | None
    uncertain_below: float = UNCERTAIN_BELOW

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarise(top: np.ndarray, entropy: np.ndarray,
              uncertain_below: float = UNCERTAIN_BELOW) -> ConfidenceSummary:
    """Summary of per-patch top probabilities and normalised entropies (NaN entries, patches
    never computed, are left out)."""
    top, entropy = np.asarray(top, np.float64), np.asarray(entropy, np.float64)
    seen = ~np.isnan(top)
    if not seen.any():
        return ConfidenceSummary(0, None, None, None, uncertain_below)
    t = top[seen]
    return ConfidenceSummary(
        patches=int(seen.sum()), median_top_probability=float(np.median(t)),
        mean_normalised_entropy=float(np.nanmean(entropy[seen])),
        fraction_uncertain=float((t < uncertain_below).mean()), uncertain_below=uncertain_below)


class ConfidenceTracker:
    """Per-patch top probability and entropy of ``n`` patches, filled batch by batch."""

    def __init__(self, n: int) -> None:
        self.top = np.full(n, np.nan, np.float32)
        self.entropy = np.full(n, np.nan, np.float32)

    def add(self, idx: np.ndarray, probs: np.ndarray) -> None:
        self.top[idx] = top_probability(probs)
        self.entropy[idx] = normalised_entropy(probs)

    def summary(self, uncertain_below: float = UNCERTAIN_BELOW) -> ConfidenceSummary:
        return summarise(self.top, self.entropy, uncertain_below)


def domain_warning(summary: ConfidenceSummary, domain: dict[str, Any] | None,
                   model_name: str) -> str | None:
    """One line when the median top probability is under the card's
    ``domain.min_median_confidence``; ``None`` when it is not (or the card sets no threshold)."""
    threshold = (domain or {}).get("min_median_confidence")
    median = summary.median_top_probability
    if threshold is None or median is None or median >= float(threshold):
        return None
    tissue = (domain or {}).get("tissue")
    made_for = f"{tissue} tissue" if tissue else "its training data"
    return (f"this slide looks outside what model {model_name!r} was made for ({made_for}): "
            f"median top probability {median:.2f} < {float(threshold):.2f}; read its labels as "
            f"guesses")


def run_record(summary: ConfidenceSummary, domain: dict[str, Any] | None,
               warning: str | None) -> dict[str, Any]:
    """``run.json``'s ``confidence``: the summary, the card's domain and the warning (or null)."""
    return {**summary.to_dict(), "domain": dict(domain) if domain else None, "warning": warning}
