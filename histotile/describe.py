"""Dataset views: class balance, t-SNE, sample grids and summary statistics.

``describe(data, out_dir)`` (CLI ``histotile describe DATA -o DIR``) opens any training source
:func:`histotile.training.datasets.load_dataset` reads (MedMNIST npz, PCam HDF5 folder or
``*_x.h5``, Kaggle folder, image folder, tile archive + labels) and writes:

* ``balance.png`` — class counts per split (all patches, labels only: no image is read);
* ``tsne.png`` — scikit-learn t-SNE of a seeded subsample (default 5,000), coloured by class: on
  pixels (scaled to [0, 1], PCA to 50 components first) or, with ``model``, on the model's
  embeddings (the input of its last linear layer);
* ``samples.png`` — up to 8 random patches per class;
* ``summary.json`` — counts per split and class, image size, per-channel mean/std (0-1 scale,
  over the subsample), the subsample size and seed, the embedding used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError, ModelError
from histotile.export.figures import new_figure, save_figure
from histotile.fileio import write_json
from histotile.models.loading import load_model
from histotile.models.preprocess import BatchPipeline
from histotile.training.datasets import Subset, load_dataset

if TYPE_CHECKING:
    from histotile.training.datasets import DatasetSplits, PatchSet

log = logging.getLogger(__name__)
SAMPLES_PER_CLASS = 8


def _splits(data: DatasetSplits) -> dict[str, PatchSet]:
    """The data's own splits: a validation set held out by the loader goes back into train,
    and a set used for two splits (test-only npz) is counted once."""

    out: dict[str, PatchSet] = {}
    if data.val_source != "official" and isinstance(data.train, Subset) \
            and isinstance(data.val, Subset) and data.train.base is data.val.base:
        out["train"] = data.train.base
    for name in ("train", "val", "test"):
        ps = getattr(data, name)
        if name in out or ps is None or (name == "val" and "train" in out and
                                          data.val_source != "official"):
            continue
        if all(ps is not other for other in out.values()):
            out[name] = ps
    return out


def _counts(splits: dict[str, PatchSet], n_classes: int) -> dict[str, list[int]]:
    return {s: np.bincount(ps.labels, minlength=n_classes).tolist() for s, ps in splits.items()}


def _subsample(splits: dict[str, PatchSet], n: int, seed: int
               ) -> list[tuple[PatchSet, int]]:
    """``n`` (patch set, index) pairs drawn without replacement over all splits, seeded."""
    pool = [(ps, i) for ps in splits.values() for i in range(len(ps))]
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
    return [pool[int(k)] for k in take]


def _read(items: list[tuple[PatchSet, int]], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    images, labels = [], []
    for ps, i in tqdm(items, desc="reading patches", disable=not progress, leave=False):
        img, y = ps[i]
        images.append(img)
        labels.append(y)
    return np.stack(images), np.asarray(labels, np.int64)


def pixel_features(images: np.ndarray, seed: int = 0, components: int = 50) -> np.ndarray:
    """Flattened pixels in [0, 1], reduced with PCA to ``components`` (fewer when n is small)."""
    from sklearn.decomposition import PCA

    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    k = min(components, len(x) - 1, x.shape[1])
    return PCA(n_components=k, random_state=seed).fit_transform(x) if k >= 2 else x


def model_embeddings(model: str | Path, images: np.ndarray, device: str = "auto",
                     batch_size: int = 256, progress: bool = True) -> tuple[np.ndarray, str]:
    """The input of the model's last ``nn.Linear`` for each patch (its embedding)."""
    import torch
    from torch import nn
    from tqdm import tqdm


    loaded = load_model(model, device)
    card = loaded.card
    if images.shape[1] != card.patch_size:
        raise InvalidArgumentError(
            f"patches are {images.shape[1]} px but the model expects {card.patch_size} px",
            "pick a model made for this data's patch size (or pass --size)")
    linears = [(n, m) for n, m in loaded.module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("the model has no linear layer to take embeddings from",
                         "use t-SNE on pixels (no --model)")
    name, head = linears[-1]
    store: list[np.ndarray] = []
    handle = head.register_forward_hook(
        lambda _m, inp, _o: store.append(inp[0].detach().float().flatten(1).cpu().numpy()))
    pipe = BatchPipeline(card, loaded.device)
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(images), batch_size), desc="embeddings",
                          disable=not progress, leave=False):
                loaded.module(pipe(torch.from_numpy(images[s:s + batch_size])))
    finally:
        handle.remove()
    return np.concatenate(store), f"{card.name}: input of {name} ({store[0].shape[1]}-d)"


