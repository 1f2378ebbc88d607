"""The resume fingerprint of a predict run, derived from its :class:`PredictOptions`.

A finished item whose run.json holds the same fingerprint is skipped. Every options field is
either fingerprinted (after resolution) or listed in :data:`NEUTRAL` (it cannot change an
output); a test fails when a new field is neither. Resolution replaces what the user typed by
what decides the numbers:

- ``model`` -> the card's name, version, weights sha256, patch size and mpp (a model reached by
  another path or URL is the same model);
- ``stain_norm`` -> the stain step actually applied: method, where its reference came from and
  the sha256 of the reference's numbers (``auto`` and ``macenko`` can mean different references,
  and ``auto`` can mean no normalisation), plus the input mean/std;
- ``device`` -> the device class (``cpu``, ``cuda``, ``mps``): CUDA runs in reduced precision,
  which changes the last digits; the device index does not;
- ``tissue_mask`` -> ``{file name: sha256}`` of the mask file (or of the folder's masks): an
  edited mask reruns, a moved one does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from histotile.models.card import ModelCard
from histotile.models.loading import resolve_device
from histotile.models.preprocess import Preprocessing
from histotile.options import PredictOptions
from histotile.tissue_source import mask_identity

FINGERPRINT_VERSION = 2

#: Options that cannot change an item's outputs: how many readers, batch size (the same
#: patches go through the same model; kept neutral as before), progress bars, the recorded
#: command line, and how items are scheduled (executor, shard, jobs, overwrite).
NEUTRAL = frozenset({"workers", "batch_size", "progress", "command", "batch"})

#: Fingerprinted fields whose value is replaced by what it resolves to (see the docstring).
RESOLVED = frozenset({"model", "stain_norm", "device", "tissue_mask"})


def model_identity(card: ModelCard) -> dict[str, Any]:
    return {"name": card.name, "version": card.version, "weights_sha256": card.weights.sha256,
            "patch_size": card.patch_size, "mpp": card.mpp}


def device_class(device: str) -> str:
    """``cpu``/``cuda``/``mps`` (``auto`` is resolved, which imports torch)."""
    if device == "auto":
        return str(resolve_device("auto").type)
    return device.split(":")[0]


def stain_identity(pre: Preprocessing) -> dict[str, Any]:
    """The stain step and input normalisation as applied (not as asked: ``auto`` and
    ``macenko`` that resolve to the same reference are the same work)."""
    return {"method": pre.stain.method, "reference_sha256": pre.stain.reference_sha256,
            "mean": list(pre.mean), "std": list(pre.std)}


def derive_fingerprint(options: PredictOptions, card: ModelCard,
                       resolve_device_class: Callable[[str], str] = device_class
                       ) -> dict[str, Any]:
    """What decides the outputs of ``options`` with the model ``card``."""
    resolved = {"model": model_identity(card),
                "stain_norm": stain_identity(Preprocessing.from_card(card, options.stain_norm)),
                "device": resolve_device_class(options.device),
                "tissue_mask": mask_identity(options.tissue_mask)}
    out: dict[str, Any] = {"job": "predict", "fingerprint_version": FINGERPRINT_VERSION}
    for f in dataclasses.fields(options):
        if f.name in NEUTRAL:
            continue
        out[f.name] = resolved[f.name] if f.name in RESOLVED else getattr(options, f.name)
    return out
