"""Grad-CAM on a batch, stitched into slide-level maps, and the PCam centre-region statistic.

* :class:`GradCAM` — one forward and one backward for a whole batch. Hooks on the target layer
  (the architecture's last conv block by default) keep its activations ``A`` (B, K, h, w); the
  backward pass is taken with respect to ``A`` only (``torch.autograd.grad``: no parameter
  ``.grad`` is touched and nothing before the layer is differentiated). Channel weights are the
  spatial means of the gradients, the map is ``ReLU(sum_k w_k A_k)`` (Selvaraju et al. 2017).
  Maps are identical to ``pytorch_grad_cam.GradCAM`` (tested on real patches) and faster
  (``bench/bench_gradcam.py``).
* Normalisation (``normalise=``): ``"minmax"`` gives each patch's map ``(m - min) / (max - min)``
  after bilinear upsampling, in [0, 1] — what the grad-cam package returns, good for looking at
  one patch; ``"none"`` keeps the raw ReLU'd map, whose scale is comparable between patches (for
  a global-average-pool head its pre-ReLU spatial mean is ``(logit - bias) / (h * w)``).
* :class:`CamStitcher` — slide-level maps are stitched from the **raw** maps (``"none"``), so a
  patch with more evidence for the class is brighter than one with little; overlapping patches
  are averaged (sum + count), a block is written once every patch touching it has arrived, and
  the stored uint8 value is ``round(clip(mean_raw / cam_scale, 0, 1) * 255)`` with ``cam_scale``
  recorded in the image's ``histotile`` attrs (given, or the slide's maximum: see the class).
* :func:`centre_mass` — share of CAM mass inside PCam's central 32 x 32 px label region.

Methods are looked up by name in :data:`METHODS` (``"gradcam"``; ``"attention"`` for ViTs is a
later addition with the same call signature).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError, ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

NORMALISATIONS = ("minmax", "none")
_EPS = 1e-7


# --------------------------------------------------------------------------- Grad-CAM
def resolve_layer(model: nn.Module, layer: str | nn.Module | None,
                  architecture: str | None = None) -> nn.Module:
    """The module to hook: a module, a dotted path (``"layer4"``), or the architecture's default."""
    from torch import nn

    if isinstance(layer, nn.Module):
        return layer
    if not layer:
        if architecture is None:
            raise InvalidArgumentError("no Grad-CAM layer given",
                                       "pass --cam-layer NAME (a module path such as layer4)")
        from histotile.models.architectures import default_cam_layer

        layer = default_cam_layer(architecture)
        if not layer:
            raise ModelError(f"architecture {architecture!r} names no default Grad-CAM layer",
                             "pass --cam-layer NAME (a module path of the model)")
    if _is_scripted(model):
        raise ModelError("Grad-CAM needs an eager PyTorch model, not TorchScript",
                         "use a model folder with safetensors weights")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and "." not in n]
        raise InvalidArgumentError(f"the model has no layer {layer!r}",
                                   f"top-level layers: {', '.join(names)}") from None


def _is_scripted(model: Any) -> bool:
    import torch

    return isinstance(model, torch.jit.ScriptModule)


def _targets(logits: torch.Tensor, target: str | int | Any) -> torch.Tensor:
    import torch

    b, c = logits.shape
    if isinstance(target, str):
        if target != "predicted":
            raise InvalidArgumentError(f"unknown CAM target {target!r}",
                                       "use 'predicted', a class index or a tensor of indices")
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device, dtype=torch.long).reshape(-1)
    t = t.expand(b) if t.numel() == 1 else t
    if t.numel() != b or bool(((t < 0) | (t >= c)).any()):
        raise InvalidArgumentError(f"CAM target {target!r} does not fit {b} patches x {c} classes",
                                   f"give one class index in 0..{c - 1} or one per patch")
    return t


