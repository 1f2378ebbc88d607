"""histotile.stain: Macenko against torchstain on real H&E images, properties, degenerate input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
import torchstain
from helpers import HE_REFERENCE, HE_SOURCE, HE_TARGET, ROOT, real_data
from PIL import Image

from histotile.errors import InputNotFoundError, InvalidArgumentError, NoTissueError
from histotile.stain import (
    DEFAULT_HE,
    DEFAULT_MAX_C,
    MacenkoNormalizer,
    StainFit,
    StainReference,
    make_normalizer,
    stain_jitter,
)

TISSUE_TILES = helpers.TISSUE_TILES[:3]
BLANK_TILES = helpers.BLANK_TILES  # [2] has no stained pixel at all


def rgb(relpath: str) -> np.ndarray:
    """A real image as (H, W, 3) uint8 (alpha dropped)."""
    with Image.open(real_data(relpath)) as img:
        return np.array(img.convert("RGB"))


def tiles96(image: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 96 px tiles of an image with >= 50 % stained pixels, (n, 96, 96, 3)."""
    h, w = image.shape[:2]
    out = []
    for y in range(0, h - 95, 96):
        for x in range(0, w - 95, 96):
            t = image[y : y + 96, x : x + 96]
            od = -np.log((t.reshape(-1, 3) + 1.0) / 240)
            if (od >= 0.15).all(axis=1).mean() >= 0.5:
                out.append(t)
    assert len(out) >= n
    return np.stack(out[:n])


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference per channel of two (..., 3) images."""
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(-1, 3).mean(axis=0)


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return rgb(HE_SOURCE)


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Three real tissue tiles, top-left 256 px, (3, 256, 256, 3) uint8."""
    return np.stack([rgb(p)[:256, :256] for p in TISSUE_TILES])


# ----------------------------------------------------------------------------- vs torchstain
@pytest.mark.parametrize("target", [HE_TARGET, HE_REFERENCE])
def test_matches_torchstain(source: np.ndarray, target: str) -> None:
    tgt = rgb(target)
    ts_torch = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_torch.fit(torch.from_numpy(tgt).permute(2, 0, 1))
    expected_torch, _, _ = ts_torch.normalize(
        torch.from_numpy(source).permute(2, 0, 1), stains=False
    )
    ts_numpy = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts_numpy.fit(tgt)
    expected_numpy, _, _ = ts_numpy.normalize(source, stains=False)

    reference = StainReference.from_image(tgt)
    np.testing.assert_allclose(reference.stain_matrix, ts_torch.HERef.numpy(), atol=0.01)
    np.testing.assert_allclose(reference.max_concentrations, ts_torch.maxCRef.numpy(), rtol=0.01)
    out = MacenkoNormalizer(reference=reference).normalize(source)  # per patch (fitted here)
    assert out.dtype == np.uint8 and out.shape == source.shape
    assert (mean_abs_diff(out, expected_torch.numpy()) <= 1.0).all()
    assert (mean_abs_diff(out, expected_numpy) <= 1.0).all()


def test_matches_torchstain_per_tile_default_reference(tissue: np.ndarray) -> None:
    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")  # default reference
    out = MacenkoNormalizer().normalize(torch.from_numpy(tissue))
    for tile, got in zip(tissue, out, strict=True):
        expected, _, _ = ts.normalize(torch.from_numpy(tile).permute(2, 0, 1), stains=False)
        assert (mean_abs_diff(got.numpy(), expected.numpy()) <= 1.0).all()


def test_torchstain_crashes_where_histotile_passes_through() -> None:
    blank = rgb(BLANK_TILES[2])
    with pytest.raises((RuntimeError, IndexError)):  # the bug this module works around
        torchstain.normalizers.MacenkoNormalizer(backend="torch").normalize(
            torch.from_numpy(blank).permute(2, 0, 1), stains=False
        )
    assert np.array_equal(MacenkoNormalizer().normalize(blank), blank)


# ----------------------------------------------------------------------------- properties
def test_reference_image_to_itself_is_near_identity() -> None:
    target = rgb(HE_REFERENCE)
    norm = MacenkoNormalizer(reference=StainReference.from_image(target))
    out = norm.normalize(target)
    stained = (-np.log((target.reshape(-1, 3) + 1.0) / 240) >= 0.15).all(axis=1)
    diff = np.abs(out.reshape(-1, 3).astype(float) - target.reshape(-1, 3))[stained]
    # Macenko projects OD onto the H-E plane: the residual off that plane is what remains
    assert diff.mean() < 3.0
    assert np.median(diff) <= 2.0
    # the per-slide path with the image's own fit gives the same result
    fit = norm.fit(target)
    assert np.abs(norm.normalize(target, fit).astype(int) - out).max() <= 1


