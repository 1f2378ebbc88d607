"""``histotile.predict``: slides and patch archives -> per-patch class probabilities.

Per slide ``OUT/<stem>/`` holds ``heatmap.ome.zarr``, ``predictions.csv``, ``tiles.geojson.gz``
(QuPath), ``overlay.png``, ``tissue.png`` and ``run.json`` (written last by the batch runner; it
marks the slide done and a second run with the same fingerprint skips it); options add Grad-CAM
or attention maps, merged QuPath classes and an OME-TIFF. A patch archive (PCam HDF5, MedMNIST
npz) gives ``predictions.csv`` and ``run.json`` with the accuracy when it has labels.

Modules: :mod:`~histotile.inference.api` (the entry point, up-front checks),
:mod:`~histotile.inference.fingerprint` (the resume fingerprint derived from the options),
:mod:`~histotile.inference.context` (what items share: options, model, preprocessing),
:mod:`~histotile.inference.slides`, :mod:`~histotile.inference.archives` (one item each),
:mod:`~histotile.inference.provenance` (timings, environment, accuracy lines). The options are
:class:`histotile.options.PredictOptions`; the preprocessing is the model's own
(:mod:`histotile.models.preprocess`).
"""

from __future__ import annotations

from histotile.inference.api import fingerprint_for, make_predict_process, predict
from histotile.inference.provenance import accuracy_lines, closing_lines

__all__ = ["accuracy_lines", "closing_lines", "fingerprint_for", "make_predict_process", "predict"]