def tsne(features: np.ndarray, seed: int = 0, perplexity: float = 30.0,
         progress: bool = False) -> np.ndarray:
    """2-D scikit-learn t-SNE (PCA init); perplexity lowered for tiny samples. ``progress``: a
    bar on stderr that follows the optimisation's iterations (minutes on 5,000 patches)."""
    from sklearn.manifold import TSNE

    if len(features) < 3:
        raise InvalidArgumentError(f"t-SNE needs at least 3 patches, got {len(features)}",
                                   "describe a larger dataset")
    perp = float(min(perplexity, max(1.0, (len(features) - 1) / 3)))
    est = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed,
               learning_rate="auto", verbose=2 if progress else 0)
    x = features.astype(np.float32)
    if not progress:
        return est.fit_transform(x)
    with _TsneProgress(est.get_params().get("max_iter") or 1000, len(x)) as stream, \
            contextlib.redirect_stdout(stream):
        xy = est.fit_transform(x)
        stream.finish(getattr(est, "n_iter_", None))
    return xy


class _TsneProgress(io.TextIOBase):
    """Turns scikit-learn's verbose t-SNE lines (``[t-SNE] Iteration 50: ...``) into a tqdm bar
    instead of printing them: neighbours first, then one step per 50 iterations."""

    _ITER = re.compile(r"\[t-SNE\] Iteration (\d+)")

    def __init__(self, total: int, n: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"t-SNE of {n:,} patches", unit="it", leave=False,
                        file=sys.stderr, postfix="neighbours")

    def write(self, text: str) -> int:
        for m in self._ITER.finditer(text):
            if self.bar.postfix:
                self.bar.set_postfix_str("", refresh=False)
            self.bar.update(max(0, min(int(m.group(1)), self.bar.total) - self.bar.n))
        return len(text)

    def finish(self, n_iter: int | None) -> None:
        """The optimisation ended (``n_iter``: where it stopped early): the bar shows it done."""
        final = max(self.bar.n, min(self.bar.total, n_iter or self.bar.total))
        self.bar.total = final
        self.bar.update(final - self.bar.n)
        self.bar.refresh()

    def __enter__(self) -> _TsneProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


# --------------------------------------------------------------------------- pictures
def _rgb(colors: list[tuple[int, int, int]], k: int) -> tuple[float, ...]:
    return tuple(c / 255 for c in colors[k])


def plot_balance(counts: dict[str, list[int]], names: list[str],
                 colors: list[tuple[int, int, int]], path: Path, title: str) -> Path:
    """Horizontal stacked bars: patches per class, one segment per split, totals written."""
    fig = new_figure(7.5, 0.45 * len(names) + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    left = np.zeros(len(names))
    shades = {"train": 1.0, "val": 0.6, "test": 0.35}
    for split, c in counts.items():
        vals = np.asarray(c, float)
        ax.barh(range(len(names)), vals, left=left, label=split, alpha=shades.get(split, 0.8),
                color=[_rgb(colors, k) for k in range(len(names))], edgecolor="black", lw=0.4)
        left += vals
    for k, total in enumerate(left):
        ax.text(total, k, f" {int(total):,} ({100 * total / max(left.sum(), 1):.1f} %)",
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("patches")
    ax.set_xlim(0, left.max() * 1.3 if left.max() else 1)
    ax.set_title(title, fontsize=9)
    if len(counts) > 1:
        ax.legend(title="split (shade)", fontsize=7)
    return save_figure(fig, path)


def plot_tsne(xy: np.ndarray, labels: np.ndarray, names: list[str],
              colors: list[tuple[int, int, int]], path: Path, title: str) -> Path:
    fig = new_figure(7.5, 6.0)
    ax = fig.add_subplot(1, 1, 1)
    size = 14 if len(xy) < 1000 else 5
    for k, name in enumerate(names):
        sel = labels == k
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=_rgb(colors, k), label=name,
                       alpha=0.8, edgecolors="none")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)