def test_batch_equals_per_image_and_modes(tissue: np.ndarray) -> None:
    norm = MacenkoNormalizer()
    batch = norm.normalize(tissue)
    for i, tile in enumerate(tissue):
        single = norm.normalize(tile)
        assert np.abs(single.astype(int) - batch[i]).max() <= 1
        assert (single != batch[i]).mean() < 1e-3
    fit = norm.fit(tissue)
    assert isinstance(fit, StainFit) and fit.n_pixels > 0
    slide_batch = norm.normalize(tissue, fit)
    for i, tile in enumerate(tissue):
        assert np.abs(norm.normalize(tile, fit).astype(int) - slide_batch[i]).max() <= 1


def test_torch_numpy_layouts_and_dtypes_agree(tissue: np.ndarray) -> None:
    norm = MacenkoNormalizer()
    ref = norm.normalize(tissue)  # numpy uint8 NHWC
    nchw = torch.from_numpy(tissue).permute(0, 3, 1, 2).contiguous()
    out = norm.normalize(nchw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == nchw.shape
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), ref)
    assert np.array_equal(norm.normalize(torch.from_numpy(tissue)).numpy(), ref)
    for dtype in (torch.float32, torch.float64):
        f = norm.normalize(nchw.to(dtype))
        assert f.dtype == dtype and f.shape == nchw.shape
        assert 0 <= float(f.min()) and float(f.max()) <= 255
        diff = np.abs(f.permute(0, 2, 3, 1).numpy() - ref)  # rounding, float64 fit
        assert diff.max() <= 1.0 and diff.mean() < 0.3
    unit = MacenkoNormalizer(value_range=1.0).normalize(tissue.astype(np.float32) / 255)
    assert unit.dtype == np.float32 and unit.shape == tissue.shape
    assert 0 <= unit.min() and unit.max() <= 1
    assert np.abs(unit * 255 - ref).max() <= 0.5 + 1e-3
    # a channels-first numpy batch, and the explicit layout flag
    explicit = MacenkoNormalizer(channels_last=False).normalize(nchw.numpy())
    assert explicit.shape == nchw.shape and np.array_equal(explicit.transpose(0, 2, 3, 1), ref)


def test_layout_errors() -> None:
    norm = MacenkoNormalizer()
    with pytest.raises(InvalidArgumentError):
        norm.normalize(np.zeros((2, 3, 8, 3), np.uint8))  # ambiguous (edge case, generated)
    with pytest.raises(InvalidArgumentError):
        norm.normalize(np.zeros((2, 8, 8, 4), np.uint8))  # RGBA
    with pytest.raises(InvalidArgumentError):
        norm.normalize(np.zeros((2, 8, 8, 3), np.int32))
    out = MacenkoNormalizer(channels_last=True).normalize(np.zeros((2, 3, 8, 3), np.uint8))
    assert out.shape == (2, 3, 8, 3)


# ----------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("relpath", BLANK_TILES)
def test_blank_tiles_pass_through_per_patch(relpath: str) -> None:
    blank = rgb(relpath)
    out = MacenkoNormalizer().normalize(blank)
    assert np.array_equal(out, blank)
    as_float = MacenkoNormalizer().normalize(torch.from_numpy(blank).float())
    assert torch.isfinite(as_float).all() and torch.equal(as_float, torch.from_numpy(blank).float())


def test_mixed_batch_tissue_and_blank(tissue: np.ndarray) -> None:
    blanks = np.stack([rgb(p)[:256, :256] for p in BLANK_TILES])
    # generated edge cases: one flat colour (pink), pure black, pure white
    flat = np.broadcast_to(np.array([200, 120, 180], np.uint8), tissue.shape[1:])
    black = np.zeros_like(tissue[0])
    white = np.full_like(tissue[0], 255)
    batch = np.concatenate([tissue[:1], blanks, flat[None], black[None], white[None], tissue[1:]])
    norm = MacenkoNormalizer()
    out = norm.normalize(batch)
    assert out.dtype == np.uint8
    for i in range(1, len(batch) - 2):
        assert np.array_equal(out[i], batch[i]), f"patch {i} changed"
    assert np.array_equal(out[0], norm.normalize(tissue[0]))
    assert np.array_equal(out[-1], norm.normalize(tissue[-1]))
    floats = norm.normalize(torch.from_numpy(batch).float())
    assert torch.isfinite(floats).all()
    # per-slide mode: the slide fit applied to blank patches stays finite and in range
    fit = norm.fit(tissue)
    slide = norm.normalize(torch.from_numpy(batch).float(), fit)
    assert torch.isfinite(slide).all() and slide.min() >= 0 and slide.max() <= 255


