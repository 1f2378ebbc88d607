"""Stain normalisation (Macenko 2009) and stain jitter, batched in torch on any device.

Images are batches ``(B, 3, H, W)`` (channels first) or ``(B, H, W, 3)`` (channels last); a
single image ``(3, H, W)`` / ``(H, W, 3)`` is accepted too. The layout is auto-detected from the
axis of size 3 (``channels_last=None``); pass ``channels_last=True/False`` when both could be 3.
Inputs may be torch tensors or numpy arrays, uint8 (0-255) or float; floats are read on the
0-``value_range`` scale (255 by default; use ``value_range=1.0`` for 0-1 floats). Output has the
input's type, dtype, layout and device.

Two modes:

* per slide: ``fit = norm.fit(sample_patches)`` pools the pixels of a sample of tissue patches, then
  ``norm.normalize(patches, fit)`` applies one 3x3 matrix per pixel (fast, consistent);
* per patch: ``norm.normalize(patches)`` fits every patch of the batch at once (batched ``eigh`` of
  the 3x3 OD covariances, masked per-image angle percentiles through ``topk``; no Python loop).

Patches with fewer than ``min_tissue_fraction`` of their pixels above the OD threshold ``beta``, or
whose fit is degenerate (one colour, collinear stains), pass through unchanged in per-patch mode; no
image content (blank, black, white, flat colour) gives NaN/Inf or an exception. NaN pixels in float
input are not cleaned. ``stain_jitter`` augments in Ruifrok HED space (not Macenko space).

Deliberate differences from torchstain (verified to agree within 1 grey level on average,
``tests/test_stain.py``):

* uint8 output is rounded (torchstain truncates with ``.int()``/``astype``) and clamped to 0-255;
* eigenvector signs are fixed (principal axis pointing to positive OD) so angles never wrap around;
* degenerate patches pass through instead of raising (torchstain: ``kthvalue(): Expected reduction
  dim 0 to have non-zero size``); output keeps the input's dtype and layout (torchstain: int32 HWC).

Percentiles are "nearest rank" as in torchstain's torch backend (``1 + round(q (n - 1))``-th value).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histotile.errors import (
    InputNotFoundError,
    InvalidArgumentError,
    NoTissueError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DEFAULT_HE",
    "DEFAULT_MAX_C",
    "MacenkoNormalizer",
    "StainFit",
    "StainReference",
    "make_normalizer",
    "stain_jitter",
]

#: The standard Macenko H&E reference (torchstain, TIAToolbox, HEnorm_python): columns H, E.
DEFAULT_HE = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_C = (1.9705, 1.0308)

#: Ruifrok & Johnston H, E, DAB optical densities (rows), as in ``skimage.color.rgb_from_hed``.
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


# --------------------------------------------------------------------------- references / fits
@dataclass(frozen=True)
class StainReference:
    """Target stains: ``stain_matrix`` (3, 2) RGB OD of H and E, ``max_concentrations`` (2,)."""

    stain_matrix: tuple[tuple[float, float], ...] = DEFAULT_HE
    max_concentrations: tuple[float, float] = DEFAULT_MAX_C
    source: str = "macenko-default"

    def __post_init__(self) -> None:
        matrix = tuple(tuple(float(v) for v in row) for row in self.stain_matrix)
        maxc = tuple(float(v) for v in self.max_concentrations)
        if len(matrix) != 3 or any(len(row) != 2 for row in matrix) or len(maxc) != 2:
            raise InvalidArgumentError(
                "stain reference must have a 3x2 stain_matrix and 2 max_concentrations",
                "give stain_matrix [[r_H, r_E], [g_H, g_E], [b_H, b_E]] and [maxC_H, maxC_E]",
            )
        values = [v for row in matrix for v in row] + list(maxc)
        if not all(v == v and abs(v) != float("inf") for v in values) or min(maxc) <= 0:
            raise InvalidArgumentError(
                "stain reference has non-finite values or non-positive max concentrations",
                "refit the reference on an image with tissue",
            )
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", maxc)

    @classmethod
    def default(cls) -> StainReference:
        """The standard Macenko reference used by torchstain and TIAToolbox."""
        return cls()

    @classmethod
    def from_image(cls, rgb: Any, **normalizer_kwargs: Any) -> StainReference:
        """Fit a reference on one RGB image (array/tensor, HWC or CHW) or an image file path."""
        if isinstance(rgb, (str, Path)):
            source = Path(rgb).name
            rgb = load_rgb(rgb)
        else:
            source = "image"
        fit = MacenkoNormalizer(**normalizer_kwargs).fit(rgb)
        return fit.to_reference(source=source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists), the ``stain.reference`` of a model card."""
        return {
            "stain_matrix": [list(row) for row in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainReference:
        """Inverse of :meth:`to_dict` (``source`` optional)."""
        try:
            return cls(
                stain_matrix=tuple(tuple(row) for row in data["stain_matrix"]),
                max_concentrations=tuple(data["max_concentrations"]),
                source=str(data.get("source", "dict")),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(
                f"invalid stain reference: {exc}",
                "expected {'stain_matrix': 3x2 list, 'max_concentrations': 2 numbers}",
            ) from exc

    def tensors(self, device: Any = None, dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stain_matrix (3, 2), max_concentrations (2,))`` as tensors."""
        import torch

        dtype = dtype or torch.float32
        return (
            torch.tensor(self.stain_matrix, dtype=dtype, device=device),
            torch.tensor(self.max_concentrations, dtype=dtype, device=device),
        )


@dataclass
class StainFit:
    """A Macenko fit: ``stain_matrix`` (3, 2) H and E OD vectors, ``max_concentrations`` (2,)."""

    stain_matrix: torch.Tensor
    max_concentrations: torch.Tensor
    n_pixels: int = 0  # stained pixels the fit used

    def to_reference(self, source: str = "fit") -> StainReference:
        """The fit as a (JSON-serialisable) reference, e.g. to store in a model card."""
        return StainReference(
            stain_matrix=tuple(tuple(row) for row in self.stain_matrix.double().cpu().tolist()),
            max_concentrations=tuple(self.max_concentrations.double().cpu().tolist()),
            source=source,
        )


# --------------------------------------------------------------------------- input handling
@dataclass
class _Batch:
    """Images as optical density ``log(Io) - log(I + 1)`` ``(B, 3, N)``, plus what restores them."""

    od: torch.Tensor  # (B, 3, N) contiguous, -log((I + 1) / Io) of 0-255 pixels, compute dtype
    original: torch.Tensor  # the input as a torch tensor (shared memory with numpy input)
    is_numpy: bool
    channels_last: bool
    squeeze: bool  # a single image was given
    shape: tuple[int, ...]  # (B, 3, H, W) or (B, H, W, 3)
    scale: float  # 255 / value_range for floats, 1 for uint8


def _as_batch(images: Any, channels_last: bool | None, value_range: float, io: float) -> _Batch:
    import numpy as np
    import torch

    is_numpy = isinstance(images, np.ndarray)
    if is_numpy:
        array = np.ascontiguousarray(images)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    elif isinstance(images, torch.Tensor):
        tensor = images
    else:
        raise InvalidArgumentError(
            f"images must be a torch tensor or numpy array, not {type(images).__name__}",
            "convert PIL images with numpy.asarray(img.convert('RGB'))",
        )
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise InvalidArgumentError(
            f"unsupported image dtype {tensor.dtype}", "use uint8 (0-255) or float images"
        )
    squeeze = tensor.ndim == 3
    batch = tensor.unsqueeze(0) if squeeze else tensor
    if batch.ndim != 4:
        raise InvalidArgumentError(
            f"images must have shape (B, 3, H, W) or (B, H, W, 3), got {tuple(tensor.shape)}",
            "stack patches into one batch",
        )
    last = _channels_last(batch.shape, channels_last)
    b = batch.shape[0]
    cdtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    scale = 1.0 if tensor.dtype == torch.uint8 else 255.0 / float(value_range)
    cols = batch.reshape(b, -1, 3).transpose(1, 2) if last else batch.reshape(b, 3, -1)
    if tensor.dtype == torch.uint8:  # a 256-entry table, gathered with the layout change
        index = torch.empty(cols.shape, dtype=torch.int32, device=tensor.device)
        index.copy_(cols)
        table = torch.arange(256, dtype=cdtype, device=tensor.device).log1p_().neg_()
        od = table.add_(math.log(io)).index_select(0, index.view(-1)).view(cols.shape)
    else:
        od = torch.empty(cols.shape, dtype=cdtype, device=tensor.device)
        od.copy_(cols)
        if scale != 1.0:
            od.mul_(scale)
        od.clamp_(min=0).log1p_().neg_().add_(math.log(io))
    return _Batch(od, tensor, is_numpy, last, squeeze, tuple(batch.shape), scale)


def _channels_last(shape: Any, channels_last: bool | None) -> bool:
    if channels_last is not None:
        if shape[3 if channels_last else 1] != 3:
            raise InvalidArgumentError(
                f"images of shape {tuple(shape)} have no 3-channel axis where expected",
                "pass RGB images (drop alpha) or fix channels_last",
            )
        return channels_last
    first, last = shape[1] == 3, shape[3] == 3
    if first and last:
        raise InvalidArgumentError(
            f"cannot tell the channel axis of shape {tuple(shape)}",
            "pass channels_last=True or False",
        )
    if not (first or last):
        raise InvalidArgumentError(
            f"images of shape {tuple(shape)} have no axis of 3 channels",
            "pass RGB images (B,3,H,W) or (B,H,W,3); drop any alpha channel",
        )
    return last


def _reconstruct(batch: _Batch, matrix: torch.Tensor, scale: Any) -> torch.Tensor:
    """``scale * exp(-matrix @ OD)`` per pixel: matrix (B, 3, 3) -> (B, 3, N)."""
    import torch

    return torch.bmm(matrix.neg(), batch.od).exp_().mul_(scale)


def _restore(batch: _Batch, out: torch.Tensor, keep: torch.Tensor | None = None) -> Any:
    """(B, 3, N) 0-255 values back to the input's dtype, layout and type (rounded for uint8).

    ``keep`` (B,) bool marks patches returned unchanged.
    """
    import torch

    original = batch.original
    out = out.clamp_(0, 255)
    if original.dtype == torch.uint8:
        out = out.add_(0.5)  # the cast below truncates: round half up
    elif batch.scale != 1.0:
        out = out.div_(batch.scale)
    b = batch.shape[0]
    dest = torch.empty(batch.shape, dtype=original.dtype, device=original.device)
    if batch.channels_last:
        dest.view(b, -1, 3).copy_(out.transpose(1, 2))
    else:
        dest.view(b, 3, -1).copy_(out)
    if keep is not None and bool(keep.any()):
        source = original.unsqueeze(0) if batch.squeeze else original
        dest = torch.where(keep.view(b, 1, 1, 1), source, dest)
    if batch.squeeze:
        dest = dest[0]
    return dest.numpy() if batch.is_numpy else dest


# --------------------------------------------------------------------------- batched math
def _rank_values(values: torch.Tensor, invalid: torch.Tensor | None, q: float) -> torch.Tensor:
    """Per-row nearest-rank ``q``-percentile (0-100) of the valid values; (R, N) -> (R,).

    The ``1 + round(q/100 (n-1))``-th smallest valid value (torchstain's ``percentile``), found with
    ``topk`` from the nearer tail, so ragged valid counts need no loop and no full sort.
    ``invalid`` (R, N) bool or ``None`` (all valid). Rows with no valid value give 0.
    """
    import torch

    size = values.shape[1]
    if invalid is None:
        n = torch.full((values.shape[0],), size, device=values.device)
    else:
        n = size - invalid.sum(dim=1)
    rank = torch.round((q / 100.0) * (n - 1).clamp(min=0).to(values.dtype)).long()
    low = q <= 50
    pos = rank if low else (n - 1 - rank).clamp(min=0)
    if invalid is not None:
        values = values.masked_fill(invalid, float("inf") if low else float("-inf"))
    k = min(int(pos.max().item()) + 1, size)
    top = torch.topk(values, k, dim=1, largest=not low, sorted=True).values
    out = top.gather(1, pos.clamp(max=k - 1).unsqueeze(1)).squeeze(1)
    return torch.where(n > 0, out, torch.zeros_like(out))


def _fit_batched(
    od: torch.Tensor, tissue: torch.Tensor, use: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Macenko fit of every row at once.

    od (B, 3, N); tissue (B, N) pixels above the OD threshold; use (B, N) pixels that count for
    the max concentrations (``None``: all). Returns stain matrices (B, 3, 2), max concentrations
    (B, 2), ok (B,) bool.
    """
    import torch

    w = tissue.to(od.dtype).unsqueeze(1)  # (B, 1, N)
    n = w.sum(dim=2, keepdim=True)  # (B, 1, 1)
    mean = (od * w).sum(dim=2, keepdim=True) / n.clamp(min=1)  # (B, 3, 1)
    centred = od - mean
    cov = (centred * w) @ centred.transpose(1, 2) / (n - 1).clamp(min=1)
    del centred
    finite = torch.isfinite(cov).all(dim=2).all(dim=1)
    eye = torch.eye(3, dtype=od.dtype, device=od.device).expand_as(cov)
    cov = torch.where(finite.view(-1, 1, 1), cov, eye)
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[:, :, 1:3]  # (B, 3, 2): second and first principal axes
    # fix signs (axes along positive OD) so the angles never wrap around +-pi
    plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(od.dtype)
    proj = plane.transpose(1, 2) @ od  # (B, 2, N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    del proj
    not_tissue = ~tissue
    lo = _rank_values(phi, not_tissue, alpha)
    hi = _rank_values(phi, not_tissue, 100.0 - alpha)
    del phi
    v_min = (plane @ torch.stack((lo.cos(), lo.sin()), dim=1).unsqueeze(2)).squeeze(2)
    v_max = (plane @ torch.stack((hi.cos(), hi.sin()), dim=1).unsqueeze(2)).squeeze(2)
    h_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(1)
    he = torch.stack(
        (torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)), dim=2
    )  # (B, 3, 2)
    conc = torch.linalg.pinv(he) @ od  # (B, 2, N)
    b = od.shape[0]
    unused = None if use is None else (~use).repeat_interleave(2, dim=0)
    max_c = _rank_values(conc.view(2 * b, -1), unused, 99.0).view(b, 2)
    ok = finite & torch.isfinite(he).all(dim=2).all(dim=1) & torch.isfinite(max_c).all(dim=1)
    ok &= (max_c > 1e-6).all(dim=1)
    # collinear H and E (single colour): the unmixing is meaningless
    ok &= torch.linalg.cross(he[:, :, 0], he[:, :, 1], dim=1).norm(dim=1) > 1e-6
    return he, max_c, ok


# --------------------------------------------------------------------------- normaliser
class MacenkoNormalizer:
    """Batched Macenko stain normaliser (see the module docstring for layouts and modes).

    ``Io`` transmitted light, ``alpha`` angle percentile, ``beta`` OD threshold of tissue pixels,
    ``reference`` the target stains (default: the standard Macenko reference),
    ``min_tissue_fraction`` below which a patch passes through unchanged (per-patch mode),
    ``channels_last`` ``None`` to auto-detect, ``value_range`` scale of float inputs (255 or 1).
    """

    def __init__(
        self,
        Io: float = 240,  # the name used in the literature and torchstain
        alpha: float = 1.0,
        beta: float = 0.15,
        reference: StainReference | None = None,
        *,
        min_tissue_fraction: float = 0.01,
        channels_last: bool | None = None,
        value_range: float = 255.0,
    ) -> None:
        if not 0 <= alpha < 50 or Io <= 0 or beta < 0 or value_range <= 0:
            raise InvalidArgumentError(
                f"invalid Macenko parameters Io={Io} alpha={alpha} beta={beta}",
                "use Io > 0, 0 <= alpha < 50, beta >= 0 (defaults 240, 1, 0.15)",
            )
        self.Io = float(Io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.reference = reference or StainReference.default()
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.channels_last = channels_last
        self.value_range = float(value_range)

    def __repr__(self) -> str:
        return (
            f"MacenkoNormalizer(Io={self.Io:g}, alpha={self.alpha:g}, beta={self.beta:g}, "
            f"reference={self.reference.source!r})"
        )

    def _tissue(self, od: torch.Tensor) -> torch.Tensor:
        """(B, N) pixels with OD >= beta in every channel."""
        return (od >= self.beta).all(dim=1)

    def fit(self, images: Any, mask: Any = None) -> StainFit:
        """Fit once on all pixels of the batch pooled (per-slide mode).

        ``mask`` (B, H, W) bool (or (H, W) for one image) limits the pixels used. Raises
        :class:`NoTissueError` when too few pixels are above the OD threshold.
        """
        import torch

        if len(images) == 0:  # e.g. every sampled patch was unreadable (a damaged slide)
            raise NoTissueError("no patches to fit the stains on",
                                "the sample held no readable patch")
        batch = _as_batch(images, self.channels_last, self.value_range, self.Io)
        od = batch.od  # (B, 3, N)
        pooled = od.transpose(0, 1).reshape(1, 3, -1)
        use = None
        n_use = pooled.shape[2]
        if mask is not None:
            m = torch.as_tensor(mask, device=od.device).to(torch.bool)
            if m.numel() != pooled.shape[2]:
                raise InvalidArgumentError(
                    f"mask has {m.numel()} pixels, images {pooled.shape[2]}",
                    "give a (B, H, W) boolean mask matching the images",
                )
            use = m.reshape(1, -1)
            n_use = int(use.sum().item())
        tissue = self._tissue(pooled)
        if use is not None:
            tissue &= use
        n_tissue = int(tissue.sum().item())
        if n_tissue < max(3.0, self.min_tissue_fraction * n_use):
            raise NoTissueError(
                f"only {n_tissue} stained pixels to fit the stains on",
                "fit on tissue patches, or lower beta",
            )
        he, max_c, ok = _fit_batched(pooled, tissue, use, self.alpha)
        if not bool(ok[0]):
            raise NoTissueError(
                "the stains could not be separated (one colour only?)",
                "fit on patches that show both haematoxylin and eosin",
            )
        return StainFit(he[0], max_c[0], n_pixels=n_tissue)

    def normalize(self, images: Any, fit: StainFit | None = None) -> Any:
        """Normalise to the reference: with ``fit`` (per slide) or fitting each patch (``None``)."""
        import torch

        batch = _as_batch(images, self.channels_last, self.value_range, self.Io)
        dtype, device = batch.od.dtype, batch.od.device
        ref_he, ref_max = self.reference.tensors(device, dtype)
        keep = None
        if fit is not None:
            he = fit.stain_matrix.to(device, dtype).unsqueeze(0)
            max_c = fit.max_concentrations.to(device, dtype).unsqueeze(0)
        else:
            tissue = self._tissue(batch.od)
            he, max_c, ok = _fit_batched(batch.od, tissue, None, self.alpha)
            enough = tissue.sum(dim=1) >= max(3.0, self.min_tissue_fraction * tissue.shape[1])
            keep = ~(ok & enough)
        # out = Io exp(-M OD) with M = HE_ref diag(maxC_ref / maxC) pinv(HE), one 3x3 per image
        scale = ref_max / max_c.clamp(min=1e-6)
        matrix = (ref_he * scale.unsqueeze(1)) @ torch.linalg.pinv(he)  # (B, 3, 3)
        if keep is not None:
            eye = torch.eye(3, dtype=dtype, device=device)
            matrix = torch.where(keep.view(-1, 1, 1), eye, matrix)
        matrix = matrix.expand(batch.od.shape[0], 3, 3).contiguous()
        out = _reconstruct(batch, matrix, self.Io)
        return _restore(batch, out, keep)

    __call__ = normalize


# --------------------------------------------------------------------------- convenience
def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 array (alpha dropped)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(
            "stain target image not found", "check the --stain-target path", subject=str(path)
        )
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedFormatError(
            f"cannot read image: {exc}", "use a PNG/JPEG/TIFF RGB image", subject=str(path)
        ) from exc


def make_normalizer(
    method: str = "none",
    target_image: str | Path | None = None,
    reference: dict[str, Any] | str | None = None,
    **kwargs: Any,
) -> MacenkoNormalizer | None:
    """The normaliser behind ``--stain-norm`` / ``--stain-target``; ``None`` for method ``none``.

    Reference precedence: ``target_image`` (fitted on it), then ``reference`` (a model card's
    ``stain.reference`` dict or its JSON text), then the built-in default.
    """
    method = (method or "none").lower()
    if method == "none":
        return None
    if method != "macenko":
        raise InvalidArgumentError(
            f"unknown stain normalisation {method!r}", "use --stain-norm none or macenko"
        )
    if target_image is not None:
        ref = StainReference.from_image(target_image, **_fit_kwargs(kwargs))
    elif reference is not None:
        data = json.loads(reference) if isinstance(reference, str) else reference
        ref = StainReference.from_dict(data)
    else:
        ref = StainReference.default()
    return MacenkoNormalizer(reference=ref, **kwargs)


def _fit_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("Io", "alpha", "beta") if k in kwargs}


def stain_jitter(
    images: Any,
    sigma: float = 0.05,
    bias: float | None = None,
    generator: torch.Generator | None = None,
    *,
    channels_last: bool | None = None,
    value_range: float = 255.0,
) -> Any:
    """HED stain augmentation (Tellez et al. 2018), batched: per image and stain,
    ``C' = C * U(1 - sigma, 1 + sigma) + U(-bias, bias)`` in Ruifrok H, E, DAB OD space.

    ``bias`` defaults to ``sigma``; ``sigma=0, bias=0`` returns the input (up to rounding).
    Same input conventions and output type as :meth:`MacenkoNormalizer.normalize`.
    """
    import torch

    bias = sigma if bias is None else bias
    batch = _as_batch(images, channels_last, value_range, 256.0)
    od = batch.od  # log(256) - log(I + 1): stays finite at I = 0
    n_img = od.shape[0]
    # stains C = A^-1 OD with A = rgb_from_hed^T; jittered OD' = A (C s + t) = M OD + A t
    # with M = A diag(s) A^-1, so out = 256 exp(-A t) exp(-M OD) - 1
    a = torch.tensor(_RGB_FROM_HED, dtype=od.dtype, device=od.device).T
    gen_device = generator.device if generator is not None else od.device
    u = torch.rand((2, n_img, 3), generator=generator, device=gen_device, dtype=od.dtype)
    u = u.to(od.device)
    scale = 1.0 + sigma * (2 * u[0] - 1)  # (B, 3)
    shift = bias * (2 * u[1] - 1)
    matrix = (a * scale.unsqueeze(1)) @ torch.linalg.inv(a)  # (B, 3, 3)
    factor = 256.0 * torch.exp(-(shift @ a.T)).unsqueeze(2)  # (B, 3, 1)
    out = _reconstruct(batch, matrix, factor).sub_(1.0)
    return _restore(batch, out)
