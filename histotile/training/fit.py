"""Training epochs, checkpoints and resume, and k-fold cross-validation.

Default recipe (MedMNIST v2, Yang et al. 2023): Adam, lr 1e-3, batch 128, cross-entropy, the
learning rate ×0.1 at 50 % and 75 % of the epochs; ``optimizer="adamw"`` uses AdamW (weight decay
0.05). Augmentation (``augment=True``): random horizontal/vertical flips, 90° rotations and a light
HED stain jitter (Tellez et al. 2018, σ = 0.05). ``stain_norm="macenko"`` records Macenko in the
card with ``stain_reference``: ``"default"`` (the standard reference), ``"fit"`` (fitted on the
pooled training patches, e.g. PathMNIST, whose source NCT-CRC-HE-100K was Macenko-normalised, so
its colours are the target) or an image path. With ``stain_train=True`` every training patch is
normalised to that reference before augmentation; with ``False`` the patches are used as they are
(data already normalised to it) and only ``predict`` normalises slides to the reference (the card's
``stain.in_training`` says which, and :class:`BatchPipeline` follows it). ``label_smoothing`` for
the cross-entropy. AMP (bf16, else
fp16 + GradScaler) on CUDA. A checkpoint (model, optimizer, scheduler, scaler, epoch, RNG states,
history, best weights) is written atomically after every epoch; ``resume=True`` continues from it
exactly. The shuffling, augmentation and dropout of epoch ``e`` are seeded with ``(seed, e)`` so a
resumed run equals an uninterrupted one. The best epoch by validation accuracy (ties: lower
validation loss) gives the saved weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile import fileio
from histotile.download import file_digest
from histotile.errors import InvalidArgumentError, ModelError
from histotile.models.architectures import build_model
from histotile.models.preprocess import BatchPipeline
from histotile.models.pretrained import load_pretrained
from histotile.training.config import CHECKPOINT, WEIGHTS, TrainConfig
from histotile.training.datasets import Subset
from histotile.training.loop import augment_batch, autocast, make_loader, predict_probs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histotile.models.card import ModelCard
    from histotile.training.datasets import DatasetSplits, PatchSet

log = logging.getLogger(__name__)


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    import torch

    torch.manual_seed(seed * 100_003 + epoch)
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _build_optim(cfg: TrainConfig, module: nn.Module) -> tuple[Any, Any]:
    import torch

    if cfg.optimizer not in {"adam", "adamw"}:
        raise InvalidArgumentError(f"unknown optimizer {cfg.optimizer!r}", "use adam or adamw")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = cls(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    milestones = sorted({max(1, int(round(cfg.epochs * f))) for f in (0.5, 0.75)})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return opt, sched


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    with fileio.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the checkpoint cannot be used
        raise ModelError(f"cannot read the checkpoint ({type(exc).__name__})",
                         "delete it and train without --resume", subject=str(path)) from None


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _val_metrics(module: nn.Module, ps: PatchSet, pipeline: BatchPipeline, batch_size: int,
                 workers: int) -> tuple[dict[str, float | None], np.ndarray]:
    probs = predict_probs(module, ps, pipeline, batch_size, workers)
    y = ps.labels
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    acc = float(np.mean(probs.argmax(1) == y))
    return {"val_loss": loss, "val_accuracy": acc, "val_auc": _auc(y, probs)}, probs


def _auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    try:
        if probs.shape[1] == 2:
            return float(roc_auc_score(y, probs[:, 1]))
        return float(roc_auc_score(y, probs, multi_class="ovr", average="macro",
                                   labels=list(range(probs.shape[1]))))
    except ValueError:  # a class absent from this split
        return None


def fit(cfg: TrainConfig, data: DatasetSplits, card: ModelCard, out_dir: Path, *,
        device: torch.device, workers: int = 0, resume: bool = False, progress: bool = True,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
        max_steps: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train with checkpoints; returns (best state_dict on CPU, history)."""
    import torch
    from tqdm import tqdm


    torch.manual_seed(cfg.seed)
    module = build_model(cfg.arch, card.num_classes, card.patch_size, **cfg.arch_kwargs)
    if cfg.pretrained:

        card.training.pretrained = load_pretrained(module, cfg.arch, cfg.pretrained,
                                                   progress=progress)
    module = module.to(device).to(memory_format=torch.channels_last)
    opt, sched = _build_optim(cfg, module)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    train_pipe = BatchPipeline(card, device, augment=augment_batch if cfg.augment else None)
    eval_pipe = BatchPipeline(card, device)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "state": None, "epoch": -1}
    start = 0
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        ck = _load_checkpoint(ckpt_path)
        if {**_cfg_key(TrainConfig(cfg.dataset)), **ck["config"]} != _cfg_key(cfg):
            raise InvalidArgumentError(
                "the checkpoint was written by a different run configuration",
                f"resume with the same options ({ck['config']}) or use a new -o folder",
                subject=str(ckpt_path))
        module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        history, best, start = ck["history"], ck["best"], ck["epoch"] + 1
        _set_rng_state(ck["rng"])
        log.info("resuming from epoch %d of %d (%s)", start + 1, cfg.epochs, ckpt_path)
    elif resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out_dir)
    steps = 0
    for epoch in range(start, cfg.epochs):
        gen = _seed_epoch(cfg.seed, epoch)
        loader = make_loader(data.train, cfg.batch_size, workers, shuffle=True, gen=gen,
                             pin=device.type == "cuda")
        module.train()
        total, n_seen, correct = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for x, y in bar:
            inputs = train_pipe(x, gen)
            y = y.to(device, non_blocking=True)
            with autocast(device):
                logits = module(inputs)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * len(y)
            n_seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{total / n_seen:.3f}", acc=f"{correct / n_seen:.3f}")
            steps += 1
            if max_steps and steps >= max_steps:
                break
        lr = opt.param_groups[0]["lr"]
        sched.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(n_seen, 1),
               "train_accuracy": correct / max(n_seen, 1)}
        row.update(_val_metrics(module, data.val, eval_pipe, cfg.batch_size, workers)[0])
        history.append(row)
        score = (row["val_accuracy"], -row["val_loss"])
        if best["score"] is None or score > tuple(best["score"]):
            best = {"score": list(score), "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}}
        _atomic_torch_save({"config": _cfg_key(cfg), "epoch": epoch, "model": module.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "scaler": scaler.state_dict(), "history": history, "best": best,
                            "rng": _rng_state()}, ckpt_path)
        log.info("epoch %d/%d: loss %.4f, val acc %.4f, val loss %.4f", epoch + 1, cfg.epochs,
                 row["train_loss"], row["val_accuracy"], row["val_loss"])
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if max_steps and steps >= max_steps:
            break
    if best["state"] is None:
        best["state"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return best, history


def _cfg_key(cfg: TrainConfig) -> dict[str, Any]:
    """The options a resumed run must share with the checkpoint (epochs may grow)."""
    d = dict(cfg.__dict__)
    d.pop("epochs")
    return json.loads(json.dumps(d))


def save_weights(state: dict[str, Any], out_dir: Path) -> str:
    """Write ``weights.safetensors`` atomically; returns its sha256."""
    from safetensors.torch import save_file


    with fileio.atomic_path(out_dir / WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return file_digest(out_dir / WEIGHTS)


def cross_validate(cfg: TrainConfig, data: DatasetSplits, card: ModelCard, folds: int, *,
                   device: torch.device, workers: int, progress: bool) -> dict[str, Any]:
    """Stratified k-fold CV accuracy of the same recipe on train ∪ val (when val is held out
    from train) or on train alone (official val)."""
    import tempfile

    from sklearn.model_selection import StratifiedKFold


    pool = data.train
    if isinstance(data.train, Subset) and isinstance(data.val, Subset) \
            and data.train.base is data.val.base:
        pool = data.train.base
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    accs, aucs = [], []
    for k, (tr, va) in enumerate(skf.split(np.zeros(len(pool)), pool.labels)):
        fold = _replace(data, train=pool.subset(tr), val=pool.subset(va))
        with tempfile.TemporaryDirectory() as tmp:
            best, _ = fit(cfg, fold, card, Path(tmp), device=device, workers=workers,
                          progress=progress)
        module = module_from_state(cfg, card, best["state"], device)
        probs = predict_probs(module, fold.val, BatchPipeline(card, device), cfg.batch_size,
                              workers)
        accs.append(float(np.mean(probs.argmax(1) == fold.val.labels)))
        aucs.append(_auc(fold.val.labels, probs))
        log.info("CV fold %d/%d: accuracy %.4f", k + 1, folds, accs[-1])
    return {"folds": folds, "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)), "accuracy_per_fold": accs,
            "auc_mean": float(np.mean([a for a in aucs if a is not None])) if any(aucs) else None,
            "n": len(pool), "note": "stratified k-fold, same recipe, best epoch per fold"}


def _replace(data: DatasetSplits, **kw: Any) -> DatasetSplits:
    import dataclasses

    return dataclasses.replace(data, **kw)


def module_from_state(cfg: TrainConfig, card: ModelCard, state: dict[str, Any],
                       device: torch.device) -> nn.Module:
    import torch


    module = build_model(cfg.arch, card.num_classes, card.patch_size, **cfg.arch_kwargs)
    module.load_state_dict(state)
    return module.to(device).to(memory_format=torch.channels_last).eval()
