"""ViT attention maps: the raw CLS row of the last block, and attention rollout.

* :func:`cls_attention` — ``softmax(QKᵀ/√d)`` of the last block, the CLS token's row without its
  own column, per head ``(B, heads, g, g)`` on the patch grid (``g`` = tokens per side).
* :func:`attention_rollout` — Abnar & Zuidema (2020): for every block the head-averaged
  attention plus the identity (residual), rows renormalised, multiplied from the first block to
  the last; the CLS row of the product, ``(B, g, g)``.
* :func:`attention` — the ``"attention"`` entry of :data:`histotile.explain.METHODS`
  (``(maps, probs)`` with the same call signature as Grad-CAM; head-averaged CLS row;
  ``"attention-rollout"`` is its rollout twin). Attention is class-agnostic: ``target`` and
  ``layer`` are accepted and ignored.
* :func:`all_maps` — per-head, head-mean and rollout maps for
  :func:`histotile.export.figures.write_attention_grid`.

The model must expose ``capture_attention(which)`` and ``attentions()`` (histotile's ``vit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.errors import ModelError
from histotile.gradcam import finish_maps

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
    vit: Any = model  # histotile's ViT: capture_attention() and attentions()
    was_training = model.training
    model.eval()
    vit.capture_attention(which)
    try:
        with torch.no_grad():
            logits = model(x)
        maps = [a.float() for a in vit.attentions()]
    finally:
        vit.capture_attention(None)
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


def attention(model: nn.Module, x: torch.Tensor, *, layer: Any = None, target: Any = None,
              normalise: str = "minmax", size: int | tuple[int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``METHODS["attention"]``: head-averaged raw CLS attention of the last block."""
    per_head, probs = cls_attention(model, x)
    return finish_maps(per_head.mean(dim=1), x, normalise, size), probs


def attention_rollout_method(model: nn.Module, x: torch.Tensor, *, layer: Any = None,
                             target: Any = None, normalise: str = "minmax",
                             size: int | tuple[int, int] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``METHODS["attention-rollout"]``: attention rollout over all blocks."""
    maps, probs = attention_rollout(model, x)
    return finish_maps(maps, x, normalise, size), probs


def all_maps(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-head, head-mean and rollout maps on the patch grid (numpy float32), and probs."""
    probs, maps = forward_with_attention(model, x, "all")
    heads = _to_grid(maps[-1][:, :, 0, 1:])
    return {"heads": heads.cpu().numpy(), "mean": heads.mean(1).cpu().numpy(),
            "rollout": rollout(maps).cpu().numpy(), "probs": probs.cpu().numpy()}
