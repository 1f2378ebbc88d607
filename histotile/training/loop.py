"""The training side of the model-input pipeline: augmentation, loaders, probabilities, stats.

The model's own preprocessing (stain step when ``stain.in_training``, input normalisation) is
:class:`histotile.models.preprocess.BatchPipeline`; training injects :func:`augment_batch`
(random flips, 90° rotations and a light HED stain jitter, Tellez et al. 2018, σ = 0.05) into it.
:func:`predict_probs` runs a module over a patch set; :func:`channel_stats` gives the card's input
mean/std. Training itself is :mod:`histotile.training.api` (entry), :mod:`histotile.training.fit`
(epochs, checkpoints) and :mod:`histotile.training.card`; evaluation is
:mod:`histotile.training.evaluation`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from histotile.models.preprocess import BatchPipeline

if TYPE_CHECKING:
    import torch
    from torch import nn

    from histotile.models.card import ModelCard
    from histotile.training.datasets import PatchSet

log = logging.getLogger(__name__)
STAIN_JITTER_SIGMA = 0.05


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

    dataset: Any = ps  # a map-style dataset (len, getitem); torch's type is not a Protocol
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
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
    with torch.inference_mode(), autocast(pipeline.device):
        for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            out.append(torch.softmax(module(pipeline(x)).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, pipeline.card.num_classes), np.float32)


def autocast(device: torch.device) -> Any:
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


