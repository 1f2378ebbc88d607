"""Explanation pictures: Grad-CAM / attention patch grids and the slide-level CAM overlay.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch) and written atomically (:mod:`histotile.fileio`). matplotlib is imported inside the
functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histotile.fileio import atomic_path
from histotile.resample import upsample_maps
from histotile.stitch import as_pair, open_heatmap, read_gradcam

_EPS = 1e-7


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of ``width`` x ``height`` inches on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def minmax_np(cams: np.ndarray) -> np.ndarray:
    """Per map ``(m - min) / (max - min + 1e-7)`` in float32 (for display)."""
    lo = cams.min(axis=(1, 2), keepdims=True)
    hi = cams.max(axis=(1, 2), keepdims=True)
    return ((cams - lo) / (hi - lo + _EPS)).astype(np.float32)


def write_gradcam_overlay(path: str | Path, thumbnail: np.ndarray, cam: np.ndarray, *,
                          thumb_downsample: float, cam_pixel_level0: float,
                          origin_level0: Sequence[float] = (0, 0),
                          coverage: np.ndarray | None = None, cam_scale: float | None = None,
                          alpha: float = 0.5, cmap: str = "jet", title: str = "Grad-CAM",
                          label: str = "Grad-CAM / cam_scale (raw map; 1 = slide maximum)",
                          ) -> Path:
    """``gradcam_overlay.png``: the thumbnail with the CAM map (colormap where covered) and a
    colour bar (values over ``cam_scale``, default the map's maximum). ``cam`` (rows, cols)
    covers ``cam_pixel_level0`` level-0 px per pixel from ``origin_level0``; the thumbnail
    ``thumb_downsample`` level-0 px per pixel."""
    th, tw = thumbnail.shape[:2]
    ys = ((np.arange(th) + 0.5) * thumb_downsample - origin_level0[1]) / cam_pixel_level0
    xs = ((np.arange(tw) + 0.5) * thumb_downsample - origin_level0[0]) / cam_pixel_level0
    yi, xi = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    inside = ((yi >= 0) & (yi < cam.shape[0]))[:, None] & ((xi >= 0) & (xi < cam.shape[1]))[None]
    yc, xc = np.clip(yi, 0, cam.shape[0] - 1), np.clip(xi, 0, cam.shape[1] - 1)
    values = cam[yc[:, None], xc[None, :]]
    mask = inside if coverage is None else inside & coverage[yc[:, None], xc[None, :]]
    vmax = cam_scale if cam_scale else float(cam.max(initial=0)) or 1.0
    values = values / vmax
    fig = new_figure(8, 8 * th / max(tw, 1) + 0.6)
    ax = fig.subplots()
    ax.imshow(thumbnail)
    im = ax.imshow(np.ma.masked_where(~mask, values), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label=label)
    return save_figure(fig, path)


def write_gradcam_overlay_from_store(path: str | Path, store: str | Path, thumbnail: np.ndarray,
                                     thumb_downsample: float, name: str = "gradcam",
                                     title: str = "Grad-CAM") -> Path:
    """``gradcam_overlay.png`` from a finished heatmap store: picks the finest pyramid level not
    finer than the thumbnail, then :func:`write_gradcam_overlay`."""
    root = open_heatmap(store)
    attrs = dict(root[name].attrs.get("histotile", {}))
    levels = len(root[name].attrs["multiscales"][0]["datasets"])
    res = float(attrs["cam_resolution_level0"])
    level = 0
    while level + 1 < levels and res * 2 ** (level + 1) <= thumb_downsample:
        level += 1
    cam, cover, _ = read_gradcam(store, level, name)
    origin = as_pair(root.attrs["histotile"].get("origin_level0", (0, 0)))
    return write_gradcam_overlay(path, thumbnail, cam, thumb_downsample=thumb_downsample,
                                 cam_pixel_level0=res * 2 ** level, origin_level0=origin,
                                 coverage=cover, cam_scale=float(attrs.get("cam_scale", 0)),
                                 title=title)


def write_cam_grid(path: str | Path, patches: np.ndarray, cams: np.ndarray, *,
                   class_names: Sequence[str], pred: np.ndarray, conf: np.ndarray,
                   true: np.ndarray | None = None, centre: int | None = None,
                   cols: int = 8, alpha: float = 0.45, title: str = "Grad-CAM") -> Path:
    """Grid of patches with their (min-max) CAM overlays, predicted class + confidence and the
    true class (green title when right, red when wrong); ``centre`` draws PCam's label box."""
    from matplotlib.patches import Rectangle

    n = len(patches)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(1.9 * cols, 2.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    p = patches.shape[1]
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(patches[k])
        im = ax.imshow(upsample_maps(cams[k:k + 1], p)[0], cmap="jet", alpha=alpha, vmin=0,
                       vmax=1, extent=(-0.5, p - 0.5, p - 0.5, -0.5))
        if centre:
            lo = (p - centre * p / 96) / 2 - 0.5 if p != 96 else (p - centre) / 2 - 0.5
            side = centre * p / 96
            ax.add_patch(Rectangle((lo, lo), side, side, fill=False, ec="white", lw=0.8, ls="--"))
        text = f"pred {_short(class_names[int(pred[k])])} {conf[k]:.2f}"
        colour = "black"
        if true is not None:
            text += f"\ntrue {_short(class_names[int(true[k])])}"
            colour = "tab:green" if int(true[k]) == int(pred[k]) else "tab:red"
        ax.set_title(text, fontsize=7, color=colour)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01,
                 label="Grad-CAM (per patch, min-max)")
    return save_figure(fig, path)


def _short(name: str, limit: int = 15) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def write_attention_grid(path: str | Path, patches: np.ndarray, maps: dict[str, np.ndarray], *,
                         class_names: Sequence[str], true: np.ndarray | None = None,
                         title: str = "ViT attention", alpha: float = 0.5) -> Path:
    """PNG: one row per patch — the patch, each head's CLS attention, the mean, the rollout
    (each min-max scaled per map, upsampled bilinearly, overlaid on the patch)."""
    n, p = len(patches), patches.shape[1]
    heads = maps["heads"]
    cols = [("patch", None)] + [(f"head {h + 1}", heads[:, h]) for h in range(heads.shape[1])]
    cols += [("head mean", maps["mean"]), ("rollout", maps["rollout"])]
    fig = new_figure(1.25 * len(cols), 1.35 * n + 0.5)
    pred = maps["probs"].argmax(1)
    for c, (name, m) in enumerate(cols):
        shown = None if m is None else minmax_np(upsample_maps(m, p))
        for r in range(n):
            ax = fig.add_subplot(n, len(cols), r * len(cols) + c + 1)
            ax.imshow(patches[r], interpolation="nearest")
            if shown is not None:
                ax.imshow(shown[r], cmap="jet", alpha=alpha, vmin=0, vmax=1,
                          interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                label = f"pred {class_names[int(pred[r])][:14]}"
                if true is not None:
                    label += f"\ntrue {class_names[int(true[r])][:14]}"
                ax.set_ylabel(label, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save_figure(fig, path)
