"""``histotile.train(...)``: train a patch classifier and write a complete model folder.

The recipe is described in :mod:`histotile.training.fit`; ``arch="xgboost"`` trains the classical
baseline (:mod:`histotile.training.xgboost`) instead, with the same model-folder layout, from
Python as from the CLI.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histotile import fileio
from histotile.errors import InvalidArgumentError
from histotile.models.architectures import architecture_names
from histotile.models.card import Metrics
from histotile.models.loading import resolve_device
from histotile.models.preprocess import BatchPipeline
from histotile.training.card import build_card
from histotile.training.config import TrainConfig
from histotile.training.datasets import load_dataset
from histotile.training.fit import cross_validate, fit, module_from_state, save_weights
from histotile.training.loop import channel_stats, predict_probs
from histotile.training.report import full_metrics, headline, write_reports
from histotile.training.xgboost import train_xgboost


def default_command(**kwargs: Any) -> str:
    """The command line that started this process, or a Python call when run as a library."""
    return fileio.command_line(call=fileio.python_call("train", **kwargs))


def train(dataset: str | Path, out_dir: str | Path = "histotile-model", arch: str = "smallcnn",
          epochs: int = 30, batch_size: int = 128, lr: float = 1e-3, data_dir: str | Path | None
          = None, download: bool = False, size: int | None = None, stain_norm: str = "none",
          augment: bool = True, seed: int = 0, resume: bool = False, device: str = "auto",
          workers: int = 0, val_fraction: float = 0.1, *, optimizer: str = "adam",
          stain_reference: str = "default", stain_train: bool = True,
          label_smoothing: float = 0.0,
          weight_decay: float | None = None, labels: str | Path | None = None,
          mpp: float | None = None, cv: int = 0, name: str | None = None,
          arch_kwargs: dict[str, Any] | None = None, notes: str = "", command: str | None = None,
          progress: bool = True, max_steps: int | None = None, n_boot: int = 1000,
          plots: bool = True,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
          pretrained: str | None = None) -> Path:
    """Train a patch classifier and write a complete model folder; returns ``out_dir``.

    See the module docstring for the recipe. ``cv=k`` adds stratified k-fold CV accuracy to the
    card (k extra trainings). ``max_steps`` stops early (smoke tests); ``n_boot`` bootstrap
    resamples for the confidence intervals; ``plots=False`` skips the pictures.
    """
    out = Path(out_dir)
    if arch not in architecture_names():
        raise InvalidArgumentError(f"unknown architecture {arch!r}",
                                   f"choose one of: {', '.join(architecture_names())}")
    if arch == "xgboost":  # gradient-boosted trees: the same folder, no epochs or optimiser
        asked = {k: v for k, v in locals().items() if k in _NEURAL_ONLY and v != _DEFAULTS[k]}
        return train_xgboost(dataset, out_dir, data_dir=data_dir, download=download, size=size,
                             val_fraction=val_fraction, seed=seed, labels=labels, mpp=mpp,
                             name=name, notes=notes, command=command, progress=progress,
                             n_boot=n_boot, plots=plots, arch_kwargs=arch_kwargs, **asked)
    if stain_norm not in {"none", "macenko"}:
        raise InvalidArgumentError(f"unknown stain normalisation {stain_norm!r}",
                                   "use none or macenko")
    if stain_norm == "none" and (str(stain_reference) != "default" or not stain_train):
        raise InvalidArgumentError("--stain-reference / --no-stain-train need a stain method",
                                   "add --stain-norm macenko")
    wd = (0.05 if optimizer == "adamw" else 0.0) if weight_decay is None else weight_decay
    cfg = TrainConfig(dataset=str(dataset), arch=arch, epochs=epochs, batch_size=batch_size,
                      lr=lr, optimizer=optimizer, weight_decay=wd, size=size,
                      stain_norm=stain_norm, stain_reference=str(stain_reference),
                      stain_train=stain_train, label_smoothing=label_smoothing,
                      augment=augment, seed=seed,
                      val_fraction=val_fraction, arch_kwargs=dict(arch_kwargs or {}),
                      pretrained=pretrained)
    data = load_dataset(dataset, data_dir, download=download, size=size,
                        val_fraction=val_fraction, seed=seed, labels=labels, mpp=mpp)
    if cv and cv > 1 and data.name == "labelled-archives":  # histotile.training.labelled
        raise InvalidArgumentError("--cv folds are drawn over patches: patches of one slide "
                                   "would be on both sides", "leave out --cv (the validation "
                                   "split already holds whole slides out)", subject="--cv")
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    command = command or default_command(dataset=str(dataset), out_dir=str(out_dir), arch=arch,
                                         epochs=epochs, seed=seed)
    card = build_card(cfg, data, name or out.name, command, [0.5] * 3, [0.5] * 3)
    card.input.mean, card.input.std = channel_stats(data.train, card, dev)
    best, history = fit(cfg, data, card, out, device=dev, workers=workers, resume=resume,
                        progress=progress, on_epoch_end=on_epoch_end, max_steps=max_steps)
    card.weights.sha256 = save_weights(best["state"], out)
    module = module_from_state(cfg, card, best["state"], dev)
    pipe = BatchPipeline(card, dev)
    metrics: dict[str, Any] = {"best_epoch": best["epoch"]}
    val_probs = predict_probs(module, data.val, pipe, batch_size, workers)
    metrics["validation"] = full_metrics(data.val.labels, val_probs, card.class_names, n_boot)
    card.metrics = Metrics(validation=headline(metrics["validation"], data.val_source),
                           best_epoch=best["epoch"])
    if data.test is not None:
        test_probs = predict_probs(module, data.test, pipe, batch_size, workers, progress,
                                   "test")
        metrics["test"] = full_metrics(data.test.labels, test_probs, card.class_names, n_boot)
        card.metrics.test = headline(metrics["test"], "official test split")
    if cv and cv > 1:
        metrics["cross_validation"] = cross_validate(cfg, data, card, cv, device=dev,
                                                     workers=workers, progress=progress)
        card.metrics.cross_validation = {k: v for k, v in metrics["cross_validation"].items()
                                            if k != "accuracy_per_fold"}
    card.notes = notes or card.notes
    write_reports(out, metrics, history, data.val.labels, val_probs, card.class_names, plots)
    card.save(out)
    return out


# train()'s options that only a neural network uses (XGBoost logs the ones given and skips them)
_NEURAL_ONLY = ("epochs", "batch_size", "lr", "stain_norm", "augment", "resume", "device",
                "workers", "optimizer", "stain_reference", "stain_train", "label_smoothing",
                "weight_decay", "cv", "max_steps", "on_epoch_end", "pretrained")
_DEFAULTS = {k: p.default for k, p in inspect.signature(train).parameters.items()}
