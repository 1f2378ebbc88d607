"""``histotile explain``: explanation maps for the first patches of an archive.

:data:`METHODS` is the table of explanation methods, each ``fn(model, x, *, layer, target,
normalise, size) -> (maps, probs)``: Grad-CAM (:mod:`histotile.gradcam`) for convolutional models,
CLS attention and attention rollout (:mod:`histotile.attention`) for ViTs. :func:`explain` runs
one on an archive's patches through the model's own preprocessing and writes the picture
(:mod:`histotile.export.figures`) and, for 96 px PCam-style models, ``centre_region.json``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile import attention, gradcam
from histotile.archives import open_archive
from histotile.errors import InvalidArgumentError
from histotile.export.figures import minmax_np, write_cam_grid
from histotile.fileio import write_json
from histotile.models.loading import load_model
from histotile.models.preprocess import BatchPipeline
from histotile.resample import upsample_maps
from histotile.stitch.cam import to_numpy

if TYPE_CHECKING:
    from torch import nn

    from histotile.models.card import ModelCard

# name -> fn(model, x, *, layer, target, normalise, size) -> (maps, probs); the CLI's --method
MethodFn = Callable[..., tuple[Any, Any]]
METHODS: dict[str, MethodFn] = {
    "gradcam": gradcam.gradcam,
    "attention": attention.attention,
    "attention-rollout": attention.attention_rollout_method,
}


def get_method(name: str) -> MethodFn:
    if name not in METHODS:
        raise InvalidArgumentError(f"unknown explanation method {name!r}",
                                   f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def explain(model: str | Path | None, archive: str | Path, out_dir: str | Path, *, n: int = 32,
            method: str = "gradcam", cam_class: str = "predicted", cam_layer: str | None = None,
            split: str = "test", batch_size: int = 64, device: str = "auto",
            centre: int = 32) -> dict[str, Any]:
    """Explain the first ``n`` patches of ``archive`` (PCam HDF5, MedMNIST npz or a Kaggle
    folder): writes ``<method>_grid.png`` (``gradcam_grid.png``, ``attention_grid.png``) and,
    for 96 px models, ``centre_region.json``.
    Returns the report dict (also the JSON's content when written)."""
    import torch

    loaded, patches, labels = load_model_and_patches(model, archive, n, split, device)
    card = loaded.card
    target = gradcam.cam_target(cam_class, card.class_names)
    fn = get_method(method)
    layer = gradcam.resolve_layer(loaded.module, cam_layer, card.architecture.name)
    pipe = BatchPipeline(card, loaded.device)
    cams_l, probs_l = [], []
    for s in range(0, len(patches), batch_size):
        x = pipe(torch.from_numpy(patches[s:s + batch_size]))
        cams, probs = fn(loaded.module, x, layer=layer, target=target, normalise="none", size=0)
        cams_l.append(to_numpy(cams))
        probs_l.append(to_numpy(probs))
    raw, probs = np.concatenate(cams_l), np.concatenate(probs_l)
    shown = minmax_np(upsample_maps(raw, card.patch_size))
    pred = probs.argmax(1)
    conf = probs[np.arange(len(pred)), pred]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pcam_like = card.patch_size == 96
    grid_path = write_cam_grid(
        out / f"{method.replace('-', '_')}_grid.png", patches, shown,
        class_names=card.class_names, pred=pred,
        conf=conf, true=labels, centre=centre if pcam_like else None,
        title=f"{method} · {card.name} · layer {_layer_name(loaded.module, layer)} · "
              f"class {cam_class}")
    report = _report(card, archive, method, cam_class, _layer_name(loaded.module, layer),
                     probs, labels, raw, centre, pcam_like)
    report["files"] = {"grid": str(grid_path)}
    if pcam_like:
        report["files"]["centre_region"] = str(out / "centre_region.json")
        write_json(out / "centre_region.json", report)
    return report


def _layer_name(model: nn.Module, layer: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is layer), "?")


def _report(card: ModelCard, archive: str | Path, method: str, cam_class: str, layer: str,
            probs: np.ndarray, labels: np.ndarray | None, raw: np.ndarray,
            centre: int, pcam_like: bool
            ) -> dict[str, Any]:
    pred = probs.argmax(1)
    rows = []
    share = gradcam.centre_mass(upsample_maps(raw, card.patch_size), centre, card.patch_size) \
        if pcam_like else np.full(len(pred), np.nan)
    for k in range(len(pred)):
        row = {"index": k, "pred": card.class_names[int(pred[k])],
               "confidence": round(float(probs[k, pred[k]]), 6)}
        if labels is not None:
            row["true"] = card.class_names[int(labels[k])]
        if pcam_like:
            row["centre_mass"] = None if np.isnan(share[k]) else round(float(share[k]), 6)
        rows.append(row)
    valid = share[~np.isnan(share)]
    area = (centre / card.patch_size) ** 2
    return {
        "model": card.name, "archive": str(archive), "method": method, "cam_class": cam_class,
        "layer": layer, "n": len(pred),
        "centre_region": {"size_px": centre, "patch_px": card.patch_size,
                          "area_share": area,
                          "mean_centre_mass": float(valid.mean()) if len(valid) else None,
                          "maps": "raw Grad-CAM upsampled to the patch (bilinear)"}
        if pcam_like else None,
        "accuracy": float((pred == labels).mean()) if labels is not None else None,
        "patches": rows,
    }


def load_model_and_patches(model: str | Path | None, archive: str | Path, n: int, split: str,
                           device: str) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """The model and the first ``n`` patches of ``archive``, checked to have its patch size."""
    loaded = load_model(model, device)
    patches, labels = read_patches(archive, n, split)
    if patches.shape[1] != loaded.card.patch_size:
        raise InvalidArgumentError(
            f"patches are {patches.shape[1]} px but the model expects {loaded.card.patch_size} px",
            "pick a model made for this archive's patch size", subject=str(archive))
    return loaded, patches, labels


def read_patches(archive: str | Path, n: int, split: str = "test"
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``n`` patches (uint8 (n, P, P, 3)) and labels (or None) of an archive or a
    Kaggle folder (``train/*.tif`` + ``train_labels.csv``)."""
    path = Path(archive)
    if path.is_dir():
        return _read_kaggle(path, n)
    with open_archive(path, split=split) as arc:
        out = []
        for _, block in arc.iter_batches(min(n, 256)):
            out.append(block)
            if sum(len(o) for o in out) >= n:
                break
        patches = np.concatenate(out)[:n]
        labels = arc.labels[:len(patches)] if arc.labels is not None else None
    return patches, labels


def _read_kaggle(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from histotile.training.datasets import FilePatches

    table = folder / "train_labels.csv"
    if not table.is_file():
        raise InvalidArgumentError("not a Kaggle folder (train/*.tif + train_labels.csv)",
                                   "pass a PCam .h5, a MedMNIST .npz or a Kaggle folder",
                                   subject=str(folder))
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    files = FilePatches([folder / "train" / f"{r['id']}.tif" for r in rows],
                        np.array([int(r["label"]) for r in rows]))
    return np.stack([files[i][0] for i in range(len(files))]), files.labels