class GradCAM:
    """Batched Grad-CAM of ``model`` at ``layer`` (a module or its dotted path).

    ``cams, probs = GradCAM(model, "layer4")(x, target="predicted")``. Hooks live only during
    a call; the model's train/eval mode and grad mode are restored; parameters get no ``.grad``.
    Works under CUDA autocast (maps are computed in float32).
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module) -> None:
        self.model = model
        self.layer = resolve_layer(model, layer)

    def __call__(self, x: torch.Tensor, target: str | int | Any = "predicted",
                 normalise: str = "minmax", size: int | tuple[int, int] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float (B, 3, H, W) as the model takes it → (cams float32 (B, h, w), probs (B, C)).

        ``size``: output map size; ``None`` = the input's (H, W), ``0`` = the layer's own grid.
        ``normalise``: ``"minmax"`` (per patch, in [0, 1]; min-max at the layer's grid, resize,
        min-max again, exactly as the grad-cam package) or ``"none"`` (raw ReLU'd map). Both
        tensors stay on ``x``'s device.
        """
        import torch

        if normalise not in NORMALISATIONS:
            raise InvalidArgumentError(f"unknown CAM normalisation {normalise!r}",
                                       f"use one of {', '.join(NORMALISATIONS)}")
        acts, logits = self._forward(x)
        with torch.inference_mode(False), torch.enable_grad():  # also under a caller's
            targets = _targets(logits, target)  # inference_mode (the predict engine)
            score = logits.float().gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
        with torch.no_grad():
            a = acts.detach().float()
            weights = grads.float().mean(dim=(2, 3))  # (B, K)
            cams = torch.relu(torch.einsum("bk,bkhw->bhw", weights, a))
            probs = torch.softmax(logits.detach().float(), dim=1)
            if normalise == "minmax":  # as grad-cam: scale, resize, scale again
                cams = minmax(cams)
            if size != 0:
                cams = upsample_cams(cams, tuple(x.shape[-2:]) if size is None else size)
                cams = minmax(cams) if normalise == "minmax" else cams
        return cams.contiguous(), probs

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model with grad switched on from the hooked layer onwards only."""
        import torch

        store: dict[str, torch.Tensor] = {}
        grad_mode = torch.is_grad_enabled()

        def hook(_module: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            torch.set_grad_enabled(True)
            leaf = out.detach().requires_grad_(True)
            store["acts"] = leaf
            return leaf.clone()  # a later in-place op must not touch the leaf

        was_training = self.model.training
        handle = self.layer.register_forward_hook(hook)
        try:
            self.model.eval()
            with torch.inference_mode(False), torch.no_grad():
                logits = self.model(x)
        finally:
            handle.remove()
            torch.set_grad_enabled(grad_mode)
            self.model.train(was_training)
        if "acts" not in store:
            raise ModelError("the Grad-CAM layer was not called in the forward pass",
                             "pick a layer the model runs (see --cam-layer)")
        acts = store["acts"]
        if acts.ndim != 4:
            raise ModelError(f"the Grad-CAM layer gives a {acts.ndim}-d output, not (B, K, h, w)",
                             "pick a convolutional layer")
        return acts, logits


def minmax(cams: torch.Tensor) -> torch.Tensor:
    """Per map ``(m - min) / (max - min + 1e-7)`` — the grad-cam package's scaling."""
    flat = cams.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (cams - lo) / (hi - lo + _EPS)


def upsample_cams(cams: Any, size: int | tuple[int, int]) -> Any:
    """Bilinear (half-pixel centres, as OpenCV's INTER_LINEAR) resize of (B, h, w) maps to
    ``size`` ((H, W) or an int); torch in → torch out, numpy in → numpy float32 out."""
    import torch
    import torch.nn.functional as F

    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))
    is_np = isinstance(cams, np.ndarray)
    t = torch.from_numpy(np.asarray(cams, np.float32)) if is_np else cams.float()
    if tuple(t.shape[-2:]) != hw:
        t = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
    return t.numpy() if is_np else t


