"""A small Vision Transformer for pathology patches (``--arch vit``).

Sized for PathMNIST (28 px) and PCam (96 px): a convolutional patch embedding (``patch`` px
patches: 4 px at ≤ 32 px inputs, 8 px up to 128 px, else 16 px), a learned CLS token and
position embedding, ``depth`` pre-norm blocks (multi-head self-attention + GELU MLP), a final
LayerNorm and a linear head on the CLS token (Dosovitskiy et al. 2021).

Attention maps: set ``model.capture_attention("last" | "all" | None)`` and every forward keeps the
softmaxed attention ``(B, heads, 1 + N, 1 + N)`` of the chosen blocks in ``block.attn.attention``
(detached, on the input's device). Without capture the blocks use PyTorch's fused
``scaled_dot_product_attention``. :mod:`histotile.attention` turns these into CLS-row maps and
attention rollout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def default_patch(patch_size: int) -> int:
    """Patch side in px for an input of ``patch_size`` px (4 → 7×7 tokens at 28 px)."""
    if patch_size <= 32:
        return 4
    return 8 if patch_size <= 128 else 16


def _classes() -> dict[str, type]:
    """Define the modules lazily (torch is imported only when a ViT is built)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        """Multi-head self-attention; keeps ``softmax(QKᵀ/√d)`` in ``.attention`` on request."""

        def __init__(self, dim: int, heads: int, attn_drop: float = 0.0) -> None:
            super().__init__()
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}")
            self.heads, self.head_dim = heads, dim // heads
            self.scale = self.head_dim ** -0.5
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.attn_drop = attn_drop
            self.keep = False
            self.attention: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, d = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, n, head_dim)
            drop = self.attn_drop if self.training else 0.0
            if self.keep:
                attn = torch.softmax((q @ k.transpose(-2, -1)).float() * self.scale, dim=-1)
                self.attention = attn.detach()
                out = F.dropout(attn, drop, self.training).to(v.dtype) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
            return self.proj(out.transpose(1, 2).reshape(b, n, d))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
            super().__init__()
            hidden = int(dim * mlp_ratio)
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads, dropout)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, dim), nn.Dropout(dropout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class VisionTransformer(nn.Module):
        """``forward(x (B,3,H,W)) -> logits (B, num_classes)``; ``.grid`` = tokens per side."""

        def __init__(self, num_classes: int, image_size: int, patch: int, dim: int, depth: int,
                     heads: int, mlp_ratio: float, dropout: float) -> None:
            super().__init__()
            if image_size % patch:
                raise ValueError(f"input {image_size} px is not a multiple of patch {patch} px")
            self.patch, self.grid = patch, image_size // patch
            self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
            self.pos_drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout)
                                        for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.apply(_init_weights)

        def capture_attention(self, which: str | None = "last") -> None:
            """Keep attention maps on the next forwards: ``"last"`` block, ``"all"``, or None."""
            if which not in ("last", "all", None):
                raise ValueError(f"capture_attention: use 'last', 'all' or None, not {which!r}")
            for i, blk in enumerate(self.blocks):
                attn: Any = blk.attn
                attn.keep = which == "all" or (which == "last" and i == len(self.blocks) - 1)
                attn.attention = None

        def attentions(self) -> list[torch.Tensor]:
            """The kept maps, first block first (only blocks that captured one)."""
            maps: list[Any] = [getattr(b.attn, "attention", None) for b in self.blocks]
            return [m for m in maps if m is not None]

        def tokens(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.tokens(x)[:, 0])

    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    return {"VisionTransformer": VisionTransformer, "Attention": Attention}


_CACHE: dict[str, type] = {}


def vit_classes() -> dict[str, type]:
    if not _CACHE:
        _CACHE.update(_classes())
    return _CACHE


def vit(num_classes: int, patch_size: int, patch: int | None = None, dim: int = 128,
        depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
        dropout: float = 0.1) -> nn.Module:
    """Small ViT: ~0.8 M parameters at the defaults (dim 128, depth 6, 4 heads, MLP ×2).

    ``patch`` defaults to :func:`default_patch` (4 px at 28 px → 7×7 tokens; 8 px at 96 px →
    12×12). The Grad-CAM default layer is the final LayerNorm (tokens, not a conv map): use
    ``--method attention`` for ViT explanations.
    """
    cls = vit_classes()["VisionTransformer"]
    return cls(num_classes, patch_size, patch or default_patch(patch_size), dim, depth, heads,
               mlp_ratio, dropout)
