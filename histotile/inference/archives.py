"""``predict`` on a patch archive (PCam HDF5, MedMNIST npz): ``predictions.csv``
(``index[,x,y],prob_<class>...,label[,true_label]``) and, with labels, the accuracy in run.json.

The patches go through the model's preprocessing exactly as in ``evaluate``
(:mod:`histotile.models.preprocess`): the stain step (per patch: archive patches come from many
slides) and the input normalisation, so both give the same probabilities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.archives import PatchArchive, open_archive
from histotile.confidence import ConfidenceTracker, domain_warning, run_record
from histotile.errors import ModelError
from histotile.inference.context import PredictContext
from histotile.inference.provenance import StageTimer, progress_bar

if TYPE_CHECKING:  # the engine imports torch
    import torch

    from histotile.engine import EngineStats, StainStep

log = logging.getLogger(__name__)


def predict_archive(item: Path, tmp_dir: Path, ctx: PredictContext) -> dict[str, Any]:
    """Per-patch predictions for a PCam HDF5 / MedMNIST npz into ``tmp_dir/predictions.csv``."""
    from histotile.engine import EngineStats, classify

    timer = StageTimer()
    card = ctx.model.card
    if ctx.options.gradcam or ctx.options.attention:
        log.warning("%s: --gradcam/--attention make slide-level maps only; for patch archives "
                    "use histotile explain", item.name)
    with open_archive(item, split=ctx.options.split) as archive:
        if archive.patch_size != card.patch_size:
            raise ModelError(
                f"patches are {archive.patch_size} px but model {card.name!r} expects "
                f"{card.patch_size} px", "use a model made for this patch size",
                subject=str(item))
        stain, stain_info = ctx.patch_stain_step()
        stats = EngineStats()
        pred = np.empty(len(archive), np.int64)
        confidence = ConfidenceTracker(len(archive))
        bar = progress_bar(len(archive), ctx.options.progress, item.name)
        path = tmp_dir / "predictions.csv"
        try:
            with open(path, "w", newline="") as fh:
                fh.write(_archive_header(card.class_names, archive) + "\n")
                batches = _archive_batches(archive, ctx.options.batch_size, stain, stats)
                for idx, probs in classify(batches, ctx.model, ctx.model.device,
                                           stats=stats, plan=ctx.compute,
                                           on_batch=bar.update if bar is not None else None):
                    timer.first_batch()
                    with timer("export"):
                        pred[idx] = probs.argmax(axis=1)
                        confidence.add(idx, probs)
                        fh.write(_archive_rows(idx, probs, card.class_names, archive))
        finally:
            if bar is not None:
                bar.close()
        timer.add("read", stats.read_s)
        timer.add("stain", stats.stain_s)
        timer.add("model", stats.model_s)
        info: dict[str, Any] = {
            **ctx.environment(), "kind": archive.kind, "patches": len(archive),
            "split": archive.split if archive.kind == "medmnist-npz" else None,
            "model": ctx.model.describe(), "stain": stain_info,
            "settings": {"batch_size": ctx.options.batch_size, "compute": ctx.compute_info()},
            **ctx.settings_info(),
            "engine": stats.to_dict(), "timings": timer.rounded(),
            "files": ["predictions.csv", "run.json"],
        }
        summary, domain = confidence.summary(), card.domain.to_dict()
        info["confidence"] = run_record(summary, domain,
                                        domain_warning(summary, domain, card.name))
        if archive.labels is not None:
            info["labels"] = {"source": archive.labels_source}
            info.update(_accuracy(archive.labels, pred, card.num_classes, str(item)))
    return info


def _archive_batches(archive: PatchArchive, batch_size: int, stain: StainStep | None,
                     stats: EngineStats) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    import torch

    it = archive.iter_batches(batch_size)
    while True:
        t0 = time.perf_counter()
        nxt = next(it, None)
        t1 = time.perf_counter()
        if nxt is None:
            return
        idx, patches = nxt
        if stain is not None:
            patches = stain(patches)
        stats.read_s += t1 - t0
        stats.stain_s += time.perf_counter() - t1
        if not patches.flags.writeable:  # a read-only view of the archive's arrays
            patches = patches.copy()
        yield idx, torch.from_numpy(patches)


def _archive_header(names: Sequence[str], archive: PatchArchive) -> str:
    cols = ["index"] + (["x", "y"] if archive.coords is not None else [])
    cols += [f"prob_{n}" for n in names] + ["label"]
    if archive.labels is not None:
        cols.append("true_label")
    return ",".join(cols)


def _archive_rows(idx: np.ndarray, probs: np.ndarray, names: Sequence[str],
                  archive: PatchArchive) -> str:
    arg = probs.argmax(axis=1)
    lines = []
    for k, i in enumerate(idx.tolist()):
        parts = [str(i)]
        if archive.coords is not None:
            parts += [str(int(v)) for v in archive.coords[i]]
        parts += [f"{v:.6g}" for v in probs[k].tolist()]
        parts.append(names[arg[k]])
        if archive.labels is not None:
            t = int(archive.labels[i])
            parts.append(names[t] if 0 <= t < len(names) else str(t))
        lines.append(",".join(parts))
    return "\n".join(lines) + "\n"


def _accuracy(labels: np.ndarray, pred: np.ndarray, num_classes: int,
              subject: str) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if labels.min() < 0 or labels.max() >= num_classes:
        log.warning("%s: labels %d..%d do not fit the model's %d classes; no accuracy",
                    subject, labels.min(), labels.max(), num_classes)
        return {"accuracy": None}
    return {"accuracy": round(float(accuracy_score(labels, pred)), 6),
            "balanced_accuracy": round(float(balanced_accuracy_score(labels, pred)), 6),
            "correct": int((labels == pred).sum())}