def gradcam(model: nn.Module, x: torch.Tensor, *, layer: str | nn.Module,
            target: str | int | Any = "predicted", normalise: str = "minmax",
            size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of :class:`GradCAM` (the ``"gradcam"`` entry of :data:`METHODS`)."""
    return GradCAM(model, layer)(x, target=target, normalise=normalise, size=size)


# name -> callable(model, x, *, layer, target, normalise, size) -> (maps, probs)
METHODS: dict[str, Callable[..., tuple[Any, Any]]] = {"gradcam": gradcam}


def get_method(name: str) -> Callable[..., tuple[Any, Any]]:
    if name not in METHODS:  # other methods (ViT attention) register when their module loads
        from histotile.models.architectures import load_plugins

        load_plugins()
    if name not in METHODS:
        raise InvalidArgumentError(f"unknown explanation method {name!r}",
                                   f"choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --------------------------------------------------------------------------- statistics
def centre_mass(cams: Any, centre: int = 32, patch: int = 96) -> np.ndarray:
    """(B,) share of each map's mass inside the central ``centre`` x ``centre`` px of a
    ``patch`` px patch (PCam's label region); maps of any size are mapped onto the patch, with
    fractional edge pixels weighted by their overlap. NaN for an all-zero map."""
    m = np.asarray(cams.detach().cpu() if hasattr(cams, "detach") else cams, np.float64)
    if m.ndim == 2:
        m = m[None]
    wy = _overlap_weights(m.shape[1], centre, patch)
    wx = _overlap_weights(m.shape[2], centre, patch)
    inside = np.einsum("bhw,h,w->b", m, wy, wx)
    total = m.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def _overlap_weights(n: int, centre: int, patch: int) -> np.ndarray:
    scale = n / patch
    lo, hi = (patch - centre) / 2 * scale, (patch + centre) / 2 * scale
    edges = np.arange(n + 1, dtype=np.float64)
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, 1)


# --------------------------------------------------------------------------- stitching
def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return float(value[0]), float(value[1])
    return float(value), float(value)


class CamStitcher:
    """Accumulate per-patch raw CAMs into the slide's heatmap store as image ``name``.

    ``heatmap`` is a :class:`histotile.stitch.HeatmapWriter`; ``indices`` (N, 2) (col, row) are
    all grid patches that will arrive. A grid cell is ``block = round(stride_level0 /
    cam_resolution)`` CAM pixels, so one pixel covers ``stride_level0 / block`` level-0 px (the
    effective resolution, recorded), and a patch footprint ``round(patch_size_level0 /
    resolution)`` pixels from its cell's top-left (cut at the image edge). :meth:`add` takes raw
    maps at any size (resized to the footprint); overlapping footprints are averaged, and a block
    is final once every patch touching it has arrived.

    ``cam_scale``: raw value stored as 255. Given → blocks go straight into the store. ``None``
    (default) → final blocks wait in a float32 memory-mapped scratch file (bounded RAM) and are
    written on :meth:`close` scaled by the slide's maximum, so the brightest pixel is 255.
    Call :meth:`close` before the heatmap writer's ``close()`` (which builds the pyramids).
    """

    def __init__(self, heatmap: Any, indices: np.ndarray, *, stride_level0: Any,
                 patch_size_level0: Any, cam_resolution: float, class_name: str = "gradcam",
                 name: str = "gradcam", cam_scale: float | None = None,
                 color: Sequence[int] = (255, 80, 0), chunk: int = 256,
                 attrs: dict[str, Any] | None = None) -> None:
        self.indices = np.asarray(indices, np.int64).reshape(-1, 2)
        stride, stride_y = _pair(stride_level0)
        if abs(stride - stride_y) > 1e-6 or cam_resolution <= 0:
            raise InvalidArgumentError("Grad-CAM stitching needs equal x/y strides and a "
                                       f"positive --cam-resolution (got {cam_resolution})",
                                       "use a square grid and e.g. --cam-resolution 8")
        self.block = max(1, round(stride / cam_resolution))
        self.resolution = stride / self.block  # the effective level-0 px per CAM pixel
        self.foot = max(1, round(_pair(patch_size_level0)[0] / self.resolution))
        self.reach = math.ceil(self.foot / self.block)  # blocks per footprint side
        self.cols, self.rows = heatmap.image.width, heatmap.image.height
        self.expected = self._touch_counts(self.indices)
        self.cam_scale = cam_scale
        self.name = name
        self.max_value = 0.0
        self._open: dict[tuple[int, int], list[Any]] = {}  # block -> [sum, count, arrived]
        self.peak_open_blocks = 0
        self.writer = heatmap.add_image(
            name, block=self.block, stride_level0=self.resolution, channel_names=[class_name],
            channel_colors=[tuple(color)], expected=np.array(list(self.expected), np.int64),
            chunk=chunk)
        self._attrs = {"cam_resolution_level0": self.resolution,
                       "cam_resolution_asked": float(cam_resolution),
                       "patch_footprint_px": self.foot,
                       "normalisation": "raw Grad-CAM (ReLU, not per-patch normalised); stored "
                                        "round(clip(mean_raw / cam_scale, 0, 1) * 255)",
                       "overlap": "mean of overlapping patches", **(attrs or {})}
        self._scratch: Path | None = None
        self._mm: np.ndarray | None = None
        self._done: np.ndarray | None = None
        self.closed = False

    @classmethod
    def from_grid(cls, heatmap: Any, grid: Any, cam_resolution: float, **kwargs: Any
                  ) -> CamStitcher:
        """For a :class:`histotile.grid.PatchGrid` (its indices, stride and patch size)."""
        return cls(heatmap, grid.indices, stride_level0=grid.stride_level0,
                   patch_size_level0=grid.patch_size_level0, cam_resolution=cam_resolution,
                   **kwargs)

    def _touch_counts(self, idx: np.ndarray) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for dc in range(self.reach):
            for dr in range(self.reach):
                c, r = idx[:, 0] + dc, idx[:, 1] + dr
                keep = (c < self.cols) & (r < self.rows)
                for key in zip(c[keep].tolist(), r[keep].tolist(), strict=True):
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def add(self, indices: np.ndarray, cams: Any) -> None:
        """``indices`` (n, 2) (col, row) of the grid; ``cams`` (n, h, w) raw maps (any size)."""
        idx = np.asarray(indices, np.int64).reshape(-1, 2)
        maps = upsample_cams(_to_numpy(cams), self.foot)
        b, span = self.block, self.reach * self.block
        ready: list[tuple[int, int]] = []
        for (col, row), m in zip(idx.tolist(), maps, strict=True):
            pad = np.zeros((span, span), np.float32)
            pad[:self.foot, :self.foot] = m
            cover = np.zeros((span, span), np.float32)
            cover[:self.foot, :self.foot] = 1
            for dr in range(self.reach):
                for dc in range(self.reach):
                    key = (col + dc, row + dr)
                    if key not in self.expected:
                        continue
                    entry = self._open.setdefault(
                        key, [np.zeros((b, b), np.float32), np.zeros((b, b), np.float32), 0])
                    ys, xs = slice(dr * b, (dr + 1) * b), slice(dc * b, (dc + 1) * b)
                    entry[0] += pad[ys, xs]
                    entry[1] += cover[ys, xs]
                    entry[2] += 1
                    if entry[2] >= self.expected[key]:
                        ready.append(key)
        self.peak_open_blocks = max(self.peak_open_blocks, len(self._open))
        if ready:
            self._emit(ready)

    def _emit(self, keys: list[tuple[int, int]]) -> None:
        means = []
        for key in keys:
            s, n, _ = self._open.pop(key)
            means.append(np.where(n > 0, s / np.maximum(n, 1), 0).astype(np.float32))
        vals = np.stack(means)
        self.max_value = max(self.max_value, float(vals.max(initial=0)))
        idx = np.array(keys, np.int64)
        if self.cam_scale is not None:
            self.writer.write(idx, self._scaled(vals, self.cam_scale))
            return
        mm = self._scratch_map()
        b = self.block
        for (col, row), v in zip(keys, vals, strict=True):
            mm[row * b:(row + 1) * b, col * b:(col + 1) * b] = v
        self._done[idx[:, 1], idx[:, 0]] = True

    def _scratch_map(self) -> np.ndarray:
        if self._mm is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="histotile-cam-"))
            shape = (self.rows * self.block, self.cols * self.block)
            self._mm = np.lib.format.open_memmap(self._scratch / "cam.npy", mode="w+",
                                                 dtype=np.float32, shape=shape)
            self._done = np.zeros((self.rows, self.cols), bool)
        return self._mm

    @staticmethod
    def _scaled(vals: np.ndarray, scale: float) -> np.ndarray:
        out = np.clip(vals / scale, 0, 1) if scale > 0 else np.zeros_like(vals)
        return np.rint(out * 255).astype(np.uint8)[:, None]

    def close(self) -> None:
        """Emit blocks still open (patches that never came), write scratch blocks, record attrs."""
        if self.closed:
            return
        if self._open:
            self._emit(list(self._open))
        if self.cam_scale is None:
            self.cam_scale = self.max_value if self.max_value > 0 else 1.0
            self._attrs["cam_scale_source"] = "slide maximum"
            if self._mm is not None:
                self._write_scratch()
        else:
            self._attrs.setdefault("cam_scale_source", "given")
        self._attrs.update({"cam_scale": float(self.cam_scale), "raw_max": self.max_value})
        self.writer.group.attrs.update({"histotile": {
            **dict(self.writer.group.attrs.get("histotile", {})), **self._attrs}})
        self.closed = True

    def _write_scratch(self) -> None:
        """Copy the scratch map into the store, one band of block rows at a time."""
        b, mm = self.block, self._mm
        band = max(1, self.writer.chunk // b)
        try:
            for r0 in range(0, self.rows, band):
                rows, cols = np.nonzero(self._done[r0:r0 + band])
                if not len(rows):
                    continue
                strip = np.asarray(mm[r0 * b:(r0 + band) * b])
                rows_l = rows.tolist()
                vals = np.stack([strip[r * b:(r + 1) * b, c * b:(c + 1) * b]
                                 for r, c in zip(rows_l, cols.tolist(), strict=True)])
                idx = np.stack([cols, rows + r0], axis=1)
                self.writer.write(idx, self._scaled(vals, self.cam_scale))
        finally:
            self._mm = None
            shutil.rmtree(self._scratch, ignore_errors=True)


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, np.float32)


def read_gradcam(path: str | Path, level: int = 0, name: str = "gradcam"
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(raw-scale map float32 (rows, cols), coverage bool, attrs) of a stitched CAM image."""
    from histotile.stitch import open_heatmap

    group = open_heatmap(path)[name]
    attrs = dict(group.attrs.get("histotile", {}))
    scale = float(attrs.get("cam_scale", 1.0))
    values = np.asarray(group[str(level)][0], np.float32) / 255 * scale
    cover = np.asarray(group["labels/coverage"][str(level)][0]) > 0
    return values, cover, attrs


# --------------------------------------------------------------------------- pictures
def _save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(8, 8 * th / max(tw, 1) + 0.6))
    ax.imshow(thumbnail)
    im = ax.imshow(np.ma.masked_where(~mask, values), cmap=cmap, alpha=alpha, vmin=0, vmax=1,
                   interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.035, pad=0.02, label=label)
    return _save_figure(fig, Path(path))


def write_gradcam_overlay_from_store(path: str | Path, store: str | Path, thumbnail: np.ndarray,
                                     thumb_downsample: float, name: str = "gradcam",
                                     title: str = "Grad-CAM") -> Path:
    """``gradcam_overlay.png`` from a finished heatmap store: picks the finest pyramid level not
    finer than the thumbnail, then :func:`write_gradcam_overlay`."""
    from histotile.stitch import open_heatmap

    root = open_heatmap(store)
    attrs = dict(root[name].attrs.get("histotile", {}))
    levels = len(root[name].attrs["multiscales"][0]["datasets"])
    res = float(attrs["cam_resolution_level0"])
    level = 0
    while level + 1 < levels and res * 2 ** (level + 1) <= thumb_downsample:
        level += 1
    cam, cover, _ = read_gradcam(store, level, name)
    origin = _pair(root.attrs["histotile"].get("origin_level0", (0, 0)))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(patches)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows + 0.4), squeeze=False)
    p = patches.shape[1]
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(patches[k])
        im = ax.imshow(upsample_cams(cams[k:k + 1], p)[0], cmap="jet", alpha=alpha, vmin=0,
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
    return _save_figure(fig, Path(path))


def _short(name: str, limit: int = 15) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


# --------------------------------------------------------------------------- explain()
def explain(model: str | Path | None, archive: str | Path, out_dir: str | Path, *, n: int = 32,
            method: str = "gradcam", cam_class: str = "predicted", cam_layer: str | None = None,
            split: str = "test", batch_size: int = 64, device: str = "auto",
            centre: int = 32) -> dict[str, Any]:
    """Explain the first ``n`` patches of ``archive`` (PCam HDF5, MedMNIST npz or a Kaggle
    folder): writes ``<method>_grid.png`` (``gradcam_grid.png``, ``attention_grid.png``) and,
    for 96 px models, ``centre_region.json``.
    Returns the report dict (also the JSON's content when written)."""
    import torch

    from histotile.models.preprocess import BatchPipeline

    loaded, patches, labels = load_model_and_patches(model, archive, n, split, device)
    card = loaded.card
    target = _cam_target(cam_class, card.class_names)
    fn = get_method(method)
    layer = resolve_layer(loaded.module, cam_layer, card.architecture.name)
    pipe = BatchPipeline(card, loaded.device)
    cams_l, probs_l = [], []
    for s in range(0, len(patches), batch_size):
        x = pipe(torch.from_numpy(patches[s:s + batch_size]))
        cams, probs = fn(loaded.module, x, layer=layer, target=target, normalise="none", size=0)
        cams_l.append(_to_numpy(cams))
        probs_l.append(_to_numpy(probs))
    raw, probs = np.concatenate(cams_l), np.concatenate(probs_l)
    shown = minmax_np(upsample_cams(raw, card.patch_size))
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
        from histotile.train.report import write_json

        report["files"]["centre_region"] = str(out / "centre_region.json")
        write_json(out / "centre_region.json", report)
    return report


def minmax_np(cams: np.ndarray) -> np.ndarray:
    lo = cams.min(axis=(1, 2), keepdims=True)
    hi = cams.max(axis=(1, 2), keepdims=True)
    return ((cams - lo) / (hi - lo + _EPS)).astype(np.float32)


def _layer_name(model: Any, layer: Any) -> str:
    return next((name for name, m in model.named_modules() if m is layer), "?")


def _cam_target(cam_class: str, names: Sequence[str]) -> str | int:
    if cam_class == "predicted":
        return "predicted"
    if cam_class in names:
        return list(names).index(cam_class)
    if cam_class.isdigit() and int(cam_class) < len(names):
        return int(cam_class)
    raise InvalidArgumentError(f"unknown class {cam_class!r}",
                               f"use predicted or one of: {', '.join(names)}")


def _report(card: Any, archive: Any, method: str, cam_class: str, layer: str, probs: np.ndarray,
            labels: np.ndarray | None, raw: np.ndarray, centre: int, pcam_like: bool
            ) -> dict[str, Any]:
    pred = probs.argmax(1)
    rows = []
    share = centre_mass(upsample_cams(raw, card.patch_size), centre, card.patch_size) \
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
    from histotile.models.loading import load_model

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
    from histotile.archives import open_archive

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
    import csv

    from histotile.train.datasets import FilePatches

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
