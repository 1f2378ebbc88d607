"""``histotile evaluate``: a model's metrics on a dataset split, through the model's own
preprocessing (:mod:`histotile.models.preprocess`, the same as ``predict``).

The held-out split: ``split="val"`` of a dataset without an official validation split is
carved out of its training images with ``val_fraction`` and ``seed``. Left unset, they are the
ones recorded in the model card (``training.val_fraction``, ``training.seed``), so the
"validation" images are the ones the model was *not* trained on; the result says where its split
came from (``split_source``), and a split that differs from the card's is flagged as overlapping
the model's training images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from histotile.errors import DatasetError, InvalidArgumentError, ModelError
from histotile.models.card import ModelCard
from histotile.models.loading import LoadedModel, load_model
from histotile.models.preprocess import BatchPipeline, Preprocessing
from histotile.options import EvaluateOptions
from histotile.training.datasets import DatasetSplits, PatchSet, load_dataset
from histotile.training.loop import predict_probs
from histotile.training.metrics import compare_models
from histotile.training.report import full_metrics, write_reports

log = logging.getLogger(__name__)
FALLBACK_VAL_FRACTION = 0.1  # a card without a recorded split (and no --val-fraction)
FALLBACK_SEED = 0


def held_out_split(card: ModelCard, options: EvaluateOptions) -> tuple[float, int, str]:
    """(val_fraction, seed, where they came from): the options', else the card's."""
    card_fraction, card_seed = card.training.val_fraction, card.training.seed
    fraction = options.val_fraction if options.val_fraction is not None else card_fraction
    seed = options.seed if options.seed is not None else card_seed
    if options.val_fraction is None and options.seed is None and card_fraction is not None:
        return float(card_fraction), int(card_seed or 0), "model card"
    fraction = FALLBACK_VAL_FRACTION if fraction is None else fraction
    seed = FALLBACK_SEED if seed is None else seed
    same = card_fraction is not None and (float(fraction), int(seed)) == (
        float(card_fraction), int(card_seed or 0))
    return float(fraction), int(seed), "model card" if same else (
        "options" if card_fraction is None else "options (differs from the model card's)")


def load_dataset_for(card: ModelCard, dataset: str | Path, options: EvaluateOptions
                     ) -> tuple[DatasetSplits, str]:
    """Open ``dataset`` at the card's patch size with the held-out split of
    :func:`held_out_split`; check its classes match the card. Returns (data, split source)."""
    fraction, seed, source = held_out_split(card, options)
    data = load_dataset(dataset, options.data_dir, download=options.download,
                        size=card.patch_size, val_fraction=fraction, seed=seed,
                        labels=options.labels, mpp=card.mpp)
    if len(data.class_names) != card.num_classes:
        raise DatasetError(f"the dataset has {len(data.class_names)} classes, the model "
                           f"{card.num_classes}", "evaluate on data with the model's classes",
                           subject=str(dataset))
    return data, source


def split_probabilities(loaded: LoadedModel, ps: PatchSet, options: EvaluateOptions,
                        desc: str = "evaluate") -> np.ndarray:
    """Softmax probabilities (N, C) of ``loaded`` over ``ps``, in order, through the model's
    preprocessing (stain step per patch, input normalisation)."""
    return predict_probs(loaded.module, ps, BatchPipeline(loaded.card, loaded.device),
                         options.batch_size, options.workers, options.progress, desc)


def _split_text(data: DatasetSplits, split: str, source: str) -> str:
    if split != "val" or data.val_source == "official":
        return f"{split} ({data.val_source if split == 'val' else 'as in the dataset'})"
    return f"val: {data.val_source}, from the {source}"


def evaluate(model: str | Path | None, dataset: str | Path,
             options: EvaluateOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Metrics of ``model`` on a dataset split (``compare``: a paired test against another
    model); writes metrics.json and the pictures into ``out_dir`` when given. ``options``: an
    :class:`~histotile.options.EvaluateOptions`; keyword ``overrides`` replace its fields."""
    options = (options or EvaluateOptions()).replace(**overrides) if overrides else (
        options or EvaluateOptions())
    if not isinstance(options, EvaluateOptions):
        raise InvalidArgumentError("options must be an EvaluateOptions",
                                   "use histotile.options.EvaluateOptions(...) or keywords")
    loaded = load_model(model, device=options.device)
    card = loaded.card
    data, source = load_dataset_for(card, dataset, options)
    if options.split == "val" and data.val_source != "official" and source != "model card":
        log.warning("the held-out split (%s) is not the one recorded in the model card: it "
                    "overlaps the images %s was trained on", data.val_source, card.name)
    ps = data.split(options.split)
    y = ps.labels
    probs = split_probabilities(loaded, ps, options, f"evaluate {card.name}")
    metrics: dict[str, Any] = {"model": card.name, "weights_sha256": loaded.weights_sha256,
                               "dataset": data.description, "split": options.split,
                               "split_source": _split_text(data, options.split, source),
                               "preprocessing": Preprocessing.from_card(card).describe(),
                               "options": options.to_dict()}
    metrics.update(full_metrics(y, probs, card.class_names, options.n_boot))
    if options.compare is not None:
        other = load_model(options.compare, device=options.device)
        if other.card.class_names != card.class_names:
            raise ModelError("the models to compare have different classes",
                             "compare models trained on the same classes",
                             subject=str(options.compare))
        odata, _ = load_dataset_for(other.card, dataset, options.replace(download=False))
        probs_b = split_probabilities(other, odata.split(options.split), options,
                                      f"evaluate {other.card.name}")
        metrics["comparison"] = {"other_model": other.card.name,
                                 **compare_models(y, probs, probs_b, card.class_names)}
    if options.out_dir is not None:
        out = Path(options.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_reports(out, metrics, None, y, probs, card.class_names, options.plots)
    return metrics
