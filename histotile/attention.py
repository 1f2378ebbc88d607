"""ViT attention maps: the raw CLS row of the last block, and attention rollout.

* :func:`cls_attention` — ``softmax(QKᵀ/√d)`` of the last block, the CLS token's row without its
  own column, per head ``(B, heads, g, g)`` on the patch grid (``g`` = tokens per side).
* :func:`attention_rollout` — Abnar & Zuidema (2020): for every block the head-averaged
  attention plus the identity (residual), rows renormalised, multiplied from the first block to
  the last; the CLS row of the product, ``(B, g, g)``.
* :func:`attention` — the ``"attention"`` entry for :data:`histotile.explain.METHODS`
  (``(maps, probs)`` with the same call signature as Grad-CAM; head-averaged CLS row;
  ``"attention-rollout"`` is its rollout twin). Attention is class-agnostic: ``target`` and
  ``layer`` are accepted and ignored.
* :func:`write_attention_grid` — one row per patch: the patch, each head, the head mean and the
  rollout, overlaid on the patch.

The model must expose ``capture_attention(which)`` and ``attentions()`` (histotile's ``vit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import InvalidArgumentError, ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn


def _check_vit(model: Any) -> None:
    if not (hasattr(model, "capture_attention") and hasattr(model, "attentions")):
        raise ModelError("attention maps need a Vision Transformer (architecture 'vit')",
                         "use --method gradcam for convolutional models")


def forward_with_attention(model: nn.Module, x: torch.Tensor, which: str = "last"
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One eval-mode, no-grad forward keeping attention; returns (probs (B, C), maps list).

    Each map is ``(B, heads, 1 + N, 1 + N)`` float32, first block first. The model's train mode
    is restored and capture is switched off afterwards.
    """
    import torch

    _check_vit(model)
    was_training = model.training
    model.eval()
    model.capture_attention(which)
    try:
        with torch.no_grad():
            logits = model(x)
        maps = [a.float() for a in model.attentions()]
    finally:
        model.capture_attention(None)
        model.train(was_training)
    return torch.softmax(logits.float(), dim=1), maps


def _to_grid(row: torch.Tensor) -> torch.Tensor:
    """(..., N) patch-token values → (..., g, g)."""
    g = int(round(row.shape[-1] ** 0.5))
    if g * g != row.shape[-1]:
        raise ModelError(f"{row.shape[-1]} patch tokens do not form a square grid",
                         "attention maps need a square patch grid")
    return row.reshape(*row.shape[:-1], g, g)