def test_fit_on_blank_raises_and_mask() -> None:
    norm = MacenkoNormalizer()
    with pytest.raises(NoTissueError):
        norm.fit(np.stack([rgb(p) for p in BLANK_TILES]))
    with pytest.raises(NoTissueError):  # generated: one flat colour has no two stains
        norm.fit(np.full((1, 32, 32, 3), (200, 120, 180), np.uint8))
    image = rgb(HE_TARGET)
    od = -np.log((image + 1.0) / 240)
    mask = (od >= 0.15).all(axis=-1)
    masked = norm.fit(image, mask=mask)
    full = norm.fit(image)
    np.testing.assert_allclose(masked.stain_matrix.numpy(), full.stain_matrix.numpy(), atol=1e-3)
    # max concentrations over stained pixels only are larger than over all pixels
    assert (masked.max_concentrations >= full.max_concentrations).all()
    with pytest.raises(InvalidArgumentError):
        norm.fit(image, mask=mask[:10])


# ----------------------------------------------------------------------------- references
def test_reference_default_dict_roundtrip_and_schema() -> None:
    import jsonschema

    ref = StainReference.default()
    assert ref.stain_matrix == DEFAULT_HE and ref.max_concentrations == DEFAULT_MAX_C
    fitted = StainReference.from_image(real_data(HE_REFERENCE))
    data = json.loads(json.dumps(fitted.to_dict()))
    assert StainReference.from_dict(data) == fitted
    assert data["source"] == Path(HE_REFERENCE).name
    schema = json.loads((ROOT / "histotile/models/model_card.schema.json").read_text())
    stain_schema = schema["properties"]["stain"]
    jsonschema.validate({"method": "macenko", "reference": data}, stain_schema)
    with pytest.raises(InvalidArgumentError):
        StainReference.from_dict({"stain_matrix": [[1, 2]], "max_concentrations": [1, 1]})
    with pytest.raises(InvalidArgumentError):
        StainReference.from_dict({"stain_matrix": DEFAULT_HE})


def test_make_normalizer(tmp_path: Path) -> None:
    assert make_normalizer("none") is None
    assert make_normalizer("macenko").reference == StainReference.default()
    target = real_data(HE_TARGET)
    from_target = make_normalizer("macenko", target_image=target)
    assert from_target.reference.source == target.name
    card_ref = from_target.reference.to_dict()
    assert make_normalizer("macenko", reference=card_ref).reference == from_target.reference
    assert (
        make_normalizer("macenko", reference=json.dumps(card_ref)).reference.source == target.name
    )
    with pytest.raises(InvalidArgumentError):
        make_normalizer("reinhard")
    with pytest.raises(InputNotFoundError):
        make_normalizer("macenko", target_image=tmp_path / "missing.png")
    with pytest.raises(NoTissueError):
        make_normalizer("macenko", target_image=real_data(BLANK_TILES[0]))


# ----------------------------------------------------------------------------- jitter
def test_stain_jitter(tissue: np.ndarray) -> None:
    x = torch.from_numpy(tissue).permute(0, 3, 1, 2).contiguous()
    same = stain_jitter(x, sigma=0.0, bias=0.0)
    assert same.dtype == torch.uint8 and same.shape == x.shape
    assert (same.int() - x.int()).abs().max() <= 1
    a = stain_jitter(x, sigma=0.1, generator=torch.Generator().manual_seed(0))
    b = stain_jitter(x, sigma=0.1, generator=torch.Generator().manual_seed(0))
    c = stain_jitter(x, sigma=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.float() - x.float()).abs().mean() > 1  # it does change colours
    blank = np.stack([rgb(p) for p in BLANK_TILES]).astype(np.float32)
    out = stain_jitter(blank, sigma=0.5)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 255


# ----------------------------------------------------------------------------- devices, bench
@pytest.mark.gpu
def test_cuda_matches_cpu(tissue: np.ndarray) -> None:
    norm = MacenkoNormalizer()
    cpu = norm.normalize(torch.from_numpy(tissue))
    gpu = norm.normalize(torch.from_numpy(tissue).cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu().int() - cpu.int()).abs().max() <= 1


@pytest.mark.slow  # a torch + torchstain subprocess: ~10-20 s
def test_bench_script_quick() -> None:
    """bench_stain.py finds its images where the tests do (tests/data first): it used to look in
    ../shared/data only and exit on a fresh clone."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_stain.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"from {Path(HE_REFERENCE).name}," in result.stdout.splitlines()[0]
    assert "histotile per slide (batched apply)" in result.stdout
    assert "torchstain torch, per patch" in result.stdout
