"""Grad-CAM on a batch, and the PCam centre-region statistic.

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
  :func:`finish_maps` applies the same rule to any method's maps (attention too).
* :func:`centre_mass` — share of CAM mass inside PCam's central 32 x 32 px label region.

Slide-level stitching is :class:`histotile.stitch.CamStitcher`; pictures are in
:mod:`histotile.export.figures`; methods are chosen by name in :data:`histotile.explain.METHODS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError, ModelError
from histotile.models.architectures import default_cam_layer
from histotile.resample import upsample_maps

if TYPE_CHECKING:
    import torch
    from torch import nn

NORMALISATIONS = ("minmax", "none")
_EPS = 1e-7


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


def class_targets(logits: torch.Tensor, target: str | int | Any) -> torch.Tensor:
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

        check_normalisation(normalise)
        acts, logits = self._forward(x)
        with torch.inference_mode(False), torch.enable_grad():  # also under a caller's
            targets = class_targets(logits, target)  # inference_mode (the predict engine)
            score = logits.float().gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
        with torch.no_grad():
            a = acts.detach().float()
            weights = grads.float().mean(dim=(2, 3))  # (B, K)
            cams = torch.relu(torch.einsum("bk,bkhw->bhw", weights, a))
            probs = torch.softmax(logits.detach().float(), dim=1)
        return finish_maps(cams, x, normalise, size), probs

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


def check_normalisation(normalise: str) -> None:
    if normalise not in NORMALISATIONS:
        raise InvalidArgumentError(f"unknown map normalisation {normalise!r}",
                                   f"use one of {', '.join(NORMALISATIONS)}")


def finish_maps(maps: torch.Tensor, x: torch.Tensor, normalise: str,
                size: int | tuple[int, int] | None) -> torch.Tensor:
    """(B, h, w) maps at the layer's grid → normalised and resized as asked: ``size`` ``None``
    = the input's (H, W), ``0`` = unchanged; ``"minmax"`` scales, resizes and scales again,
    exactly as the grad-cam package."""
    import torch

    check_normalisation(normalise)
    with torch.no_grad():
        if normalise == "minmax":
            maps = minmax(maps)
        if size != 0:
            maps = upsample_maps(maps, (int(x.shape[-2]), int(x.shape[-1])) if size is None
                                 else size)
            maps = minmax(maps) if normalise == "minmax" else maps
    return maps.contiguous()


def gradcam(model: nn.Module, x: torch.Tensor, *, layer: str | nn.Module,
            target: str | int | Any = "predicted", normalise: str = "minmax",
            size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form of :class:`GradCAM` (``histotile.explain.METHODS["gradcam"]``)."""
    return GradCAM(model, layer)(x, target=target, normalise=normalise, size=size)


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


def cam_target(cam_class: str, names: Sequence[str]) -> str | int:
    """``"predicted"``, a class name or a class index as Grad-CAM's ``target``."""
    if cam_class == "predicted":
        return "predicted"
    if cam_class in names:
        return list(names).index(cam_class)
    if cam_class.isdigit() and int(cam_class) < len(names):
        return int(cam_class)
    raise InvalidArgumentError(f"unknown class {cam_class!r}",
                               f"use predicted or one of: {', '.join(names)}")