def cls_attention(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw CLS-row attention of the last block per head: ((B, heads, g, g), probs (B, C))."""
    probs, maps = forward_with_attention(model, x, "last")
    return _to_grid(maps[-1][:, :, 0, 1:]), probs


def rollout(maps: Sequence[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout of per-block maps ``(B, heads, T, T)`` → CLS row ``(B, g, g)``.

    ``discard_ratio`` > 0 zeroes that share of the lowest head-averaged weights per block (the
    CLS column excepted) before adding the identity, as in common implementations; 0 = the
    paper's rollout.
    """
    import torch

    if not maps:
        raise ModelError("no attention maps to roll out", "run the ViT with capture 'all'")
    b, _, t, _ = maps[0].shape
    eye = torch.eye(t, device=maps[0].device, dtype=torch.float32)
    result = eye.expand(b, t, t).clone()
    for a in maps:
        fused = a.float().mean(dim=1)
        if discard_ratio > 0:
            flat = fused.reshape(b, -1)
            ranked = flat.clone()
            ranked[:, ::t] = float("inf")  # never discard attention to the CLS column
            k = int((t * t - t) * discard_ratio)
            if k:
                idx = ranked.topk(k, dim=1, largest=False).indices
                fused = flat.scatter(1, idx, 0.0).reshape(b, t, t)
        step = 0.5 * fused + 0.5 * eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step @ result
    return _to_grid(result[:, 0, 1:])


def attention_rollout(model: nn.Module, x: torch.Tensor, discard_ratio: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout over all blocks: ((B, g, g), probs (B, C))."""
    probs, maps = forward_with_attention(model, x, "all")
    return rollout(maps, discard_ratio), probs


def _finish(maps: torch.Tensor, x: torch.Tensor, normalise: str,
            size: int | tuple[int, int] | None) -> torch.Tensor:
    from histotile.explain import NORMALISATIONS, minmax, upsample_cams

    if normalise not in NORMALISATIONS:
        raise InvalidArgumentError(f"unknown map normalisation {normalise!r}",
                                   f"use one of {', '.join(NORMALISATIONS)}")
    if normalise == "minmax":
        maps = minmax(maps)
    if size != 0:
        maps = upsample_cams(maps, tuple(x.shape[-2:]) if size is None else size)
        maps = minmax(maps) if normalise == "minmax" else maps
    return maps.contiguous()


def attention(model: nn.Module, x: torch.Tensor, *, layer: Any = None, target: Any = None,
              normalise: str = "minmax", size: int | tuple[int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``METHODS["attention"]``: head-averaged raw CLS attention of the last block."""
    per_head, probs = cls_attention(model, x)
    return _finish(per_head.mean(dim=1), x, normalise, size), probs


def attention_rollout_method(model: nn.Module, x: torch.Tensor, *, layer: Any = None,
                             target: Any = None, normalise: str = "minmax",
                             size: int | tuple[int, int] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``METHODS["attention-rollout"]``: attention rollout over all blocks."""
    maps, probs = attention_rollout(model, x)
    return _finish(maps, x, normalise, size), probs


def all_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-head, head-mean and rollout maps on the patch grid (numpy float32), and probs."""
    probs, maps = forward_with_attention(model, x, "all")
    heads = _to_grid(maps[-1][:, :, 0, 1:])
    return {"heads": heads.cpu().numpy(), "mean": heads.mean(1).cpu().numpy(),
            "rollout": rollout(maps).cpu().numpy(), "probs": probs.cpu().numpy()}


def write_attention_grid(path: str | Path, patches: np.ndarray, maps: dict[str, np.ndarray], *,
                         class_names: Sequence[str], true: np.ndarray | None = None,
                         title: str = "ViT attention", alpha: float = 0.5) -> Path:
    """PNG: one row per patch — the patch, each head's CLS attention, the mean, the rollout
    (each min-max scaled per map, upsampled bilinearly, overlaid on the patch)."""
    from histotile.explain import _save_figure, minmax_np, upsample_cams

    n, p = len(patches), patches.shape[1]
    heads = maps["heads"]
    cols = [("patch", None)] + [(f"head {h + 1}", heads[:, h]) for h in range(heads.shape[1])]
    cols += [("head mean", maps["mean"]), ("rollout", maps["rollout"])]
    fig = _figure(1.25 * len(cols), 1.35 * n + 0.5)
    pred = maps["probs"].argmax(1)
    for c, (name, m) in enumerate(cols):
        shown = None if m is None else minmax_np(upsample_cams(m, p))
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
    return _save_figure(fig, Path(path))


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def explain_attention(model: str | Path | None, archive: str | Path, out_dir: str | Path, *,
                      n: int = 8, split: str = "test", device: str = "auto") -> dict[str, Any]:
    """Write ``attention_grid.png`` (heads, mean, rollout) for the first ``n`` patches of an
    archive (PCam HDF5, MedMNIST npz, Kaggle folder) with a ViT model; returns a summary."""
    import torch

    from histotile.explain import load_model_and_patches
    from histotile.models.preprocess import BatchPipeline

    loaded, patches, labels = load_model_and_patches(model, archive, n, split, device)
    card = loaded.card
    x = BatchPipeline(card, loaded.device)(torch.from_numpy(patches))
    maps = all_maps(loaded.module, x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_attention_grid(out / "attention_grid.png", patches, maps,
                                class_names=card.class_names, true=labels,
                                title=f"ViT attention · {card.name} (last block CLS row; rollout)")
    return {"grid": str(path), "n": len(patches), "heads": int(maps["heads"].shape[1]),
            "grid_size": int(maps["heads"].shape[-1])}


def register_methods() -> None:
    """Add ``attention`` and ``attention-rollout`` to :data:`histotile.explain.METHODS` (called
    when the ``vit`` architecture is registered)."""
    from histotile.explain import METHODS

    METHODS.setdefault("attention", attention)
    METHODS.setdefault("attention-rollout", attention_rollout_method)
