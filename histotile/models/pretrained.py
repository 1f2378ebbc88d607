"""ImageNet weights for torchvision architectures (``histotile train ... --pretrained imagenet``).

Weights come from torchvision's own URLs (``<Weights enum>.url``) through
:func:`histotile.download.download`: cached under ``cache_dir("weights", "imagenet")``, resumed
from a ``.part`` file, verified, and a one-line :class:`~histotile.errors.DownloadError` when
offline. torchvision names each file ``<name>-<first 8 hex digits of its sha256>.pth``; the
full sha256 in :data:`IMAGENET_WEIGHTS` is the one several independent public projects record for
these exact files (each agrees with torchvision's prefix; the files themselves could not be
downloaded where this table was written), and every download is checked against both.
The file is read with ``torch.load(weights_only=True)`` (or safetensors) only.

Tensors whose name and shape match the model are copied; the rest (the classifier for another
number of classes, the 3×3 small-input stem of a 28 px ResNet, the CBAM modules) keep their fresh
initialisation and are listed in the returned report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotile.download import cache_dir, download, file_digest
from histotile.errors import ChecksumError, InvalidArgumentError, ModelError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
BASE_URL_ENV = "HISTOTILE_WEIGHTS_URL"  # mirror: replaces https://download.pytorch.org/models


@dataclass(frozen=True)
class WeightsFile:
    enum: str  # torchvision weights enum member
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def prefix(self) -> str:
        """The sha256 prefix torchvision embeds in the file name (``name-<prefix>.pth``)."""
        return self.filename.rsplit("-", 1)[-1].split(".")[0]


_TV = "https://download.pytorch.org/models/"
# architecture -> ImageNet-1k weights (torchvision 0.29 URLs; sha256 as recorded publicly)
IMAGENET_WEIGHTS: dict[str, WeightsFile] = {
    "resnet18": WeightsFile(
        "ResNet18_Weights.IMAGENET1K_V1", _TV + "resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    "resnet50": WeightsFile(
        "ResNet50_Weights.IMAGENET1K_V2", _TV + "resnet50-11ad3fa6.pth",
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
    "resnet50-attention": WeightsFile(
        "ResNet50_Weights.IMAGENET1K_V2", _TV + "resnet50-11ad3fa6.pth",
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
    "efficientnet-b0": WeightsFile(
        "EfficientNet_B0_Weights.IMAGENET1K_V1", _TV + "efficientnet_b0_rwightman-7f5810bc.pth",
        "7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934"),
}
SOURCES = ("imagenet",)


def weights_for(arch: str) -> WeightsFile:
    if arch not in IMAGENET_WEIGHTS:
        raise InvalidArgumentError(f"no ImageNet weights for architecture {arch!r}",
                                   f"--pretrained imagenet works with: "
                                   f"{', '.join(sorted(IMAGENET_WEIGHTS))}")
    return IMAGENET_WEIGHTS[arch]


def weights_url(entry: WeightsFile) -> str:
    """The download URL (``HISTOTILE_WEIGHTS_URL`` replaces torchvision's base for a mirror)."""
    base = os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def fetch_weights(arch: str, *, cache: str | Path | None = None,
                  progress: bool = True) -> Path:
    """Download (or find in the cache) the ImageNet weights of ``arch``; verified."""
    entry = weights_for(arch)
    folder = Path(cache) if cache is not None else cache_dir("weights", "imagenet")
    dest = download(weights_url(entry), folder / entry.filename, sha256=entry.sha256,
                    progress=progress)
    digest = file_digest(dest)
    if not digest.startswith(entry.prefix):  # belt and braces: torchvision's own check
        dest.unlink(missing_ok=True)
        raise ChecksumError(f"sha256 {digest[:12]}… does not start with torchvision's "
                            f"{entry.prefix}", "delete the file and download it again",
                            subject=str(dest))
    return dest


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """A state dict from safetensors or ``torch.load(weights_only=True)`` (no pickled code)."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad weights file
        raise ModelError(f"cannot read weights ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})",
                         "the file is corrupt or not a state dict; delete it and download again",
                         subject=str(path)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError("the weights file holds no state dict", "use a torchvision .pth file",
                         subject=str(path))
    return state


def apply_state_dict(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Copy every tensor whose name and shape match; returns {loaded, skipped, missing} lists."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise ModelError("no tensor of the pretrained weights fits this model",
                         "these weights belong to another architecture")
    model.load_state_dict(matched, strict=False)
    return {"loaded": sorted(matched),
            "skipped": sorted(k for k in state if k not in matched),
            "missing": sorted(k for k in own if k not in matched)}


def load_pretrained(model: nn.Module, arch: str, source: str = "imagenet", *,
                    cache: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Initialise ``model`` (built by ``build_model(arch, ...)``) from ``source`` weights.

    Returns a report: ``file``, ``sha256``, ``url``, ``loaded``/``skipped``/``missing`` tensor
    counts and the names not loaded (for the model card's ``training.pretrained``).
    """
    if source not in SOURCES:
        raise InvalidArgumentError(f"unknown pretrained weights {source!r}",
                                   f"use one of: {', '.join(SOURCES)}")
    entry = weights_for(arch)
    path = fetch_weights(arch, cache=cache, progress=progress)
    result = apply_state_dict(model, read_state_dict(path))
    log.info("ImageNet weights %s: %d tensors loaded, %d kept fresh", path.name,
             len(result["loaded"]), len(result["missing"]))
    return {"source": source, "weights": entry.enum, "url": weights_url(entry),
            "file": path.name, "sha256": entry.sha256, "loaded": len(result["loaded"]),
            "skipped": result["skipped"], "missing": result["missing"]}