def plot_samples(images: np.ndarray, labels: np.ndarray, names: list[str], path: Path,
                 seed: int = 0, per_class: int = SAMPLES_PER_CLASS) -> Path:
    """A row of up to ``per_class`` random patches per class."""
    rng = np.random.default_rng(seed)
    fig = new_figure(1.1 * per_class + 2.2, 1.15 * len(names) + 0.4)
    for k, name in enumerate(names):
        idx = np.flatnonzero(labels == k)
        pick: np.ndarray = rng.choice(idx, size=min(per_class, len(idx)), replace=False) \
            if len(idx) else np.zeros(0, np.int64)
        for j in range(per_class):
            ax = fig.add_subplot(len(names), per_class, k * per_class + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(pick):
                ax.imshow(images[int(pick[j])], interpolation="nearest")
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- entry point
def describe(data: str | Path, out_dir: str | Path, *, n: int = 5000, seed: int = 0,
             model: str | Path | None = None, labels: str | Path | None = None,
             size: int | None = None, mpp: float | None = None, device: str = "auto",
             perplexity: float = 30.0, progress: bool = True) -> dict[str, Any]:
    """Write balance.png, tsne.png, samples.png and summary.json; returns the summary."""

    if n < 3:
        raise InvalidArgumentError(f"-n must be at least 3, got {n}", "use e.g. -n 5000")
    t0 = time.perf_counter()
    ds = load_dataset(data, size=size, labels=labels, mpp=mpp, seed=seed)
    names, colors = ds.class_names, ds.colors
    splits = _splits(ds)
    counts = _counts(splits, len(names))
    images, y = _read(_subsample(splits, n, seed), progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = int(sum(sum(c) for c in counts.values()))
    plot_balance(counts, names, colors, out / "balance.png",
                 f"{ds.description}: {total:,} patches")
    if model is None:
        feats, how = pixel_features(images, seed), "pixels (PCA to 50 components)"
    else:
        feats, how = model_embeddings(model, images, device, progress=progress)
    xy = tsne(feats, seed, perplexity, progress=progress)
    plot_tsne(xy, y, names, colors, out / "tsne.png",
              f"t-SNE of {len(y):,} patches (seed {seed}) · {how}")
    plot_samples(images, y, names, out / "samples.png", seed)
    f = images.reshape(-1, 3).astype(np.float64) / 255.0
    summary = {
        "data": str(data), "description": ds.description, "classes": names,
        "counts": {s: dict(zip(names, c, strict=True)) for s, c in counts.items()},
        "total": total,
        "class_totals": dict(zip(names, np.sum(list(counts.values()), axis=0).tolist(),
                                 strict=True)),
        "image_size": list(images.shape[1:]), "mpp": ds.mpp, "val_source": ds.val_source,
        "subsample": {"n": int(len(y)), "seed": seed,
                      "counts": dict(zip(names, np.bincount(y, minlength=len(names)).tolist(),
                                         strict=True))},
        "channel_mean": [round(v, 4) for v in f.mean(0).tolist()],
        "channel_std": [round(v, 4) for v in f.std(0).tolist()],
        "channel_stats_over": "the subsample, 0-1 scale, RGB",
        "tsne": {"features": how, "perplexity": float(min(perplexity,
                                                          max(1.0, (len(y) - 1) / 3)))},
        "files": ["balance.png", "tsne.png", "samples.png", "summary.json"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / "summary.json", summary)
    return summary
