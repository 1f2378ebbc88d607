"""The model card a training run writes: classes, input statistics, stain, data and recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.download import file_digest
from histotile.errors import DatasetError
from histotile.models.card import (
    Architecture,
    ClassInfo,
    InputNorm,
    ModelCard,
    StainSpec,
    Training,
    Weights,
)
from histotile.stain import MacenkoNormalizer, StainReference
from histotile.training.config import WEIGHTS, TrainConfig

if TYPE_CHECKING:
    from histotile.training.datasets import DatasetSplits


def build_card(cfg: TrainConfig, data: DatasetSplits, name: str, command: str,
               mean: list[float], std: list[float]) -> ModelCard:

    if data.mpp is None:
        raise DatasetError("the pixel size of these patches is unknown",
                           "pass --mpp (microns per pixel of the patches)", subject=cfg.dataset)
    stain: dict[str, Any] = {"method": cfg.stain_norm, "reference": None}
    if cfg.stain_norm == "macenko":
        stain["reference"] = stain_reference(cfg.stain_reference, data).to_dict()
        stain["in_training"] = cfg.stain_train
    return ModelCard(
        name=name, version="1.0", architecture=Architecture(cfg.arch, dict(cfg.arch_kwargs)),
        classes=[ClassInfo(n, (int(c[0]), int(c[1]), int(c[2])))
                 for n, c in zip(data.class_names, data.colors, strict=True)],
        patch_size=data.patch_size, mpp=round(float(data.mpp), 6),
        input=InputNorm(mean, std), stain=StainSpec.from_dict(stain),
        weights=Weights(WEIGHTS, "0" * 64, "safetensors"),
        training=Training(data=data.description, data_md5=_data_md5(data.files),
                          command=command, seed=cfg.seed, val_split=data.val_source,
                          val_fraction=cfg.val_fraction, recipe=_recipe(cfg),
                          n_train=len(data.train), n_val=len(data.val)),
        license="CC-BY-4.0" if data.name == "pathmnist" else "",
    )


def stain_reference(spec: str, data: DatasetSplits, max_patches: int = 4096) -> Any:
    """The Macenko reference ``spec`` names: ``default``, ``fit`` (pooled pixels of up to
    ``max_patches`` training patches, seeded sample) or an image file."""

    if spec == "default":
        return StainReference.default()
    if spec != "fit":
        return StainReference.from_image(spec)
    ps = data.train
    idx = np.arange(len(ps))
    if len(ps) > max_patches:
        idx = np.sort(np.random.default_rng(0).choice(len(ps), max_patches, replace=False))
    x = np.stack([ps[int(i)][0] for i in idx])
    fit = MacenkoNormalizer(channels_last=True).fit(x)
    return fit.to_reference(source=f"fit: {data.description}, training split "
                                   f"({len(idx)} patches pooled)")


def _recipe(cfg: TrainConfig) -> str:
    opt = "AdamW" if cfg.optimizer == "adamw" else "Adam"
    aug = "flips, 90° rotations, HED jitter 0.05" if cfg.augment else "none"
    arch = f"{cfg.arch} {json.dumps(cfg.arch_kwargs)}" if cfg.arch_kwargs else cfg.arch
    extra = f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else ""
    stain = "none"
    if cfg.stain_norm != "none":
        stain = (f"{cfg.stain_norm} to the {cfg.stain_reference} reference, "
                 + ("per patch at training and inference" if cfg.stain_train else
                    "at inference only (training patches already normalised)"))
    return (f"{arch}, {opt} lr {cfg.lr:g} wd {cfg.weight_decay:g}, batch {cfg.batch_size}, "
            f"{cfg.epochs} epochs, lr x0.1 at 50%/75%{extra}, augment: {aug}, stain: {stain}")


def _data_md5(files: list[Path], limit: int = 2 << 30) -> str | None:

    if len(files) != 1 or files[0].stat().st_size > limit:
        return ";".join(f"{p.name}:{file_digest(p, 'md5')}" for p in files
                        if p.stat().st_size <= limit) or None
    return file_digest(files[0], "md5")
