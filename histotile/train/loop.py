"""The training loop and evaluation behind ``histotile train`` / ``histotile evaluate``.

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

import csv
import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import DatasetError, InvalidArgumentError, ModelError
from histotile.models.preprocess import BatchPipeline

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histotile.models.card import ModelCard
    from histotile.train.datasets import DatasetSplits, PatchSet

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.safetensors"
STAIN_JITTER_SIGMA = 0.05


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint and the card)."""

    dataset: str
    arch: str = "smallcnn"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    size: int | None = None
    stain_norm: str = "none"
    stain_reference: str = "default"
    stain_train: bool = True
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # "imagenet": torchvision weights (models/pretrained.py)


# --------------------------------------------------------------------------- batch pipeline
# BatchPipeline (the model's preprocessing) lives in the model layer; training injects its
# augmentation (augment_batch) into it.


def augment_batch(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Per-patch random flips, 90° rotations and HED jitter on a uint8 NHWC batch."""
    import torch

    n = x.shape[0]
    r = torch.rand((n, 3), generator=gen).to(x.device)
    x = torch.where((r[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(2), x)
    x = torch.where((r[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(1), x)
    k = (r[:, 2] * 4).long().clamp(max=3)
    if x.shape[1] == x.shape[2]:
        x = x.clone()
        for turns in (1, 2, 3):
            sel = k == turns
            if bool(sel.any()):
                x[sel] = torch.rot90(x[sel], turns, dims=(1, 2))
    try:
        from histotile.stain import stain_jitter
    except ImportError:
        return x
    return stain_jitter(x, sigma=STAIN_JITTER_SIGMA, generator=gen, channels_last=True)


def make_loader(ps: PatchSet, batch_size: int, workers: int, shuffle: bool = False,
                gen: torch.Generator | None = None, pin: bool = False) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(ps, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=workers, pin_memory=pin, drop_last=False,
                      persistent_workers=False)


def predict_probs(module: nn.Module, ps: PatchSet, pipeline: BatchPipeline, batch_size: int = 256,
                  workers: int = 0, progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Softmax probabilities (N, C) of ``module`` over a patch set, in order."""
    import torch
    from tqdm import tqdm

    module.eval()
    out = []
    loader = make_loader(ps, batch_size, workers, pin=pipeline.device.type == "cuda")
    with torch.inference_mode(), _autocast(pipeline.device):
        for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out.append(torch.softmax(module(pipeline(x)).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, pipeline.card.num_classes), np.float32)


def _autocast(device: torch.device) -> Any:
    import contextlib

    import torch

    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# --------------------------------------------------------------------------- card helpers
def channel_stats(ps: PatchSet, card: ModelCard, device: torch.device,
                  max_patches: int = 2048) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0-1 scale) of up to ``max_patches`` training patches (after stain
    normalisation when the card asks for it)."""
    import torch

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(ps), size=min(len(ps), max_patches), replace=False))
    x = torch.from_numpy(np.stack([ps[int(i)][0] for i in idx]))
    stain = BatchPipeline(card, device).normalizer  # what the model's input goes through
    if stain is not None:
        x = stain.normalize(x.to(device)).cpu()
    f = x.double().div(255.0).reshape(-1, 3)
    return [round(v, 4) for v in f.mean(0).tolist()], [round(max(v, 1e-3), 4)
                                                        for v in f.std(0).tolist()]


def build_card(cfg: TrainConfig, data: DatasetSplits, name: str, command: str,
               mean: list[float], std: list[float]) -> ModelCard:
    from histotile.models.card import ClassInfo, ModelCard

    if data.mpp is None:
        raise DatasetError("the pixel size of these patches is unknown",
                           "pass --mpp (microns per pixel of the patches)", subject=cfg.dataset)
    stain: dict[str, Any] = {"method": cfg.stain_norm, "reference": None}
    if cfg.stain_norm == "macenko":
        stain["reference"] = stain_reference(cfg.stain_reference, data).to_dict()
        stain["in_training"] = cfg.stain_train
    return ModelCard(
        name=name, version="1.0", architecture={"name": cfg.arch, "kwargs": cfg.arch_kwargs},
        classes=[ClassInfo(n, tuple(c))
                 for n, c in zip(data.class_names, data.colors, strict=True)],
        patch_size=data.patch_size, mpp=round(float(data.mpp), 6),
        input={"mean": mean, "std": std}, stain=stain,
        weights={"file": WEIGHTS, "sha256": "0" * 64, "format": "safetensors"},
        training={"data": data.description, "data_md5": _data_md5(data.files),
                  "command": command, "seed": cfg.seed, "val_split": data.val_source,
                  "val_fraction": cfg.val_fraction,
                  "recipe": _recipe(cfg), "n_train": len(data.train), "n_val": len(data.val)},
        license="CC-BY-4.0" if data.name == "pathmnist" else "",
    )


def stain_reference(spec: str, data: DatasetSplits, max_patches: int = 4096) -> Any:
    """The Macenko reference ``spec`` names: ``default``, ``fit`` (pooled pixels of up to
    ``max_patches`` training patches, seeded sample) or an image file."""
    from histotile.stain import MacenkoNormalizer, StainReference

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
    from histotile.download import file_digest

    if len(files) != 1 or files[0].stat().st_size > limit:
        return ";".join(f"{p.name}:{file_digest(p, 'md5')}" for p in files
                        if p.stat().st_size <= limit) or None
    return file_digest(files[0], "md5")


def default_command(**kwargs: Any) -> str:
    """The command line that started this process, or a Python call when run as a library."""
    argv0 = Path(sys.argv[0]) if sys.argv else Path()
    if argv0.name == "histotile" or argv0.parts[-2:] == ("histotile", "__main__.py"):
        return shlex.join(["histotile", *sys.argv[1:]])
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"histotile.train({args})"


# --------------------------------------------------------------------------- training
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

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the checkpoint cannot be used
        raise ModelError(f"cannot read the checkpoint ({type(exc).__name__})",
                         "delete it and train without --resume", subject=str(path)) from None


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _val_metrics(module: nn.Module, ps: PatchSet, pipeline: BatchPipeline, batch_size: int,
                 workers: int) -> tuple[dict[str, float], np.ndarray]:
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

    from histotile.models.architectures import build_model

    torch.manual_seed(cfg.seed)
    module = build_model(cfg.arch, card.num_classes, card.patch_size, **cfg.arch_kwargs)
    if cfg.pretrained:
        from histotile.models.pretrained import load_pretrained

        card.training.pretrained = load_pretrained(module, cfg.arch, cfg.pretrained,
                                                      progress=progress)
    module = module.to(device=device, memory_format=torch.channels_last)
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
            with _autocast(device):
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

    from histotile.download import file_digest

    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out_dir / WEIGHTS)
    return file_digest(out_dir / WEIGHTS)


def cross_validate(cfg: TrainConfig, data: DatasetSplits, card: ModelCard, folds: int, *,
                   device: torch.device, workers: int, progress: bool) -> dict[str, Any]:
    """Stratified k-fold CV accuracy of the same recipe on train ∪ val (when val is held out
    from train) or on train alone (official val)."""
    import tempfile

    from sklearn.model_selection import StratifiedKFold

    from histotile.train.datasets import Subset

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
        module = _module_from_state(cfg, card, best["state"], device)
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


def _module_from_state(cfg: TrainConfig, card: ModelCard, state: dict[str, Any],
                       device: torch.device) -> nn.Module:
    import torch

    from histotile.models.architectures import build_model

    module = build_model(cfg.arch, card.num_classes, card.patch_size, **cfg.arch_kwargs)
    module.load_state_dict(state)
    return module.to(device=device, memory_format=torch.channels_last).eval()


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
    from histotile.models.architectures import architecture_names
    from histotile.models.loading import resolve_device
    from histotile.train.datasets import load_dataset

    out = Path(out_dir)
    if arch not in architecture_names():
        raise InvalidArgumentError(f"unknown architecture {arch!r}",
                                   f"choose one of: {', '.join(architecture_names())}")
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
    if cv and cv > 1 and data.name == "labelled-archives":  # histotile.train.labelled
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
    module = _module_from_state(cfg, card, best["state"], dev)
    pipe = BatchPipeline(card, dev)
    metrics: dict[str, Any] = {"best_epoch": best["epoch"]}
    val_probs = predict_probs(module, data.val, pipe, batch_size, workers)
    metrics["validation"] = _full_metrics(data.val.labels, val_probs, card.class_names, n_boot)
    card.metrics = {"validation": _headline(metrics["validation"], data.val_source),
                    "best_epoch": best["epoch"]}
    if data.test is not None:
        test_probs = predict_probs(module, data.test, pipe, batch_size, workers, progress,
                                   "test")
        metrics["test"] = _full_metrics(data.test.labels, test_probs, card.class_names, n_boot)
        card.metrics.test = _headline(metrics["test"], "official test split")
    if cv and cv > 1:
        metrics["cross_validation"] = cross_validate(cfg, data, card, cv, device=dev,
                                                     workers=workers, progress=progress)
        card.metrics.cross_validation = {k: v for k, v in metrics["cross_validation"].items()
                                            if k != "accuracy_per_fold"}
    card.notes = notes or card.notes
    _write_reports(out, metrics, history, data.val.labels, val_probs, card.class_names, plots)
    card.save(out)
    return out


def _headline(m: dict[str, Any], split: str) -> dict[str, Any]:
    keys = ("accuracy", "balanced_accuracy", "auc", "n")
    out = {k: m[k] for k in keys if k in m}
    if "ci" in m:
        out["ci95"] = {k: m["ci"][k] for k in ("accuracy", "auc") if k in m["ci"]}
    out["split"] = split
    return out


def _full_metrics(y: np.ndarray, probs: np.ndarray, names: list[str],
                  n_boot: int = 1000) -> dict[str, Any]:
    try:
        from histotile.train.metrics import compute_metrics
    except ImportError:
        return {"accuracy": float(np.mean(probs.argmax(1) == y)), "auc": _auc(y, probs),
                "n": int(len(y))}
    m = compute_metrics(y, probs, names, n_boot=n_boot)
    m.setdefault("n", int(len(y)))
    return m


def _write_reports(out: Path, metrics: dict[str, Any], history: list[dict[str, Any]] | None,
                   y: np.ndarray, probs: np.ndarray, names: list[str],
                   plots: bool = True) -> list[Path]:
    """metrics.json, history.csv and the pictures (report.py); without plots (or report.py)
    only the JSON and CSV."""
    write_report = None
    if plots:
        try:
            from histotile.train.report import write_report
        except ImportError:
            log.warning("histotile.train.report is not available: no plots")
    if write_report is not None:
        return write_report(out, metrics, history, y, probs, names)
    paths = [_atomic_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")]
    if history:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
        paths.append(_atomic_text(out / "history.csv", buf.getvalue()))
    return paths


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
